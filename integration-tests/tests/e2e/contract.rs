//! The client's contract at the edge of `Process` and `Submit` (issue 7,
//! findings 1–5 and 12): resending released events, frames the server cannot
//! decode, oversized input, repeated stateless Submits, and gaps.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use integration_tests::{
    Cluster,
    client::{check_in_order_exactly_once, event, with_attr},
};
use ordo_proto::{
    ResultStatus,
    v1::{Event, EventResult},
};
use prost::Message;
use tokio::time::timeout;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::DEADLINE;

/// What a whole `Process` call gave: results, then how it ended.
struct Outcome {
    results: Vec<EventResult>,
    /// `Ok(())`: ended with OK. `Err`: its final status.
    end: Result<(), Status>,
}

/// Runs one `Process` call that sends `frames` (raw encoded messages, sent
/// as they are, valid or not), half-closes, and reads until the server ends
/// the call. Panics if it does not end within [`DEADLINE`].
async fn process_raw(channel: Channel, frames: Vec<Vec<u8>>) -> Outcome {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(4 * 1024 * 1024);
    grpc.ready().await.expect("harmonizer ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/ordo.v1.Harmonizer/Process");
    // Paced a little, so the server reads the valid frames before the bad one.
    let requests = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        frame
    });
    let call = async {
        let response = grpc.streaming(tonic::Request::new(requests), path, RawCodec).await?;
        let mut stream = response.into_inner();
        let mut results = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(result)) => results.push(result),
                Ok(None) => return Ok::<_, Status>(Outcome { results, end: Ok(()) }),
                Err(status) => return Ok(Outcome { results, end: Err(status) }),
            }
        }
    };
    match timeout(DEADLINE, call).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(status)) => Outcome { results: Vec::new(), end: Err(status) },
        Err(_) => panic!("the Process call did not end within {DEADLINE:?}"),
    }
}

fn encode(event: &Event) -> Vec<u8> {
    event.encode_to_vec()
}

/// Sends bytes as they are; reads `EventResult`s.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = EventResult;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = EventResult;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        EventResult::decode(bytes).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

fn slow_echo(stream: &str, sequence: u64) -> Event {
    with_attr(
        event(stream, sequence, "async-echo", format!("{stream}:{sequence}").into_bytes()),
        "latency",
        "fixed:300ms",
    )
}

async fn channel(cluster: &Cluster) -> Channel {
    Channel::from_shared(format!("http://{}", cluster.harmonizer_addr()))
        .expect("address")
        .connect()
        .await
        .expect("connect to the harmonizer")
}

/// Finding 1: resending events whose results were already released (the
/// recovery after a harmonizer crash) returns each released result once, in
/// order, and the call ends.
#[tokio::test(flavor = "multi_thread")]
async fn resending_released_events_returns_each_result_once_and_the_call_ends() {
    const N: u64 = 200;
    let cluster = Cluster::start().await;
    let stream = "resend";
    let events: Vec<Event> = (0..N)
        .map(|seq| {
            with_attr(
                event(stream, seq, "async-echo", format!("{stream}:{seq}").into_bytes()),
                "latency",
                "uniform:0ms-3ms",
            )
        })
        .collect();
    let first = process_raw(channel(&cluster).await, events.iter().take(N as usize).map(encode).collect()).await;
    assert!(first.end.is_ok(), "first call: {:?}", first.end);
    assert_ok(check_in_order_exactly_once(&first.results, N));

    // Twice, the second time one by one as a slow client would: every
    // result again, exactly once each, in order, and the call ends.
    for round in 0..2 {
        let again = process_raw(channel(&cluster).await, events.iter().map(encode).collect()).await;
        assert!(again.end.is_ok(), "resend {round}: {:?}", again.end);
        assert_ok(check_in_order_exactly_once(&again.results, N));
        for (result, first) in again.results.iter().zip(&first.results) {
            assert_eq!(result.payload, first.payload, "the released result, not a new one");
        }
    }
}

