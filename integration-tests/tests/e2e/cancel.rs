//! What the worker does with attempts the harmonizer no longer waits for,
//! and with attempts that fail transiently:
//! - an attempt the harmonizer abandoned (event timeout, given up) is
//!   cancelled on the worker and frees its concurrency slot, so slow events
//!   that time out cannot starve later fast ones (issue 7, finding 6);
//! - `callback` rides out a brief outage of the stateless service by
//!   retrying within its attempt and handing the attempt back for another
//!   one, instead of releasing FAILED at once (finding 10);
//! - a permanent error (the stateless operation rejects the input) is FAILED on
//!   the first attempt, with a dead letter saying so;
//! - after SIGTERM a worker lets short operations finish and deliver, cancels
//!   long ones at its drain timeout and exits 0 in time (finding 7).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, by_stream, check_all_ok, check_in_order_exactly_once, event, with_attr},
};
use ordo_proto::{ResultStatus, v1::Event};

use crate::{DEADLINE, assert_ok, numbered_events};

fn slow_events(stream: &str, n: u64, operation: &str, latency: &str) -> Vec<Event> {
    (0..n)
        .map(|seq| with_attr(event(stream, seq, operation, format!("{seq}").into_bytes()), "latency", latency))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_attempts_free_their_worker_slots() {
    // 25 slow events × 2 attempts want 50 slots of 32: without cancellation
    // the abandoned attempts hold every slot for 10 minutes, so the fast
    // events sent afterwards queue behind them and time out as well.
    const SLOW: u64 = 25;
    const FAST: u64 = 20;
    let cluster = Cluster::builder()
        .worker_args(["--concurrency", "32"])
        .harmonizer_args(["--event-timeout", "1s", "--max-attempts", "2"])
        .start()
        .await;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(slow_events("slow", SLOW, "async-echo", "fixed:600s"), None);
    call.wait_for_counts(&BTreeMap::from([("slow".to_owned(), SLOW as usize)]), DEADLINE)
        .await
        .expect("the slow events are given up after their attempts");

    call.feed(numbered_events("fast", FAST, "async-echo", "fixed:1ms"), None);
    call.wait_for_counts(&BTreeMap::from([("fast".to_owned(), FAST as usize)]), DEADLINE)
        .await
        .expect("the fast events come back");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");

    let streams = by_stream(&results);
    let fast = streams.get("fast").map(Vec::as_slice).unwrap_or_default();
    assert_ok(check_in_order_exactly_once(fast, FAST).and_then(|()| check_all_ok(fast)), "fast events after slow ones");
    let slow = streams.get("slow").map(Vec::as_slice).unwrap_or_default();
    assert_ok(check_in_order_exactly_once(slow, SLOW), "slow events");
    assert!(
        slow.iter().all(|r| r.status() == ResultStatus::Failed && r.error.contains("2 attempts")),
        "every slow event is FAILED after its 2 attempts: {:?}",
        slow.iter().find(|r| r.status() != ResultStatus::Failed)
    );
    // Given up by the harmonizer: each is a dead letter with its attempts.
    let letters = cluster.dead_letters("slow").await.expect("list dead letters");
    assert_eq!(letters.len(), SLOW as usize, "{letters:?}");
    assert!(letters.iter().all(|l| l.attempts == 2 && l.event.is_some()), "{letters:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn callback_survives_a_brief_stateless_outage() {
    const N: u64 = 10;
    // Attempts of 1 s: the outage outlasts the first attempts, so they must
    // be handed back and tried again, not released FAILED.
    let mut cluster =
        Cluster::builder().harmonizer_args(["--event-timeout", "1s", "--max-attempts", "8"]).start().await;
    let stream = "callback-outage";
    cluster.stateless_process().kill();

    let mut call = ProcessCall::open(&cluster.harmonizer());
    let events = (0..N)
        .map(|seq| {
            let e = with_attr(event(stream, seq, "callback", format!("{stream}:{seq}").into_bytes()), "call", "upper");
            with_attr(e, "latency", "fixed:1ms")
        })
        .collect();
    call.feed(events, None);
    // The fault itself: the stateless service stays down for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        call.received().iter().all(|r| r.status() == ResultStatus::Processing),
        "results before the stateless service is back: {:?}",
        call.received()
    );
    cluster.stateless_process().restart(Duration::from_secs(30)).await.expect("the stateless service restarts");

    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE)
        .await
        .expect("every callback completes once the stateless service is back");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, N).and_then(|()| check_all_ok(&results)), "callbacks");
    for result in &results {
        assert_eq!(result.payload, format!("{stream}:{}", result.sequence).to_uppercase().into_bytes(), "{result:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_callback_error_is_failed_at_once_with_a_dead_letter() {
    let cluster = Cluster::builder().harmonizer_args(["--max-attempts", "3"]).start().await;
    let stream = "callback-permanent";
    // The stateless operation answers about the event itself: not JSON.
    let e = with_attr(event(stream, 0, "callback", b"{nope".to_vec()), "call", "json-validate");
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(vec![e], None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), 1)]), DEADLINE).await.expect("a result");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].status(), ResultStatus::Failed, "{results:?}");
    assert!(results[0].error.contains("invalid JSON"), "the error names the cause: {:?}", results[0].error);

    let letters = cluster.dead_letters(stream).await.expect("list dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.status(), ResultStatus::Failed);
    assert_eq!(letter.attempts, 1, "a permanent error is not retried: {letter:?}");
    assert_eq!(letter.error, results[0].error);
    assert_eq!(letter.event.as_ref().map(|e| e.payload.as_ref()), Some(&b"{nope"[..]), "{letter:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_drains_then_cancels_and_exits_in_time() {
    const SHORT: u64 = 5;
    let drain = Duration::from_secs(2);
    let mut cluster = Cluster::builder()
        .worker_args(["--drain-timeout", "2s"])
        // A PROCESSING result tells the test the events were admitted.
        .harmonizer_args(["--stream-processing-threshold", "100ms"])
        .start()
        .await;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(slow_events("long", 5, "async-echo", "fixed:600s"), None);
    call.feed(numbered_events("short", SHORT, "async-echo", "fixed:1500ms"), None);
    call.wait_until(DEADLINE, |received| {
        ["long", "short"]
            .iter()
            .all(|s| received.iter().any(|r| r.stream_id == *s && r.status() == ResultStatus::Processing))
    })
    .await
    .expect("both streams are admitted");
    // Let the dispatches reach the worker (the short ones still run 1 s+).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    let status = cluster.worker_process(0).terminate(Duration::from_secs(15)).await;
    let took = start.elapsed();
    let status = status.expect("the worker exits after SIGTERM");
    assert!(status.success(), "the worker exits 0: {status}");
    assert!(took <= drain + Duration::from_secs(1), "the worker exited {took:?} after SIGTERM; drain is {drain:?}");

    // What was running and could finish within the drain was delivered.
    call.wait_until(DEADLINE, |received| {
        received.iter().filter(|r| r.stream_id == "short" && r.status() != ResultStatus::Processing).count()
            >= SHORT as usize
    })
    .await
    .expect("the short operations finished during the drain are delivered");
    let short: Vec<_> = call
        .received()
        .iter()
        .filter(|r| r.stream_id == "short" && r.status() != ResultStatus::Processing)
        .cloned()
        .collect();
    assert_ok(check_in_order_exactly_once(&short, SHORT).and_then(|()| check_all_ok(&short)), "short events");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_only_worker_restarted_with_sigterm_mid_stream_loses_nothing() {
    // A rolling restart of a one-worker deployment: events arrive while the
    // worker drains and while it is down; each still gets its OK result,
    // in order, once.
    const N: u64 = 60;
    let mut cluster = Cluster::builder().worker_args(["--drain-timeout", "2s"]).start().await;
    let stream = "worker-rolling-restart";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "fixed:200ms"), Some(Duration::from_millis(20)));
    call.wait_for_total(5, DEADLINE).await.expect("the first results arrive");
    assert!(!call.fed(), "the feed is still going when the worker stops");

    let worker = cluster.worker_process(0);
    let status = worker.terminate(Duration::from_secs(10)).await.expect("the worker exits after SIGTERM");
    assert!(status.success(), "the worker exits 0: {status}");
    worker.restart(Duration::from_secs(30)).await.expect("the worker restarts on its port");

    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE)
        .await
        .expect("every event completes after the restart");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(
        check_in_order_exactly_once(&results, N)
            .and_then(|()| check_all_ok(&results))
            .and_then(|()| crate::check_numbered_payloads(&results)),
        "results across the worker's restart",
    );
}
