//! `ordo-chaos`: Ordo's own fault suite, on the real binaries.
//!
//! One cluster (testkit: durable Redis, two workers, two reassemblers) serves
//! a sequence of runs. Each run sends a fresh workload — many ORDERED
//! streams of `"<stream>:<seq>"` events over several concurrent `Process`
//! calls ([`client`]) — and, once a share of its results arrived, injects
//! exactly one [`Fault`]: SIGKILL + restart, SIGSTOP + SIGCONT, or SIGTERM +
//! restart of a service, Redis killed and restarted from its append-only
//! file or frozen, RabbitMQ's application stopped and started, or the client
//! dropping all its calls. The client recovers the documented way
//! (reconnect, resend every event without a result). Afterwards every stream
//! is read back from its release log ([`log_check`]).
//!
//! Per run: lost, duplicated, reordered (client and log), FAILED, GAP, hung
//! calls, rejections, call breaks, and how a SIGTERMed service stopped.
//! [`report`] prints a table per fault kind and totals, writes JSON, and
//! fails when anything was lost, duplicated, reordered or hung.
//!
//! A run that goes wrong keeps the cluster's logs (copied under
//! `<out>/logs/`), and the next run gets a fresh cluster, so one failure
//! does not cascade into the following runs.

pub mod cli;
pub mod client;
pub mod log_check;
pub mod report;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use anyhow::Context as _;
use futures::future::join_all;
use integration_tests::{
    Cluster, ServiceProcess,
    process::health_status,
    rabbitmq::{self, QueueConsumer},
};
use serde::Serialize;
use tokio::{
    sync::watch,
    time::{Instant, sleep},
};
use tonic_health::pb::health_check_response::ServingStatus;

use self::{
    client::{GroupOutcome, RunSignals, Workload},
    report::{Report, RunOutcome},
};

/// Serializes durations as seconds (f64) in the JSON report.
pub(crate) mod serde_duration {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// A service a fault can hit (replica 0 of workers and reassemblers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Harmonizer,
    Stateless,
    Worker,
    Reassembler,
    PushGateway,
}

impl Target {
    pub const ALL: [Target; 5] =
        [Target::Harmonizer, Target::Stateless, Target::Worker, Target::Reassembler, Target::PushGateway];

    pub fn name(self) -> &'static str {
        match self {
            Self::Harmonizer => "harmonizer",
            Self::Stateless => "stateless",
            Self::Worker => "worker",
            Self::Reassembler => "reassembler",
            Self::PushGateway => "push-gateway",
        }
    }

    fn process(self, cluster: &mut Cluster) -> &mut ServiceProcess {
        match self {
            Self::Harmonizer => cluster.harmonizer_process(),
            Self::Stateless => cluster.stateless_process(),
            Self::Worker => cluster.worker_process(0),
            Self::Reassembler => cluster.reassembler_process(0),
            Self::PushGateway => cluster.push_gateway_process(),
        }
    }
}

/// One fault, injected once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault: the control run.
    None,
    /// SIGKILL, down for a moment, restart on the same port. For the
    /// harmonizer this is "killed, the client reconnects and resends".
    Kill(Target),
    /// SIGSTOP for `pause`, then SIGCONT.
    Stop(Target),
    /// SIGTERM (drain), wait for the exit, restart.
    Term(Target),
    /// Redis SIGKILLed and restarted from its append-only file.
    RedisKill,
    /// Redis frozen (SIGSTOP) for `pause`.
    RedisStop,
    /// `rabbitmqctl stop_app` for `pause`, then `start_app` (AMQP publishing on).
    RabbitStop,
    /// The client drops every call at once and reconnects.
    DropCalls,
}

impl Fault {
    /// Every fault kind, in the order runs cycle through them.
    pub fn all() -> Vec<Fault> {
        let mut all = vec![Fault::None];
        for target in Target::ALL {
            all.extend([Fault::Kill(target), Fault::Stop(target), Fault::Term(target)]);
        }
        all.extend([Fault::RedisKill, Fault::RedisStop, Fault::RabbitStop, Fault::DropCalls]);
        all
    }

