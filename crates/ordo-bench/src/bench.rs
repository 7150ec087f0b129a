//! Ordo against its baselines, in one run, on five workloads:
//!
//! - **(a)** the Confluent Parallel Consumer's example: `events` (10,000)
//!   events on one stream, `latency=uniform:0ms-5ms`, concurrency 100;
//! - **(b)** zero-delay saturation: many streams over a few `Process` calls,
//!   no latency attribute — the most ordered events per second;
//! - **(c)** skewed latency: 99% of events `fixed:1ms`, 1% `fixed:50ms`
//!   (chosen by a seeded RNG, the same set for every variant);
//! - **(d)** many streams: the same total of zero-delay ORDERED events over
//!   64, 4,096, 32,768 and 131,072 streams, one fresh cluster per point, with
//!   CPU per event and per stream, peak RSS and Redis memory per stream, and
//!   each point's ratio to the first (see [`crate::many_streams`]).
//! - **(e)** scale-out: (b)'s ORDERED events on one Redis node, on a 3-master
//!   Redis Cluster and with two workers and reassemblers, a cluster each
//!   (see [`crate::scale_out`]);
//!
//! Variants of (a) and (c), side by side:
//! - Ordo ORDERED and UNORDERED, the client keeping at most `concurrency`
//!   events outstanding (sent, result not received) — the same contract as
//!   `buffered(n)` and `buffer_unordered(n)`;
//! - Ordo ORDERED and UNORDERED on a second cluster whose worker runs at
//!   most `concurrency` operations (`--concurrency`), the client keeping up
//!   to the harmonizer's window (1024) outstanding: the reorder window is
//!   larger than the concurrency, as in a parallel consumer;
//! - in-process `buffered(n)`, `buffer_unordered(n)` and
//!   `buffer_unordered(n)` + reorder map over the same latency distribution;
//! - one sequential ordered consumer (a sample of `sequential_sample`
//!   events, extrapolated, unless `full_sequential`).
//!
//! Per variant: events/s, end-to-end latency (send → receive), reorder
//! overhead (receive − completion of the event and all its predecessors;
//! for UNORDERED, of the event itself: the transport after release),
//! efficiency against the Little's-law bound, CPU seconds per million events
//! per service process (and Redis, and this client), and peak RSS per process.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use futures::future::try_join_all;
use integration_tests::Cluster;
use ordo_core::latency::Latency;
use ordo_proto::{Event, OrderingMode};
use rand::{SeedableRng as _, seq::SliceRandom as _};
use serde::Serialize;

use crate::{
    driver::{self, CallOptions},
    inprocess::{self, Shape},
    many_streams::{self, ManyStreams},
    procstat::{self, Meter, ProcessUsage, Watched},
    stats::LatencySummary,
};

/// The operation every benchmark event runs (a delay, then the payload back).
pub const OPERATION: &str = "async-echo";
/// The harmonizer's default per-stream window, which bounds what the client
/// keeps outstanding in the worker-concurrency variants.
pub const HARMONIZER_WINDOW: usize = 1024;

/// Which workloads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadId {
    A,
    B,
    C,
    D,
    E,
}

impl std::fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::A => "a",
            Self::B => "b",
            Self::C => "c",
            Self::D => "d",
            Self::E => "e",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub workloads: Vec<WorkloadId>,
    /// Events of workloads (a) and (c).
    pub events: usize,
    /// Concurrency of (a) and (c).
    pub concurrency: usize,
    /// Latency model of (a).
    pub uniform_latency: String,
    /// Latency of the fast events of (c).
    pub skew_fast: Duration,
    /// How many times slower the slow events of (c) are.
    pub skew_factor: u32,
    /// Share of slow events in (c).
    pub skew_share: f64,
    /// (b): calls, streams per call, total events, outstanding events per call.
    pub saturation_calls: usize,
    pub saturation_streams: usize,
    pub saturation_events: usize,
    pub saturation_in_flight: usize,
    /// (d): the numbers of streams (the first is the baseline), the events
    /// of each point, calls, outstanding events per call.
    pub many_streams: Vec<usize>,
    pub many_streams_events: usize,
    pub many_streams_calls: usize,
    pub many_streams_in_flight: usize,
    /// Events of the sequential consumer's sample (extrapolated to `events`).
    pub sequential_sample: usize,
    /// Run the sequential consumer over all events instead.
    pub full_sequential: bool,
    /// Also run the worker-concurrency variants (a second cluster).
    pub worker_concurrency_variants: bool,
    /// Per-call deadline.
    pub deadline: Duration,
    pub out_dir: PathBuf,
    /// Seed of the skewed workload's choice of slow events.
    pub seed: u64,
    /// Extra flags of every harmonizer and every worker the benchmark
    /// starts (`--harmonizer-arg`, `--worker-arg`), e.g. the direct results
    /// path `--follow-releases redis --store-results redis`.
    pub harmonizer_args: Vec<String>,
    pub worker_args: Vec<String>,
}

