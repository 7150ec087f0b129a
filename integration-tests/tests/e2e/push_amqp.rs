//! The push path with the machine's RabbitMQ: a long-running stream reaches
//! the client as PROCESSING, then every result over gRPC, SSE and AMQP in
//! order; a broker outage mid-stream loses nothing and keeps the order (a
//! repeat only ever carries a position already delivered); results trimmed
//! from the log before the broker got them are announced by one `ordo.gap`
//! message, never skipped silently; two gateway replicas publishing to one
//! exchange, one of them restarted, keep the order too.
//!
//! Every test here has `amqp` in its name: `.config/nextest.toml` runs them
//! one at a time, since one stops the broker. Each uses its own exchange.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall, ServiceProcess,
    client::{LINGER, check_in_order_exactly_once, event, with_attr},
    process::{ServiceSpec, binary},
    rabbitmq::{self, AMQP_URL, QueueConsumer, Received},
    sse,
};
use ordo_proto::v1::{EventResult, ResultStatus};

use crate::{
    DEADLINE, assert_ok, check_numbered_payloads, numbered_events,
    push::{check_sse_results, receive, subscribe},
};

/// A cluster whose push-gateway publishes to `exchange`.
fn amqp_cluster(exchange: &str) -> integration_tests::ClusterBuilder {
    Cluster::builder().push_gateway_args(["--amqp-url", AMQP_URL, "--amqp-exchange", exchange])
}

/// `Ok` when the messages, with repeats dropped, are results at positions
/// `0..n` in order, and every repeat carries a position already delivered.
fn check_amqp_in_order(messages: &[Received], stream: &str, n: u64) -> Result<(), String> {
    let mut next = 0u64;
    let mut repeats = 0;
    for (i, message) in messages.iter().enumerate() {
        if message.kind != "ordo.result" {
            return Err(format!("message #{i} is a {:?}, not a result: {message:?}", message.kind));
        }
        let Some(position) = message.position else { return Err(format!("message #{i} has no position header")) };
        if message.sequence != Some(position) {
            return Err(format!("message #{i}: sequence {:?} != position {position}", message.sequence));
        }
        if position < next {
            repeats += 1; // an already-delivered position: allowed (at least once)
            continue;
        }
        if position > next {
            return Err(format!("message #{i} is position {position} but {next} was never delivered (a gap)"));
        }
        let body: serde_json::Value =
            serde_json::from_slice(&message.body).map_err(|e| format!("message #{i}: body is not JSON: {e}"))?;
        if body["sequence"] != position || body["payload_utf8"] != format!("{stream}:{position}") {
            return Err(format!("message #{i} carries the wrong result: {body}"));
        }
        if message.delivery_mode != Some(2)
            || message.routing_key != stream
            || message.content_type != "application/json"
        {
            return Err(format!("message #{i} is not a persistent JSON message routed by stream id: {message:?}"));
        }
        next += 1;
    }
    if next != n {
        return Err(format!("{next} of {n} positions delivered ({} messages)", messages.len()));
    }
    eprintln!("AMQP: {n} results in order, {repeats} repeats");
    Ok(())
}

