//! Property tests of the release script against a real, private
//! `redis-server` (started on a free port; the shared instance is never
//! touched): whatever the arrival order, batching, duplication and mixing of
//! streams, each stream's log holds every result exactly once — in sequence
//! order for ORDERED streams, in first-arrival order for UNORDERED ones — and
//! the published batches carry exactly the log's entries.
//!
//! The same properties run against a private Redis Cluster (3 masters, 1
//! replica each; the testkit's `redis_cluster`), where the store splits each
//! batch by slot and publishes on the slots' sharded channels; plus a batch
//! spanning many slots, and masters failing over (forced, and killed)
//! while batches keep coming, with 0 lost, duplicated or reordered.

use std::{
    collections::{BTreeMap, HashSet},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use integration_tests::redis_cluster::RedisCluster;
use ordo_core::keys;
use ordo_proto::v1::{DeadLetter, Event, EventResult, OrderingMode, ReleasedBatches};
use ordo_runtime::redis_conn::RedisConn;
use proptest::{prelude::*, test_runner::TestCaseError};
use prost::Message;
use reassembler::store::{Item, Store, StoreConfig};
use tokio::sync::mpsc;

/// Where a test runs the script: one private node, or a private cluster.
enum Backend {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Backend {
    fn single() -> Self {
        Self::Single(Redis::start())
    }

    fn cluster() -> Self {
        Self::Cluster(runtime().block_on(RedisCluster::start()).expect("a private redis cluster"))
    }

    fn url(&self) -> String {
        match self {
            Self::Single(redis) => redis.url.clone(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    fn conn(&self) -> RedisConn {
        ordo_runtime::redis_conn::connect(&self.url()).expect("url")
    }

    fn store(&self, config: StoreConfig) -> Store {
        Store::new(self.conn(), config)
    }

    /// The payloads of the released batches of `streams` from now on: their
    /// slots' sharded channels, on a single node and on a cluster alike (as
    /// the push-gateway follows them).
    async fn released(&self, streams: &[String]) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        match self {
            Self::Single(redis) => {
                let (push_tx, mut push_rx) = mpsc::unbounded_channel::<redis::PushInfo>();
                let client = redis::Client::open(format!("{}/?protocol=resp3", redis.url)).expect("url");
                let config = redis::AsyncConnectionConfig::new().set_push_sender(push_tx);
                let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.expect("connection");
                let stride = keys::release_channel_stride(false);
                let slots: HashSet<u16> =
                    streams.iter().map(|s| keys::release_channel_slot(keys::stream_slot(s), stride)).collect();
                for slot in slots {
                    // One channel per command: its one confirmation is the reply.
                    redis::cmd("SSUBSCRIBE")
                        .arg(keys::released_channel(slot))
                        .exec_async(&mut conn)
                        .await
                        .expect("ssubscribe");
                }
                tokio::spawn(async move {
                    let _conn = conn;
                    while let Some(push) = push_rx.recv().await {
                        if push.kind == redis::PushKind::SMessage
                            && let Some(redis::Value::BulkString(payload)) = push.data.get(1)
                            && tx.send(payload.clone()).is_err()
                        {
                            return;
                        }
                    }
                });
            }
            Self::Cluster(cluster) => {
                let (push_tx, mut push_rx) = mpsc::unbounded_channel::<redis::PushInfo>();
                let nodes: Vec<String> = (0..integration_tests::redis_cluster::NODES)
                    .map(|i| format!("{}/?protocol=resp3", cluster.node_url(i)))
                    .collect();
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(push_tx)
                    .build()
                    .expect("cluster client");
                let mut conn = client.get_async_connection().await.expect("cluster connection");
                let slots: HashSet<u16> = streams.iter().map(|s| keys::stream_slot(s)).collect();
                for slot in slots {
                    conn.ssubscribe(keys::released_channel(slot)).await.expect("ssubscribe");
                }
                tokio::spawn(async move {
                    let _conn = conn;
                    while let Some(push) = push_rx.recv().await {
                        if push.kind == redis::PushKind::SMessage
                            && let Some(redis::Value::BulkString(payload)) = push.data.get(1)
                            && tx.send(payload.clone()).is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
        rx
    }

    /// Every dead letter of the streams `names`, in log order per log, as
    /// (stream, sequence, letter): the global log through the store on a
    /// single node, the streams' slot logs on a cluster.
    async fn dead_letters(&self, store: &Store, names: &[String]) -> Vec<(String, u64, DeadLetter)> {
        if let Self::Single(_) = self {
            return read_dead_letters(store, names).await;
        }
        let mut conn = self.conn();
        let slots: std::collections::BTreeSet<u16> = names.iter().map(|s| keys::stream_slot(s)).collect();
        let mut out = Vec::new();
        for slot in slots {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(keys::dead_letters(slot))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .expect("xrange");
            for entry in reply.ids {
                let field = |name: &str| match entry.map.get(name) {
                    Some(redis::Value::BulkString(bytes)) => bytes.clone(),
                    other => panic!("bad dead-letter field {name}: {other:?}"),
                };
                let stream = String::from_utf8(field("stream")).expect("utf-8");
                let sequence = String::from_utf8(field("sequence")).expect("utf-8").parse().expect("a sequence");
                if names.contains(&stream) {
                    let letter = DeadLetter::decode(field("letter").as_slice()).expect("a decodable dead letter");
                    out.push((stream, sequence, letter));
                }
            }
        }
        out
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        retention: 1_000_000,
        ttl_ms: 60_000,
        tombstone_ms: 60_000,
        dead_letter_retention: 1_000_000,
        wait_replicas: 0,
        wait_timeout_ms: 0,
    }
}

struct Redis {
    url: String,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Redis {
    /// A private server, killed when the value drops (statics never drop, so
    /// each test owns its own).
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/install-deps.sh)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).expect("url");
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get_connection().is_err() {
            assert!(Instant::now() < deadline, "private redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { url, _child: ChildGuard(child), _dir: dir }
    }
}

impl Redis {
    /// A reconnecting connection to the private server.
    async fn manager(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url.as_str()).expect("url");
        redis::aio::ConnectionManager::new(client).await.expect("connect")
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fn item(stream: &str, sequence: u64, mode: OrderingMode) -> Item {
    let result = EventResult {
        stream_id: stream.into(),
        sequence,
        status: ordo_proto::ResultStatus::Ok as i32,
        payload: format!("{stream}#{sequence}").into_bytes().into(),
        ..Default::default()
    };
    Item { stream_id: stream.into(), sequence, mode, body: result.encode_to_vec(), dead_letter: Vec::new() }
}

async fn read_log(conn: &mut impl redis::aio::ConnectionLike, stream: &str) -> Vec<EventResult> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(keys::log(stream)).arg("-").arg("+").query_async(conn).await.expect("xrange");
    reply
        .ids
        .iter()
        .map(|entry| match entry.map.get("r") {
            Some(redis::Value::BulkString(body)) => EventResult::decode(body.as_slice()).expect("decodable"),
            other => panic!("bad log entry {other:?}"),
        })
        .collect()
}

/// Meta's count of `stream`'s pending hash (field `p`; 0 without meta).
async fn pend_count(conn: &mut impl redis::aio::ConnectionLike, stream: &str) -> u64 {
    let count: Option<u64> =
        redis::cmd("HGET").arg(keys::meta(stream)).arg("p").query_async(conn).await.expect("hget p");
    count.unwrap_or(0)
}

async fn pend_len(conn: &mut impl redis::aio::ConnectionLike, stream: &str) -> u64 {
    redis::cmd("HLEN").arg(keys::pending(stream)).query_async(conn).await.expect("hlen")
}

static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs one scenario: `arrivals` are (stream index, sequence) in arrival
/// order, cut into script calls at `cuts`. Returns per stream the log and the
/// results seen on the release channel.
type Outcome = Vec<(Vec<EventResult>, Vec<EventResult>)>;

fn run(backend: &Backend, arrivals: &[(usize, u64)], cuts: &[usize], modes: &[OrderingMode]) -> Outcome {
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let names: Vec<String> = (0..modes.len()).map(|i| format!("prop-{case}-{i}-{}", std::process::id())).collect();
    runtime().block_on(async {
        let mut released = backend.released(&names).await;
        let store = backend.store(config());
        let items: Vec<Item> = arrivals.iter().map(|&(s, seq)| item(&names[s], seq, modes[s])).collect();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (items.len() + 1)).collect();
        bounds.push(items.len());
        bounds.sort_unstable();
        let mut conn = backend.conn();
        for end in bounds {
            if end > start {
                store.apply(&items[start..end]).await.expect("script");
                start = end;
                for name in &names {
                    assert_eq!(
                        pend_count(&mut conn, name).await,
                        pend_len(&mut conn, name).await,
                        "meta's p counts pend"
                    );
                }
            }
        }
        let mut published: BTreeMap<String, Vec<EventResult>> = BTreeMap::new();
        while let Ok(Some(payload)) = tokio::time::timeout(Duration::from_millis(100), released.recv()).await {
            let batches = ReleasedBatches::decode_message(&payload).expect("a released message decodes");
            assert!(!batches.is_empty(), "a message holds at least one stream's batch");
            for batch in batches {
                if names.contains(&batch.stream_id) {
                    published.entry(batch.stream_id).or_default().extend(batch.results);
                }
            }
        }
        let mut out = Vec::new();
        for name in &names {
            out.push((read_log(&mut conn, name).await, published.remove(name).unwrap_or_default()));
        }
        out
    })
}

type Scenario = (Vec<OrderingMode>, Vec<u64>, Vec<(usize, u64)>, Vec<usize>);

/// Up to 3 streams, up to 60 events each, each event 1–3 times, shuffled.
fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=3)
        .prop_flat_map(|streams| {
            (
                proptest::collection::vec(
                    prop_oneof![Just(OrderingMode::Ordered), Just(OrderingMode::Unordered)],
                    streams,
                ),
                proptest::collection::vec(0u64..60, streams),
            )
        })
        .prop_flat_map(|(modes, lens)| {
            let mut events = Vec::new();
            for (s, &n) in lens.iter().enumerate() {
                for seq in 0..n {
                    events.push((s, seq));
                }
            }
            let copies = proptest::collection::vec(1usize..=3, events.len());
            (Just(modes), Just(lens), Just(events), copies)
        })
        .prop_flat_map(|(modes, lens, events, copies)| {
            let arrivals: Vec<(usize, u64)> =
                events.iter().zip(&copies).flat_map(|(e, &c)| std::iter::repeat_n(*e, c)).collect();
            let n = arrivals.len();
            (Just(modes), Just(lens), Just(arrivals).prop_shuffle(), proptest::collection::vec(0..=n, 0..8))
        })
}

fn check(
    backend: &Backend,
    config: ProptestConfig,
    strategy: impl Strategy<Value = Scenario>,
    test: impl Fn(&Backend, Scenario) -> Result<(), TestCaseError>,
) {
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(failure) = runner.run(&strategy, |scenario| test(backend, scenario)) {
        panic!("{failure}");
    }
}

#[test]
fn every_result_released_once_and_ordered_streams_in_sequence() {
    released_once_in_order(&Backend::single(), 64);
}

#[test]
fn cluster_every_result_released_once_and_ordered_streams_in_sequence() {
    released_once_in_order(&Backend::cluster(), 32);
}

fn released_once_in_order(backend: &Backend, cases: u32) {
    check(backend, ProptestConfig::with_cases(cases), scenario(), |backend, (modes, lens, arrivals, cuts)| {
        let outcome = run(backend, &arrivals, &cuts, &modes);
        for (s, (log, published)) in outcome.iter().enumerate() {
            let n = lens[s];
            prop_assert_eq!(log.len() as u64, n, "stream {} released {} of {}", s, log.len(), n);
            let seqs: Vec<u64> = log.iter().map(|r| r.sequence).collect();
            let positions: Vec<u64> = log.iter().map(|r| r.position).collect();
            prop_assert_eq!(&positions, &(0..n).collect::<Vec<_>>(), "positions are contiguous from 0");
            prop_assert_eq!(seqs.iter().copied().collect::<HashSet<_>>().len() as u64, n, "each sequence once");
            if modes[s] == OrderingMode::Ordered {
                prop_assert_eq!(&seqs, &(0..n).collect::<Vec<_>>(), "ordered stream released in sequence order");
            } else {
                // Completion order: the order of first arrival.
                let mut seen = HashSet::new();
                let first: Vec<u64> =
                    arrivals.iter().filter(|(st, _)| *st == s).map(|(_, q)| *q).filter(|q| seen.insert(*q)).collect();
                prop_assert_eq!(&seqs, &first);
            }
            for r in log {
                let expected = format!("{}#{}", r.stream_id, r.sequence);
                prop_assert_eq!(r.payload.as_ref(), expected.as_bytes());
            }
            prop_assert_eq!(published, log, "published batches carry exactly the log");
        }
        Ok(())
    });
}

#[test]
fn a_missing_sequence_holds_back_only_its_successors() {
    let holes = (2u64..40).prop_flat_map(|n| {
        (0..n).prop_flat_map(move |hole| {
            let arrivals: Vec<(usize, u64)> = (0..n).filter(|&q| q != hole).map(|q| (0, q)).collect();
            (Just(vec![OrderingMode::Ordered]), Just(vec![hole]), Just(arrivals).prop_shuffle(), Just(vec![]))
        })
    });
    check(&Backend::single(), ProptestConfig::with_cases(32), holes, |backend, (modes, hole, arrivals, cuts)| {
        let outcome = run(backend, &arrivals, &cuts, &modes);
        let seqs: Vec<u64> = outcome[0].0.iter().map(|r| r.sequence).collect();
        prop_assert_eq!(seqs, (0..hole[0]).collect::<Vec<_>>());
        Ok(())
    });
}

/// A FAILED result of `stream`#`sequence` whose dead letter records `attempts`
/// (used to tell which of several copies was stored).
fn failed_item(stream: &str, sequence: u64, mode: OrderingMode, attempts: u32) -> Item {
    let result = EventResult {
        stream_id: stream.into(),
        sequence,
        status: ordo_proto::ResultStatus::Failed as i32,
        error: format!("attempt {attempts} failed"),
        ..Default::default()
    };
    let letter = DeadLetter {
        event: Some(Event { stream_id: stream.into(), sequence, operation: "op".into(), ..Default::default() }),
        status: ordo_proto::ResultStatus::Failed as i32,
        attempts,
        error: result.error.clone(),
        at_unix_ms: 1,
        ..Default::default()
    };
    Item { stream_id: stream.into(), sequence, mode, body: result.encode_to_vec(), dead_letter: letter.encode_to_vec() }
}

/// Every dead letter of the streams `names`, in log order, as (stream, sequence, letter).
async fn read_dead_letters(store: &Store, names: &[String]) -> Vec<(String, u64, DeadLetter)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.dead_letters_after(after.as_deref(), 500).await.expect("xrange");
        let Some(last) = page.last() else { return out };
        after = Some(last.id.clone());
        for entry in page {
            if names.contains(&entry.stream_id) {
                let letter = DeadLetter::decode(entry.letter.as_slice()).expect("a decodable dead letter");
                out.push((entry.stream_id, entry.sequence, letter));
            }
        }
    }
}

#[test]
fn a_dead_letter_is_stored_once_per_accepted_failed_result_and_never_for_a_duplicate() {
    dead_letter_once(&Backend::single(), 48);
}

#[test]
fn cluster_a_dead_letter_is_stored_once_per_accepted_failed_result_and_never_for_a_duplicate() {
    dead_letter_once(&Backend::cluster(), 24);
}

fn dead_letter_once(backend: &Backend, cases: u32) {
    // The scenario's arrivals, each copy FAILED (with a dead letter) or OK at random.
    let strategy = scenario().prop_flat_map(|(modes, lens, arrivals, cuts)| {
        let failed = proptest::collection::vec(proptest::bool::weighted(0.4), arrivals.len());
        (Just(modes), Just(lens), Just(arrivals), Just(cuts), failed)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    let outcome = runner.run(&strategy, |(modes, lens, arrivals, cuts, failed)| {
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names: Vec<String> = (0..modes.len()).map(|i| format!("dlq-{case}-{i}-{}", std::process::id())).collect();
        let items: Vec<Item> =
            arrivals
                .iter()
                .zip(&failed)
                .enumerate()
                .map(|(i, (&(s, seq), &failed))| {
                    if failed {
                        failed_item(&names[s], seq, modes[s], i as u32)
                    } else {
                        item(&names[s], seq, modes[s])
                    }
                })
                .collect();
        let (logs, letters) = runtime().block_on(async {
            let store = backend.store(config());
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (items.len() + 1)).collect();
            bounds.push(items.len());
            bounds.sort_unstable();
            let mut start = 0;
            for end in bounds {
                if end > start {
                    store.apply(&items[start..end]).await.expect("script");
                    start = end;
                }
            }
            // A redelivery of everything is all duplicates: no dead letter twice.
            store.apply(&items).await.expect("script");
            let mut conn = backend.conn();
            let mut logs = Vec::new();
            for name in &names {
                logs.push(read_log(&mut conn, name).await);
            }
            (logs, backend.dead_letters(&store, &names).await)
        });

        // The first copy of each event wins; it alone may leave a dead letter.
        let mut first: BTreeMap<(usize, u64), (usize, bool)> = BTreeMap::new();
        for (i, (&key, &failed)) in arrivals.iter().zip(&failed).enumerate() {
            first.entry(key).or_insert((i, failed));
        }
        let mut expected: Vec<(String, u64, u32)> = first
            .iter()
            .filter(|(_, (_, failed))| *failed)
            .map(|(&(s, seq), &(i, _))| (names[s].clone(), seq, i as u32))
            .collect();
        let mut got: Vec<(String, u64, u32)> =
            letters.iter().map(|(stream, seq, letter)| (stream.clone(), *seq, letter.attempts)).collect();
        expected.sort();
        got.sort();
        prop_assert_eq!(&got, &expected, "one dead letter per stored FAILED result, from the stored copy");
        for (stream, seq, letter) in &letters {
            let event = letter.event.as_ref().expect("the event is recorded");
            prop_assert_eq!((&event.stream_id, event.sequence), (stream, *seq));
            prop_assert_eq!(letter.status(), ordo_proto::ResultStatus::Failed);
        }
        // The stored results agree with the dead letters.
        for (s, log) in logs.iter().enumerate() {
            prop_assert_eq!(log.len() as u64, lens[s]);
            for result in log {
                let (_, failed) = first[&(s, result.sequence)];
                let want = if failed { ordo_proto::ResultStatus::Failed } else { ordo_proto::ResultStatus::Ok };
                prop_assert_eq!(result.status(), want, "{:?}", result);
            }
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

#[test]
fn dead_letters_are_trimmed_to_the_retention() {
    let redis = Redis::start();
    runtime().block_on(async {
        let conn = redis.manager().await;
        let store = Store::new(conn, StoreConfig { ttl_ms: 0, dead_letter_retention: 10, ..config() });
        for seq in 0..2_000 {
            store.apply(&[failed_item("trim", seq, OrderingMode::Ordered, 1)]).await.expect("script");
        }
        let kept = read_dead_letters(&store, &["trim".to_owned()]).await;
        // MAXLEN ~ trims whole blocks (100 entries by default), never below the retention.
        assert!((10..=200).contains(&kept.len()), "{} dead letters kept", kept.len());
        assert_eq!(kept.last().map(|(_, seq, _)| *seq), Some(1_999), "the newest are kept");
    });
}

/// `ordo_results_pending` samples every stream's pending hash: results
/// stored behind a missing predecessor, and nothing once it arrived.
#[test]
fn pending_results_count_what_waits_for_a_predecessor() {
    let redis = Redis::start();
    runtime().block_on(async {
        let conn = redis.manager().await;
        let store = Store::new(conn, config());
        assert_eq!(store.pending_results().await.expect("scan"), (0, 0));
        // a: 0 released, 2 and 3 wait for 1; b: 5 waits for 0..5; c: all released.
        let items = [
            item("pend-a", 0, OrderingMode::Ordered),
            item("pend-a", 2, OrderingMode::Ordered),
            item("pend-a", 3, OrderingMode::Ordered),
            item("pend-b", 5, OrderingMode::Ordered),
            item("pend-c", 0, OrderingMode::Ordered),
        ];
        store.apply(&items).await.expect("script");
        assert_eq!(store.pending_results().await.expect("scan"), (2, 3));
        store.apply(&[item("pend-a", 1, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!(store.pending_results().await.expect("scan"), (1, 1));
    });
}

/// The metrics sampler's scan visits a bounded number of keys per sample:
/// on a keyspace of 20,000 other keys and three pending hashes, a step of
/// 5,000 keys ends before the pass does, and the pass, spread over several
/// steps, counts what one whole scan counts; then a new pass starts.
#[test]
fn the_pending_sample_spreads_a_large_keyspace_over_several_steps() {
    let redis = Redis::start();
    runtime().block_on(async {
        let mut conn = redis.manager().await;
        let store = Store::new(conn.clone(), config());
        let mut filler = redis::pipe();
        for i in 0..20_000 {
            filler.set(format!("ordo:{{other-{i}}}:meta"), 1).ignore();
        }
        let () = filler.query_async(&mut conn).await.expect("filler keys");
        let items = [
            item("pend-a", 2, OrderingMode::Ordered),
            item("pend-a", 3, OrderingMode::Ordered),
            item("pend-b", 5, OrderingMode::Ordered),
            item("pend-c", 1, OrderingMode::Ordered),
        ];
        store.apply(&items).await.expect("script");
        assert_eq!(store.pending_results().await.expect("whole scan"), (3, 4));
        let mut scan = reassembler::store::PendingScan::default();
        for pass in 0..2 {
            let mut steps = 1;
            let counted = loop {
                match scan.step(&store, 5_000).await.expect("step") {
                    Some(counted) => break counted,
                    None => steps += 1,
                }
            };
            assert_eq!(counted, (3, 4), "pass {pass}");
            assert!(steps >= 4, "pass {pass}: 20,000 keys in steps of 5,000 took {steps} step(s)");
        }
    });
}

/// The script counts in Lua doubles: exact up to 2^53, which is why the
/// harmonizer refuses sequences above `MAX_SEQUENCE` (2^53 − 1). At the
/// boundary itself every sequence is still its own slot: a stream whose
/// lowest unreleased sequence is `MAX_SEQUENCE - 2` releases the last three
/// sequences in order (arriving in reverse), drops their duplicates, and
/// stores the floor `2^53` exactly.
#[test]
fn sequences_up_to_2_pow_53_minus_1_are_exact_in_the_script() {
    use ordo_core::limits::MAX_SEQUENCE;
    let redis = Redis::start();
    runtime().block_on(async {
        let client = redis::Client::open(redis.url.as_str()).expect("url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
        let manager = redis::aio::ConnectionManager::new(client).await.expect("connect");
        let store = Store::new(manager, config());
        let stream = "edge";
        let () = redis::cmd("HSET")
            .arg(keys::meta(stream))
            .arg(&["next", &(MAX_SEQUENCE - 2).to_string(), "released", "0", "mode", "1"])
            .query_async(&mut conn)
            .await
            .expect("hset");
        let top = [MAX_SEQUENCE, MAX_SEQUENCE - 1, MAX_SEQUENCE - 2];
        for sequence in top {
            let accepted = store.apply(&[item(stream, sequence, OrderingMode::Ordered)]).await.expect("script");
            assert_eq!(accepted, vec![true], "sequence {sequence} is new");
        }
        for sequence in top {
            let accepted = store.apply(&[item(stream, sequence, OrderingMode::Ordered)]).await.expect("script");
            assert_eq!(accepted, vec![false], "sequence {sequence} again is a duplicate");
        }
        let log: Vec<u64> = read_log(&mut conn, stream).await.iter().map(|r| r.sequence).collect();
        assert_eq!(log, vec![MAX_SEQUENCE - 2, MAX_SEQUENCE - 1, MAX_SEQUENCE]);
        let next: String =
            redis::cmd("HGET").arg(keys::meta(stream)).arg("next").query_async(&mut conn).await.expect("hget");
        assert_eq!(next, (MAX_SEQUENCE + 1).to_string(), "the floor is stored as an exact integer");
        let pending: u64 = redis::cmd("HLEN").arg(keys::pending(stream)).query_async(&mut conn).await.expect("hlen");
        assert_eq!(pending, 0);
    });
}

/// The released sequences of `stream`, in log order.
async fn released_sequences(conn: &mut RedisConn, stream: &str) -> Vec<u64> {
    read_log(conn, stream).await.iter().map(|r| r.sequence).collect()
}

/// One batch of 300 streams (spread over hundreds of slots, on all three
/// masters) × 8 results, each twice, shuffled: one script call per slot, every
/// result released once and in order; the second copies are duplicates.
#[test]
fn cluster_a_batch_spanning_many_slots_releases_every_stream_once_in_order() {
    let backend = Backend::cluster();
    runtime().block_on(async {
        let store = backend.store(config());
        let names: Vec<String> = (0..300).map(|i| format!("wide-{i}")).collect();
        let slots: HashSet<u16> = names.iter().map(|n| keys::stream_slot(n)).collect();
        assert!(slots.len() > 250, "{} slots", slots.len());
        let mut items: Vec<Item> = names
            .iter()
            .flat_map(|n| {
                (0..8u64).flat_map(move |q| [item(n, q, OrderingMode::Ordered), item(n, q, OrderingMode::Ordered)])
            })
            .collect();
        // A fixed shuffle (reverse per block) keeps the test deterministic.
        for chunk in items.chunks_mut(37) {
            chunk.reverse();
        }
        let accepted = store.apply(&items).await.expect("script calls");
        assert_eq!(accepted.iter().filter(|&&a| a).count(), 300 * 8, "each result is new once");
        let mut conn = backend.conn();
        for name in &names {
            assert_eq!(released_sequences(&mut conn, name).await, (0..8).collect::<Vec<_>>(), "{name}");
        }
    });
}

#[test]
fn one_call_publishes_one_message_per_channel_holding_every_stream_of_it() {
    one_message_per_channel(&Backend::single(), false);
}

#[test]
fn cluster_one_call_publishes_one_message_per_channel_holding_every_stream_of_it() {
    one_message_per_channel(&Backend::cluster(), true);
}

/// A stream's batch as heard: (stream, next, [(sequence, position)]).
type Heard = (String, u64, Vec<(u64, u64)>);

/// One script call over streams that share a release channel (a slot on a
/// cluster, a group of slots on a single node) publishes a single message
/// there: a `ReleasedBatches` with each stream's batch, in the call's stream
/// order, with its `next` and positions; a stream that released nothing
/// (its result waits for a predecessor) has no batch in it.
fn one_message_per_channel(backend: &Backend, cluster: bool) {
    let stride = keys::release_channel_stride(cluster);
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Streams of one channel: on a cluster, of one slot (the same text before
    // a `}`: one hash tag); on a single node, of any slots of one group.
    let base = format!("channel-{case}-{}", std::process::id());
    let name = |i: u32| if cluster { format!("{base}}}-{i}") } else { format!("{base}-{i}") };
    let channel = keys::release_channel_slot(keys::stream_slot(&name(0)), stride);
    let names: Vec<String> = (0..10_000)
        .map(name)
        .filter(|n| keys::release_channel_slot(keys::stream_slot(n), stride) == channel)
        .take(4)
        .collect();
    assert_eq!(names.len(), 4, "four streams of one channel");
    if !cluster {
        let slots: HashSet<u16> = names.iter().map(|n| keys::stream_slot(n)).collect();
        assert!(slots.len() > 1, "a single node's channel spans slots");
    }
    runtime().block_on(async {
        let mut released = backend.released(&names).await;
        let store = backend.store(config());
        // Streams 0, 1 and 3 release 0..2; stream 2 gets only sequence 1 (it waits for 0).
        let mut items = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if i == 2 {
                items.push(item(name, 1, OrderingMode::Ordered));
            } else {
                items.push(item(name, 0, OrderingMode::Ordered));
                items.push(item(name, 1, OrderingMode::Ordered));
            }
        }
        store.apply(&items).await.expect("one script call");
        let payload = tokio::time::timeout(Duration::from_secs(5), released.recv())
            .await
            .expect("a message within 5 s")
            .expect("the subscriber runs");
        assert_eq!(payload.first(), Some(&ReleasedBatches::TAG));
        let batches = ReleasedBatches::decode_message(&payload).expect("decodes");
        let heard: Vec<Heard> = batches
            .into_iter()
            .map(|b| (b.stream_id, b.next_sequence, b.results.iter().map(|r| (r.sequence, r.position)).collect()))
            .collect();
        let expected: Vec<Heard> = [0, 1, 3].iter().map(|&i| (names[i].clone(), 2, vec![(0, 0), (1, 1)])).collect();
        assert_eq!(heard, expected);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), released.recv()).await.is_err(),
            "one message for the whole call"
        );
    });
}

/// Applies `batch` until it is stored, as a sender redelivers an unacked
/// batch: a failure (a failover in progress) is retried after a pause.
async fn deliver(store: &Store, batch: &[Item]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match store.apply(batch).await {
            Ok(_) => return,
            Err(error) => {
                assert!(Instant::now() < deadline, "not stored within 60 s: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Masters change while batches keep coming: a forced failover (`CLUSTER
/// FAILOVER` on a replica), then a master SIGKILLed, its replica promoted and
/// the old master restarted as a replica. Every script call waits for one
/// replica (`WAIT 1`), so nothing acked is lost with the killed master; a
/// call that fails meanwhile is redelivered whole. Each of 40 streams (over
/// all masters) must release 0..300 once and in order.
#[test]
fn cluster_failovers_mid_stream_lose_duplicate_and_reorder_nothing() {
    let Backend::Cluster(mut cluster) = Backend::cluster() else { unreachable!("a cluster") };
    runtime().block_on(async {
        let url = cluster.url();
        let store = Store::new(
            ordo_runtime::redis_conn::connect(&url).expect("url"),
            StoreConfig { wait_replicas: 1, wait_timeout_ms: 500, ..config() },
        );
        let names: Vec<String> = (0..40).map(|i| format!("failover-{i}")).collect();
        const EVENTS: u64 = 300;
        // Batches of 10 results per stream, each stream's results in reverse
        // within its batch (so every call also reorders).
        let batches: Vec<Vec<Item>> = (0..EVENTS / 10)
            .map(|b| {
                names
                    .iter()
                    .flat_map(|n| (b * 10..b * 10 + 10).rev().map(move |q| item(n, q, OrderingMode::Ordered)))
                    .collect()
            })
            .collect();
        let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
        let driver = {
            let store = store.clone();
            tokio::spawn(async move {
                for (i, batch) in batches.iter().enumerate() {
                    deliver(&store, batch).await;
                    // Every third batch is delivered again (a sender that never saw the ack).
                    if i % 3 == 0 {
                        deliver(&store, batch).await;
                    }
                    let _ = progress_tx.send(i + 1);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let reached = async |progress: &mut tokio::sync::watch::Receiver<usize>, n: usize| {
            progress.wait_for(|&done| done >= n).await.expect("the driver runs");
        };

        // A forced failover of the master of the first stream's slot.
        reached(&mut progress, 5).await;
        let master = cluster.master_of(keys::stream_slot(&names[0])).await.expect("a master");
        let replica = cluster.replica_of(master).await.expect("a replica");
        cluster.failover(replica).await.expect("forced failover");

        // A master killed: its replica is promoted, then it comes back as a replica.
        reached(&mut progress, 12).await;
        let master = cluster.master_of(keys::stream_slot(&names[1])).await.expect("a master");
        let replica = cluster.replica_of(master).await.expect("a replica");
        cluster.kill(master);
        cluster.wait_master(replica).await.expect("the replica is promoted");
        cluster.restart(master).await.expect("the old master restarts");
        cluster.wait_settled().await.expect("the cluster settles");

        driver.await.expect("the driver finished");
        let mut conn = ordo_runtime::redis_conn::connect(&url).expect("url");
        for name in &names {
            let released = released_sequences(&mut conn, name).await;
            assert_eq!(released, (0..EVENTS).collect::<Vec<_>>(), "{name}: lost, duplicated or reordered");
        }
        let state = store.stream_state(&names[1]).await.expect("stream state");
        assert_eq!((state.next_sequence, state.released, state.pending), (EVENTS, EVENTS, 0));
    });
}

/// Bytes `MEMORY USAGE` reports for `key` (0 when it does not exist).
async fn memory_usage(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> u64 {
    let bytes: Option<u64> =
        redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query_async(conn).await.expect("MEMORY USAGE");
    bytes.unwrap_or(0)
}

/// A finished short stream (two results released): what it keeps in Redis
/// while its log lives, then only its meta (the dedup tombstone) after
/// `ttl_ms`, until `ttl_ms + tombstone_ms`. A late duplicate result is
/// dropped while the tombstone lives, and is new again once it expired.
#[test]
fn a_finished_stream_keeps_its_meta_as_a_tombstone_after_its_log_expired() {
    let redis = Redis::start();
    runtime().block_on(async {
        let mut conn = redis.manager().await;
        let ttl = Duration::from_millis(300);
        let tombstone = Duration::from_millis(900);
        let config =
            StoreConfig { ttl_ms: ttl.as_millis() as u64, tombstone_ms: tombstone.as_millis() as u64, ..config() };
        let store = Store::new(conn.clone(), config);
        let s = "finished-short";
        let accepted = store.apply(&[item(s, 0, OrderingMode::Ordered), item(s, 1, OrderingMode::Ordered)]).await;
        assert_eq!(accepted.expect("script"), vec![true, true]);
        let (meta, pend, log) = (keys::meta(s), keys::pending(s), keys::log(s));
        let live = (
            memory_usage(&mut conn, &meta).await,
            memory_usage(&mut conn, &pend).await,
            memory_usage(&mut conn, &log).await,
        );
        println!("a finished 2-event stream: meta {} B, pend {} B, log {} B (MEMORY USAGE)", live.0, live.1, live.2);
        assert!(live.0 > 0 && live.2 > 0 && live.1 == 0, "meta and log exist, pend is gone: {live:?}");
        let (meta_ttl, log_ttl): (i64, i64) =
            redis::pipe().pttl(&meta).pttl(&log).query_async(&mut conn).await.expect("pttl");
        // Renewed at most every ttl/16: the keys live ttl to 17/16 × ttl after the last call.
        let longest = (ttl.as_millis() + ttl.as_millis() / 16) as i64;
        assert!(log_ttl > ttl.as_millis() as i64 - 100 && log_ttl <= longest, "log ttl {log_ttl}");
        assert!(meta_ttl > ttl.as_millis() as i64, "meta outlives the log: {meta_ttl} ms");

        tokio::time::sleep(ttl + Duration::from_millis(150)).await;
        let exists: (bool, bool, bool) =
            redis::pipe().exists(&meta).exists(&pend).exists(&log).query_async(&mut conn).await.expect("exists");
        assert_eq!(exists, (true, false, false), "only the tombstone is left");
        let tombstone_bytes = memory_usage(&mut conn, &meta).await;
        println!("its tombstone after --stream-ttl: meta {tombstone_bytes} B");
        let late = store.apply(&[item(s, 0, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!(late, vec![false], "a late duplicate is dropped while the tombstone lives");
        assert!(read_log(&mut conn, s).await.is_empty(), "and nothing is released again");

        // The duplicate's script call renewed the tombstone (every call
        // renews the keys of its streams): wait until it expires.
        let deadline = Instant::now() + ttl + tombstone + Duration::from_secs(2);
        loop {
            let gone: bool = redis::cmd("EXISTS").arg(&meta).query_async(&mut conn).await.expect("exists");
            if !gone {
                break;
            }
            assert!(Instant::now() < deadline, "the tombstone expires");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = store.apply(&[item(s, 0, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!(again, vec![true], "after the tombstone expired the stream is new");
        let log = read_log(&mut conn, s).await;
        assert_eq!(log.iter().map(|r| (r.sequence, r.position)).collect::<Vec<_>>(), vec![(0, 0)], "released again");
    });
}

/// Expiry is renewed at most every ttl/16 per stream (two PEXPIREATs then,
/// none in between), and a key a call creates in between still gets the
/// stream's expiry: a pending hash created by an early result, a log created
/// by the first release.
#[test]
fn expiry_is_renewed_only_when_less_than_the_ttl_is_left_and_new_keys_get_it() {
    let redis = Redis::start();
    runtime().block_on(async {
        let mut conn = redis.manager().await;
        let ttl: i64 = 1_600;
        let slack = ttl / 16;
        let config = StoreConfig { ttl_ms: ttl as u64, tombstone_ms: 1_000, ..config() };
        let store = Store::new(conn.clone(), config);
        let s = "renewed-seldom";
        let (meta, pend, log) = (keys::meta(s), keys::pending(s), keys::log(s));
        let expiry = |conn: &mut redis::aio::ConnectionManager| {
            let mut conn = conn.clone();
            let (meta, pend, log) = (meta.clone(), pend.clone(), log.clone());
            async move {
                let got: (Option<u64>, i64, i64, i64) = redis::pipe()
                    .hget(&meta, "x")
                    .pttl(&meta)
                    .pttl(&pend)
                    .pttl(&log)
                    .query_async(&mut conn)
                    .await
                    .expect("read expiry");
                got
            }
        };
        // Sequence 1 first: it waits in pend; no log yet.
        store.apply(&[item(s, 1, OrderingMode::Ordered)]).await.expect("script");
        let (x1, meta_ttl, pend_ttl, log_ttl) = expiry(&mut conn).await;
        let x1 = x1.expect("the expiry time is kept in meta");
        assert!(pend_ttl > ttl && pend_ttl <= ttl + slack, "pend gets ttl + ttl/16: {pend_ttl}");
        assert!(meta_ttl > ttl + 900, "meta outlives pend by the tombstone: {meta_ttl}");
        assert_eq!(log_ttl, -2, "no log before the first release");
        // Sequence 0 at once: both released, pend emptied, the log created
        // without renewing (plenty left): the log gets the same expiry.
        store.apply(&[item(s, 0, OrderingMode::Ordered)]).await.expect("script");
        let (x2, _, pend_ttl, log_ttl) = expiry(&mut conn).await;
        assert_eq!(x2, Some(x1), "not renewed while more than the ttl is left");
        assert_eq!(pend_ttl, -2, "pend is gone once empty");
        assert!(log_ttl > ttl - 200 && log_ttl <= ttl + slack, "a log created in between gets the expiry: {log_ttl}");
        // Later than ttl/16: less than the ttl is left, so the next call renews.
        tokio::time::sleep(std::time::Duration::from_millis((slack + 50) as u64)).await;
        store.apply(&[item(s, 3, OrderingMode::Ordered)]).await.expect("script");
        let (x3, _, pend_ttl, log_ttl) = expiry(&mut conn).await;
        let x3 = x3.expect("kept");
        assert!(x3 > x1, "renewed: {x3} after {x1}");
        assert!(log_ttl > ttl && log_ttl <= ttl + slack, "the log renewed: {log_ttl}");
        assert!(pend_ttl > ttl && pend_ttl <= ttl + slack, "and pend (3 waits for 2): {pend_ttl}");
        // Right after: not renewed again, but the pend a call re-creates gets it.
        store.apply(&[item(s, 2, OrderingMode::Ordered), item(s, 5, OrderingMode::Ordered)]).await.expect("script");
        let (x4, _, pend_ttl, _) = expiry(&mut conn).await;
        assert_eq!(x4, Some(x3), "not renewed again so soon");
        assert!(
            pend_ttl > ttl - 200 && pend_ttl <= ttl + slack,
            "pend emptied and re-created gets the expiry: {pend_ttl}"
        );
        let released: Vec<u64> = read_log(&mut conn, s).await.iter().map(|r| r.sequence).collect();
        assert_eq!(released, [0, 1, 2, 3]);
    });
}

/// Meta's field `p` counts the pending hash, so a call needs no `HLEN`. A
/// meta without it (written by a version before it) falls back to `HLEN`: the
/// results such a version left waiting are still released. A count above
/// the truth (pend expired before its tombstone) costs only lookups, and is
/// recounted when the expiry is renewed.
#[test]
fn the_pend_count_falls_back_to_hlen_without_it_and_is_recounted_on_renewal() {
    let redis = Redis::start();
    runtime().block_on(async {
        let mut conn = redis.manager().await;
        let store = Store::new(conn.clone(), config());
        // An older version's state: 0 released, 2 and 3 waiting, no `p`.
        let s = "legacy-count";
        store.apply(&[item(s, 0, OrderingMode::Ordered)]).await.expect("script");
        let mut pend_fields = Vec::new();
        for seq in [2u64, 3] {
            pend_fields.push((seq, item(s, seq, OrderingMode::Ordered).body));
        }
        let _: () = redis::pipe()
            .hset_multiple(keys::pending(s), &pend_fields)
            .hdel(keys::meta(s), "p")
            .query_async(&mut conn)
            .await
            .expect("legacy state");
        store.apply(&[item(s, 1, OrderingMode::Ordered)]).await.expect("script");
        let released: Vec<u64> = read_log(&mut conn, s).await.iter().map(|r| r.sequence).collect();
        assert_eq!(released, [0, 1, 2, 3], "what waited without a count is released");
        assert_eq!((pend_count(&mut conn, s).await, pend_len(&mut conn, s).await), (0, 0));

        // A count above the truth: results are still released, the count
        // only falls as far as pend holds entries...
        let s = "stale-count";
        let ttl: i64 = 1_600;
        let store = Store::new(conn.clone(), StoreConfig { ttl_ms: ttl as u64, tombstone_ms: 1_000, ..config() });
        store.apply(&[item(s, 0, OrderingMode::Ordered), item(s, 2, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!(pend_count(&mut conn, s).await, 1);
        let _: () = redis::cmd("HSET").arg(keys::meta(s)).arg("p").arg(5).query_async(&mut conn).await.expect("stale");
        store.apply(&[item(s, 1, OrderingMode::Ordered)]).await.expect("script");
        let released: Vec<u64> = read_log(&mut conn, s).await.iter().map(|r| r.sequence).collect();
        assert_eq!(released, [0, 1, 2]);
        assert_eq!((pend_count(&mut conn, s).await, pend_len(&mut conn, s).await), (4, 0), "stale, not renewed yet");
        // ...until the expiry is renewed (less than the ttl left): recounted.
        tokio::time::sleep(Duration::from_millis((ttl / 16 + 50) as u64)).await;
        store.apply(&[item(s, 4, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!((pend_count(&mut conn, s).await, pend_len(&mut conn, s).await), (1, 1), "recounted on renewal");
        store.apply(&[item(s, 3, OrderingMode::Ordered)]).await.expect("script");
        let released: Vec<u64> = read_log(&mut conn, s).await.iter().map(|r| r.sequence).collect();
        assert_eq!(released, [0, 1, 2, 3, 4]);
        assert_eq!((pend_count(&mut conn, s).await, pend_len(&mut conn, s).await), (0, 0));
    });
}

/// Below the retention a release appends without a `MAXLEN` (nothing to
/// trim); from it on, the log is trimmed (approximately: whole nodes of
/// `stream-node-max-entries`, 100 by default) and keeps the newest results.
#[test]
fn the_log_is_trimmed_to_the_retention_once_it_reaches_it() {
    let redis = Redis::start();
    runtime().block_on(async {
        let mut conn = redis.manager().await;
        let store = Store::new(conn.clone(), StoreConfig { retention: 150, ..config() });
        let s = "trimmed-log";
        for from in (0..1_000u64).step_by(50) {
            let batch: Vec<Item> = (from..from + 50).map(|q| item(s, q, OrderingMode::Ordered)).collect();
            store.apply(&batch).await.expect("script");
        }
        let log: Vec<u64> = read_log(&mut conn, s).await.iter().map(|r| r.sequence).collect();
        assert!((150..=250).contains(&log.len()), "trimmed to about the retention: {} entries", log.len());
        assert_eq!(log.last(), Some(&999), "the newest kept");
        let first = log[0];
        assert_eq!(log, (first..1_000).collect::<Vec<_>>(), "contiguous, oldest trimmed");
        // A stream below the retention keeps everything.
        let short = "short-log";
        store
            .apply(&(0..149).map(|q| item(short, q, OrderingMode::Ordered)).collect::<Vec<_>>())
            .await
            .expect("script");
        assert_eq!(read_log(&mut conn, short).await.len(), 149);
    });
}
