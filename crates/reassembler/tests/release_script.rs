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
use ordo_proto::v1::{DeadLetter, Event, EventResult, OrderingMode, ReleasedBatch};
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
    Item { stream_id: stream.into(), sequence, mode, body: result.encode_to_vec(), dead_letter: Vec::new() }
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
        let store =
            Store::new(conn, StoreConfig { retention: 1_000_000, ttl_ms: 60_000, dead_letter_retention: 1_000_000 });
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
    // The scenario's arrivals, each copy FAILED (with a dead letter) or OK at random.
    let strategy = scenario().prop_flat_map(|(modes, lens, arrivals, cuts)| {
        let failed = proptest::collection::vec(proptest::bool::weighted(0.4), arrivals.len());
        (Just(modes), Just(lens), Just(arrivals), Just(cuts), failed)
    });
    let redis = Redis::start();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(48));
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
            let client = redis::Client::open(redis.url.as_str()).expect("url");
            let conn = redis::aio::ConnectionManager::new(client.clone()).await.expect("connect");
            let store = Store::new(
                conn,
                StoreConfig { retention: 1_000_000, ttl_ms: 60_000, dead_letter_retention: 1_000_000 },
            );
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
            let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
            let mut logs = Vec::new();
            for name in &names {
                logs.push(read_log(&mut conn, name).await);
            }
            (logs, read_dead_letters(&store, &names).await)
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
        let client = redis::Client::open(redis.url.as_str()).expect("url");
        let conn = redis::aio::ConnectionManager::new(client).await.expect("connect");
        let store = Store::new(conn, StoreConfig { retention: 1_000_000, ttl_ms: 0, dead_letter_retention: 10 });
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
        let client = redis::Client::open(redis.url.as_str()).expect("url");
        let conn = redis::aio::ConnectionManager::new(client).await.expect("connect");
        let store =
            Store::new(conn, StoreConfig { retention: 1_000_000, ttl_ms: 60_000, dead_letter_retention: 1_000_000 });
        assert_eq!(store.pending_results(1000).await.expect("scan"), (0, 0));
        // a: 0 released, 2 and 3 wait for 1; b: 5 waits for 0..5; c: all released.
        let items = [
            item("pend-a", 0, OrderingMode::Ordered),
            item("pend-a", 2, OrderingMode::Ordered),
            item("pend-a", 3, OrderingMode::Ordered),
            item("pend-b", 5, OrderingMode::Ordered),
            item("pend-c", 0, OrderingMode::Ordered),
        ];
        store.apply(&items).await.expect("script");
        assert_eq!(store.pending_results(1000).await.expect("scan"), (2, 3));
        store.apply(&[item("pend-a", 1, OrderingMode::Ordered)]).await.expect("script");
        assert_eq!(store.pending_results(1000).await.expect("scan"), (1, 1));
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
        let store =
            Store::new(manager, StoreConfig { retention: 1_000_000, ttl_ms: 60_000, dead_letter_retention: 1_000_000 });
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
