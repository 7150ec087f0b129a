//! The JetStream source and sink (`ordo-source`) end to end: messages
//! published to a stream of a private nats-server come out, per key, on
//! `results.<key>` of the results stream — read back message by message and
//! checked for 0 lost, 0 duplicated, 0 reordered — through faults: the
//! source killed mid-run, nats-server restarted, Redis restarted, plus
//! duplicate publishes, a message without a key, and results slower than
//! `ack_wait` (in-progress acks).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;
use integration_tests::{Cluster, NatsServer, ServiceProcess, eventually, metrics};

const INPUT: &str = "ORDERS";
const RESULTS: &str = "ORDO_RESULTS";
const SOURCE: &str = "src";

/// A cluster, a private nats-server with the input stream, and a source.
struct Rig {
    cluster: Cluster,
    nats: NatsServer,
    source: ServiceProcess,
}

impl Rig {
    async fn start(source_args: &[&str]) -> Self {
        // Durable: a Redis restart must keep the reorder state and the mapping.
        let cluster = Cluster::builder().durable_redis().workers(2).start().await;
        let nats = NatsServer::start_in(cluster.log_dir()).await.expect("nats-server starts");
        let js = js(&nats).await;
        js.create_stream(stream::Config {
            name: INPUT.into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .expect("the input stream");
        let mut args = vec!["--stream", INPUT, "--sink-sweep", "500ms"];
        args.extend_from_slice(source_args);
        let source = cluster.start_source(SOURCE, &nats.url(), args).await.expect("ordo-source starts");
        Self { cluster, nats, source }
    }

    async fn js(&self) -> jetstream::Context {
        js(&self.nats).await
    }

    /// Publishes `count` messages per key, `key-i` as payload, waiting for every PubAck.
    async fn publish(&self, keys: &[String], count: usize) {
        let js = self.js().await;
        let mut acks = Vec::new();
        for i in 0..count {
            for key in keys {
                acks.push(publish(&js, key, &format!("{key}-{i}"), &format!("in-{key}-{i}")).await);
            }
        }
        for ack in acks {
            ack.await.expect("PubAck");
        }
    }

    /// Waits until the results stream holds `total` messages, then reads it all.
    async fn results(&self, total: u64, within: Duration) -> BTreeMap<String, Vec<(String, String)>> {
        let js = self.js().await;
        let reached = integration_tests::eventually::try_eventually(within, || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(RESULTS).await.map_err(|e| e.to_string())?;
                let messages = stream.info().await.map_err(|e| e.to_string())?.state.messages;
                if messages >= total { Ok(()) } else { Err(format!("{messages} of {total} results published")) }
            }
        })
        .await;
        if let Err(why) = reached {
            panic!("{why}\nsource log:\n{}\nnats log:\n{}", self.source.log_tail(60), self.nats.log_tail(20));
        }
        read_results(&js).await
    }

    async fn scrape(&self) -> metrics::Metrics {
        let url = self.source.metrics_url().expect("the testkit gave the source a metrics port");
        metrics::scrape(&url).await.expect("scrape ordo-source")
    }
}

async fn js(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect to the private nats-server");
    jetstream::new(client)
}

async fn publish(js: &jetstream::Context, key: &str, payload: &str, id: &str) -> jetstream::context::PublishAckFuture {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Ordo-Key", key);
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(format!("orders.{key}"), headers, payload.to_owned().into()).await.expect("publish")
}

/// Every message of the results stream in stream order, per subject:
/// (payload, Nats-Msg-Id).
async fn read_results(js: &jetstream::Context) -> BTreeMap<String, Vec<(String, String)>> {
    let mut stream = js.get_stream(RESULTS).await.expect("the results stream");
    let state = stream.info().await.expect("results stream info").state.clone();
    let mut by_subject: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.expect("a stored result");
        let id = message.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()).unwrap_or_default();
        by_subject
            .entry(message.subject.to_string())
            .or_default()
            .push((String::from_utf8_lossy(&message.payload).into_owned(), id));
    }
    by_subject
}

