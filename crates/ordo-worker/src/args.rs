//! The worker's flags ([`WorkerArgs`], to flatten into a service's own clap
//! config) and the `--operations` filter.

use std::{collections::BTreeSet, fmt, net::SocketAddr, str::FromStr, sync::OnceLock};

use ordo_registry::Pin;
use ordo_runtime::{
    app::{CommonArgs, ServiceConfig},
    discovery::DiscoveryArgs,
};
use result_sink::StoreResults;

/// Flags of every Ordo worker. Flatten them into your own config
/// (`#[command(flatten)] worker: WorkerArgs`) to add flags of your own.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "WORKER_LISTEN", default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "WORKER_METRICS_LISTEN", default_value = "0.0.0.0:9093", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    /// Reassembler replicas (comma-separated `host:port`, or
    /// `dns://name:port`: every A/AAAA record of the name, re-resolved every
    /// --dns-refresh); results are spread over the healthy ones and
    /// redelivered elsewhere if one dies.
    #[arg(long, env = "ORDO_REASSEMBLERS", default_value = "127.0.0.1:50054", value_delimiter = ',')]
    pub reassemblers: Vec<String>,
    /// Where results go: `reassembler` (over `Deliver` to `--reassemblers`)
    /// or `redis` (this worker runs the release script itself, on
    /// `--redis-url`, with the storing flags below: one hop less per result;
    /// the reassembler is then needed only for its read calls and for the
    /// harmonizer's results).
    #[arg(long, env = "WORKER_STORE_RESULTS", value_enum, default_value = "reassembler")]
    pub store_results: StoreResults,
    #[command(flatten)]
    pub store: reassembler::StoreArgs,
    /// Operations run at once by this worker; further events wait (back-pressure).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 1024)]
    pub concurrency: usize,
    /// Redis holding the operation registry (read only; the worker starts
    /// and serves its built-in operations while it is unreachable), and,
    /// with `--store-results redis`, the reorder state it writes.
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Operations this worker serves (comma-separated names; `*` or empty:
    /// all it can run). Remote operations of the registry (with an endpoint)
    /// count, and those compiled into this worker.
    #[arg(long, env = "WORKER_OPERATIONS", default_value = "*")]
    pub operations: OperationFilter,
    /// Registry version to use: `follow` (the global pin, else the active
    /// version), or a version number (`0`: the built-in operations only).
    #[arg(long, env = "WORKER_REGISTRY_PIN", default_value = "follow", value_parser = Pin::parse)]
    pub registry_pin: Pin,
    /// Name announced to harmonizers (default: host name and port).
    #[arg(long, env = "WORKER_NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl WorkerArgs {
    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        self.store.check()?;
        if self.store_results == StoreResults::Reassembler && self.reassembler_list().is_empty() {
            return Err("--reassemblers needs at least one address".into());
        }
        ordo_runtime::discovery::parse_list(&self.reassemblers).map_err(|error| format!("--reassemblers: {error}"))?;
        if self.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err("--name must not be empty".into());
        }
        Ok(())
    }

    /// `--reassemblers` without blanks.
    pub fn reassembler_list(&self) -> Vec<String> {
        self.reassemblers.iter().map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect()
    }
}

/// Which operations a worker may serve (`--operations`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OperationFilter {
    /// Everything it can run.
    #[default]
    All,
    /// Only these names.
    Only(BTreeSet<String>),
}

impl OperationFilter {
    /// Comma-separated names; `*`, or nothing, is every operation.
    pub fn parse(text: &str) -> Self {
        let names: BTreeSet<String> =
            text.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect();
        if names.is_empty() || names.contains("*") { Self::All } else { Self::Only(names) }
    }

    pub fn allows(&self, operation: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.contains(operation),
        }
    }
}

impl FromStr for OperationFilter {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(text))
    }
}

impl fmt::Display for OperationFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Only(names) => f.write_str(&names.iter().cloned().collect::<Vec<_>>().join(",")),
        }
    }
}

/// The command name [`crate::main`] parses its flags under.
pub(crate) static COMMAND_NAME: OnceLock<&'static str> = OnceLock::new();