    /// `sigkill:harmonizer`, `redis-kill`, … (also what `--faults` takes).
    pub fn name(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Kill(t) => format!("sigkill:{}", t.name()),
            Self::Stop(t) => format!("sigstop:{}", t.name()),
            Self::Term(t) => format!("sigterm:{}", t.name()),
            Self::RedisKill => "redis-kill".into(),
            Self::RedisStop => "redis-sigstop".into(),
            Self::RabbitStop => "rabbitmq-stop".into(),
            Self::DropCalls => "client-drop-calls".into(),
        }
    }

    /// Faults whose name contains any of `patterns` (all when empty).
    pub fn select(patterns: &[String]) -> Vec<Fault> {
        Fault::all()
            .into_iter()
            .filter(|f| patterns.is_empty() || patterns.iter().any(|p| f.name().contains(p.as_str())))
            .collect()
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Fault runs in all, cycling through `faults`.
    pub runs: usize,
    #[serde(serialize_with = "fault_names")]
    pub faults: Vec<Fault>,
    pub workload: Workload,
    /// Share of a run's results that arrive before the fault.
    pub fault_at: f64,
    /// How long a killed service stays down before its restart.
    #[serde(with = "serde_duration")]
    pub down: Duration,
    /// How long a frozen process (or stopped broker) stays so.
    #[serde(with = "serde_duration")]
    pub pause: Duration,
    /// Services' drain timeout (`--drain-timeout`): a SIGTERMed service
    /// must exit 0 within it plus one second.
    #[serde(with = "serde_duration")]
    pub drain: Duration,
    pub workers: usize,
    pub reassemblers: usize,
    /// Extra harmonizer flags.
    pub harmonizer_args: Vec<String>,
    /// How long reading the release logs back may take.
    #[serde(with = "serde_duration")]
    pub log_deadline: Duration,
    #[serde(skip)]
    pub out_dir: PathBuf,
    /// Print one line per run.
    #[serde(skip)]
    pub verbose: bool,
}

fn fault_names<S: serde::Serializer>(faults: &[Fault], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(faults.iter().map(|f| f.name()))
}

impl Config {
    /// The long suite: 6 runs of each of the 20 fault kinds (120 runs).
    pub fn long() -> Self {
        let faults = Fault::all();
        Self {
            runs: 6 * faults.len(),
            faults,
            workload: Workload {
                streams: 32,
                events_per_stream: 150,
                calls: 4,
                pace: Duration::from_millis(5),
                latency: "uniform:0ms-10ms".into(),
                stateless_every: 5,
                settle: Duration::from_secs(90),
                call_end: Duration::from_secs(15),
            },
            fault_at: 0.25,
            down: Duration::from_secs(1),
            pause: Duration::from_secs(3),
            drain: Duration::from_secs(10),
            workers: 2,
            reassemblers: 2,
            harmonizer_args: Vec::new(),
            log_deadline: Duration::from_secs(20),
            out_dir: PathBuf::from("results/chaos"),
            verbose: true,
        }
    }

    /// Every fault kind once, smaller workload.
    pub fn quick() -> Self {
        let long = Self::long();
        Self {
            runs: long.faults.len(),
            workload: Workload { streams: 16, events_per_stream: 80, pace: Duration::from_millis(10), ..long.workload },
            ..long
        }
    }
}

/// Runs the suite and returns the report (not yet checked).
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    anyhow::ensure!(!config.faults.is_empty(), "no fault kind selected");
    anyhow::ensure!(
        config.workload.calls > 0 && config.workload.streams >= config.workload.calls,
        "need streams >= calls > 0"
    );
    let started = Instant::now();
    let amqp = if config.faults.contains(&Fault::RabbitStop) {
        if rabbitmq::broker_listening().await {
            Some(rabbitmq::unique_name("ordo.chaos"))
        } else {
            eprintln!("ordo-chaos: RabbitMQ is not listening on 127.0.0.1:5672: rabbitmq-stop runs are skipped");
            None
        }
    } else {
        None
    };
    let mut env = Env { cluster: None, consumer: None, amqp_exchange: amqp };
    let mut runs = Vec::new();
    for index in 0..config.runs {
        let fault = config.faults[index % config.faults.len()];
        if fault == Fault::RabbitStop && env.amqp_exchange.is_none() {
            runs.push(RunOutcome::skipped(index, fault, "RabbitMQ not reachable"));
            continue;
        }
        env.ensure(config).await?;
        let outcome = run_one(&mut env, config, index, fault).await;
        if config.verbose {
            println!("{}", outcome.line());
        }
        if !outcome.clean() {
            let kept = keep_logs(env.cluster_ref(), &config.out_dir, index, fault);
            eprintln!("ordo-chaos: run {index} ({}) went wrong; {kept}; starting a fresh cluster", fault.name());
            env.cluster = None;
        }
        runs.push(outcome);
    }
    if let Some(consumer) = env.consumer.take() {
        let _ = consumer.delete().await;
    }
    Ok(Report::new(config, runs, started.elapsed()))
}