/// A cluster with the configuration's extra service flags.
pub fn cluster(config: &Config) -> integration_tests::ClusterBuilder {
    Cluster::builder().harmonizer_args(config.harmonizer_args.clone()).worker_args(config.worker_args.clone())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            workloads: vec![WorkloadId::A, WorkloadId::B, WorkloadId::C, WorkloadId::D],
            events: 10_000,
            concurrency: 100,
            uniform_latency: "uniform:0ms-5ms".into(),
            skew_fast: Duration::from_millis(1),
            skew_factor: 50,
            skew_share: 0.01,
            saturation_calls: 4,
            saturation_streams: 16,
            saturation_events: 200_000,
            saturation_in_flight: 4096,
            many_streams: many_streams::DEFAULT_STREAMS.to_vec(),
            many_streams_events: 262_144,
            many_streams_calls: 4,
            many_streams_in_flight: 4096,
            sequential_sample: 1000,
            full_sequential: false,
            worker_concurrency_variants: true,
            deadline: Duration::from_secs(300),
            out_dir: PathBuf::from("results/bench"),
            seed: 42,
            harmonizer_args: Vec::new(),
            worker_args: Vec::new(),
        }
    }
}

/// One line of a workload's table.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: String,
    /// `ordo`, `in-process` or `sequential`.
    pub kind: &'static str,
    pub ordered: bool,
    pub events: usize,
    pub elapsed_s: f64,
    /// The elapsed time is extrapolated from a sample.
    pub extrapolated_from: Option<usize>,
    pub events_per_s: f64,
    pub end_to_end: Option<LatencySummary>,
    pub reorder_overhead: Option<LatencySummary>,
    /// Little's-law bound / elapsed.
    pub efficiency: Option<f64>,
    /// CPU seconds per million events, all service processes and Redis.
    pub service_cpu_s_per_million: Option<f64>,
    /// CPU seconds per million events of this (client) process.
    pub client_cpu_s_per_million: Option<f64>,
    pub processes: Vec<ProcessUsage>,
    pub order_violations: usize,
    pub failed: usize,
    pub duplicates: usize,
    pub note: String,
}

/// One workload with its variants.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub id: WorkloadId,
    pub title: String,
    pub events: usize,
    pub concurrency: usize,
    pub latency: String,
    /// Mean of the requested distribution, ms.
    pub requested_mean_ms: f64,
    /// What tokio actually slept (in-process `buffer_unordered` run).
    pub measured_sleep: Option<LatencySummary>,
    pub measured_mean_ms: f64,
    /// events × requested mean / concurrency.
    pub little_bound_s: Option<f64>,
    /// The same with the measured mean.
    pub little_bound_measured_s: Option<f64>,
    pub variants: Vec<Variant>,
    /// (d): the points, their ratios and Redis memory (variants are in the
    /// same order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub many_streams: Option<ManyStreams>,
}

impl Workload {
    /// A workload of zero-delay events (no latency model, no Little's-law
    /// bound): (b), (d) and (e).
    pub(crate) fn zero_delay(
        id: WorkloadId,
        title: String,
        events: usize,
        concurrency: usize,
        variants: Vec<Variant>,
    ) -> Self {
        Self {
            id,
            title,
            events,
            concurrency,
            latency: "none".into(),
            requested_mean_ms: 0.0,
            measured_sleep: None,
            measured_mean_ms: 0.0,
            little_bound_s: None,
            little_bound_measured_s: None,
            variants,
            many_streams: None,
        }
    }
}

