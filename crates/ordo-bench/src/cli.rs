//! Command lines of `ordo-experiment` and `ordo-bench`: flags, printing,
//! files, exit codes (0 done, 1 failed or a re-assembled error, 2 bad usage).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use ordo_core::duration;

use crate::{
    bench::{self, WorkloadId},
    experiment,
};

/// The paper's experiment (figures 6-7) on the real Ordo services: the
/// Sonnets, one character per event, through asynchronous callbacks with
/// exponential delays; error rate of naive (UNORDERED) versus re-assembled
/// (ORDERED) delivery. Exits 1 if any re-assembled run has an error.
#[derive(Debug, clap::Parser)]
#[command(name = "ordo-experiment", version)]
pub struct ExperimentArgs {
    /// Runs per (mean delay, mode) cell; the paper's equation 1 gives 389.
    #[arg(long, default_value_t = 389)]
    pub runs: usize,
    /// Mean callback delays (exponential), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2ms,5ms,10ms", value_parser = duration::parse)]
    pub delays: Vec<Duration>,
    /// Time between two events of a run (the sending pattern).
    #[arg(long, default_value = "1ms", value_parser = duration::parse)]
    pub pace: Duration,
    /// Runs in flight at once, each on its own stream and call (8 gives the
    /// same naive error rates as 1 on 2 cores; more loads the suite enough
    /// to change them).
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// The stateful operation each event runs: `async-echo`, or `callback`
    /// (the delay, then a call to the stateless service).
    #[arg(long, default_value = experiment::OPERATION)]
    pub operation: String,
    /// Where runs.csv, summary.csv, summary.json, table.md and error_rate.png go.
    #[arg(long, default_value = "results/experiment")]
    pub out: PathBuf,
}

/// Ordo ORDERED against UNORDERED, in-process futures and a sequential
/// consumer, on workloads (a) uniform 0-5 ms, (b) zero-delay saturation,
/// (c) skewed latency and (d) the same events over more and more streams
/// (events/s, CPU per event and per stream, peak RSS, Redis memory per
/// stream, each point against the first). Prints Markdown tables and writes JSON. Exits 1 if an
/// Ordo variant lost, duplicated or misordered a result (targets are only
/// recorded).
#[derive(Debug, clap::Parser)]
#[command(name = "ordo-bench", version)]
pub struct BenchArgs {
    /// Workloads to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b,c,d,e")]
    pub workloads: Vec<WorkloadId>,
    /// Events of workloads (a) and (c).
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Concurrency of (a) and (c).
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Latency model of (a).
    #[arg(long, default_value = "uniform:0ms-5ms")]
    pub uniform_latency: String,
    /// (b): Process calls at once.
    #[arg(long, default_value_t = 4)]
    pub saturation_calls: usize,
    /// (b): streams per call.
    #[arg(long, default_value_t = 16)]
    pub saturation_streams: usize,
    /// (b): events in total.
    #[arg(long, default_value_t = 200_000)]
    pub saturation_events: usize,
    /// (b): events outstanding per call.
    #[arg(long, default_value_t = 4096)]
    pub saturation_in_flight: usize,
    /// (d): numbers of streams in total, comma-separated; the first is the
    /// baseline of the ratios.
    #[arg(long, value_delimiter = ',', default_value = "64,4096,32768,131072")]
    pub streams_list: Vec<usize>,
    /// (d): events of each point (split evenly over its streams; at least
    /// the largest --streams-list entry).
    #[arg(long, default_value_t = 262_144)]
    pub many_streams_events: usize,
    /// (d): Process calls at once (stream i on call i mod calls).
    #[arg(long, default_value_t = 4)]
    pub many_streams_calls: usize,
    /// (d): events outstanding per call.
    #[arg(long, default_value_t = 4096)]
    pub many_streams_in_flight: usize,
    /// Events the sequential consumer runs; its time is extrapolated to --events.
    #[arg(long, default_value_t = 1000)]
    pub sequential_sample: usize,
    /// Run the sequential consumer over all events (about 30 s for (a)).
    #[arg(long)]
    pub full_sequential: bool,
    /// Skip the variants on a cluster whose worker runs --concurrency operations at once.
    #[arg(long)]
    pub no_worker_concurrency: bool,
    /// An extra flag of every harmonizer started (repeatable; a value that
    /// starts with `-` is given as `--harmonizer-arg=--follow-releases`).
    /// `--direct` adds the direct results path.
    #[arg(long = "harmonizer-arg", allow_hyphen_values = true)]
    pub harmonizer_args: Vec<String>,
    /// An extra flag of every worker started (repeatable, as --harmonizer-arg).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// The direct results path: workers and harmonizers store their results
    /// (`--store-results redis`) and the harmonizers follow the releases
    /// (`--follow-releases redis`) themselves, so no reassembler or push
    /// gateway is in a result's path.
    #[arg(long)]
    pub direct: bool,
    /// Where the JSON and Markdown go.
    #[arg(long, default_value = "results/bench")]
    pub out: PathBuf,
}