/// The whole configuration of a worker started by [`crate::main`]: just
/// [`WorkerArgs`], under the service's own name.
#[derive(Debug, Clone)]
pub(crate) struct MainConfig(pub WorkerArgs);

impl clap::CommandFactory for MainConfig {
    fn command() -> clap::Command {
        let name = COMMAND_NAME.get().copied().unwrap_or("ordo-worker");
        // `about` after the flags: theirs is the doc of `WorkerArgs`.
        <WorkerArgs as clap::Args>::augment_args(clap::Command::new(name))
            .version(env!("CARGO_PKG_VERSION"))
            .about("An Ordo stateful worker: runs stream operations concurrently and delivers their results to the reassemblers.")
    }

    fn command_for_update() -> clap::Command {
        let command = Self::command();
        <WorkerArgs as clap::Args>::augment_args_for_update(command)
    }
}

impl clap::FromArgMatches for MainConfig {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        WorkerArgs::from_arg_matches(matches).map(Self)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(matches)
    }
}

impl clap::Parser for MainConfig {}

impl ServiceConfig for MainConfig {
    fn listen(&self) -> SocketAddr {
        self.0.listen
    }
    fn common(&self) -> &CommonArgs {
        &self.0.common
    }
    fn metrics_listen(&self) -> Option<SocketAddr> {
        self.0.metrics_listen
    }
    fn validate(&self) -> Result<(), String> {
        self.0.validate()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn filters_parse_names_and_stars() {
        assert_eq!(OperationFilter::parse(""), OperationFilter::All);
        assert_eq!(OperationFilter::parse(" * "), OperationFilter::All);
        assert_eq!(OperationFilter::parse("a,*"), OperationFilter::All);
        let only = OperationFilter::parse(" a , b,,");
        assert!(only.allows("a") && only.allows("b") && !only.allows("c"));
        assert_eq!(only.to_string(), "a,b");
        assert!(OperationFilter::All.allows("anything"));
    }

    #[test]
    fn flags_parse_with_their_defaults() {
        let config = MainConfig::try_parse_from(["w"]).expect("defaults");
        assert_eq!(config.0.registry_pin, Pin::Follow);
        assert_eq!(config.0.operations, OperationFilter::All);
        assert_eq!(config.0.redis_url, "redis://127.0.0.1:6379");
        assert!(config.validate().is_ok());
        let config = MainConfig::try_parse_from([
            "w",
            "--registry-pin",
            "3",
            "--operations",
            "x,y",
            "--name",
            "w1",
            "--concurrency",
            "0",
        ])
        .expect("flags");
        assert_eq!(config.0.registry_pin, Pin::Version(3));
        assert!(config.0.operations.allows("y") && !config.0.operations.allows("z"));
        assert_eq!(config.0.name.as_deref(), Some("w1"));
        assert!(config.validate().expect_err("concurrency 0").contains("concurrency"));
        assert!(MainConfig::try_parse_from(["w", "--registry-pin", "latest"]).is_err());
        let help = <MainConfig as clap::CommandFactory>::command().render_help().to_string();
        assert!(help.starts_with("An Ordo stateful worker"), "{help}");
    }

    #[test]
    fn results_go_to_the_reassemblers_unless_redis_is_asked_for() {
        let config = MainConfig::try_parse_from(["w"]).expect("defaults");
        assert_eq!(config.0.store_results, StoreResults::Reassembler);
        let config = MainConfig::try_parse_from(["w", "--reassemblers", ""]).expect("flags");
        assert!(config.validate().expect_err("no reassembler").contains("--reassemblers"));
        let config =
            MainConfig::try_parse_from(["w", "--store-results", "redis", "--reassemblers", "", "--stream-ttl", "2h"])
                .expect("flags");
        assert_eq!(config.0.store_results, StoreResults::Redis);
        assert_eq!(config.0.store.stream_ttl, std::time::Duration::from_secs(7200));
        assert!(config.validate().is_ok(), "storing itself, it needs no reassembler");
        let config = MainConfig::try_parse_from(["w", "--store-results", "redis", "--max-batch", "0"]).expect("flags");
        assert!(config.validate().expect_err("max batch 0").contains("--max-batch"), "the storing flags are checked");
    }
}