/// 0 lost, 0 duplicated, 0 reordered: each key's subject carries exactly
/// `key-0 … key-(count-1)` in that order, with ids `<src>:<key>` positions 0….
fn assert_exactly_once_in_order(results: &BTreeMap<String, Vec<(String, String)>>, keys: &[String], count: usize) {
    let subjects: HashSet<&String> = results.keys().collect();
    let expected_subjects: HashSet<String> = keys.iter().map(|k| format!("results.{k}")).collect();
    assert_eq!(subjects, expected_subjects.iter().collect(), "one results subject per key, nothing else");
    for key in keys {
        let got = &results[&format!("results.{key}")];
        let payloads: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        let expected: Vec<String> = (0..count).map(|i| format!("{key}-{i}")).collect();
        let lost = expected.iter().filter(|e| !payloads.contains(&e.as_str())).count();
        let mut seen = HashSet::new();
        let duplicated = payloads.iter().filter(|p| !seen.insert(**p)).count();
        assert_eq!((lost, duplicated), (0, 0), "key {key}: lost / duplicated results; got {payloads:?}");
        assert_eq!(payloads, expected, "key {key}: results out of order");
        let ids: Vec<&str> = got.iter().map(|(_, id)| id.as_str()).collect();
        let expected_ids: Vec<String> = (0..count).map(|i| format!("{key}:{i}")).collect();
        assert_eq!(ids, expected_ids, "key {key}: Nats-Msg-Id is <key>:<position>");
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct-{i}")).collect()
}

#[tokio::test]
async fn jetstream_keys_come_out_in_order_exactly_once() {
    // Up to 20 ms per event over 2 workers: results finish out of order.
    let rig = Rig::start(&["--attribute", "latency=uniform:0ms-20ms"]).await;
    let keys = keys(6);
    rig.publish(&keys, 40).await;
    let results = rig.results(6 * 40, Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&results, &keys, 40);
    let metrics = rig.scrape().await;
    assert_eq!(metrics.sum("ordo_source_messages_consumed_total", &[]), 240.0, "each message delivered once");
    eventually(Duration::from_secs(10), || async {
        let metrics = rig.scrape().await;
        let acked = metrics.sum("ordo_source_messages_acked_total", &[]);
        let in_flight = metrics.sum("ordo_source_in_flight_messages", &[]);
        (acked == 240.0 && in_flight == 0.0).then_some(()).ok_or(format!("acked {acked}, in flight {in_flight}"))
    })
    .await;
    assert_eq!(metrics.sum("ordo_source_sink_published_total", &[]), 240.0);
}

#[tokio::test]
async fn jetstream_duplicates_are_dropped_and_a_message_without_a_key_is_dead_lettered() {
    let rig = Rig::start(&["--attribute", "latency=uniform:0ms-10ms"]).await;
    let client = async_nats::connect(rig.nats.url()).await.expect("connect");
    let mut dead = client.subscribe("ordo.dead.src").await.expect("subscribe to the dead letters");
    client.flush().await.expect("flush");
    let js = rig.js().await;
    let keys = keys(2);
    for i in 0..10 {
        for key in &keys {
            publish(&js, key, &format!("{key}-{i}"), &format!("in-{key}-{i}")).await.await.expect("PubAck");
        }
        if i == 4 {
            // The same message ids again: JetStream drops them, nothing is numbered twice.
            for key in &keys {
                let ack = publish(&js, key, "duplicate", &format!("in-{key}-{i}")).await.await.expect("PubAck");
                assert!(ack.duplicate, "JetStream saw the republish as a duplicate");
            }
            // No Ordo-Key header: dead-lettered, and the keys go on.
            js.publish("orders.nokey", "lost key".into()).await.expect("publish").await.expect("PubAck");
        }
    }
    let results = rig.results(20, Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&results, &keys, 10);
    let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a dead letter within 10 s")
        .expect("the subscription is open");
    assert_eq!(&letter.payload[..], b"lost key");
    let headers = letter.headers.expect("dead letters carry headers");
    let error = headers.get("Ordo-Error").map(|v| v.as_str().to_owned()).unwrap_or_default();
    assert!(error.contains("no Ordo-Key header"), "the reason: {error}");
    assert_eq!(headers.get("Ordo-Source-Subject").map(|v| v.as_str()), Some("orders.nokey"));
    assert_eq!(rig.scrape().await.sum("ordo_source_dead_letters_total", &[]), 1.0);
}

#[tokio::test]
async fn jetstream_results_slower_than_ack_wait_are_not_redelivered() {
    // Each result takes 2.5 s, ack_wait is 1 s: only in-progress acks keep
    // JetStream from redelivering (a redelivery would be consumed twice).
    let rig = Rig::start(&["--ack-wait", "1s", "--attribute", "latency=fixed:2500ms"]).await;
    let keys = keys(3);
    rig.publish(&keys, 3).await;
    let results = rig.results(9, Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&results, &keys, 3);
    assert_eq!(rig.scrape().await.sum("ordo_source_messages_consumed_total", &[]), 9.0, "no redelivery");
}

/// How many results the results stream holds now.
async fn published(js: &jetstream::Context) -> Result<u64, String> {
    let mut stream = js.get_stream(RESULTS).await.map_err(|e| e.to_string())?;
    Ok(stream.info().await.map_err(|e| e.to_string())?.state.messages)
}

/// Publishes 8 keys × 50 messages, throttled to 16 in flight with 10–60 ms
/// per event (so the run lasts seconds), applies `fault` once some results
/// are out but most are not, and checks that everything comes out exactly
/// once in order, and that nothing more comes once the source is idle.
async fn survives(fault: impl AsyncFnOnce(&mut Rig)) {
    let mut rig =
        Rig::start(&["--attribute", "latency=uniform:10ms-60ms", "--ack-wait", "5s", "--max-in-flight", "16"]).await;
    let keys = keys(8);
    let count = 50;
    let total = (keys.len() * count) as u64;
    rig.publish(&keys, count).await;
    let js = rig.js().await;
    let before = eventually(Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            let messages = published(&js).await?;
            if messages >= 40 { Ok(messages) } else { Err(format!("{messages} results so far")) }
        }
    })
    .await;
    assert!(before < total / 2, "the fault must come mid-run ({before} of {total} results were out)");
    fault(&mut rig).await;
    let results = rig.results(total, Duration::from_secs(90)).await;
    assert_exactly_once_in_order(&results, &keys, count);
    eventually(Duration::from_secs(20), || async {
        let metrics = rig.scrape().await;
        let in_flight = metrics.sum("ordo_source_in_flight_messages", &[]);
        let lag = metrics.sum("ordo_source_sink_lag_results", &[]);
        (in_flight == 0.0 && lag == 0.0).then_some(()).ok_or(format!("in flight {in_flight}, sink lag {lag}"))
    })
    .await;
    assert_eq!(published(&js).await, Ok(total), "nothing more once idle");
}

