//! A user's operation over HTTP (`examples/http-operation`, Python's
//! standard library): the worker POSTs each attempt; 2xx is the result, a
//! 4xx is FAILED in place at once (one attempt, a dead letter), a 5xx is
//! retried and FAILED in place only after the operation's attempts.

use std::collections::{BTreeMap, HashMap};

use integration_tests::{
    Cluster, ExampleServer, ProcessCall,
    client::{LINGER, check_all_ok, check_in_order_exactly_once, event, payload_text, with_attr},
    example::{REGISTRY_HTTP_BASE, example_registry},
    sonnets_text,
};
use ordo_proto::v1::{Event, EventResult, ResultStatus};

use crate::{DEADLINE, assert_ok, publish_and_wait};

/// Attempts of `http-shout` in `examples/registry.toml`.
const ATTEMPTS: u32 = 3;

async fn stream(cluster: &Cluster, stream: &str, events: Vec<Event>) -> Vec<EventResult> {
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let n = events.len();
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), n)]), DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    results.into_iter().filter(|r| r.stream_id == stream).collect()
}

/// `GET /calls` of the example: how often each `stream#sequence` was POSTed.
async fn calls(server: &ExampleServer) -> HashMap<String, u64> {
    let response = reqwest::get(server.http_url("/calls")).await.expect("GET /calls answers");
    let body = response.bytes().await.expect("a body");
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET /calls is JSON ({e}): {body:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_operation_orders_a_text_fails_a_4xx_at_once_and_retries_a_5xx() {
    let cluster = Cluster::start().await;
    let http =
        ExampleServer::http_operation("http-operation", cluster.log_dir(), &[]).await.expect("the server starts");
    let registry = example_registry().replace(REGISTRY_HTTP_BASE, &http.http_url(""));
    publish_and_wait(&cluster, &registry).await;
    let listed = cluster.wait_for_workers("http-shout", &[&cluster.worker_name(0)]).await;
    let op = listed.operations.iter().find(|op| op.name == "http-shout").expect("listed");
    assert_eq!((op.endpoint.as_str(), op.attempts), (http.http_url("/shout").as_str(), ATTEMPTS), "{op:?}");

    // A text, one character per event, answered after random delays.
    let text = &sonnets_text()[..600];
    let events = text
        .chars()
        .enumerate()
        .map(|(i, c)| with_attr(event("http-text", i as u64, "http-shout", c.to_string()), "max-delay-ms", "20"))
        .collect();
    let results = stream(&cluster, "http-text", events).await;
    assert_ok(check_in_order_exactly_once(&results, text.len() as u64), "sequences");
    assert_ok(check_all_ok(&results), "statuses");
    assert_eq!(payload_text(&results), text.to_uppercase());

    // Failures the handler is told to give, between good events.
    let s = "http-failures";
    let events = vec![
        event(s, 0, "http-shout", "zero"),
        with_attr(event(s, 1, "http-shout", "bad request"), "status", "400"),
        event(s, 2, "http-shout", "two"),
        with_attr(event(s, 3, "http-shout", "server error"), "status", "503"),
        with_attr(event(s, 4, "http-shout", "flaky"), "fail-attempts", "1"),
        event(s, 5, "http-shout", "five"),
    ];
    let results = stream(&cluster, s, events).await;
    assert_ok(check_in_order_exactly_once(&results, 6), "sequences");
    let got: Vec<(u64, ResultStatus, String)> =
        results.iter().map(|r| (r.sequence, r.status(), String::from_utf8_lossy(&r.payload).into_owned())).collect();
    let failed = (ResultStatus::Failed, String::new());
    let expected: Vec<(u64, ResultStatus, String)> = [
        (ResultStatus::Ok, "ZERO".to_owned()),
        failed.clone(),
        (ResultStatus::Ok, "TWO".to_owned()),
        failed,
        (ResultStatus::Ok, "FLAKY".to_owned()),
        (ResultStatus::Ok, "FIVE".to_owned()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (status, payload))| (i as u64, status, payload))
    .collect();
    assert_eq!(got, expected, "{results:#?}");
    assert!(results[1].error.contains("400"), "the 4xx is the reason: {:?}", results[1].error);
    assert!(results[3].error.contains("503"), "the 5xx is the reason: {:?}", results[3].error);

    let letters = cluster.dead_letters(s).await.expect("ListDeadLetters answers");
    let attempts: Vec<(u64, u32)> =
        letters.iter().map(|l| (l.event.as_ref().map_or(u64::MAX, |e| e.sequence), l.attempts)).collect();
    assert_eq!(attempts, [(1, 1), (3, ATTEMPTS)], "a 4xx is not retried, a 5xx is, until its attempts: {letters:#?}");

    // What the handler saw: one POST for the 4xx, every attempt for the 5xx.
    let calls = calls(&http).await;
    let seen: Vec<u64> = (0..6).map(|seq| calls.get(&format!("{s}#{seq}")).copied().unwrap_or(0)).collect();
    assert_eq!(seen, [1, 1, 1, u64::from(ATTEMPTS), 2, 1], "POSTs per sequence: {calls:?}");
}
