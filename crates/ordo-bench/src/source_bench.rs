//! `ordo-bench-source` (`just bench-source`): ordered throughput through a
//! real JetStream broker, Ordo against a plain consumer, in one run.
//!
//! For each number of keys K (default 1 and 10), `events` messages (default
//! 10,000) go round robin over K keys into a stream of a private
//! `nats-server`; each carries a delay drawn once from `latency` (default
//! `uniform:0ms-5ms`) with a seeded RNG, so every variant sleeps the same
//! draws for the same message. Variants:
//!
//! - **Ordo** via `ordo-source`: the suite (worker `--concurrency`, default
//!   100) behind a durable pull consumer; each message runs `async-echo`
//!   with `latency=fixed:<its draw>`; the released results are read back
//!   from the sink's results stream, in order per key;
//! - **per-key sequential**: a plain async-nats pull consumer in this
//!   process that processes each key's messages in order, one at a time,
//!   keys in parallel, at most `concurrency` at once (the Confluent Parallel
//!   Consumer's key ordering);
//! - **unordered**: the same consumer with `concurrency` messages at once in
//!   any order (the upper bound; order is not checked).
//!
//! Each variant's clock starts at the first publish (its consumer is already
//! waiting) and stops at the last result; end-to-end latency is a message's
//! publish → its result (for Ordo: read from the results stream; for the
//! plain consumers: its sleep is over). Every result is checked per key
//! against what was published: lost, duplicated, reordered, foreign
//! ([`check`]). See `docs/benchmarks.md`, "JetStream source".

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use async_nats::{
    HeaderMap,
    jetstream::{self, consumer, message::PublishMessage, stream},
};
use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};
use ordo_core::latency::Latency;
use rand::SeedableRng as _;
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use crate::{bench::Machine, stats::Latencies};

/// The header that carries a message's key (the one `ordo publish` sets).
pub const KEY_HEADER: &str = "Ordo-Key";
/// The header that carries a message's delay in microseconds, for the
/// plain consumers.
pub const DELAY_HEADER: &str = "Ordo-Bench-Delay-Us";
/// The header `ordo-source` turns into the event's `latency` attribute.
pub const ATTRIBUTE_HEADER: &str = "Ordo-Attr-latency";
/// How long after the last expected result a variant keeps reading, to see
/// duplicates.
const GRACE: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub events: usize,
    /// Each entry is one scenario (K keys).
    pub keys: Vec<usize>,
    pub concurrency: usize,
    pub latency: String,
    pub seed: u64,
    /// Run the unordered upper bound too.
    pub unordered: bool,
    /// Run the Ordo variant (needs the `ordo-source` binary).
    pub ordo: bool,
    /// Publishes awaiting their acknowledgement at once.
    pub publish_in_flight: usize,
    /// Longest a variant may take.
    pub deadline: Duration,
    pub out_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            events: 10_000,
            keys: vec![1, 10],
            concurrency: 100,
            latency: "uniform:0ms-5ms".into(),
            seed: 42,
            unordered: true,
            ordo: true,
            publish_in_flight: 1000,
            deadline: Duration::from_secs(300),
            out_dir: PathBuf::from("results/bench-source"),
        }
    }
}

/// The messages of one scenario: message `i` has key `k<i mod keys>` and
/// delay `delays[i]`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub keys: usize,
    pub delays: Vec<Duration>,
}

impl Plan {
    /// `events` draws from `model` with a RNG seeded with `seed`: the same
    /// delays for every variant and every K.
    pub fn new(events: usize, keys: usize, model: &Latency, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Whole microseconds: what the header and the latency attribute carry.
        let delays = (0..events).map(|_| Duration::from_micros(model.sample(&mut rng).as_micros() as u64)).collect();
        Self { keys: keys.max(1), delays }
    }

    pub fn len(&self) -> usize {
        self.delays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.delays.is_empty()
    }

    pub fn key(&self, index: usize) -> String {
        format!("k{}", index % self.keys)
    }

    /// The time per-key sequential processing needs at best: the longest
    /// key's sum of delays.
    pub fn per_key_bound(&self) -> Duration {
        let mut per_key = vec![Duration::ZERO; self.keys];
        for (i, d) in self.delays.iter().enumerate() {
            per_key[i % self.keys] += *d;
        }
        per_key.into_iter().max().unwrap_or_default()
    }