/// A target of the issue, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// Everything one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// The extra flags the services ran with (`harmonizer --follow-releases redis`, …).
    pub service_args: Vec<String>,
    pub workloads: Vec<Workload>,
    pub targets: Vec<Target>,
}

/// Where it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub clock_ticks: u64,
    pub kernel: String,
    pub unix_time: u64,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".into(), |m| m.trim().to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            clock_ticks: procstat::clock_ticks(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            unix_time: driver::unix_nanos() / 1_000_000_000,
        }
    }
}

pub(crate) fn event(stream: &str, sequence: u64, latency: Option<&str>, mode: OrderingMode) -> Event {
    let mut event = Event {
        stream_id: stream.to_owned(),
        sequence,
        operation: OPERATION.to_owned(),
        payload: format!("{sequence:08}").into_bytes().into(),
        ..Default::default()
    };
    if let Some(latency) = latency {
        event.attributes.insert(ordo_core::latency::ATTRIBUTE.to_owned(), latency.to_owned());
    }
    event.set_mode(mode);
    event
}

/// Per-event latency attributes of one stream, with the delays the in-process
/// baselines sleep for the same events.
struct Plan {
    attributes: Vec<Option<String>>,
    delays: Vec<Duration>,
}

impl Plan {
    fn events(&self, stream: &str, mode: OrderingMode) -> Vec<Event> {
        self.attributes.iter().enumerate().map(|(i, a)| event(stream, i as u64, a.as_deref(), mode)).collect()
    }
}

fn uniform_plan(config: &Config) -> anyhow::Result<Plan> {
    let model = Latency::parse(&config.uniform_latency).context("--uniform-latency")?;
    let mut rng = rand::rng();
    Ok(Plan {
        attributes: vec![Some(config.uniform_latency.clone()); config.events],
        delays: (0..config.events).map(|_| model.sample(&mut rng)).collect(),
    })
}

fn skewed_plan(config: &Config) -> Plan {
    let slow = config.skew_fast * config.skew_factor;
    let n_slow = ((config.events as f64) * config.skew_share).round() as usize;
    let mut indexes: Vec<usize> = (0..config.events).collect();
    indexes.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed));
    let mut is_slow = vec![false; config.events];
    for &i in &indexes[..n_slow.min(config.events)] {
        is_slow[i] = true;
    }
    let text = |d: Duration| Latency::Fixed(d).to_string();
    let (fast_text, slow_text) = (text(config.skew_fast), text(slow));
    Plan {
        attributes: is_slow.iter().map(|&s| Some(if s { slow_text.clone() } else { fast_text.clone() })).collect(),
        delays: is_slow.iter().map(|&s| if s { slow } else { config.skew_fast }).collect(),
    }
}

/// The processes of a cluster, front to back, and Redis.
fn watched(cluster: &Cluster) -> Vec<Watched> {
    cluster.pids().into_iter().map(|(name, pid)| Watched { name, pid }).collect()
}

fn per_million(seconds: Option<f64>, events: usize) -> Option<f64> {
    seconds.filter(|_| events > 0).map(|s| s * 1e6 / events as f64)
}

/// Runs one Ordo variant: `calls` (each a list of events) at once, each on
/// its own connection, every process metered.
pub(crate) async fn ordo_variant(
    cluster: &Cluster,
    name: &str,
    calls: Vec<Vec<Event>>,
    max_in_flight: usize,
    deadline: Duration,
    bound_s: Option<f64>,
    note: &str,
) -> anyhow::Result<Variant> {
    let ordered = calls.first().and_then(|c| c.first()).is_none_or(|e| e.mode() != OrderingMode::Unordered);
    let addr = cluster.harmonizer_addr();
    let clients = try_join_all(calls.iter().map(|_| driver::connect(&addr))).await?;
    let options = CallOptions { max_in_flight, deadline, keep_payloads: false };
    let meter = Meter::start(watched(cluster));
    let client_before = procstat::cpu_seconds(None);
    let outcomes =
        try_join_all(clients.iter().zip(calls).map(|(client, events)| driver::run_call(client, events, options)))
            .await
            .with_context(|| format!("variant {name:?}"))?;
    let client_cpu = procstat::cpu_seconds(None).zip(client_before).map(|(a, b)| a - b);
    let processes = meter.finish();
    let m = driver::measure(&outcomes);
    let service_cpu = processes.iter().map(|p| p.cpu_seconds).sum::<Option<f64>>();
    Ok(Variant {
        name: name.to_owned(),
        kind: "ordo",
        ordered,
        events: m.events,
        elapsed_s: m.elapsed_s,
        extrapolated_from: None,
        events_per_s: if m.elapsed_s > 0.0 { m.events as f64 / m.elapsed_s } else { 0.0 },
        end_to_end: m.end_to_end.summary(),
        reorder_overhead: m.reorder_overhead.summary(),
        efficiency: bound_s.filter(|_| m.elapsed_s > 0.0).map(|b| b / m.elapsed_s),
        service_cpu_s_per_million: per_million(service_cpu, m.events),
        client_cpu_s_per_million: per_million(client_cpu, m.events),
        processes,
        order_violations: m.order_violations,
        failed: m.failed,
        duplicates: m.duplicates + m.foreign,
        note: note.to_owned(),
    })
}