/// The harmonizer's and the worker's flags of `--direct`.
pub const DIRECT_HARMONIZER: [&str; 4] = ["--follow-releases", "redis", "--store-results", "redis"];
pub const DIRECT_WORKER: [&str; 2] = ["--store-results", "redis"];

impl From<BenchArgs> for bench::Config {
    fn from(a: BenchArgs) -> Self {
        let on = a.direct;
        let direct = |flags: &[&str]| if on { flags.iter().map(|f| f.to_string()).collect() } else { Vec::new() };
        Self {
            workloads: a.workloads,
            events: a.events,
            concurrency: a.concurrency,
            uniform_latency: a.uniform_latency,
            saturation_calls: a.saturation_calls,
            saturation_streams: a.saturation_streams,
            saturation_events: a.saturation_events,
            saturation_in_flight: a.saturation_in_flight,
            many_streams: a.streams_list,
            many_streams_events: a.many_streams_events,
            many_streams_calls: a.many_streams_calls,
            many_streams_in_flight: a.many_streams_in_flight,
            sequential_sample: a.sequential_sample,
            full_sequential: a.full_sequential,
            worker_concurrency_variants: !a.no_worker_concurrency,
            out_dir: a.out,
            harmonizer_args: [direct(&DIRECT_HARMONIZER), a.harmonizer_args].concat(),
            worker_args: [direct(&DIRECT_WORKER), a.worker_args].concat(),
            ..Self::default()
        }
    }
}

fn outcome(result: anyhow::Result<()>, program: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn experiment_main(args: ExperimentArgs) -> ExitCode {
    let run = async {
        let config = experiment::Config {
            runs: args.runs,
            mean_delays: args.delays,
            pace: args.pace,
            parallel: args.parallel,
            out_dir: args.out,
            text: integration_tests::sonnets_text(),
            operation: args.operation,
        };
        let report = experiment::run(&config).await?;
        println!("{}", report.table());
        match report.write(&config.out_dir)? {
            Ok(chart) => println!("chart: {}", chart.display()),
            Err(why) => eprintln!("ordo-experiment: warning: no chart: {why}"),
        }
        println!("tables and CSV: {}", config.out_dir.display());
        report.check()
    };
    outcome(run.await, "ordo-experiment")
}

pub async fn bench_main(args: BenchArgs) -> ExitCode {
    let run = async {
        let config = bench::Config::from(args);
        let report = bench::run(&config).await?;
        println!("{}", report.tables());
        let path = report.write(&config.out_dir)?;
        println!("JSON: {}", path.display());
        report.check()
    };
    outcome(run.await, "ordo-bench")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn direct_and_extra_service_flags_reach_the_config() {
        let config = bench::Config::from(BenchArgs::try_parse_from(["ordo-bench"]).expect("defaults"));
        assert!(config.harmonizer_args.is_empty() && config.worker_args.is_empty(), "no extra flags by default");
        let args = BenchArgs::try_parse_from([
            "ordo-bench",
            "--direct",
            "--harmonizer-arg=--window",
            "--harmonizer-arg",
            "2048",
            "--worker-arg",
            "--concurrency=64",
        ])
        .expect("flags parse");
        let config = bench::Config::from(args);
        assert_eq!(
            config.harmonizer_args,
            ["--follow-releases", "redis", "--store-results", "redis", "--window", "2048"],
            "--direct first, then the extra flags in order"
        );
        assert_eq!(config.worker_args, ["--store-results", "redis", "--concurrency=64"]);
    }
}