    /// The time `concurrency` at once need at best: total / concurrency, at
    /// least the longest delay.
    pub fn concurrent_bound(&self, concurrency: usize) -> Duration {
        let total: Duration = self.delays.iter().sum();
        let longest = self.delays.iter().max().copied().unwrap_or_default();
        (total / concurrency.max(1) as u32).max(longest)
    }
}

/// What arrived, against what was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Results received, duplicates included.
    pub received: usize,
    /// Published messages without a result.
    pub lost: usize,
    /// Results beyond the first of a message.
    pub duplicated: usize,
    /// First results of a message that came after a later message of the same key.
    pub reordered: usize,
    /// Results naming no published message, or the wrong key (or, for
    /// Ordo, a per-key sequence other than the message's).
    pub foreign: usize,
    /// Results that are not OK.
    pub failed: usize,
}

impl Delivery {
    /// Nothing lost, duplicated or foreign; and, when `ordered`, nothing reordered.
    pub fn clean(&self, ordered: bool) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.foreign == 0
            && self.failed == 0
            && (!ordered || self.reordered == 0)
    }
}

/// Checks `received` (key, message index), in arrival order, against `plan`.
pub fn check(plan: &Plan, received: &[(String, u64)]) -> Delivery {
    let mut seen = vec![false; plan.len()];
    let mut highest: HashMap<&str, u64> = HashMap::new();
    let mut out = Delivery { received: received.len(), ..Delivery::default() };
    for (key, index) in received {
        let Some(i) = usize::try_from(*index).ok().filter(|&i| i < plan.len() && plan.key(i) == *key) else {
            out.foreign += 1;
            continue;
        };
        if seen[i] {
            out.duplicated += 1;
            continue;
        }
        seen[i] = true;
        let top = highest.entry(key.as_str()).or_insert(*index);
        if *index < *top {
            out.reordered += 1;
        } else {
            *top = *index;
        }
    }
    out.lost = seen.iter().filter(|s| !**s).count();
    out
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub keys: usize,
    pub variant: String,
    /// Whether per-key order is required (and checked).
    pub ordered: bool,
    pub events: usize,
    /// First publish → last result.
    pub elapsed_s: f64,
    pub events_per_s: f64,
    /// How long publishing all messages took.
    pub publish_s: f64,
    /// The best this variant's shape allows with these delays.
    pub ideal_s: f64,
    pub end_to_end: Option<crate::stats::LatencySummary>,
    /// Mean time a message's work really slept, ms (plain consumers only).
    pub mean_sleep_ms: Option<f64>,
    pub delivery: Delivery,
    pub note: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// `/proc/loadavg` before and after the run.
    pub load_before: String,
    pub load_after: String,
    pub events: usize,
    pub concurrency: usize,
    pub latency: String,
    pub seed: u64,
    /// Mean of the drawn delays, ms.
    pub mean_delay_ms: f64,
    pub rows: Vec<Row>,
}

/// One result a variant saw.
#[derive(Debug, Clone)]
struct Arrival {
    key: String,
    index: u64,
    at: Instant,
    /// How long the work really slept (the plain consumers measure it).
    slept: Option<Duration>,
    /// The result is not OK (Ordo's `Ordo-Status` header).
    failed: bool,
}

type Arrivals = Vec<Arrival>;

/// What a publish of a plan took.
#[derive(Debug)]
struct Published {
    /// When each message's publish was issued.
    sent: Vec<Instant>,
    started: Instant,
    finished: Instant,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// Connects to the private server with a JetStream context whose publish
/// window is `in_flight`.
async fn connect(url: &str, in_flight: usize) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let client = async_nats::ConnectOptions::new()
        .name("ordo-bench-source")
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(in_flight.max(1))
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok((client, js))
}

/// A fresh stream `name` on `<prefix>.>` (file storage, as in production).
async fn create_stream(js: &jetstream::Context, name: &str, prefix: &str) -> anyhow::Result<stream::Stream> {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create stream {name}"))
}

