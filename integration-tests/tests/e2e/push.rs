//! The push path without a broker: PROCESSING on the bidirectional call,
//! gRPC Subscribe and Server-Sent Events resuming from a cursor with no gap,
//! explicit statuses for cursors older than retention (by age and by count),
//! and a slow SSE reader caught up from the log instead of buffered.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, check_in_order_exactly_once, event, with_attr},
    eventually,
    sse::{self, Opened, SseEvent},
};
use ordo_proto::v1::{EventResult, ResultStatus, StreamCursor, SubscribeRequest};
use tonic::{Code, Streaming};

use crate::{DEADLINE, assert_ok, check_numbered_payloads, numbered_events};

/// Opens a gRPC Subscribe on one stream from `from`.
pub async fn subscribe(cluster: &Cluster, stream: &str, from: u64) -> Result<Streaming<EventResult>, tonic::Status> {
    let request = SubscribeRequest { stream_id: stream.to_owned(), from_sequence: from, streams: vec![] };
    Ok(cluster.push_gateway().subscribe(request).await?.into_inner())
}

/// Receives `n` results from a Subscribe call (at most `deadline`).
pub async fn receive(results: &mut Streaming<EventResult>, n: usize, deadline: Duration) -> Vec<EventResult> {
    let mut got = Vec::with_capacity(n);
    let until = tokio::time::Instant::now() + deadline;
    while got.len() < n {
        match tokio::time::timeout_at(until, results.message()).await {
            Ok(Ok(Some(result))) => got.push(result),
            Ok(Ok(None)) => panic!("Subscribe ended after {} of {n} results", got.len()),
            Ok(Err(status)) => panic!("Subscribe failed after {} of {n} results: {status:?}", got.len()),
            Err(_) => panic!("Subscribe delivered {} of {n} results within {deadline:?}", got.len()),
        }
    }
    got
}

