//! Harmonizer configuration (flags and env vars).

use std::{net::SocketAddr, time::Duration};

use ordo_core::duration;
use ordo_registry::Pin;
use ordo_runtime::{app::CommonArgs, discovery::DiscoveryArgs};
use result_sink::StoreResults;

/// Ordo harmonizer: the front door. Validates events, routes them by
/// operation (stateless → stateless service, stateful → workers), keeps a
/// bounded window per stream and returns each stream's results in order.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "harmonizer", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "HARMONIZER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "HARMONIZER_METRICS_LISTEN", default_value = "0.0.0.0:9091", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    /// The stateless service.
    #[arg(long, env = "ORDO_STATELESS", default_value = "127.0.0.1:50052")]
    pub stateless: String,
    /// Stateful workers (comma-separated `host:port`, or `dns://name:port`:
    /// every A/AAAA record of the name, re-resolved every --dns-refresh);
    /// work goes to the least-loaded healthy one.
    #[arg(long, env = "ORDO_WORKERS", default_value = "127.0.0.1:50053", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Reassembler replicas (comma-separated `host:port` or
    /// `dns://name:port`), for results the harmonizer records itself
    /// (stateless results, FAILED placeholders).
    #[arg(long, env = "ORDO_REASSEMBLERS", default_value = "127.0.0.1:50054", value_delimiter = ',')]
    pub reassemblers: Vec<String>,
    /// Where the results the harmonizer records itself go: `reassembler`
    /// (over `Deliver` to --reassemblers) or `redis` (this harmonizer runs
    /// the release script itself, on --redis-url, with the storing flags:
    /// one hop less per result, as a worker's --store-results).
    #[arg(long, env = "HARMONIZER_STORE_RESULTS", value_enum, default_value = "reassembler")]
    pub store_results: StoreResults,
    #[command(flatten)]
    pub store: reassembler::StoreArgs,
    /// The push gateway, from which released results are followed (with
    /// the default `--follow-releases push-gateway`).
    #[arg(long, env = "ORDO_PUSH_GATEWAY", default_value = "127.0.0.1:50055")]
    pub push_gateway: String,
    /// Where released results are followed from: `push-gateway` (default:
    /// its `Follow` call at --push-gateway, so a result's trace passes
    /// through every service) or `redis` (this harmonizer tails the release
    /// channels and reads the release logs itself, with the push gateway's
    /// rules and code: one process hop less per result, less CPU, and the
    /// push gateway serves only subscribers; the delivery span is then the
    /// harmonizer's).
    #[arg(long, env = "HARMONIZER_FOLLOW_RELEASES", value_enum, default_value = "push-gateway")]
    pub follow_releases: FollowReleases,
    /// With `--follow-releases redis`: how long a release-channel slot stays
    /// subscribed after the last stream followed in it left (as the push
    /// gateway's --hub-slot-hold).
    #[arg(long, env = "HARMONIZER_HUB_SLOT_HOLD", default_value = "30s", value_parser = duration::parse)]
    pub hub_slot_hold: Duration,
    /// Redis holding the reorder state (read: a stream's next sequence and
    /// stored results; written: the in-flight claims, see --claim-after,
    /// and with --store-results redis the results it records).
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// A stream accepts sequences below its lowest unreleased sequence + window.
    #[arg(long, env = "HARMONIZER_WINDOW", default_value_t = 1024)]
    pub window: u64,
    /// How long an event beyond the window holds its call before OUT_OF_RANGE.
    #[arg(long, env = "HARMONIZER_WINDOW_WAIT", default_value = "5s", value_parser = duration::parse)]
    pub window_wait: Duration,
    /// Per attempt: an event not acked by its worker in time is retried elsewhere.
    #[arg(long, env = "HARMONIZER_EVENT_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    pub event_timeout: Duration,
    /// Attempts per event before a FAILED result is released in its place
    /// (an operation's `attempts` in the registry overrides it). An
    /// attempt's time is the larger of this and the operation's `timeout` + 1s.
    #[arg(long, env = "HARMONIZER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// A stateful event whose operation no live worker serves (and none did
    /// within the last --event-timeout) waits this long for a worker that
    /// serves it, then is refused with UNAVAILABLE.
    #[arg(long, env = "HARMONIZER_WORKER_WAIT", default_value = "2s", value_parser = duration::parse)]
    pub worker_wait: Duration,
    /// Submit waits this long for a stateful result, then answers PROCESSING.
    #[arg(long, env = "HARMONIZER_UNARY_THRESHOLD", default_value = "500ms", value_parser = duration::parse)]
    pub unary_threshold: Duration,
    /// On a `Process` call, when the head of a stream (its lowest awaited
    /// sequence) has waited this long, the call sends a PROCESSING result for
    /// it at once (at most one per sequence per call); its real result still
    /// follows on the call, and on the push-gateway's channels. `off`
    /// (default) or `0` never sends PROCESSING on `Process`.
    #[arg(
        long,
        env = "HARMONIZER_STREAM_PROCESSING_THRESHOLD",
        default_value = "off",
        value_parser = parse_threshold
    )]
    // Fully qualified: clap would otherwise treat it as an optional `Duration`.
    pub stream_processing_threshold: ::std::option::Option<Duration>,
    /// Default gap timeout of a stream (events override it with attribute
    /// `gap-timeout`): when a sequence has not arrived this long while later
    /// ones wait behind it, a GAP result is released in its place so its
    /// successors flow. `off` (or `0`) waits for the missing event forever.
    #[arg(long, env = "HARMONIZER_GAP_TIMEOUT", default_value = "10s", value_parser = parse_gap_timeout)]
    // Fully qualified: clap would otherwise treat it as an optional `Duration`.
    pub gap_timeout: ::std::option::Option<Duration>,
    /// Several harmonizers may share one Redis (behind a client-side
    /// balancer): an event this one has held this long is claimed in Redis
    /// (renewed while held, removed once settled), so that no harmonizer
    /// declares a gap over it. Events that settle sooner cost no Redis
    /// write. `off` (or `0`) writes no claims: only for a single harmonizer.
    #[arg(long, env = "HARMONIZER_CLAIM_AFTER", default_value = "200ms", value_parser = parse_threshold)]
    // Fully qualified: clap would otherwise treat it as an optional `Duration`.
    pub claim_after: ::std::option::Option<Duration>,
    /// Largest event payload accepted.
    #[arg(long, env = "HARMONIZER_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Which version of the operation registry to use: `follow` (default:
    /// the registry's pin, else its active version, else the built-in
    /// operations below), or a version number (`0`: the built-in operations
    /// only, whatever is published).
    #[arg(long, env = "HARMONIZER_REGISTRY_PIN", default_value = "follow", value_parser = Pin::parse)]
    pub registry_pin: Pin,
    /// Operations answered by the stateless service (built-in registry, version 0).
    #[arg(
        long,
        env = "HARMONIZER_STATELESS_OPS",
        default_value = "echo,upper,lower,sha256,json-validate",
        value_delimiter = ','
    )]
    pub stateless_ops: Vec<String>,
    /// Operations run by stateful workers (built-in registry, version 0).
    #[arg(
        long,
        env = "HARMONIZER_STATEFUL_OPS",
        default_value = "async-echo,async-upper,callback",
        value_delimiter = ','
    )]
    pub stateful_ops: Vec<String>,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// Bearer-token authorization of Process and Submit (off unless a key is given).
    #[command(flatten)]
    pub auth: ordo_runtime::auth::AuthArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where a harmonizer follows released results from (`--follow-releases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FollowReleases {
    /// The push gateway's `Follow` call.
    PushGateway,
    /// Redis directly: the release channels and logs.
    Redis,
}

ordo_runtime::service_config!(Config, validate = Config::check);

impl Config {
    /// Cross-field checks clap cannot express.
    fn check(&self) -> Result<(), String> {
        // Unreadable or malformed key files stop the start with exit code 64.
        ordo_runtime::auth::Auth::from_args(&self.auth)?;
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        if self.event_timeout.is_zero() {
            return Err("--event-timeout must be positive".into());
        }
        if clean(&self.workers).is_empty() {
            return Err("--workers needs at least one address".into());
        }
        self.store.check()?;
        if self.store_results == StoreResults::Reassembler && clean(&self.reassemblers).is_empty() {
            return Err("--reassemblers needs at least one address".into());
        }
        ordo_runtime::discovery::parse_list(&self.workers).map_err(|error| format!("--workers: {error}"))?;
        ordo_runtime::discovery::parse_list(&self.reassemblers).map_err(|error| format!("--reassemblers: {error}"))?;
        if let Some(op) = clean(&self.stateless_ops).iter().find(|op| clean(&self.stateful_ops).contains(op)) {
            return Err(format!("operation {op:?} is listed as both stateless and stateful"));
        }
        Ok(())
    }
}

/// `off` or `0` (disabled), else a duration.
fn parse_threshold(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "off" | "0" => Ok(None),
        other => duration::parse(other).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// A gap timeout: `off` or `0` (disabled), else a duration.
pub fn parse_gap_timeout(text: &str) -> Result<Option<Duration>, String> {
    parse_threshold(text)
}

/// Trims and drops empty entries of a comma-separated list.
pub fn clean(list: &[String]) -> Vec<String> {
    list.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn stream_processing_threshold_is_off_unless_set() {
        let config = Config::try_parse_from(["harmonizer"]).expect("defaults parse");
        assert_eq!(config.stream_processing_threshold, None);
        let config =
            Config::try_parse_from(["harmonizer", "--stream-processing-threshold", "250ms"]).expect("flag parses");
        assert_eq!(config.stream_processing_threshold, Some(Duration::from_millis(250)));
        let config = Config::try_parse_from(["harmonizer", "--stream-processing-threshold", "0"]).expect("flag parses");
        assert_eq!(config.stream_processing_threshold, None);
    }

    #[test]
    fn releases_are_followed_through_the_push_gateway_unless_redis_is_asked_for() {
        let config = Config::try_parse_from(["harmonizer"]).expect("defaults parse");
        assert_eq!(config.follow_releases, FollowReleases::PushGateway);
        let config = Config::try_parse_from(["harmonizer", "--follow-releases", "redis"]).expect("flag parses");
        assert_eq!(config.follow_releases, FollowReleases::Redis);
        assert!(Config::try_parse_from(["harmonizer", "--follow-releases", "amqp"]).is_err(), "unknown source");
    }

    #[test]
    fn results_go_to_the_reassemblers_unless_redis_is_asked_for() {
        let config = Config::try_parse_from(["harmonizer"]).expect("defaults parse");
        assert_eq!(config.store_results, StoreResults::Reassembler);
        assert_eq!((config.store.retention, config.store.max_batch), (100_000, 512), "the reassembler's defaults");
        let config = Config::try_parse_from(["harmonizer", "--store-results", "redis", "--reassemblers", ""])
            .expect("flags parse");
        assert_eq!(config.store_results, StoreResults::Redis);
        assert_eq!(config.check(), Ok(()), "storing itself, it needs no reassembler");
        let config = Config::try_parse_from(["harmonizer", "--reassemblers", ""]).expect("flags parse");
        assert!(config.check().expect_err("no reassembler").contains("--reassemblers"));
        let config = Config::try_parse_from(["harmonizer", "--store-results", "redis", "--retention", "0"])
            .expect("flags parse");
        assert!(config.check().expect_err("retention 0").contains("--retention"), "the storing flags are checked");
        assert!(Config::try_parse_from(["harmonizer", "--store-results", "postgres"]).is_err(), "unknown target");
    }

    #[test]
    fn claims_are_on_by_default_and_can_be_turned_off() {
        let config = Config::try_parse_from(["harmonizer"]).expect("defaults parse");
        assert_eq!(config.claim_after, Some(Duration::from_millis(200)));
        let config = Config::try_parse_from(["harmonizer", "--claim-after", "off"]).expect("flag parses");
        assert_eq!(config.claim_after, None);
        let config = Config::try_parse_from(["harmonizer", "--claim-after", "1s"]).expect("flag parses");
        assert_eq!(config.claim_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn registry_pin_and_worker_wait() {
        let config = Config::try_parse_from(["harmonizer"]).expect("defaults parse");
        assert_eq!((config.registry_pin, config.worker_wait), (Pin::Follow, Duration::from_secs(2)));
        let config = Config::try_parse_from(["harmonizer", "--registry-pin", "3", "--worker-wait", "250ms"])
            .expect("flags parse");
        assert_eq!((config.registry_pin, config.worker_wait), (Pin::Version(3), Duration::from_millis(250)));
        let config = Config::try_parse_from(["harmonizer", "--registry-pin", "0"]).expect("flag parses");
        assert_eq!(config.registry_pin, Pin::Version(0));
        assert!(Config::try_parse_from(["harmonizer", "--registry-pin", "latest"]).is_err());
    }
}