/// Publishes the plan to `<prefix>.<key>`, the key also in [`KEY_HEADER`],
/// the delay in [`DELAY_HEADER`] and as the latency attribute, the payload
/// the message's index; returns once every publish is acknowledged.
async fn publish(js: &jetstream::Context, prefix: &str, plan: &Plan, in_flight: usize) -> anyhow::Result<Published> {
    let mut sent = Vec::with_capacity(plan.len());
    let mut pending = FuturesUnordered::new();
    let started = Instant::now();
    for (i, delay) in plan.delays.iter().enumerate() {
        let key = plan.key(i);
        let micros = delay.as_micros().to_string();
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, key.as_str());
        headers.insert(DELAY_HEADER, micros.as_str());
        headers.insert(ATTRIBUTE_HEADER, format!("fixed:{micros}us").as_str());
        let message = PublishMessage::build()
            .payload(Bytes::from(i.to_string()))
            .headers(headers)
            .message_id(format!("bench-{i}"));
        while pending.len() >= in_flight.max(1) {
            if let Some(ack) = pending.next().await {
                ack?;
            }
        }
        sent.push(Instant::now());
        let ack = js.send_publish(format!("{prefix}.{key}"), message).await.with_context(|| format!("publish {i}"))?;
        pending.push(async move { ack.await.with_context(|| format!("publish {i} not acknowledged")) });
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(Published { sent, started, finished: Instant::now() })
}

/// Index, key and delay of a message of [`publish`].
fn parse_message(message: &async_nats::Message) -> anyhow::Result<(String, u64, Duration)> {
    let headers = message.headers.as_ref().context("a message without headers")?;
    let key = headers.get(KEY_HEADER).context("a message without its key header")?.as_str().to_owned();
    let micros: u64 = headers
        .get(DELAY_HEADER)
        .context("a message without its delay header")?
        .as_str()
        .parse()
        .context("a malformed delay header")?;
    let index = parse_index(&message.payload)?;
    Ok((key, index, Duration::from_micros(micros)))
}

fn parse_index(payload: &[u8]) -> anyhow::Result<u64> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("payload {:?} is not a message index", String::from_utf8_lossy(payload)))
}

/// How the plain consumer schedules messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Each key in order, one at a time; keys in parallel up to the cap.
    PerKey,
    /// Up to the cap at once, in any order.
    Unordered,
}

/// Sleeps like the stateful worker (not at all for zero); returns how long
/// it really took (tokio's timer rounds up to the millisecond).
async fn work(delay: Duration) -> Duration {
    let start = Instant::now();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    start.elapsed()
}

/// A plain async-nats pull consumer over `stream`, processing as `shape`
/// with at most `cap` messages at once; each message is acked after its
/// work. Sends (key, index, done) for every processed message to `done`.
/// Runs until aborted.
async fn plain_consumer(
    stream: stream::Stream,
    durable: String,
    shape: Shape,
    cap: usize,
    done: mpsc::UnboundedSender<Arrival>,
) -> anyhow::Result<()> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            // The server's default: enough in hand for `cap` at work, and few
            // enough that a key's queue is worked off within `ack_wait` (30 s):
            // holding all 10,000 messages of one key (36 s of work) got the
            // last ones redelivered as duplicates.
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot create consumer {durable}"))?;
    let mut messages = consumer.messages().await.context("cannot pull")?;
    let permits = Arc::new(Semaphore::new(cap.max(1)));
    let mut tasks = JoinSet::new();
    let mut lanes: HashMap<String, mpsc::UnboundedSender<(jetstream::Message, u64, Duration)>> = HashMap::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("pull failed: {e}"))?;
        let (key, index, delay) = parse_message(&message)?;
        match shape {
            Shape::Unordered => {
                let permit = permits.clone().acquire_owned().await.context("semaphore closed")?;
                let done = done.clone();
                tasks.spawn(async move {
                    let slept = work(delay).await;
                    drop(permit);
                    let _ = done.send(Arrival { key, index, at: Instant::now(), slept: Some(slept), failed: false });
                    let _ = message.ack().await;
                });
            }
            Shape::PerKey => {
                let lane = lanes.entry(key.clone()).or_insert_with(|| {
                    let (tx, mut rx) = mpsc::unbounded_channel::<(jetstream::Message, u64, Duration)>();
                    let (permits, done, key) = (permits.clone(), done.clone(), key.clone());
                    tasks.spawn(async move {
                        while let Some((message, index, delay)) = rx.recv().await {
                            let Ok(permit) = permits.acquire().await else { return };
                            let slept = work(delay).await;
                            drop(permit);
                            let _ = done.send(Arrival {
                                key: key.clone(),
                                index,
                                at: Instant::now(),
                                slept: Some(slept),
                                failed: false,
                            });
                            let _ = message.ack().await;
                        }
                    });
                    tx
                });
                lane.send((message, index, delay)).map_err(|_| anyhow::anyhow!("lane of key {key} ended"))?;
            }
        }
        // Reap finished unordered tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    bail!("the pull consumer {durable} ended")
}