fn in_process_variant(name: &str, run: &inprocess::InProcess, ordered: bool, bound_s: Option<f64>) -> Variant {
    Variant {
        name: name.to_owned(),
        kind: "in-process",
        ordered,
        events: run.events,
        elapsed_s: run.elapsed_s,
        extrapolated_from: None,
        events_per_s: if run.elapsed_s > 0.0 { run.events as f64 / run.elapsed_s } else { 0.0 },
        end_to_end: run.end_to_end.summary(),
        reorder_overhead: run.reorder_overhead.summary(),
        efficiency: bound_s.filter(|_| run.elapsed_s > 0.0).map(|b| b / run.elapsed_s),
        service_cpu_s_per_million: None,
        client_cpu_s_per_million: None,
        processes: Vec::new(),
        order_violations: 0,
        failed: 0,
        duplicates: 0,
        note: String::new(),
    }
}

/// The in-process baselines and the sequential consumer over `delays`.
async fn baselines(
    config: &Config,
    delays: &[Duration],
    n: usize,
    bound_s: Option<f64>,
) -> (Vec<Variant>, inprocess::InProcess) {
    let mut variants = Vec::new();
    let buffered = inprocess::run(delays, n, Shape::Buffered).await;
    variants.push(in_process_variant(&format!("in-process buffered({n})"), &buffered, true, bound_s));
    let unordered = inprocess::run(delays, n, Shape::BufferUnordered).await;
    variants.push(in_process_variant(&format!("in-process buffer_unordered({n})"), &unordered, false, bound_s));
    let reordered = inprocess::run(delays, n, Shape::Reordered).await;
    variants.push(in_process_variant(
        &format!("in-process buffer_unordered({n}) + reorder"),
        &reordered,
        true,
        bound_s,
    ));
    if delays.iter().any(|d| !d.is_zero()) {
        let sample =
            if config.full_sequential { delays.len() } else { config.sequential_sample.clamp(1, delays.len()) };
        let seq = inprocess::sequential(&delays[..sample]).await;
        let scale = delays.len() as f64 / sample as f64;
        let elapsed = seq.elapsed_s * scale;
        let mut v = in_process_variant("sequential ordered consumer", &seq, true, bound_s);
        v.kind = "sequential";
        v.events = delays.len();
        v.elapsed_s = elapsed;
        v.events_per_s = if elapsed > 0.0 { delays.len() as f64 / elapsed } else { 0.0 };
        v.efficiency = bound_s.filter(|_| elapsed > 0.0).map(|b| b / elapsed);
        v.reorder_overhead = None;
        if sample < delays.len() {
            v.extrapolated_from = Some(sample);
            v.note = format!("first {sample} events run, time × {scale:.0}");
        }
        variants.push(v);
    }
    (variants, unordered)
}

fn requested_mean_ms(plan: &Plan, model: Option<&Latency>) -> f64 {
    match model {
        Some(model) => model.mean().as_secs_f64() * 1000.0,
        None if plan.delays.is_empty() => 0.0,
        None => 1000.0 * plan.delays.iter().map(Duration::as_secs_f64).sum::<f64>() / plan.delays.len() as f64,
    }
}