#[track_caller]
fn assert_ok(check: Result<(), String>) {
    if let Err(reason) = check {
        panic!("{reason}");
    }
}

/// Finding 2: a frame that is not an Event, or carries a string that is not
/// UTF-8, ends the call with INVALID_ARGUMENT after the results of the
/// events accepted before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_frame_ends_the_call_with_invalid_argument_after_owed_results() {
    let cluster = Cluster::start().await;
    // Field 1 (stream_id, a string) holding bytes that are not UTF-8.
    let not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    // A length-delimited field whose length runs past the end.
    let truncated = vec![0x0a, 0x7f, b'x'];
    for (name, bad) in [("not-utf8", not_utf8), ("undecodable", truncated)] {
        let frames = vec![encode(&slow_echo(name, 0)), encode(&slow_echo(name, 1)), bad];
        let outcome = process_raw(channel(&cluster).await, frames).await;
        let status = outcome.end.as_ref().err().unwrap_or_else(|| panic!("{name}: the call must not end OK"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains("decode"), "{name}: the message names the problem: {status:?}");
        assert_ok(check_in_order_exactly_once(&outcome.results, 2));
        assert!(outcome.results.iter().all(|r| r.status() == ResultStatus::Ok), "{name}: {:?}", outcome.results);
    }
}

/// Finding 2 (size): a frame over the message size limit ends the call with
/// RESOURCE_EXHAUSTED after the owed results.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_frame_ends_the_call_with_resource_exhausted_after_owed_results() {
    let cluster = Cluster::start().await;
    let mut huge = event("huge", 2, "echo", Bytes::from(vec![b'x'; 17 * 1024 * 1024]));
    huge.stream_id = "huge".into();
    let frames = vec![encode(&slow_echo("huge", 0)), encode(&slow_echo("huge", 1)), encode(&huge)];
    let outcome = process_raw(channel(&cluster).await, frames).await;
    let status = outcome.end.as_ref().expect_err("the call must not end OK");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit"), "{status:?}");
    assert_ok(check_in_order_exactly_once(&outcome.results, 2));
}

/// Finding 3: a REJECTED result never copies oversized input back, so a
/// client with the common 4 MiB receive limit keeps its call.
#[tokio::test(flavor = "multi_thread")]
async fn rejected_results_do_not_echo_oversized_input() {
    let cluster = Cluster::start().await;
    let long_id = "s".repeat(10 * 1024 * 1024);
    let mut unknown_op = event("ok-stream", 0, &"o".repeat(1024 * 1024), Bytes::new());
    unknown_op.stream_id = "bad-op".into();
    let frames = vec![
        encode(&event(&long_id, 0, "echo", Bytes::new())),
        encode(&unknown_op),
        encode(&event("ok-stream", 0, "upper", Bytes::from_static(b"abc"))),
    ];
    let outcome = process_raw(channel(&cluster).await, frames).await;
    assert!(outcome.end.is_ok(), "the call survives: {:?}", outcome.end);
    assert_eq!(outcome.results.len(), 3, "{} results", outcome.results.len());
    for result in &outcome.results[..2] {
        assert_eq!(result.status(), ResultStatus::Rejected);
        let expected = if result.stream_id == "bad-op" { Code::NotFound } else { Code::InvalidArgument };
        assert_eq!(result.code, expected as i32, "{}", result.error);
        assert!(result.encoded_len() < 2048, "a REJECTED result of {} bytes", result.encoded_len());
    }
    assert_eq!(outcome.results[2].payload.as_ref(), b"ABC");
}

/// Finding 4: an oversized unary Submit answers RESOURCE_EXHAUSTED naming the limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_submit_is_resource_exhausted_with_the_limit() {
    let cluster = Cluster::start().await;
    let mut client = cluster.harmonizer();
    let big = event("big", 0, "echo", Bytes::from(vec![b'x'; 17 * 1024 * 1024]));
    let status = client.submit(big).await.expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit of 16777216 bytes"), "{status:?}");
}