#[tokio::test]
async fn jetstream_source_killed_mid_run() {
    survives(async |rig: &mut Rig| {
        // Killed while it holds deliveries unacked (each takes at least 10 ms).
        eventually(Duration::from_secs(20), || async {
            let in_flight = rig.scrape().await.sum("ordo_source_in_flight_messages", &[]);
            (in_flight >= 8.0).then_some(()).ok_or(format!("{in_flight} in flight"))
        })
        .await;
        rig.source.kill();
        // JetStream still counts deliveries the dead source never acked: the
        // restarted one must get them again (and `survives` checks that each
        // result is out exactly once, in order). Read from the server, not
        // from the source's counters, which lag behind its last moments.
        let js = rig.js().await;
        let mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
            js.get_consumer_from_stream(SOURCE, INPUT).await.expect("the durable consumer stays");
        let info = consumer.info().await.expect("consumer info").clone();
        assert!(info.num_ack_pending > 0, "the killed source held unacked deliveries: {info:?}");
        rig.source.restart(Duration::from_secs(20)).await.expect("the source restarts");
    })
    .await;
}

#[tokio::test]
async fn jetstream_nats_restarted_mid_run() {
    survives(async |rig: &mut Rig| {
        rig.nats.restart().await.expect("nats-server restarts on its port with its store");
        // The source saw the reconnect and recreated its consumer at the ack floor.
        eventually(Duration::from_secs(30), || async {
            let resets = rig.scrape().await.sum("ordo_source_consumer_resets_total", &[]);
            (resets >= 2.0).then_some(()).ok_or(format!("{resets} consumer (re)creations"))
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn jetstream_redis_restarted_mid_run() {
    survives(async |rig: &mut Rig| {
        rig.cluster.redis().restart().await.expect("redis restarts with its append-only file");
    })
    .await;
}

#[tokio::test]
async fn jetstream_source_drains_on_sigterm() {
    // 1.5 s per result: SIGTERM comes while all six are in flight.
    let mut rig = Rig::start(&["--attribute", "latency=fixed:1500ms"]).await;
    let keys = keys(2);
    rig.publish(&keys, 3).await;
    eventually(Duration::from_secs(20), || async {
        let in_flight = rig.scrape().await.sum("ordo_source_in_flight_messages", &[]);
        (in_flight >= 2.0).then_some(()).ok_or(format!("{in_flight} in flight"))
    })
    .await;
    let status = rig.source.terminate(Duration::from_secs(12)).await.expect("exits within the drain timeout");
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    // It stopped consuming, so what it had not taken yet waits for the next
    // start; what it held was released, acked and published before it exited.
    let js = rig.js().await;
    let mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
        js.get_consumer_from_stream(SOURCE, INPUT).await.expect("the durable consumer stays");
    let info = consumer.info().await.expect("consumer info").clone();
    assert_eq!(info.num_ack_pending, 0, "nothing left unacked: {info:?}");
    let acked = info.ack_floor.stream_sequence;
    assert!(acked >= 2, "the messages in flight were acked ({acked})");
    assert_eq!(published(&js).await, Ok(acked), "each acked message's result was published before the exit");
    // The next start finishes the rest, exactly once in order.
    rig.source.restart(Duration::from_secs(20)).await.expect("restart");
    let results = rig.results(6, Duration::from_secs(30)).await;
    assert_exactly_once_in_order(&results, &keys, 3);
}

#[tokio::test]
async fn jetstream_harmonizer_killed_mid_run() {
    survives(async |rig: &mut Rig| {
        let harmonizer = rig.cluster.harmonizer_process();
        harmonizer.kill();
        harmonizer.restart(Duration::from_secs(20)).await.expect("the harmonizer restarts on its port");
        // The source opened a new Process call and resent what was in flight.
        eventually(Duration::from_secs(30), || async {
            let resent = rig.scrape().await.sum("ordo_source_events_resent_total", &[]);
            (resent > 0.0).then_some(()).ok_or("nothing resent yet")
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn jetstream_key_from_a_subject_token() {
    let rig = Rig::start(&["--key", "subject:1"]).await;
    let js = rig.js().await;
    let keys = keys(3);
    for i in 0..5 {
        for key in &keys {
            // No Ordo-Key header: the key is the subject's second token.
            js.publish(format!("orders.{key}"), format!("{key}-{i}").into())
                .await
                .expect("publish")
                .await
                .expect("PubAck");
        }
    }
    let results = rig.results(15, Duration::from_secs(30)).await;
    assert_exactly_once_in_order(&results, &keys, 5);
}