/// Reads `rx` until `expected` results arrived (then [`GRACE`] longer) or
/// `deadline` passed.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Arrival>, expected: usize, deadline: Duration) -> Arrivals {
    let mut out = Vec::with_capacity(expected);
    let end = tokio::time::Instant::now() + deadline;
    while out.len() < expected {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(arrival)) => out.push(arrival),
            Ok(None) | Err(_) => return out,
        }
    }
    let grace = tokio::time::Instant::now() + GRACE;
    while let Ok(Some(arrival)) = tokio::time::timeout_at(grace, rx.recv()).await {
        out.push(arrival);
    }
    out
}

/// Turns arrivals into a row.
#[allow(clippy::too_many_arguments)]
fn row(
    plan: &Plan,
    variant: &str,
    ordered: bool,
    published: &Published,
    arrivals: &Arrivals,
    ideal: Duration,
    note: String,
) -> Row {
    let pairs: Vec<(String, u64)> = arrivals.iter().map(|a| (a.key.clone(), a.index)).collect();
    let mut delivery = check(plan, &pairs);
    delivery.failed = arrivals.iter().filter(|a| a.failed).count();
    let last = arrivals.iter().map(|a| a.at).max().unwrap_or(published.started);
    let elapsed = last.saturating_duration_since(published.started).as_secs_f64();
    let mut latencies = Latencies::new();
    let mut first = vec![true; plan.len()];
    let mut slept = Vec::new();
    for a in arrivals {
        if let Some(sent) = usize::try_from(a.index).ok().and_then(|i| published.sent.get(i))
            && std::mem::take(&mut first[a.index as usize])
        {
            latencies.record_nanos(a.at.saturating_duration_since(*sent).as_nanos() as i128);
            slept.extend(a.slept);
        }
    }
    let mean_sleep_ms =
        (!slept.is_empty()).then(|| 1000.0 * slept.iter().map(Duration::as_secs_f64).sum::<f64>() / slept.len() as f64);
    let received = plan.len() - delivery.lost;
    Row {
        keys: plan.keys,
        variant: variant.to_owned(),
        ordered,
        events: received,
        elapsed_s: elapsed,
        events_per_s: if elapsed > 0.0 { received as f64 / elapsed } else { 0.0 },
        publish_s: published.finished.saturating_duration_since(published.started).as_secs_f64(),
        ideal_s: ideal.as_secs_f64(),
        end_to_end: latencies.summary(),
        mean_sleep_ms,
        delivery,
        note,
    }
}

/// One plain-consumer variant on its own stream.
async fn plain_variant(
    config: &Config,
    js: &jetstream::Context,
    plan: &Plan,
    shape: Shape,
    name: &str,
    tag: &str,
) -> anyhow::Result<Row> {
    let stream_name = format!("BENCH_{tag}_K{}", plan.keys);
    let prefix = format!("bench.{}.k{}", tag.to_lowercase(), plan.keys);
    let stream = create_stream(js, &stream_name, &prefix).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = tokio::spawn(plain_consumer(stream, format!("{tag}-k{}", plan.keys), shape, config.concurrency, tx));
    let published = publish(js, &prefix, plan, config.publish_in_flight).await?;
    let arrivals = collect(&mut rx, plan.len(), config.deadline).await;
    consumer.abort();
    if let Ok(Ok(Err(error))) = tokio::time::timeout(Duration::from_secs(1), consumer).await {
        bail!("{name}: {error:#}");
    }
    let (ordered, ideal) = match shape {
        Shape::PerKey => (true, plan.per_key_bound()),
        Shape::Unordered => (false, plan.concurrent_bound(config.concurrency)),
    };
    let note = match shape {
        Shape::PerKey => format!("≤{} at once, one per key", config.concurrency.min(plan.keys)),
        Shape::Unordered => format!("{} at once", config.concurrency),
    };
    js.delete_stream(&stream_name).await.with_context(|| format!("cannot delete {stream_name}"))?;
    Ok(row(plan, name, ordered, &published, &arrivals, ideal, note))
}

