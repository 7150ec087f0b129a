//! A user's operation in Python (`examples/python-operation`: a grpcio
//! server of `ordo.v1.Operation/Invoke`, not compiled into Ordo), published
//! in the registry with its endpoint and called by the stock stateful-worker.
//! Its answers come back after random delays, so completions are out of
//! order; Ordo still releases each stream in order, exactly once. When the
//! server dies mid-stream, the events it would have answered are retried,
//! then FAILED in their place (with dead letters), and the stream goes on.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ExampleServer, ProcessCall,
    client::{
        LINGER, check_all_ok, check_exactly_once, check_in_order_exactly_once, event, payload_text, with_attr,
        with_mode,
    },
    example::{REGISTRY_PYTHON_ENDPOINT, example_registry, remote_operation},
    sonnets_text,
};
use ordo_proto::v1::{Event, EventResult, OrderingMode, ResultStatus};

use crate::{DEADLINE, assert_ok, publish_and_wait};

/// One event per character of `text`, each answered after a random delay of
/// up to `max_delay_ms` by the Python server.
fn text_events(stream: &str, text: &str, operation: &str, max_delay_ms: &str, mode: OrderingMode) -> Vec<Event> {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            let e =
                with_attr(event(stream, i as u64, operation, c.to_string().into_bytes()), "max-delay-ms", max_delay_ms);
            with_mode(e, mode)
        })
        .collect()
}

async fn stream(cluster: &Cluster, events: Vec<Event>) -> Vec<EventResult> {
    let stream = events.first().map(|e| e.stream_id.clone()).unwrap_or_default();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let n = events.len();
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.clone(), n)]), DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    results.into_iter().filter(|r| r.stream_id == stream).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sonnets_through_the_python_operation_come_back_in_order_exactly_once() {
    let cluster = Cluster::start().await;
    let python =
        ExampleServer::python_operation("python-operation", cluster.log_dir(), &[]).await.expect("the server starts");
    // The example registry as shipped, pointed at this test's server.
    let registry = example_registry().replace(REGISTRY_PYTHON_ENDPOINT, &python.grpc_endpoint());
    publish_and_wait(&cluster, &registry).await;
    let listed = cluster.wait_for_workers("shout", &[&cluster.worker_name(0)]).await;
    let shout = listed.operations.iter().find(|op| op.name == "shout").expect("listed");
    assert_eq!(shout.endpoint, python.grpc_endpoint(), "{shout:?}");

    let text = sonnets_text();
    let shouted = text.to_uppercase();
    assert_ne!(text, shouted, "the operation must change the text, or the test proves nothing");
    let results = stream(&cluster, text_events("sonnets-python", &text, "shout", "20", OrderingMode::Ordered)).await;
    assert_ok(check_in_order_exactly_once(&results, text.len() as u64), "ORDERED sequences");
    assert_ok(check_all_ok(&results), "statuses");
    assert_eq!(payload_text(&results), shouted, "the shouted text, reassembled in arrival order");

    // The same text UNORDERED: the random delays really do reorder completions.
    let results =
        stream(&cluster, text_events("sonnets-python-unordered", &text, "shout", "20", OrderingMode::Unordered)).await;
    assert_ok(check_exactly_once(&results, text.len() as u64), "UNORDERED sequences");
    assert_ok(check_all_ok(&results), "statuses");
    let assembled = payload_text(&results);
    let differing = assembled.bytes().zip(shouted.bytes()).filter(|(a, b)| a != b).count();
    assert!(differing > 0, "the Python operation's random delays did not reorder a single completion");
    eprintln!("UNORDERED through Python: {differing} of {} positions differ", text.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_python_server_mid_stream_fails_its_events_in_place_and_the_rest_stay_in_order() {
    const N: u64 = 1500;
    // The restarted server first works through the attempts retried during
    // the outage, which takes longer on a loaded machine: events sent after
    // this allowance must all be OK.
    const RECOVERY: Duration = Duration::from_millis(1500);
    // One event per 6 ms: with the attempts retried after the restart, a
    // faster feed outran the Python server's asyncio loop on a CI machine
    // running other clusters (timeouts feeding retries, to the end).
    const PACE: Duration = Duration::from_millis(6);
    let cluster = Cluster::builder().harmonizer_args(["--event-timeout", "1s"]).start().await;
    let mut python = ExampleServer::python_operation("python-operation", cluster.log_dir(), &["--op", "fragile=shout"])
        .await
        .expect("the server starts");
    let registry = example_registry()
        + &remote_operation("fragile", &python.grpc_endpoint(), &["attempts = 2", "timeout = \"500ms\""]);
    publish_and_wait(&cluster, &registry).await;
    cluster.wait_for_workers("fragile", &[&cluster.worker_name(0)]).await;

    let stream = "python-killed";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    // A steady feed that counts what it sent, so the test knows where the
    // server's outage fell in the stream.
    let feeder = call
        .feed_counted(N, PACE, move |seq| {
            with_attr(event(stream, seq, "fragile", format!("event {seq}").into_bytes()), "max-delay-ms", "10")
        })
        .expect("the call is open");
    call.wait_for_total(150, DEADLINE).await.expect("the first results arrive");
    python.kill();
    let at_kill = feeder.sent();
    tokio::time::sleep(Duration::from_secs(1)).await;
    python.restart().await.expect("the server restarts on its port");
    let at_restart = feeder.sent();
    tokio::time::sleep(RECOVERY).await;
    let recovered = feeder.sent();
    eprintln!(
        "killed the Python server after {at_kill} events were sent, restarted it after {at_restart}, {recovered} sent {RECOVERY:?} later"
    );
    assert!(recovered + 200 < N, "the stream was (nearly) all sent before the recovery; the test would prove nothing");
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes although the server was down");
    feeder.join().await.expect("the feeder ends");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");

    assert_ok(check_in_order_exactly_once(&results, N), "sequences");
    let failed: Vec<u64> = results.iter().filter(|r| r.status() == ResultStatus::Failed).map(|r| r.sequence).collect();
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| match r.status() {
            ResultStatus::Ok => r.payload.as_ref() != format!("EVENT {}", r.sequence).as_bytes(),
            ResultStatus::Failed => r.error.is_empty(),
            _ => true,
        })
        .take(5)
        .map(|r| format!("{r:?}"))
        .collect();
    assert!(wrong.is_empty(), "every result is the shouted payload or a FAILED with its reason: {wrong:?}");
    assert!(!failed.is_empty(), "no event failed while the server was down for a second");
    let (first, last) = (failed[0], failed[failed.len() - 1]);
    assert!(first >= 150, "events answered before the kill are OK; the first FAILED is {first}");
    assert!(
        last < recovered,
        "events sent {RECOVERY:?} after the restart are OK again; the last FAILED is {last}, {recovered} were sent by then"
    );
    eprintln!("{} FAILED in place, sequences {first}..={last}", failed.len());

    let letters = cluster.dead_letters(stream).await.expect("ListDeadLetters answers");
    let mut lettered: Vec<u64> = letters.iter().map(|l| l.event.as_ref().map_or(u64::MAX, |e| e.sequence)).collect();
    lettered.sort_unstable();
    assert_eq!(lettered, failed, "one dead letter per FAILED result");
    for letter in &letters {
        assert_eq!(letter.status(), ResultStatus::Failed, "{letter:?}");
        assert_eq!(letter.attempts, 2, "each was tried the operation's 2 attempts: {letter:?}");
        assert_eq!(letter.event.as_ref().map(|e| e.operation.as_str()), Some("fragile"), "{letter:?}");
    }
}