/// Workloads (a) and (c): one stream, `concurrency` outstanding.
async fn one_stream_workload(
    config: &Config,
    cluster: &Cluster,
    id: WorkloadId,
    plan: &Plan,
    model: Option<&Latency>,
    nonce: u64,
) -> anyhow::Result<Workload> {
    let n = config.concurrency;
    let mean_ms = requested_mean_ms(plan, model);
    let bound = Some(config.events as f64 * mean_ms / 1000.0 / n as f64);
    let mut variants = Vec::new();
    for (mode, label) in [(OrderingMode::Ordered, "ORDERED"), (OrderingMode::Unordered, "UNORDERED")] {
        let stream = format!("bench-{id}-{label}-{nonce}").to_lowercase();
        let name = format!("Ordo {label}, client ≤{n} outstanding");
        eprintln!("ordo-bench: ({id}) {name}");
        variants
            .push(ordo_variant(cluster, &name, vec![plan.events(&stream, mode)], n, config.deadline, bound, "").await?);
    }
    eprintln!("ordo-bench: ({id}) in-process baselines");
    let (baseline_variants, unordered) = baselines(config, &plan.delays, n, bound).await;
    variants.extend(baseline_variants);
    let measured_mean_ms = unordered.mean_sleep_ms;
    let title = match id {
        WorkloadId::A => {
            format!("(a) {} events, one stream, {}, concurrency {n}", config.events, config.uniform_latency)
        }
        _ => format!(
            "(c) {} events, one stream, {:.0}% at {} and the rest at {}, concurrency {n}",
            config.events,
            config.skew_share * 100.0,
            Latency::Fixed(config.skew_fast * config.skew_factor),
            Latency::Fixed(config.skew_fast),
        ),
    };
    Ok(Workload {
        id,
        title,
        events: config.events,
        concurrency: n,
        latency: model.map_or_else(|| "per event (see title)".into(), ToString::to_string),
        requested_mean_ms: mean_ms,
        measured_sleep: unordered.sleeps.summary(),
        measured_mean_ms,
        little_bound_s: bound,
        little_bound_measured_s: Some(config.events as f64 * measured_mean_ms / 1000.0 / n as f64),
        variants,
        many_streams: None,
    })
}

/// Workload (b): zero delay, many streams over a few calls.
async fn saturation(config: &Config, cluster: &Cluster, nonce: u64) -> anyhow::Result<Workload> {
    let calls = config.saturation_calls.max(1);
    let streams = config.saturation_streams.max(1);
    let per_stream = (config.saturation_events / (calls * streams)).max(1);
    let total = per_stream * calls * streams;
    let mut variants = Vec::new();
    for (mode, label) in [(OrderingMode::Ordered, "ORDERED"), (OrderingMode::Unordered, "UNORDERED")] {
        let events: Vec<Vec<Event>> = (0..calls)
            .map(|c| {
                let names: Vec<String> =
                    (0..streams).map(|s| format!("bench-b-{label}-{nonce}-c{c}-s{s}").to_lowercase()).collect();
                (0..per_stream as u64)
                    .flat_map(|seq| names.iter().map(move |name| event(name, seq, None, mode)))
                    .collect()
            })
            .collect();
        let name = format!(
            "Ordo {label}, {calls} calls × {streams} streams, ≤{} outstanding per call",
            config.saturation_in_flight
        );
        eprintln!("ordo-bench: (b) {name}");
        variants
            .push(ordo_variant(cluster, &name, events, config.saturation_in_flight, config.deadline, None, "").await?);
    }
    eprintln!("ordo-bench: (b) in-process baselines");
    let n = config.saturation_in_flight * calls;
    let (baseline_variants, _) = baselines(config, &vec![Duration::ZERO; total], n, None).await;
    variants.extend(baseline_variants);
    Ok(Workload::zero_delay(
        WorkloadId::B,
        format!("(b) saturation: {total} events, {calls} calls × {streams} streams, no delay"),
        total,
        n,
        variants,
    ))
}

/// A short zero-delay call so that connections, pools and allocators are warm.
pub(crate) async fn warm_up(cluster: &Cluster, nonce: u64) -> anyhow::Result<()> {
    let client = driver::connect(&cluster.harmonizer_addr()).await?;
    let events = (0..2000).map(|s| event(&format!("bench-warmup-{nonce}"), s, None, OrderingMode::Ordered)).collect();
    let options = CallOptions { max_in_flight: 512, deadline: Duration::from_secs(60), keep_payloads: false };
    driver::run_call(&client, events, options).await.context("warm-up call")?;
    Ok(())
}