/// Runs every scenario on one private nats-server (and, for Ordo, a suite
/// per scenario).
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    if config.events == 0 || config.concurrency == 0 || config.keys.contains(&0) {
        bail!("--events, --concurrency and every --keys entry must be at least 1");
    }
    let model = Latency::parse(&config.latency).context("--latency")?;
    let load_before = loadavg();
    let nats = integration_tests::nats::NatsServer::start().await.context("cannot start a private nats-server")?;
    eprintln!("ordo-bench-source: private nats-server at {}", nats.url());
    let (client, js) = connect(&nats.url(), config.publish_in_flight).await?;
    let mut rows = Vec::new();
    let mut mean_delay_ms = 0.0;
    for &keys in &config.keys {
        let plan = Plan::new(config.events, keys, &model, config.seed);
        mean_delay_ms = 1000.0 * plan.delays.iter().map(Duration::as_secs_f64).sum::<f64>() / plan.len() as f64;
        if config.ordo {
            eprintln!("ordo-bench-source: K={keys} Ordo via ordo-source");
            rows.push(ordo::variant(config, &nats, &js, &plan).await?);
        }
        eprintln!("ordo-bench-source: K={keys} plain consumer, per-key sequential");
        rows.push(plain_variant(config, &js, &plan, Shape::PerKey, "plain consumer, per-key sequential", "SEQ").await?);
        if config.unordered {
            eprintln!("ordo-bench-source: K={keys} plain consumer, unordered");
            rows.push(plain_variant(config, &js, &plan, Shape::Unordered, "plain consumer, unordered", "UNORD").await?);
        }
    }
    drop(client);
    Ok(Report {
        machine: Machine::detect(),
        load_before,
        load_after: loadavg(),
        events: config.events,
        concurrency: config.concurrency,
        latency: config.latency.clone(),
        seed: config.seed,
        mean_delay_ms,
        rows,
    })
}

/// The Ordo variant: the suite, `ordo-source` between the stream and the
/// harmonizer, and a reader of the sink's results stream.
mod ordo {
    use integration_tests::{Cluster, nats::NatsServer};

    use super::*;

    /// Headers of a sink message (`ordo_source::sink`).
    const STATUS_HEADER: &str = "Ordo-Status";
    const SEQUENCE_HEADER: &str = "Ordo-Sequence";

    /// The sink's subjects of a scenario: `<prefix>.<key>`.
    fn sink_prefix(keys: usize) -> String {
        format!("bench.results.k{keys}")
    }