/// Finding 5: a stateless Submit repeated with another payload answers the
/// result that was stored (and released) first.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_stateless_submit_answers_the_first_result() {
    let cluster = Cluster::start().await;
    let mut client = cluster.harmonizer();
    let first =
        client.submit(event("repeat", 0, "upper", Bytes::from_static(b"first"))).await.expect("submit").into_inner();
    assert_eq!(first.payload.as_ref(), b"FIRST");
    let again =
        client.submit(event("repeat", 0, "upper", Bytes::from_static(b"second"))).await.expect("submit").into_inner();
    assert_eq!(again.payload.as_ref(), b"FIRST", "the released result, not a new computation");
    // The same while the result still waits for a predecessor (stored, not released).
    let held =
        client.submit(event("held", 1, "upper", Bytes::from_static(b"first"))).await.expect("submit").into_inner();
    assert_eq!(held.payload.as_ref(), b"FIRST");
    let again =
        client.submit(event("held", 1, "lower", Bytes::from_static(b"SECOND"))).await.expect("submit").into_inner();
    assert_eq!(again.payload.as_ref(), b"FIRST", "the stored result, not a new computation");
}

/// Finding 12: a sequence the client never sends is released as GAP after
/// the stream's gap timeout, its successors flow, the half-closed call ends,
/// and a late event for the settled gap is refused with FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread")]
async fn a_gap_is_released_after_its_timeout_and_a_late_event_is_refused() {
    let cluster = Cluster::start().await;
    let stream = "gappy";
    let send = |seq: u64| with_attr(slow_echo(stream, seq), "gap-timeout", "1s");
    let frames = vec![encode(&send(0)), encode(&send(2)), encode(&send(3))];
    let outcome = process_raw(channel(&cluster).await, frames).await;
    assert!(outcome.end.is_ok(), "the half-closed call ends once everything is settled: {:?}", outcome.end);
    assert_ok(check_in_order_exactly_once(&outcome.results, 4));
    let statuses: Vec<ResultStatus> = outcome.results.iter().map(|r| r.status()).collect();
    assert_eq!(statuses, [ResultStatus::Ok, ResultStatus::Gap, ResultStatus::Ok, ResultStatus::Ok]);

    // Late: on a new call, and as a Submit.
    let late = process_raw(channel(&cluster).await, vec![encode(&send(1))]).await;
    assert!(late.end.is_ok(), "{:?}", late.end);
    assert_eq!(late.results.len(), 1, "{:?}", late.results);
    assert_eq!(late.results[0].status(), ResultStatus::Rejected);
    assert_eq!(late.results[0].code, Code::FailedPrecondition as i32, "{:?}", late.results[0]);
    assert!(late.results[0].error.contains("gap"), "{:?}", late.results[0].error);
    let status = cluster.harmonizer().submit(send(1)).await.expect_err("a settled gap is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The gap is a dead letter, once.
    let letters = cluster.dead_letters(stream).await.expect("list dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].status(), ResultStatus::Gap);
    assert_eq!(letters[0].event.as_ref().map(|e| e.sequence), Some(1));
}

/// Chaos finding: a draining harmonizer ended open calls with OK, although
/// events the client sent after the shutdown began were never accepted. It
/// sends every owed result, then ends the call with UNAVAILABLE (resend
/// elsewhere); a client that had half-closed still gets OK.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_harmonizer_ends_open_calls_with_unavailable_after_owed_results() {
    let mut cluster = Cluster::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut client = cluster.harmonizer();
    for seq in 0..3 {
        tx.send(slow_echo("draining", seq)).await.expect("queued");
    }
    let mut results = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("call").into_inner();
    // Set-up, not an assertion: the events reach the harmonizer before the signal.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = cluster.harmonizer_process().pid().expect("the harmonizer runs");
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let mut received = Vec::new();
    let end = loop {
        match timeout(DEADLINE, results.message()).await.expect("the call ends") {
            Ok(Some(result)) => received.push(result),
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    assert_ok(check_in_order_exactly_once(&received, 3));
    let status = end.expect_err("an open call of a draining harmonizer must not end OK");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(tx);
}