/// Runs the configured workloads on clusters it starts (binaries from
/// `ORDO_BIN_DIR` or next to this program).
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    if config.events == 0 || config.concurrency == 0 {
        bail!("--events and --concurrency must be at least 1");
    }
    let nonce = driver::unix_nanos();
    let uniform = Latency::parse(&config.uniform_latency).context("--uniform-latency")?;
    let a_plan = uniform_plan(config)?;
    let c_plan = skewed_plan(config);
    let mut workloads = Vec::new();
    {
        // (d) starts a cluster per point; the others share this one.
        let shared = if config.workloads.iter().any(|&w| !matches!(w, WorkloadId::D | WorkloadId::E)) {
            let cluster = cluster(config).try_start().await.context("cannot start the Ordo cluster")?;
            warm_up(&cluster, nonce).await?;
            Some(cluster)
        } else {
            None
        };
        for &id in &config.workloads {
            if id == WorkloadId::D {
                workloads.push(many_streams::run(config, nonce).await?);
                continue;
            }
            if id == WorkloadId::E {
                workloads.push(crate::scale_out::run(config, nonce).await?);
                continue;
            }
            let cluster = shared.as_ref().context("the shared cluster was not started")?;
            workloads.push(match id {
                WorkloadId::A => one_stream_workload(config, cluster, id, &a_plan, Some(&uniform), nonce).await?,
                WorkloadId::B => saturation(config, cluster, nonce).await?,
                _ => one_stream_workload(config, cluster, id, &c_plan, None, nonce).await?,
            });
        }
    }
    let one_stream = |id: WorkloadId| matches!(id, WorkloadId::A | WorkloadId::C);
    if config.worker_concurrency_variants && config.workloads.iter().any(|&w| one_stream(w)) {
        let n = config.concurrency;
        let cluster = cluster(config)
            .worker_args(["--concurrency", &n.to_string()])
            .try_start()
            .await
            .context("cannot start the worker-concurrency cluster")?;
        warm_up(&cluster, nonce).await?;
        for workload in workloads.iter_mut().filter(|w| one_stream(w.id)) {
            let plan = if workload.id == WorkloadId::A { &a_plan } else { &c_plan };
            let mut extra = Vec::new();
            for (mode, label) in [(OrderingMode::Ordered, "ORDERED"), (OrderingMode::Unordered, "UNORDERED")] {
                let stream = format!("bench-{}-wc-{label}-{nonce}", workload.id).to_lowercase();
                let name = format!("Ordo {label}, worker --concurrency {n}");
                eprintln!("ordo-bench: ({}) {name}", workload.id);
                let note = format!("client ≤{HARMONIZER_WINDOW} outstanding (the harmonizer's window)");
                extra.push(
                    ordo_variant(
                        &cluster,
                        &name,
                        vec![plan.events(&stream, mode)],
                        HARMONIZER_WINDOW,
                        config.deadline,
                        workload.little_bound_s,
                        &note,
                    )
                    .await?,
                );
            }
            // Right after the client-window variants.
            workload.variants.splice(2..2, extra);
        }
    }
    let targets = targets(&workloads);
    let service_args = [("harmonizer", &config.harmonizer_args), ("worker", &config.worker_args)]
        .iter()
        .filter(|(_, args)| !args.is_empty())
        .map(|(service, args)| format!("{service} {}", args.join(" ")))
        .collect();
    Ok(Report { machine: Machine::detect(), service_args, workloads, targets })
}

fn find<'a>(workloads: &'a [Workload], id: WorkloadId, prefix: &str) -> Option<&'a Variant> {
    workloads.iter().find(|w| w.id == id)?.variants.iter().find(|v| v.name.starts_with(prefix))
}

