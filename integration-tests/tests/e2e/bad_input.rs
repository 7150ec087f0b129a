//! Bad input, as docs/configuration.md ("Bad input (gRPC codes)") specifies:
//! unary `Submit` answers with a gRPC status, the bidirectional `Process`
//! call answers with a REJECTED result carrying the code and stays open, and
//! a repeated (stream, sequence) is idempotent. Each test checks every case
//! and reports all mismatches at once.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, by_stream, check_all_ok, check_in_order_exactly_once, event, payload_text, with_attr},
};
use ordo_proto::v1::{Event, ResultStatus};
use tonic::Code;

use crate::DEADLINE;

const MAX_PAYLOAD: usize = 1024;

async fn cluster() -> Cluster {
    Cluster::builder()
        .harmonizer_args(["--max-payload-bytes", "1024", "--window", "16", "--window-wait", "200ms"])
        .start()
        .await
}

/// The bad events: (what, event, expected code). Stream ids are distinct so
/// each REJECTED result can be matched to its case.
fn bad_events(prefix: &str) -> Vec<(&'static str, Event, Code)> {
    let s = |name: &str| format!("{prefix}-{name}");
    vec![
        ("missing stream id", event("", 0, "upper", "x"), Code::InvalidArgument),
        ("unknown operation", event(&s("unknown-op"), 0, "no-such-operation", "x"), Code::NotFound),
        ("oversized payload", event(&s("oversized"), 0, "upper", vec![b'a'; 2000]), Code::InvalidArgument),
        (
            "malformed latency",
            with_attr(event(&s("bad-latency"), 0, "async-echo", "x"), "latency", "exp:banana"),
            Code::InvalidArgument,
        ),
        (
            "bad call attribute",
            with_attr(
                with_attr(event(&s("bad-call"), 0, "callback", "x"), "latency", "fixed:1ms"),
                "call",
                "no-such-operation",
            ),
            Code::InvalidArgument,
        ),
        (
            "empty attribute key",
            with_attr(event(&s("empty-key"), 0, "async-echo", "x"), "", "x"),
            Code::InvalidArgument,
        ),
        // Above 2^53 - 1 the release script's doubles are no longer exact.
        ("sequence above 2^53 - 1", event(&s("huge-seq"), 1 << 53, "upper", "x"), Code::InvalidArgument),
        ("sequence u64::MAX", event(&s("max-seq"), u64::MAX, "upper", "x"), Code::InvalidArgument),
        (
            "sequence beyond the window",
            with_attr(event(&s("far"), 10_000, "async-echo", "x"), "latency", "fixed:1ms"),
            Code::OutOfRange,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_bad_inputs_and_idempotence() {
    let cluster = cluster().await;
    let mut client = cluster.harmonizer();
    let mut failures = Vec::new();

    // A good event first: the errors below must not be an unusable service.
    match client.submit(event("submit-ok", 0, "upper", "hello")).await {
        Ok(r) if r.get_ref().status() == ResultStatus::Ok && r.get_ref().payload.as_ref() == b"HELLO" => {}
        other => failures.push(format!("valid Submit(upper, hello): expected OK \"HELLO\", got {other:?}")),
    }
    // Right at the limit is accepted.
    match client.submit(event("submit-at-limit", 0, "upper", vec![b'a'; MAX_PAYLOAD])).await {
        Ok(r) if r.get_ref().status() == ResultStatus::Ok => {}
        other => failures.push(format!(
            "payload of exactly --max-payload-bytes: expected OK, got {:?}",
            other.map(|r| r.into_inner().status())
        )),
    }

    for (what, bad, code) in bad_events("submit") {
        match client.submit(bad).await {
            Err(status) if status.code() == code => {}
            Err(status) => {
                failures.push(format!("{what}: expected {code:?}, got {:?} ({})", status.code(), status.message()))
            }
            Ok(result) => failures.push(format!("{what}: expected {code:?}, got a result {:?}", result.into_inner())),
        }
    }

    // The same (stream, sequence) twice: the same result both times, for a
    // stateless and for a stateful operation.
    let stateless = event("submit-dup-stateless", 0, "upper", "hello");
    let stateful = with_attr(event("submit-dup-stateful", 0, "async-upper", "hello"), "latency", "fixed:1ms");
    for original in [stateless, stateful] {
        let first = client.submit(original.clone()).await.map(|r| r.into_inner());
        let second = client.submit(original.clone()).await.map(|r| r.into_inner());
        match (&first, &second) {
            (Ok(a), Ok(b))
                if a.status() == ResultStatus::Ok
                    && b.status() == ResultStatus::Ok
                    && a.payload == b.payload
                    && a.payload.as_ref() == b"HELLO" => {}
            _ => failures.push(format!(
                "{} submitted twice: expected OK \"HELLO\" both times, got {first:?} then {second:?}",
                original.operation
            )),
        }
    }

    assert!(failures.is_empty(), "{} Submit contract violations:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn process_bad_inputs_rejected_and_call_survives() {
    let cluster = cluster().await;
    let good = "process-ok";
    let good_event =
        |seq: u64, payload: &str| with_attr(event(good, seq, "async-echo", payload.to_owned()), "latency", "fixed:1ms");
    let bad = bad_events("process");

    let mut events: Vec<Event> = ["a", "b", "c"].iter().enumerate().map(|(i, p)| good_event(i as u64, p)).collect();
    events.extend(bad.iter().map(|(_, e, _)| e.clone()));
    events.push(good_event(3, "d"));
    events.push(good_event(3, "d")); // the duplicate
    events.extend(["e", "f", "g"].iter().enumerate().map(|(i, p)| good_event(4 + i as u64, p)));

    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    let mut expected: BTreeMap<String, usize> = bad.iter().map(|(_, e, _)| (e.stream_id.clone(), 1)).collect();
    expected.insert(good.to_owned(), 7);
    call.wait_for_counts(&expected, DEADLINE + Duration::from_secs(5)).await.expect("a result for every event");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    let grouped = by_stream(&results);

    let mut failures = Vec::new();
    let good_results = grouped.get(good).cloned().unwrap_or_default();
    if let Err(e) = check_in_order_exactly_once(&good_results, 7).and_then(|()| check_all_ok(&good_results)) {
        failures.push(format!("valid events around the bad ones (and the duplicate of #3): {e}"));
    }
    if payload_text(&good_results) != "abcdefg" {
        failures.push(format!("valid events: payloads {:?}, expected \"abcdefg\"", payload_text(&good_results)));
    }
    for (what, e, code) in &bad {
        let got = grouped.get(&e.stream_id).cloned().unwrap_or_default();
        match got.as_slice() {
            [r] if r.status() == ResultStatus::Rejected && r.code == *code as i32 && r.sequence == e.sequence => {}
            _ => failures.push(format!(
                "{what}: expected one REJECTED result with code {} ({code:?}), got {:?}",
                *code as i32,
                got.iter().map(|r| (r.sequence, r.status(), r.code, r.error.clone())).collect::<Vec<_>>()
            )),
        }
    }
    assert!(failures.is_empty(), "{} Process contract violations:\n{}", failures.len(), failures.join("\n"));
}
