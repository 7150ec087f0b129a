//! Property tests of the release script against a real, private
//! `redis-server` (started on a free port; the shared instance is never
//! touched): whatever the arrival order, batching, duplication and mixing of
//! streams, each stream's log holds every result exactly once — in sequence
//! order for ORDERED streams, in first-arrival order for UNORDERED ones — and
//! the published batches carry exactly the log's entries.

use std::{
    collections::{BTreeMap, HashSet},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures::StreamExt;
use ordo_core::keys;
use ordo_proto::v1::{EventResult, OrderingMode, ReleasedBatch};
use proptest::{prelude::*, test_runner::TestCaseError};
use prost::Message;
use reassembler::store::{Item, Store, StoreConfig};

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
    Item { stream_id: stream.into(), sequence, mode, body: result.encode_to_vec() }
}

async fn read_log(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<EventResult> {
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

static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs one scenario: `arrivals` are (stream index, sequence) in arrival
/// order, cut into script calls at `cuts`. Returns per stream the log and the
/// results seen on the release channel.
type Outcome = Vec<(Vec<EventResult>, Vec<EventResult>)>;

fn run(redis: &Redis, arrivals: &[(usize, u64)], cuts: &[usize], modes: &[OrderingMode]) -> Outcome {
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let names: Vec<String> = (0..modes.len()).map(|i| format!("prop-{case}-{i}-{}", std::process::id())).collect();
    runtime().block_on(async {
        let client = redis::Client::open(redis.url.as_str()).expect("url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub.subscribe(keys::RELEASED_CHANNEL).await.expect("subscribe");
        let conn = redis::aio::ConnectionManager::new(client.clone()).await.expect("connect");
        let store = Store::new(conn, StoreConfig { retention: 1_000_000, ttl_ms: 60_000 });
        let items: Vec<Item> = arrivals.iter().map(|&(s, seq)| item(&names[s], seq, modes[s])).collect();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (items.len() + 1)).collect();
        bounds.push(items.len());
        bounds.sort_unstable();
        for end in bounds {
            if end > start {
                store.apply(&items[start..end]).await.expect("script");
                start = end;
            }
        }
        let mut published: BTreeMap<String, Vec<EventResult>> = BTreeMap::new();
        let mut messages = pubsub.on_message();
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
            let batch = ReleasedBatch::decode(message.get_payload_bytes()).expect("released batch decodes");
            if names.contains(&batch.stream_id) {
                published.entry(batch.stream_id).or_default().extend(batch.results);
            }
        }
        drop(messages);
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
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
    config: ProptestConfig,
    strategy: impl Strategy<Value = Scenario>,
    test: impl Fn(&Redis, Scenario) -> Result<(), TestCaseError>,
) {
    let redis = Redis::start();
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(failure) = runner.run(&strategy, |scenario| test(&redis, scenario)) {
        panic!("{failure}");
    }
}

#[test]
fn every_result_released_once_and_ordered_streams_in_sequence() {
    check(ProptestConfig::with_cases(64), scenario(), |redis, (modes, lens, arrivals, cuts)| {
        let outcome = run(redis, &arrivals, &cuts, &modes);
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
    check(ProptestConfig::with_cases(32), holes, |redis, (modes, hole, arrivals, cuts)| {
        let outcome = run(redis, &arrivals, &cuts, &modes);
        let seqs: Vec<u64> = outcome[0].0.iter().map(|r| r.sequence).collect();
        prop_assert_eq!(seqs, (0..hole[0]).collect::<Vec<_>>());
        Ok(())
    });
}