/// The targets, as measured (recorded, never asserted).
fn targets(workloads: &[Workload]) -> Vec<Target> {
    let mut out = Vec::new();
    for (label, prefix) in [("client window", "Ordo ORDERED, client"), ("worker concurrency", "Ordo ORDERED, worker")] {
        if let Some(v) = find(workloads, WorkloadId::A, prefix) {
            out.push(Target {
                target: format!("(a) ordered ≤ 0.36 s ({label})"),
                measured: format!("{:.3} s ({:.0}% of the bound)", v.elapsed_s, 100.0 * v.efficiency.unwrap_or(0.0)),
                met: v.elapsed_s <= 0.36,
            });
        }
    }
    // (d) and (e) have no UNORDERED variants: their points compare topologies or stream counts.
    for w in workloads.iter().filter(|w| !matches!(w.id, WorkloadId::D | WorkloadId::E)) {
        // Ordo variants come in pairs: ORDERED, then UNORDERED of the same setup.
        let ordo: Vec<&Variant> = w.variants.iter().filter(|v| v.kind == "ordo").collect();
        for pair in ordo.chunks(2) {
            let [o, u] = pair else { continue };
            let ratio = if u.events_per_s > 0.0 { o.events_per_s / u.events_per_s } else { 0.0 };
            let setup = o.name.trim_start_matches("Ordo ORDERED, ");
            out.push(Target {
                target: format!("({}) ordered ≥ 0.9 × unordered throughput ({setup})", w.id),
                measured: format!("{ratio:.2} ({:.0} vs {:.0} events/s)", o.events_per_s, u.events_per_s),
                met: ratio >= 0.9,
            });
        }
    }
    if let Some(w) = workloads.iter().find(|w| w.id == WorkloadId::B)
        && let Some(v) = w.variants.iter().find(|v| v.kind == "ordo" && v.ordered)
    {
        out.push(Target {
            target: "(b) saturation ≥ 100,000 ordered events/s (stretch 200,000)".into(),
            measured: format!("{:.0} events/s", v.events_per_s),
            met: v.events_per_s >= 100_000.0,
        });
    }
    for w in workloads.iter().filter(|w| matches!(w.id, WorkloadId::A | WorkloadId::C)) {
        for v in w.variants.iter().filter(|v| v.kind == "ordo" && v.ordered) {
            if let Some(r) = v.reorder_overhead {
                out.push(Target {
                    target: format!("({}) reorder overhead p99 ≤ 1 ms ({})", w.id, v.name),
                    measured: format!("p99 {:.2} ms (p50 {:.2} ms)", r.p99_ms, r.p50_ms),
                    met: r.p99_ms <= 1.0,
                });
            }
        }
    }
    out.extend(many_streams::targets(workloads));
    out
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") })
}

