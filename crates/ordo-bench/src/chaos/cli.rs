//! The `ordo-chaos` command line: flags over [`Config::long`] /
//! [`Config::quick`], the table on stdout, files, exit code (0 clean, 1 a
//! contract was broken or the suite could not run, 2 bad usage).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ordo_core::duration;

use super::{Config, Fault};

/// Ordo's fault suite: a workload of many ORDERED streams over several
/// concurrent Process calls while one fault at a time is injected (SIGKILL,
/// SIGSTOP, SIGTERM of every service, Redis killed or frozen, RabbitMQ
/// stopped, the client dropping its calls). The client reconnects and
/// resends what has no result; every stream is read back from its release
/// log. Exits 1 if anything was lost, duplicated, reordered or hung.
#[derive(Debug, clap::Parser)]
#[command(name = "ordo-chaos", version)]
pub struct ChaosArgs {
    /// Every fault kind once, with a smaller workload (the default is 6 runs
    /// of each of the 20 kinds: 120 fault runs).
    #[arg(long)]
    pub quick: bool,
    /// Runs in all, cycling through the fault kinds.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Only fault kinds whose name contains one of these (comma-separated),
    /// e.g. `sigkill,redis`. Kinds: none, sigkill:<service>,
    /// sigstop:<service>, sigterm:<service> (harmonizer, stateless, worker,
    /// reassembler, push-gateway), redis-kill, redis-sigstop, rabbitmq-stop,
    /// client-drop-calls.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Leave these fault kinds out (same matching as --faults), e.g. `rabbitmq`.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Streams per run.
    #[arg(long)]
    pub streams: Option<usize>,
    /// Events per stream.
    #[arg(long)]
    pub events: Option<u64>,
    /// Concurrent Process calls per run.
    #[arg(long)]
    pub calls: Option<usize>,
    /// Time between two events of one call.
    #[arg(long, value_parser = duration::parse)]
    pub pace: Option<Duration>,
    /// The `latency` attribute of the stateful events (more latency, more
    /// events in flight when the fault hits).
    #[arg(long)]
    pub latency: Option<String>,
    /// Where the JSON, the table and the logs of failed runs go.
    #[arg(long, default_value = "results/chaos")]
    pub out: PathBuf,
}

impl ChaosArgs {
    pub fn config(&self) -> Config {
        let mut config = if self.quick { Config::quick() } else { Config::long() };
        config.faults = Fault::select(&self.faults)
            .into_iter()
            .filter(|f| !self.skip.iter().any(|s| f.name().contains(s.as_str())))
            .collect();
        config.runs = self.runs.unwrap_or(if self.quick { 1 } else { 6 } * config.faults.len());
        if let Some(streams) = self.streams {
            config.workload.streams = streams;
        }
        if let Some(events) = self.events {
            config.workload.events_per_stream = events;
        }
        if let Some(calls) = self.calls {
            config.workload.calls = calls;
        }
        if let Some(latency) = &self.latency {
            config.workload.latency = latency.clone();
        }
        if let Some(pace) = self.pace {
            config.workload.pace = pace;
        }
        config.out_dir = self.out.clone();
        config
    }
}

pub async fn chaos_main(args: ChaosArgs) -> ExitCode {
    let config = args.config();
    if config.faults.is_empty() {
        eprintln!("ordo-chaos: no fault kind matches --faults {:?} / --skip {:?}", args.faults, args.skip);
        return ExitCode::from(2);
    }
    crate::results::finish("ordo-chaos", &config.out_dir.clone(), super::run(&config)).await
}