/// The cluster the runs share, and the AMQP consumer when RabbitMQ is used.
struct Env {
    cluster: Option<Cluster>,
    consumer: Option<QueueConsumer>,
    amqp_exchange: Option<String>,
}

impl Env {
    fn cluster_ref(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// A healthy cluster: the current one if every process runs and says
    /// SERVING, else a fresh one.
    async fn ensure(&mut self, config: &Config) -> anyhow::Result<()> {
        if let Some(cluster) = self.cluster.as_mut()
            && healthy(cluster).await
        {
            return Ok(());
        }
        self.cluster = None;
        let mut builder = Cluster::builder()
            .durable_redis()
            .workers(config.workers)
            .reassemblers(config.reassemblers)
            .env("ORDO_DRAIN_TIMEOUT", format!("{}ms", config.drain.as_millis()))
            .harmonizer_args(config.harmonizer_args.clone());
        if let Some(exchange) = &self.amqp_exchange {
            builder = builder.push_gateway_args(["--amqp-url", rabbitmq::AMQP_URL, "--amqp-exchange", exchange]);
            if self.consumer.is_none() {
                // Every stream's routing key is its id: one queue bound with `#` sees them all.
                self.consumer = Some(QueueConsumer::bind(exchange, "#").await.context("binding the AMQP queue")?);
            }
        }
        self.cluster = Some(builder.try_start().await.context("starting the cluster")?);
        Ok(())
    }
}

/// Every process running and SERVING, and Redis answering.
async fn healthy(cluster: &mut Cluster) -> bool {
    if cluster.redis().ping().await.is_err() {
        return false;
    }
    let mut addrs = Vec::new();
    for process in cluster.processes_mut() {
        if !process.is_running() {
            return false;
        }
        addrs.push(process.addr());
    }
    for addr in addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        while health_status(&addr).await != Some(ServingStatus::Serving) {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(100)).await;
        }
    }
    true
}

/// Copies the cluster's logs under `<out>/logs/run-<n>-<fault>/`.
fn keep_logs(cluster: Option<&Cluster>, out: &Path, index: usize, fault: Fault) -> String {
    let Some(cluster) = cluster else { return "no cluster logs".into() };
    let dir = out.join("logs").join(format!("run-{index:03}-{}", fault.name().replace(':', "-")));
    let copy = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(cluster.log_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_file() && entry.path().extension().is_some_and(|e| e == "log") {
                std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
            }
        }
        Ok(())
    };
    match copy() {
        Ok(()) => format!("logs kept in {}", dir.display()),
        Err(error) => format!("could not keep the logs: {error}"),
    }
}

/// How the fault went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultRecord {
    /// Results delivered when the fault was injected.
    pub at_results: usize,
    /// Seconds from the run's start to the injection.
    pub at_s: f64,
    /// For SIGTERM: how the process exited and how long it took.
    pub stop: Option<StopRecord>,
    /// The fault could not be injected or undone (e.g. a restart failed).
    pub error: Option<String>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StopRecord {
    /// `exit status: 0`, or why it did not exit.
    pub exit: String,
    pub seconds: f64,
    /// Exited 0 within the drain timeout plus one second.
    pub clean: bool,
}