impl Report {
    /// Fails when an ordered Ordo variant delivered out of order, lost or
    /// duplicated a result, or produced a FAILED result (none may).
    pub fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for w in &self.workloads {
            for (i, v) in w.variants.iter().enumerate().filter(|(_, v)| v.kind == "ordo") {
                // (d): each point sent its own number of events.
                let expected = w.many_streams.as_ref().and_then(|d| d.points.get(i)).map_or(w.events, |p| p.events);
                if v.order_violations > 0 || v.failed > 0 || v.duplicates > 0 || v.events != expected {
                    problems.push(format!(
                        "({}) {}: {} results for {} events, {} out of order, {} failed, {} duplicate or foreign",
                        w.id, v.name, v.events, expected, v.order_violations, v.failed, v.duplicates
                    ));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { bail!("{}", problems.join("\n")) }
    }

    /// Markdown tables: one per workload, then peak memory, then the targets.
    pub fn tables(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), kernel {}, CLK_TCK {}\n",
            m.cpus, m.cpu_model, m.kernel, m.clock_ticks
        );
        if !self.service_args.is_empty() {
            let _ = writeln!(out, "Service flags: {}\n", self.service_args.join("; "));
        }
        for w in &self.workloads {
            let _ = writeln!(out, "### {}\n", w.title);
            if let Some(d) = &w.many_streams {
                many_streams::tables(&mut out, d, &w.variants);
                continue;
            }
            if let Some(bound) = w.little_bound_s {
                let _ = writeln!(
                    out,
                    "Little's-law bound: {} × {:.2} ms / {} = {:.3} s (requested mean); {:.3} s with the measured mean sleep {:.2} ms{}.\n",
                    w.events,
                    w.requested_mean_ms,
                    w.concurrency,
                    bound,
                    w.little_bound_measured_s.unwrap_or(0.0),
                    w.measured_mean_ms,
                    w.measured_sleep.map_or(String::new(), |s| format!(
                        " (p50 {:.2}, p99 {:.2}, max {:.2} ms)",
                        s.p50_ms, s.p99_ms, s.max_ms
                    )),
                );
            }
            let _ = writeln!(
                out,
                "| variant | events | time (s) | events/s | e2e p50 (ms) | e2e p99 | e2e p99.9 | reorder p50 (ms) | reorder p99 | efficiency | CPU s / M events (services) | client CPU s / M |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for v in &w.variants {
                let time = match v.extrapolated_from {
                    Some(sample) => format!("{:.3} (extrapolated from {sample})", v.elapsed_s),
                    None => format!("{:.3}", v.elapsed_s),
                };
                let _ = writeln!(
                    out,
                    "| {}{} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    v.name,
                    if v.note.is_empty() { String::new() } else { format!(" ({})", v.note) },
                    v.events,
                    time,
                    v.events_per_s,
                    ms(v.end_to_end.map(|s| s.p50_ms)),
                    ms(v.end_to_end.map(|s| s.p99_ms)),
                    ms(v.end_to_end.map(|s| s.p999_ms)),
                    ms(v.reorder_overhead.map(|s| s.p50_ms)),
                    ms(v.reorder_overhead.map(|s| s.p99_ms)),
                    v.efficiency.map_or_else(|| "n/a".into(), |e| format!("{:.0}%", 100.0 * e)),
                    ms(v.service_cpu_s_per_million),
                    ms(v.client_cpu_s_per_million),
                );
            }
            out.push('\n');
            let ordo: Vec<&Variant> = w.variants.iter().filter(|v| v.kind == "ordo").collect();
            if let Some(first) = ordo.first() {
                let names: Vec<&str> = first.processes.iter().map(|p| p.name.as_str()).collect();
                let _ = writeln!(out, "CPU seconds per million events and peak RSS (MiB) per process:\n");
                let _ = writeln!(out, "| variant | {} |", names.join(" | "));
                let _ = writeln!(out, "|---|{}", "---:|".repeat(names.len()));
                for v in &ordo {
                    let cells: Vec<String> = v
                        .processes
                        .iter()
                        .map(|p| {
                            format!(
                                "{} s / {} MiB",
                                ms(per_million(p.cpu_seconds, v.events)),
                                p.peak_rss_mib.map_or_else(|| "n/a".into(), |r| format!("{r:.0}"))
                            )
                        })
                        .collect();
                    let _ = writeln!(out, "| {} | {} |", v.name, cells.join(" | "));
                }
                out.push('\n');
            }
        }
        let _ = writeln!(out, "### Targets (recorded, not asserted)\n");
        let _ = writeln!(out, "| target | measured | met |");
        let _ = writeln!(out, "|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(out, "| {} | {} | {} |", t.target, t.measured, if t.met { "yes" } else { "**no**" });
        }
        out
    }

    /// Writes `bench-<unix time>.json`, `latest.json` and `latest.md` into
    /// `dir`; returns the JSON path.
    pub fn write(&self, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
        crate::results::write(dir, "bench", self.machine.unix_time, self, &self.tables())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skewed_plan_has_the_asked_share_of_slow_events() {
        let config = Config { events: 10_000, ..Config::default() };
        let plan = skewed_plan(&config);
        let slow = plan.delays.iter().filter(|d| **d == Duration::from_millis(50)).count();
        assert_eq!(slow, 100);
        assert_eq!(plan.attributes.iter().filter(|a| a.as_deref() == Some("fixed:50ms")).count(), 100);
        // Seeded: the same events are slow every time.
        assert_eq!(skewed_plan(&config).delays, plan.delays);
    }

    #[test]
    fn events_carry_mode_latency_and_operation() {
        let e = event("s", 3, Some("fixed:1ms"), OrderingMode::Unordered);
        assert_eq!((e.sequence, e.operation.as_str(), e.mode()), (3, OPERATION, OrderingMode::Unordered));
        assert_eq!(e.attributes.get("latency").map(String::as_str), Some("fixed:1ms"));
        assert!(event("s", 0, None, OrderingMode::Ordered).attributes.is_empty());
    }
}