/// The number of distinct positions delivered so far.
fn delivered(messages: &[Received]) -> usize {
    messages.iter().filter_map(|m| m.position).collect::<std::collections::BTreeSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_long_running_stream_every_channel_in_order() {
    const N: u64 = 12;
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.every-channel");
    let stream = "long-running";
    let consumer = QueueConsumer::bind(&exchange, stream).await.expect("a queue bound to the exchange");
    let cluster = amqp_cluster(&exchange)
        .harmonizer_args(["--stream-processing-threshold", "100ms", "--unary-threshold", "100ms"])
        .start()
        .await;

    let mut grpc = subscribe(&cluster, stream, 0).await.expect("Subscribe opens");
    let url = sse::events_url(&cluster.sse_url(), stream, None);
    let mut events = sse::open_stream(&url, None).await.expect("the SSE stream opens");

    // Operations that each take longer than the threshold.
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "uniform:150ms-400ms"), None);
    let is_result = |r: &EventResult| r.status() != ResultStatus::Processing;
    call.wait_until(DEADLINE, |got| got.iter().filter(|r| is_result(r)).count() >= N as usize)
        .await
        .expect("every result on the call");

    // One more, unary and slower than --unary-threshold: PROCESSING at once.
    let slow = with_attr(event(stream, N, "async-echo", format!("{stream}:{N}").into_bytes()), "latency", "fixed:1s");
    let started = std::time::Instant::now();
    let ticket = cluster.harmonizer().submit(slow).await.expect("Submit answers").into_inner();
    assert_eq!(ticket.status(), ResultStatus::Processing, "{ticket:?}");
    assert!(started.elapsed() < Duration::from_millis(900), "PROCESSING took {:?}", started.elapsed());

    let received = call.finish(LINGER).await.expect("the call ends cleanly");
    let mut ticketed = std::collections::HashSet::new();
    for (i, r) in received.iter().enumerate() {
        if r.status() == ResultStatus::Processing {
            assert!(ticketed.insert(r.sequence), "PROCESSING twice for sequence {}", r.sequence);
            let result_before = received[..i].iter().any(|x| x.sequence == r.sequence && is_result(x));
            assert!(!result_before, "PROCESSING for {} after its result", r.sequence);
        }
    }
    assert!(!ticketed.is_empty(), "no PROCESSING on the call although every operation outlasted the threshold");
    let results: Vec<EventResult> = received.into_iter().filter(is_result).collect();
    assert_ok(check_in_order_exactly_once(&results, N), "results on the Process call");
    eprintln!("PROCESSING tickets on the call: {ticketed:?}");

    // Every channel: the N results, then the unary one.
    let over_grpc = receive(&mut grpc, N as usize + 1, DEADLINE).await;
    assert_ok(check_in_order_exactly_once(&over_grpc, N + 1), "gRPC Subscribe");
    assert_ok(check_numbered_payloads(&over_grpc), "gRPC payloads");
    let over_sse = events.collect(N as usize + 1, DEADLINE).await.expect("every result over SSE");
    assert_ok(check_sse_results(&over_sse, stream, 0), "SSE");
    consumer.wait_until(DEADLINE, |m| delivered(m) > N as usize).await.expect("every result over AMQP");
    assert_ok(check_amqp_in_order(&consumer.received(), stream, N + 1), "AMQP");

    drop(cluster);
    consumer.delete().await.expect("the test's queue and exchange are deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_broker_outage_mid_stream_loses_nothing() {
    const PHASE: u64 = 100;
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.outage");
    let stream = "outage";
    let consumer = QueueConsumer::bind(&exchange, stream).await.expect("a queue bound to the exchange");
    let cluster = amqp_cluster(&exchange).start().await;
    let events = numbered_events(stream, 3 * PHASE, "async-echo", "exp:3ms");
    let mut phases = events.chunks(PHASE as usize).map(<[_]>::to_vec);
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let counts = |n: u64| BTreeMap::from([(stream.to_owned(), n as usize)]);

    // 1. The broker is up: the first results are published.
    call.feed(phases.next().unwrap_or_default(), Some(Duration::from_millis(2)));
    consumer.wait_until(DEADLINE, |m| delivered(m) >= PHASE as usize).await.expect("phase 1 over AMQP");

    // 2. The broker's application stops; results keep being released.
    let stopped = rabbitmq::stop_broker().await.expect("rabbitmqctl stop_app");
    call.feed(phases.next().unwrap_or_default(), Some(Duration::from_millis(2)));
    call.wait_for_counts(&counts(2 * PHASE), DEADLINE).await.expect("phase 2 released while the broker is down");
    assert!(!rabbitmq::broker_listening().await, "the broker came back by itself; the test would prove nothing");

    // 3. The broker is back: the backlog goes out in order, then new results.
    stopped.start().await.expect("rabbitmqctl start_app");
    call.feed(phases.next().unwrap_or_default(), Some(Duration::from_millis(2)));
    call.wait_for_counts(&counts(3 * PHASE), DEADLINE).await.expect("phase 3 released");
    consumer
        .wait_until(DEADLINE, |m| delivered(m) >= 3 * PHASE as usize)
        .await
        .expect("every result over AMQP after the outage");
    assert_ok(check_amqp_in_order(&consumer.received(), stream, 3 * PHASE), "AMQP across the outage");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, 3 * PHASE), "the Process call");

    drop(cluster);
    consumer.delete().await.expect("the test's queue and exchange are deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_two_gateways_and_a_gateway_restart_keep_order() {
    const PHASE: u64 = 100;
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.replicas");
    let stream = "replicas";
    let consumer = QueueConsumer::bind(&exchange, stream).await.expect("a queue bound to the exchange");
    let mut cluster = amqp_cluster(&exchange).start().await;
    // A second gateway on the same Redis, publishing to the same exchange.
    let spec = ServiceSpec {
        name: "push-gateway-2".into(),
        binary: binary("push-gateway"),
        args: ["--redis-url", &cluster.redis_url(), "--sse-listen", "off", "--amqp-url", AMQP_URL, "--amqp-exchange"]
            .into_iter()
            .map(str::to_owned)
            .chain([exchange.clone()])
            .collect(),
        env: Vec::new(),
    };
    let mut second = ServiceProcess::start(spec, cluster.log_dir(), Duration::from_secs(30))
        .await
        .expect("a second push-gateway starts");

    let events = numbered_events(stream, 2 * PHASE, "async-echo", "exp:3ms");
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events[..PHASE as usize].to_vec(), Some(Duration::from_millis(2)));
    consumer.wait_until(DEADLINE, |m| delivered(m) >= 50).await.expect("the first results over AMQP");

    // The cluster's gateway dies mid-stream and comes back on its port.
    let gateway = cluster.push_gateway_process();
    gateway.kill();
    gateway.restart(Duration::from_secs(30)).await.expect("the push-gateway restarts");
    call.feed(events[PHASE as usize..].to_vec(), Some(Duration::from_millis(2)));
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), 2 * PHASE as usize)]), DEADLINE)
        .await
        .expect("every result on the call");
    consumer.wait_until(DEADLINE, |m| delivered(m) >= 2 * PHASE as usize).await.expect("every result over AMQP");
    assert_ok(check_amqp_in_order(&consumer.received(), stream, 2 * PHASE), "AMQP with two gateways");

    second.kill();
    drop(cluster);
    consumer.delete().await.expect("the test's queue and exchange are deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_results_trimmed_during_an_outage_are_announced_as_a_gap() {
    const BEFORE: u64 = 10;
    const DURING: u64 = 400;
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.gap");
    let stream = "gap";
    let consumer = QueueConsumer::bind(&exchange, stream).await.expect("a queue bound to the exchange");
    // A short log: results released while the broker is away get trimmed.
    let cluster = amqp_cluster(&exchange).reassembler_args(["--retention", "50"]).start().await;
    let events = numbered_events(stream, BEFORE + DURING, "async-echo", "fixed:1ms");
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events[..BEFORE as usize].to_vec(), None);
    consumer.wait_until(DEADLINE, |m| delivered(m) >= BEFORE as usize).await.expect("the first results over AMQP");

    let stopped = rabbitmq::stop_broker().await.expect("rabbitmqctl stop_app");
    call.feed(events[BEFORE as usize..].to_vec(), None);
    call.wait_for_total((BEFORE + DURING) as usize, DEADLINE).await.expect("released while the broker is down");
    stopped.start().await.expect("rabbitmqctl start_app");
    consumer
        .wait_until(DEADLINE, |m| m.iter().any(|r| r.position == Some(BEFORE + DURING - 1)))
        .await
        .expect("the last result over AMQP");

    // Results 0..BEFORE, one gap message BEFORE..oldest, results oldest.. to the end.
    let messages = consumer.received();
    let gaps: Vec<&Received> = messages.iter().filter(|m| m.kind == "ordo.gap").collect();
    assert_eq!(gaps.len(), 1, "one gap announcement: {messages:?}");
    let gap_from = gaps[0].headers.get("ordo-gap-from").and_then(|v| v.parse::<u64>().ok());
    let gap_to = gaps[0].headers.get("ordo-gap-to").and_then(|v| v.parse::<u64>().ok());
    assert_eq!(gap_from, Some(BEFORE), "the gap starts where publishing stopped: {:?}", gaps[0]);
    let gap_to = gap_to.expect("ordo-gap-to header");
    assert!(gap_to > BEFORE && gap_to < BEFORE + DURING, "gap to {gap_to}");
    let positions: Vec<u64> = messages.iter().filter(|m| m.kind == "ordo.result").filter_map(|m| m.position).collect();
    let expected: Vec<u64> = (0..BEFORE).chain(gap_to..BEFORE + DURING).collect();
    // A repeat (at least once) carries a position already delivered: skip it.
    let mut first_seen: Vec<u64> = Vec::new();
    for position in positions {
        if first_seen.last().is_none_or(|last| position > *last) {
            first_seen.push(position);
        }
    }
    assert_eq!(first_seen, expected, "results before the gap, then from the gap's end, in order");
    let gap_index = messages.iter().position(|m| m.kind == "ordo.gap").unwrap_or_default();
    assert!(
        messages[gap_index + 1..].iter().all(|m| m.position.is_none_or(|p| p >= gap_to)),
        "nothing from inside the gap after it was announced"
    );

    drop(cluster);
    consumer.delete().await.expect("the test's queue and exchange are deleted");
}