/// Checks that SSE `events` are results at positions `from..from+n` in order,
/// each one's id its position and its JSON the numbered event's result.
pub fn check_sse_results(events: &[SseEvent], stream: &str, from: u64) -> Result<(), String> {
    for (i, event) in events.iter().enumerate() {
        let expected = from + i as u64;
        if event.event != "result" {
            return Err(format!("event #{i} is {:?}, not a result: {:?}", event.event, event.data));
        }
        let position = event.position().map_err(|e| format!("event #{i}: {e:#}"))?;
        let json = event.json().map_err(|e| format!("event #{i}: {e:#}"))?;
        if position != expected || json["position"] != expected || json["sequence"] != expected {
            return Err(format!("event #{i} should be position {expected}: id {position}, data {json}"));
        }
        if json["status"] != "OK" || json["payload_utf8"] != format!("{stream}:{expected}") {
            return Err(format!("event #{i} carries the wrong result: {json}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bidi_call_sends_processing_once_for_a_slow_head() {
    let cluster = Cluster::builder().harmonizer_args(["--stream-processing-threshold", "100ms"]).start().await;
    let stream = "slow-head";
    let mut events = numbered_events(stream, 10, "async-echo", "fixed:10ms");
    events[0] =
        with_attr(event(stream, 0, "async-echo", format!("{stream}:0").into_bytes()), "latency", "fixed:1500ms");
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_until(DEADLINE, |got| got.iter().filter(|r| r.status() != ResultStatus::Processing).count() >= 10)
        .await
        .expect("every result arrives");
    let received = call.finish(LINGER).await.expect("the call ends cleanly");

    let processing: Vec<u64> =
        received.iter().filter(|r| r.status() == ResultStatus::Processing).map(|r| r.sequence).collect();
    assert_eq!(processing, vec![0], "one PROCESSING, for the slow head only: {received:?}");
    assert_eq!(received[0].status(), ResultStatus::Processing, "PROCESSING comes before any result");
    let results: Vec<EventResult> = received.into_iter().filter(|r| r.status() != ResultStatus::Processing).collect();
    assert_ok(check_in_order_exactly_once(&results, 10), "results after PROCESSING");
    assert_ok(check_numbered_payloads(&results), "payloads");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_resume_from_their_last_position_without_gap() {
    const N: u64 = 60;
    let cluster = Cluster::start().await;
    let stream = "resume";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "exp:5ms"), Some(Duration::from_millis(25)));

    // First connections: read the first results, then drop mid-stream.
    let mut grpc = subscribe(&cluster, stream, 0).await.expect("Subscribe opens");
    let url = sse::events_url(&cluster.sse_url(), stream, Some("from=0"));
    let mut events = sse::open_stream(&url, None).await.expect("the SSE stream opens");
    let mut grpc_got = receive(&mut grpc, 10, DEADLINE).await;
    let mut sse_got = events.collect(10, DEADLINE).await.expect("the first SSE events");
    drop(grpc);
    drop(events);
    assert!(!call.fed(), "the stream finished before the subscribers dropped; the test would prove nothing");

    // While both are away, more results are released.
    let away = sse_got.len().max(grpc_got.len()) + 15;
    call.wait_for_total(away, DEADLINE).await.expect("results keep coming");

    // Resume: gRPC from the last position + 1, SSE with Last-Event-ID.
    let last = grpc_got.last().map(|r| r.position).expect("a result");
    let mut grpc = subscribe(&cluster, stream, last + 1).await.expect("Subscribe resumes");
    grpc_got.extend(receive(&mut grpc, (N - last - 1) as usize, DEADLINE).await);
    let last_id = sse_got.last().map(|e| e.position().expect("numeric id")).expect("an event");
    let mut events = sse::open_stream(&sse::events_url(&cluster.sse_url(), stream, Some("from=0")), Some(last_id))
        .await
        .expect("the SSE stream resumes");
    sse_got.extend(events.collect((N - last_id - 1) as usize, DEADLINE).await.expect("the rest over SSE"));

    assert_ok(check_in_order_exactly_once(&grpc_got, N), "gRPC results across the reconnect");
    assert_ok(check_numbered_payloads(&grpc_got), "gRPC payloads");
    assert_ok(check_sse_results(&sse_got, stream, 0), "SSE events across the reconnect");
    assert_eq!(sse_got.len() as u64, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_follows_several_streams_on_one_call() {
    let cluster = Cluster::start().await;
    let names = ["multi-a", "multi-b", "multi-c"];
    let request = SubscribeRequest {
        stream_id: String::new(),
        from_sequence: 0,
        streams: names.iter().map(|s| StreamCursor { stream_id: (*s).into(), from_sequence: 0 }).collect(),
    };
    let mut results = cluster.push_gateway().subscribe(request).await.expect("Subscribe opens").into_inner();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    for name in names {
        call.feed(numbered_events(name, 20, "async-echo", "exp:5ms"), None);
    }
    let got = receive(&mut results, 60, DEADLINE).await;
    for name in names {
        let mine: Vec<EventResult> = got.iter().filter(|r| r.stream_id == name).cloned().collect();
        assert_ok(check_in_order_exactly_once(&mine, 20), name);
    }

    let twice = SubscribeRequest {
        stream_id: "multi-a".into(),
        from_sequence: 0,
        streams: vec![StreamCursor { stream_id: "multi-a".into(), from_sequence: 5 }],
    };
    let status = cluster.push_gateway().subscribe(twice).await.expect_err("one cursor per stream");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

/// Asserts that `from` of `stream` is refused over gRPC (OUT_OF_RANGE) and
/// over SSE (410 Gone, by `?from=` and by `Last-Event-ID`) with a message
/// that names retention.
async fn assert_expired(cluster: &Cluster, stream: &str, from: u64) -> Result<(), String> {
    match subscribe(cluster, stream, from).await {
        Err(status) if status.code() == Code::OutOfRange && status.message().contains("retention") => {}
        Err(status) => return Err(format!("gRPC: {status:?}")),
        Ok(_) => return Err(format!("gRPC Subscribe from {from} was accepted")),
    }
    let url = sse::events_url(&cluster.sse_url(), stream, Some(&format!("from={from}")));
    for last_event_id in [None, from.checked_sub(1)] {
        if from == 0 && last_event_id.is_some() {
            continue;
        }
        let url = if last_event_id.is_some() { sse::events_url(&cluster.sse_url(), stream, None) } else { url.clone() };
        match sse::open(&url, last_event_id).await.map_err(|e| format!("{e:#}"))? {
            Opened::Refused { status: 410, body } if body.contains("older than retention") => {}
            Opened::Refused { status, body } => return Err(format!("SSE answered {status}: {body}")),
            Opened::Stream(_) => return Err(format!("SSE from {from} (Last-Event-ID {last_event_id:?}) was accepted")),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cursor_older_than_retention_age_gets_an_explicit_status() {
    let cluster = Cluster::builder().push_gateway_args(["--retention-age", "1s"]).start().await;
    let stream = "aged";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, 5, "async-echo", "fixed:1ms"), None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), 5)]), DEADLINE).await.expect("five results");

    // Fresh results are served…
    let mut fresh = subscribe(&cluster, stream, 0).await.expect("fresh results can be read");
    assert_ok(check_in_order_exactly_once(&receive(&mut fresh, 5, DEADLINE).await, 5), "fresh results");
    drop(fresh);
    // …and once they are older than a second, refused with a status.
    eventually(Duration::from_secs(30), || assert_expired(&cluster, stream, 0)).await;
    eventually(Duration::from_secs(30), || assert_expired(&cluster, stream, 4)).await;

    // The head of the stream is not expired: subscribers there get what comes next.
    let mut grpc = subscribe(&cluster, stream, 5).await.expect("Subscribe at the head");
    let url = sse::events_url(&cluster.sse_url(), stream, Some("from=5"));
    let mut events = sse::open_stream(&url, None).await.expect("SSE at the head");
    call.send(numbered_events(stream, 6, "async-echo", "fixed:1ms").remove(5)).await.expect("event 5 sent");
    assert_eq!(receive(&mut grpc, 1, DEADLINE).await[0].sequence, 5);
    assert_ok(check_sse_results(&events.collect(1, DEADLINE).await.expect("event 5 over SSE"), stream, 5), "SSE");
}

#[tokio::test(flavor = "multi_thread")]
async fn cursor_trimmed_by_count_gets_an_explicit_status() {
    const N: u64 = 250;
    // Redis trims approximately, in whole nodes (at most 100 entries each):
    // `--retention 50` keeps at least the last 50 and drops the first nodes.
    let cluster = Cluster::builder().reassembler_args(["--retention", "50"]).start().await;
    let stream = "trimmed";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "fixed:1ms"), None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE).await.expect("all results");

    eventually(Duration::from_secs(30), || assert_expired(&cluster, stream, 0)).await;
    let mut tail = subscribe(&cluster, stream, N - 1).await.expect("the last result is retained");
    assert_eq!(receive(&mut tail, 1, DEADLINE).await[0].sequence, N - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_sse_reader_is_caught_up_from_the_log() {
    const N: u64 = 400;
    // One live batch buffered per subscriber: a reader that does not keep up
    // must be served from the release log.
    let cluster = Cluster::builder().push_gateway_args(["--subscriber-buffer", "1"]).start().await;
    let stream = "slow-reader";
    let url = sse::events_url(&cluster.sse_url(), stream, None);
    let mut events = sse::open_stream(&url, None).await.expect("the SSE stream opens");
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "uniform:0ms-3ms"), None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE).await.expect("all results");

    // Only now does the reader start reading.
    let got = events.collect(N as usize, DEADLINE).await.expect("every result over SSE");
    assert_ok(check_sse_results(&got, stream, 0), "SSE events of a slow reader");
}