async fn run_one(env: &mut Env, config: &Config, index: usize, fault: Fault) -> RunOutcome {
    let started = Instant::now();
    let workload = Arc::new(config.workload.clone());
    let slug = fault.name().replace(':', "-");
    let streams: Vec<String> = (0..workload.streams).map(|i| format!("chaos-{index:03}-{slug}-{i:02}")).collect();
    let Some(cluster) = env.cluster.as_mut() else {
        return RunOutcome::skipped(index, fault, "no cluster");
    };
    let delivered = Arc::new(AtomicUsize::new(0));
    let (drop_tx, drop_rx) = watch::channel(0u64);
    let signals = RunSignals { delivered: delivered.clone(), drop_calls: drop_rx };
    let groups: Vec<_> = (0..workload.calls)
        .map(|g| {
            let mine: Vec<String> = streams.iter().skip(g).step_by(workload.calls).cloned().collect();
            tokio::spawn(client::run_group(cluster.harmonizer(), mine, workload.clone(), signals.clone()))
        })
        .collect();

    // The fault, once a share of the results is in (or after 30 s anyway).
    let want = (workload.total_events() as f64 * config.fault_at) as usize;
    let wait_until = Instant::now() + Duration::from_secs(30);
    while delivered.load(std::sync::atomic::Ordering::Relaxed) < want && Instant::now() < wait_until {
        sleep(Duration::from_millis(20)).await;
    }
    let mut record = FaultRecord {
        at_results: delivered.load(std::sync::atomic::Ordering::Relaxed),
        at_s: started.elapsed().as_secs_f64(),
        ..FaultRecord::default()
    };
    if record.at_results < want {
        record.note = format!("only {} of the {want} results wanted before the fault arrived", record.at_results);
    }
    if let Err(error) = inject(cluster, config, fault, &drop_tx, &mut record).await {
        record.error = Some(format!("{error:#}"));
    }

    let outcomes: Vec<GroupOutcome> = join_all(groups)
        .await
        .into_iter()
        .map(|joined| {
            joined.unwrap_or_else(|error| GroupOutcome {
                hung: true,
                end: format!("the client task failed: {error}"),
                ..GroupOutcome::default()
            })
        })
        .collect();
    let log = log_check::check(cluster.push_gateway(), &streams, workload.events_per_stream, config.log_deadline).await;
    let amqp_lost = match &env.consumer {
        Some(consumer) => Some(amqp_missing(consumer, &streams, workload.events_per_stream).await),
        None => None,
    };
    RunOutcome::new(index, fault, &workload, outcomes, log, record, amqp_lost, started.elapsed())
}

async fn inject(
    cluster: &mut Cluster,
    config: &Config,
    fault: Fault,
    drop_tx: &watch::Sender<u64>,
    record: &mut FaultRecord,
) -> anyhow::Result<()> {
    let restart_deadline = Duration::from_secs(30);
    match fault {
        Fault::None => {}
        Fault::Kill(target) => {
            let process = target.process(cluster);
            process.kill();
            sleep(config.down).await;
            process.restart(restart_deadline).await?;
        }
        Fault::Stop(target) => {
            let process = target.process(cluster);
            process.freeze()?;
            sleep(config.pause).await;
            process.resume()?;
        }
        Fault::Term(target) => {
            let process = target.process(cluster);
            let start = Instant::now();
            // Waits past the promise (drain + 1 s) so a slow stop is measured, not cut.
            let exited = process.terminate(config.drain + Duration::from_secs(5)).await;
            let seconds = start.elapsed().as_secs_f64();
            let limit = (config.drain + Duration::from_secs(1)).as_secs_f64();
            record.stop = Some(match exited {
                Ok(status) => {
                    StopRecord { exit: status.to_string(), seconds, clean: status.success() && seconds <= limit }
                }
                Err(error) => StopRecord { exit: format!("{error:#}"), seconds, clean: false },
            });
            process.restart(restart_deadline).await?;
        }
        Fault::RedisKill => {
            let redis = cluster.redis();
            redis.kill();
            sleep(config.down).await;
            redis.restart().await?;
        }
        Fault::RedisStop => {
            let redis = cluster.redis();
            redis.freeze()?;
            sleep(config.pause).await;
            redis.resume()?;
        }
        Fault::RabbitStop => {
            let stopped = rabbitmq::stop_broker().await?;
            sleep(config.pause).await;
            stopped.start().await?;
        }
        Fault::DropCalls => {
            drop_tx.send_modify(|generation| *generation += 1);
        }
    }
    Ok(())
}

/// How many (stream, sequence) results of the run never reached the AMQP
/// queue (waits up to 30 s for the stragglers; redeliveries are allowed).
async fn amqp_missing(consumer: &QueueConsumer, streams: &[String], n: u64) -> usize {
    let missing = || {
        let mut seen: std::collections::HashSet<(String, u64)> = std::collections::HashSet::new();
        for message in consumer.received() {
            if let Some(sequence) = message.sequence
                && streams.contains(&message.routing_key)
            {
                seen.insert((message.routing_key.clone(), sequence));
            }
        }
        streams.len() * n as usize - seen.len().min(streams.len() * n as usize)
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let left = missing();
        if left == 0 || Instant::now() >= until {
            return left;
        }
        sleep(Duration::from_millis(200)).await;
    }
}