    /// `ordo-source`'s flags for one scenario besides those the testkit sets
    /// (`--name`, `--nats-url`, `--harmonizer`, `--redis-url`, `--listen`).
    fn source_args(stream: &str, sink: &str) -> Vec<String> {
        let sink_stream = format!("{stream}_RESULTS");
        let key = format!("header:{KEY_HEADER}");
        [
            "--stream",
            stream,
            "--key",
            &key,
            "--operation",
            crate::bench::OPERATION,
            "--sink-prefix",
            sink,
            "--sink-stream",
            &sink_stream,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Waits until `ordo-source` created its durable consumer (it is then
    /// pulling).
    async fn wait_for_consumer(stream: &mut stream::Stream, durable: &str, log: &Path) -> anyhow::Result<()> {
        let end = Instant::now() + Duration::from_secs(30);
        while stream.consumer_info(durable).await.is_err() {
            if Instant::now() > end {
                bail!("ordo-source did not create consumer {durable} within 30 s (log {})", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Reads the results stream from its start: every stored result, sent
    /// to `tx`, until aborted. A result whose payload is not an index, or
    /// whose `Ordo-Sequence` is not its message's place in its key, counts
    /// as foreign.
    async fn read_results(
        results: stream::Stream,
        sink: String,
        keys: usize,
        tx: mpsc::UnboundedSender<Arrival>,
    ) -> anyhow::Result<()> {
        let consumer = results
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("cannot create the results reader")?;
        let mut messages = consumer.messages().await.context("cannot pull results")?;
        let prefix = format!("{sink}.");
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("pull of results failed: {e}"))?;
            let at = Instant::now();
            let key = message.subject.as_str().strip_prefix(&prefix).unwrap_or(message.subject.as_str()).to_owned();
            let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
            let index = parse_index(&message.payload)
                .ok()
                .filter(|i| header(SEQUENCE_HEADER).and_then(|s| s.parse::<u64>().ok()) == Some(i / keys as u64))
                .unwrap_or(u64::MAX);
            let failed = header(STATUS_HEADER).as_deref() != Some("OK");
            if tx.send(Arrival { key, index, at, slept: None, failed }).is_err() {
                return Ok(());
            }
        }
        bail!("the results reader ended")
    }

    pub(super) async fn variant(
        config: &Config,
        nats: &NatsServer,
        js: &jetstream::Context,
        plan: &Plan,
    ) -> anyhow::Result<Row> {
        let cluster = Cluster::builder()
            .worker_args(["--concurrency", &config.concurrency.to_string()])
            .try_start()
            .await
            .context("cannot start the Ordo suite")?;
        crate::bench::warm_up(&cluster, crate::driver::unix_nanos()).await?;
        let k = plan.keys;
        let (stream_name, prefix, name) =
            (format!("BENCH_ORDO_K{k}"), format!("bench.ordo.k{k}"), format!("bench-k{k}"));
        let mut stream = create_stream(js, &stream_name, &prefix).await?;
        let sink = sink_prefix(k);
        let results = create_stream(js, &format!("{stream_name}_RESULTS"), &sink).await?;
        let mut source = cluster
            .start_source(&name, &nats.url(), source_args(&stream_name, &sink))
            .await
            .context("cannot start ordo-source")?;
        wait_for_consumer(&mut stream, &name, source.log_path()).await?;

        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_results(results, sink, k, tx));
        let published = publish(js, &prefix, plan, config.publish_in_flight).await?;
        let arrivals = collect(&mut rx, plan.len(), config.deadline).await;
        reader.abort();
        if arrivals.len() < plan.len() {
            eprintln!(
                "ordo-bench-source: K={k}: {} of {} results; ordo-source's log:\n{}",
                arrivals.len(),
                plan.len(),
                source.log_tail(30)
            );
        }
        source.kill();
        let note = format!("worker --concurrency {}", config.concurrency);
        Ok(row(
            plan,
            "Ordo via ordo-source",
            true,
            &published,
            &arrivals,
            plan.concurrent_bound(config.concurrency),
            note,
        ))
    }
}

/// The command line of `ordo-bench-source`.
pub mod cli {
    use std::{path::PathBuf, process::ExitCode, time::Duration};

    use ordo_core::duration;

    use super::Config;

    /// Ordered throughput through a real JetStream broker (a private
    /// nats-server): N messages over K keys through Ordo via ordo-source,
    /// next to a plain JetStream consumer that processes each key in order
    /// one at a time, and the same consumer unordered. Prints a table,
    /// writes JSON, CSV and Markdown; exits 1 if a variant lost, duplicated
    /// or (ordered) reordered a result.
    #[derive(Debug, clap::Parser)]
    #[command(name = "ordo-bench-source", version)]
    pub struct SourceBenchArgs {
        /// Messages per scenario.
        #[arg(long, default_value_t = 10_000)]
        pub events: usize,
        /// Numbers of keys, comma-separated: one scenario each.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        pub keys: Vec<usize>,
        /// Messages processed at once (the worker's --concurrency for Ordo,
        /// the plain consumers' cap).
        #[arg(long, default_value_t = 100)]
        pub concurrency: usize,
        /// Each message's work, drawn once per message: fixed:D, uniform:D1-D2 or exp:MEAN.
        #[arg(long, default_value = "uniform:0ms-5ms")]
        pub latency: String,
        /// Seed of the draws (the same delays for every variant and K).
        #[arg(long, default_value_t = 42)]
        pub seed: u64,
        /// Skip the unordered plain consumer.
        #[arg(long)]
        pub no_unordered: bool,
        /// Skip Ordo (only the plain consumers).
        #[arg(long)]
        pub no_ordo: bool,
        /// Publishes awaiting their acknowledgement at once.
        #[arg(long, default_value_t = 1000)]
        pub publish_in_flight: usize,
        /// Longest one variant may take.
        #[arg(long, default_value = "300s", value_parser = duration::parse)]
        pub deadline: Duration,
        /// Where the JSON, CSV and Markdown go.
        #[arg(long, default_value = "results/bench-source")]
        pub out: PathBuf,
    }

    pub async fn source_bench_main(args: SourceBenchArgs) -> ExitCode {
        let config = Config {
            events: args.events,
            keys: args.keys,
            concurrency: args.concurrency,
            latency: args.latency,
            seed: args.seed,
            unordered: !args.no_unordered,
            ordo: !args.no_ordo,
            publish_in_flight: args.publish_in_flight,
            deadline: args.deadline,
            out_dir: args.out,
        };
        crate::results::finish("ordo-bench-source", &config.out_dir.clone(), super::run(&config)).await
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1}"))
}

impl Report {
    /// One CSV line per row.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "keys,variant,ordered,events,elapsed_s,events_per_s,publish_s,ideal_s,mean_sleep_ms,e2e_p50_ms,e2e_p99_ms,e2e_max_ms,received,lost,duplicated,reordered,foreign,failed\n",
        );
        for r in &self.rows {
            let e = r.end_to_end;
            let d = r.delivery;
            let _ = writeln!(
                out,
                "{},{},{},{},{:.4},{:.1},{:.4},{:.4},{},{},{},{},{},{},{},{},{},{}",
                r.keys,
                r.variant,
                r.ordered,
                r.events,
                r.elapsed_s,
                r.events_per_s,
                r.publish_s,
                r.ideal_s,
                r.mean_sleep_ms.map_or_else(String::new, |m| format!("{m:.3}")),
                ms(e.map(|s| s.p50_ms)),
                ms(e.map(|s| s.p99_ms)),
                ms(e.map(|s| s.max_ms)),
                d.received,
                d.lost,
                d.duplicated,
                d.reordered,
                d.foreign,
                d.failed
            );
        }
        out
    }
}

impl crate::results::Report for Report {
    fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), kernel {}; load average before {} / after {}\n",
            m.cpus, m.cpu_model, m.kernel, self.load_before, self.load_after
        );
        let _ = writeln!(
            out,
            "{} events over K keys (message i has key k<i mod K>), {} (seed {}, mean of the draws {:.3} ms), concurrency {}.\n",
            self.events, self.latency, self.seed, self.mean_delay_ms, self.concurrency
        );
        let _ = writeln!(
            out,
            "ideal: per-key sequential, the longest key's sum of draws; otherwise the sum / concurrency (at least the longest draw). tokio's timer sleeps each draw rounded up to the millisecond (the measured mean is in the table).\n"
        );
        let _ = writeln!(
            out,
            "| K | variant | events | time (s) | events/s | ideal (s) | slept, mean (ms) | publish (s) | e2e p50 (ms) | e2e p99 (ms) | lost / dup / reordered / foreign / failed |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in &self.rows {
            let d = r.delivery;
            let checked = if r.ordered { d.reordered.to_string() } else { format!("({}, not required)", d.reordered) };
            let _ = writeln!(
                out,
                "| {} | {} ({}) | {} | {:.3} | {:.0} | {:.3} | {} | {:.3} | {} | {} | {} / {} / {} / {} / {} |",
                r.keys,
                r.variant,
                r.note,
                r.events,
                r.elapsed_s,
                r.events_per_s,
                r.ideal_s,
                r.mean_sleep_ms.map_or_else(|| "n/a".into(), |m| format!("{m:.2}")),
                r.publish_s,
                ms(r.end_to_end.map(|s| s.p50_ms)),
                ms(r.end_to_end.map(|s| s.p99_ms)),
                d.lost,
                d.duplicated,
                checked,
                d.foreign,
                d.failed
            );
        }
        out
    }

    fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let unix_time = self.machine.unix_time;
        let path = crate::results::write(dir, "bench-source", unix_time, self, &self.table())?;
        let csv = self.csv();
        for p in [dir.join(format!("bench-source-{unix_time}.csv")), dir.join("latest.csv")] {
            std::fs::write(&p, &csv).with_context(|| format!("cannot write {}", p.display()))?;
        }
        Ok(path)
    }

    /// Fails when a variant lost, duplicated or invented a result, or an
    /// ordered one released a key's results out of order.
    fn check(&self) -> anyhow::Result<()> {
        let problems: Vec<String> = self
            .rows
            .iter()
            .filter(|r| !r.delivery.clean(r.ordered))
            .map(|r| format!("K={} {}: {:?}", r.keys, r.variant, r.delivery))
            .collect();
        if problems.is_empty() { Ok(()) } else { bail!("{}", problems.join("\n")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(events: usize, keys: usize) -> Plan {
        Plan::new(events, keys, &Latency::parse("uniform:0ms-5ms").expect("valid"), 7)
    }

    fn in_order(plan: &Plan) -> Vec<(String, u64)> {
        (0..plan.len()).map(|i| (plan.key(i), i as u64)).collect()
    }

    #[test]
    fn a_clean_delivery_passes_in_any_interleaving_of_keys() {
        let p = plan(30, 3);
        assert_eq!(check(&p, &in_order(&p)), Delivery { received: 30, ..Delivery::default() });
        // Keys interleave differently but each stays in order.
        let mut by_key = in_order(&p);
        by_key.sort_by_key(|(k, i)| (k.clone(), *i));
        let d = check(&p, &by_key);
        assert!(d.clean(true), "{d:?}");
    }

    #[test]
    fn the_checker_catches_reordered_duplicated_missing_and_foreign_results() {
        let p = plan(20, 2);
        let mut swapped = in_order(&p);
        swapped.swap(2, 4); // k0: 0, 4, 2, … — 2 after 4
        let d = check(&p, &swapped);
        assert_eq!((d.reordered, d.lost, d.duplicated, d.foreign), (1, 0, 0, 0));
        assert!(!d.clean(true) && d.clean(false));

        let mut duplicated = in_order(&p);
        duplicated.insert(5, ("k1".into(), 1));
        let d = check(&p, &duplicated);
        assert_eq!((d.received, d.duplicated, d.reordered, d.lost), (21, 1, 0, 0));
        assert!(!d.clean(false));

        let mut missing = in_order(&p);
        missing.remove(7);
        let d = check(&p, &missing);
        assert_eq!((d.lost, d.reordered), (1, 0));
        assert!(!d.clean(false));

        let mut foreign = in_order(&p);
        foreign.push(("k0".into(), 1)); // 1 is k1's
        foreign.push(("k0".into(), 99)); // never published
        let d = check(&p, &foreign);
        assert_eq!(d.foreign, 2);
        assert!(!d.clean(false));
    }

    #[test]
    fn a_failed_row_fails_the_report() {
        use crate::results::Report as _;
        let p = plan(10, 1);
        let published = Published { sent: vec![Instant::now(); 10], started: Instant::now(), finished: Instant::now() };
        let now = Instant::now();
        let mut arrivals: Arrivals =
            (0..10).map(|i| Arrival { key: p.key(i), index: i as u64, at: now, slept: None, failed: false }).collect();
        arrivals.swap(0, 1);
        let bad = row(&p, "x", true, &published, &arrivals, Duration::ZERO, String::new());
        let report = |rows| Report {
            machine: Machine::detect(),
            load_before: String::new(),
            load_after: String::new(),
            events: 10,
            concurrency: 1,
            latency: "none:0".into(),
            seed: 0,
            mean_delay_ms: 0.0,
            rows,
        };
        assert!(report(vec![bad.clone()]).check().is_err());
        let unordered = Row { ordered: false, ..bad };
        assert!(report(vec![unordered]).check().is_ok(), "order is not required of the unordered consumer");
    }

    #[test]
    fn plans_are_seeded_and_bounded() {
        let a = plan(1000, 10);
        assert_eq!(a.delays, plan(1000, 1).delays, "the same draws for every K");
        assert!(a.delays.iter().all(|d| *d <= Duration::from_millis(5)));
        let total: Duration = a.delays.iter().sum();
        assert_eq!(plan(1000, 1).per_key_bound(), total);
        assert!(a.per_key_bound() < total / 5);
        assert!(a.concurrent_bound(100) >= total / 100);
        assert_eq!(a.key(13), "k3");
    }
}
