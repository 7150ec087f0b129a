//! Dead letters (seed 002: failed events are published so their owners can
//! retry or roll back). An event whose every attempt fails becomes a FAILED
//! result *and* a dead letter — listed by `ListDeadLetters` and `ordo dlq
//! list`, shown by `ordo dlq show`, and resubmitted by `ordo dlq replay`
//! once the cause is gone. Only the stored result counts: a FAILED that
//! loses to an earlier OK, or a redelivered FAILED, leaves no (second) dead
//! letter. With AMQP on, every FAILED result also goes out with routing key
//! `dead-letter.<stream id>`.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    cli::{ordo, stderr, stdout},
    client::{LINGER, event, with_attr},
    rabbitmq::{self, AMQP_URL, QueueConsumer},
};
use ordo_proto::v1::{
    Completed, DeadLetter, DeliverBatch, Event, EventResult, GetDeadLetterRequest, ListDeadLettersRequest,
    OrderingMode, ResultStatus,
};

use crate::DEADLINE;

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_event_becomes_a_dead_letter_that_ordo_dlq_lists_shows_and_replays() {
    let mut cluster =
        Cluster::builder().workers(1).harmonizer_args(["--event-timeout", "1s", "--max-attempts", "2"]).start().await;
    let stream = "dlq-orders";
    // The stateless service is down: the callback's every attempt fails.
    cluster.stateless_process().kill();
    let events = vec![
        with_attr(event(stream, 0, "async-echo", "first"), "latency", "fixed:1ms"),
        with_attr(with_attr(event(stream, 1, "callback", "retry me"), "call", "upper"), "latency", "fixed:1ms"),
        with_attr(event(stream, 2, "async-echo", "third"), "latency", "fixed:1ms"),
    ];
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), 3)]), DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    let statuses: Vec<(u64, ResultStatus)> = results.iter().map(|r| (r.sequence, r.status())).collect();
    assert_eq!(
        statuses,
        [(0, ResultStatus::Ok), (1, ResultStatus::Failed), (2, ResultStatus::Ok)],
        "the callback fails while the stateless service is down: {results:?}"
    );

    // Exactly one dead letter: the failed event, recorded whole; OK results leave none.
    let letters = cluster.dead_letters(stream).await.expect("ListDeadLetters answers");
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    let recorded = letter.event.clone().unwrap_or_default();
    assert_eq!((recorded.stream_id.as_str(), recorded.sequence), (stream, 1), "{letter:?}");
    assert_eq!(letter.status(), ResultStatus::Failed);
    assert_eq!(recorded.operation, "callback", "the event is recorded so it can be replayed: {letter:?}");
    assert_eq!(recorded.payload.as_ref(), b"retry me");
    assert_eq!(recorded.attributes.get("call").map(String::as_str), Some("upper"));
    assert!(letter.attempts >= 1 && !letter.error.is_empty() && letter.at_unix_ms > 0, "{letter:?}");
    let id = letter.id.clone();
    let by_id = cluster
        .reassembler(0)
        .get_dead_letter(GetDeadLetterRequest { id: id.clone() })
        .await
        .expect("GetDeadLetter finds it")
        .into_inner();
    assert_eq!(&by_id, letter);

    // The CLI, as an operator would use it.
    let reassembler = cluster.reassembler_process(0).addr();
    let listed = ordo(&["dlq", "list", "--stream", stream, "--reassembler", &reassembler], &[]).await;
    assert!(listed.status.success());
    let lines: Vec<String> = stdout(&listed).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 1, "one line per dead letter: {lines:?}");
    assert!(lines[0].starts_with(&format!("{id} {stream}#1 FAILED attempts=")), "{}", lines[0]);
    assert!(lines[0].contains("op=callback"), "{}", lines[0]);

    let listed = ordo(&["dlq", "list", "--stream", stream, "--reassembler", &reassembler, "--json"], &[]).await;
    assert!(listed.status.success());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("--json prints JSON");
    assert_eq!(json["dead_letters"][0]["id"], id.as_str(), "{json}");
    assert_eq!(json["dead_letters"][0]["event"]["payload_utf8"], "retry me", "{json}");
    assert_eq!(json["next"], "", "{json}");

    let shown = ordo(&["dlq", "show", &id, "--reassembler", &reassembler], &[]).await;
    assert!(shown.status.success());
    let text = stdout(&shown);
    assert!(text.contains("operation:  callback") && text.contains("payload:    retry me"), "{text}");
    assert!(text.contains("status:     FAILED"), "{text}");

    let unknown = ordo(&["dlq", "show", "1-0", "--reassembler", &reassembler], &[]).await;
    assert!(!unknown.status.success(), "an unknown id fails");
    assert!(stderr(&unknown).contains("NotFound"), "{unknown:?}");

    // The cause is gone: the owner replays the event on a stream of their own.
    cluster.stateless_process().restart(DEADLINE).await.expect("stateless restarts");
    let harmonizer = cluster.harmonizer_addr();
    let retry_stream = format!("{stream}-retry");
    let replayed = ordo(
        &[
            "dlq",
            "replay",
            &id,
            "--stream",
            &retry_stream,
            "--sequence",
            "0",
            "--harmonizer",
            &harmonizer,
            "--reassembler",
            &reassembler,
        ],
        &[],
    )
    .await;
    assert_eq!(stdout(&replayed).trim(), "0 OK RETRY ME", "the replayed event's result");
    assert!(replayed.status.success());
    assert!(
        cluster.dead_letters(&retry_stream).await.expect("ListDeadLetters answers").is_empty(),
        "a successful replay leaves no dead letter"
    );
}

/// A result as a producer would deliver it, with a dead letter when FAILED.
fn completed(stream: &str, sequence: u64, status: ResultStatus, with_letter: bool) -> Completed {
    let result = EventResult {
        stream_id: stream.to_owned(),
        sequence,
        status: status as i32,
        payload: if status == ResultStatus::Ok {
            format!("{stream}:{sequence}").into_bytes().into()
        } else {
            Default::default()
        },
        error: if status == ResultStatus::Ok { String::new() } else { format!("{stream}#{sequence} failed") },
        ..Default::default()
    };
    let dead_letter = with_letter.then(|| DeadLetter {
        event: Some(Event {
            stream_id: stream.to_owned(),
            sequence,
            operation: "async-echo".into(),
            payload: "p".into(),
            ..Default::default()
        }),
        status: status as i32,
        attempts: 3,
        error: result.error.clone(),
        at_unix_ms: 1,
        ..Default::default()
    });
    Completed { result: Some(result), mode: OrderingMode::Ordered as i32, dead_letter }
}

/// Delivers `results` to reassembler 0 as one batch; returns how many were new.
async fn deliver(cluster: &Cluster, batch_id: u64, results: Vec<Completed>) -> u32 {
    let batch = DeliverBatch { batch_id, results };
    let mut acks =
        cluster.reassembler(0).deliver(futures::stream::iter([batch])).await.expect("Deliver opens").into_inner();
    let ack = acks.message().await.expect("Deliver acks").expect("an ack");
    assert_eq!(ack.batch_id, batch_id);
    ack.accepted
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_stored_failed_or_gap_result_leaves_a_dead_letter_once() {
    let cluster = Cluster::start().await;
    let stream = "dlq-first-wins";
    // Sequence 0 succeeded (after a retry); the give-up of an older attempt arrives late.
    assert_eq!(deliver(&cluster, 1, vec![completed(stream, 0, ResultStatus::Ok, false)]).await, 1);
    assert_eq!(deliver(&cluster, 2, vec![completed(stream, 0, ResultStatus::Failed, true)]).await, 0);
    // Sequence 1 failed, and its batch was redelivered.
    assert_eq!(deliver(&cluster, 3, vec![completed(stream, 1, ResultStatus::Failed, true)]).await, 1);
    assert_eq!(deliver(&cluster, 3, vec![completed(stream, 1, ResultStatus::Failed, true)]).await, 0);
    // Sequence 2 is a GAP whose producer attached nothing: recorded all the same.
    assert_eq!(deliver(&cluster, 4, vec![completed(stream, 2, ResultStatus::Gap, false)]).await, 1);
    // Sequence 3: OK first, FAILED second, in one batch.
    let both = vec![completed(stream, 3, ResultStatus::Ok, false), completed(stream, 3, ResultStatus::Failed, true)];
    assert_eq!(deliver(&cluster, 5, both).await, 1);

    let letters = cluster.dead_letters(stream).await.expect("ListDeadLetters answers");
    let summary: Vec<(u64, ResultStatus)> =
        letters.iter().map(|l| (l.event.as_ref().map_or(u64::MAX, |e| e.sequence), l.status())).collect();
    assert_eq!(summary, [(1, ResultStatus::Failed), (2, ResultStatus::Gap)], "{letters:#?}");
    assert_eq!(letters[0].attempts, 3, "the producer's record is kept");
    assert_eq!(letters[1].error, format!("{stream}#2 failed"), "a GAP's record comes from its result");

    // Paging: one at a time, `next` chains them, then ends.
    let mut reassembler = cluster.reassembler(0);
    let page = |after: String| ListDeadLettersRequest { stream_id: stream.to_owned(), after, limit: 1 };
    let first = reassembler.list_dead_letters(page(String::new())).await.expect("page 1").into_inner();
    assert_eq!(first.dead_letters, letters[..1]);
    let second = reassembler.list_dead_letters(page(first.next.clone())).await.expect("page 2").into_inner();
    assert_eq!(second.dead_letters, letters[1..]);
    let third = reassembler.list_dead_letters(page(second.next.clone())).await.expect("page 3").into_inner();
    assert!(third.dead_letters.is_empty() && third.next.is_empty(), "{third:?}");

    // Bad input is refused with a clear message, never echoed in full.
    let refused = |request| {
        let mut reassembler = cluster.reassembler(0);
        async move { reassembler.list_dead_letters(request).await.expect_err("refused") }
    };
    let too_many = refused(ListDeadLettersRequest { limit: 5000, ..Default::default() }).await;
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert!(too_many.message().contains("1000"), "{too_many:?}");
    let bad_after = refused(ListDeadLettersRequest { after: "x".repeat(100_000), ..Default::default() }).await;
    assert_eq!(bad_after.code(), tonic::Code::InvalidArgument);
    assert!(bad_after.message().len() < 300, "the echo is cut: {}", bad_after.message().len());
    let missing = reassembler.get_dead_letter(GetDeadLetterRequest { id: "1-0".into() }).await.expect_err("unknown");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let malformed = reassembler.get_dead_letter(GetDeadLetterRequest { id: "nope".into() }).await.expect_err("bad id");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument, "{malformed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_failed_results_are_published_as_dead_letters() {
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.dead-letters");
    let consumer = QueueConsumer::bind(&exchange, "dead-letter.#").await.expect("a queue bound to dead-letter.#");
    let cluster =
        Cluster::builder().push_gateway_args(["--amqp-url", AMQP_URL, "--amqp-exchange", &exchange]).start().await;
    let stream = "dlq-amqp";
    let statuses = [ResultStatus::Ok, ResultStatus::Failed, ResultStatus::Ok, ResultStatus::Failed, ResultStatus::Gap];
    let results = statuses
        .iter()
        .enumerate()
        .map(|(seq, &status)| completed(stream, seq as u64, status, status != ResultStatus::Ok))
        .collect();
    assert_eq!(deliver(&cluster, 1, results).await, statuses.len() as u32);

    // The dead letters, and only they, in release order on the dead-letter queue.
    let want: Vec<u64> = vec![1, 3, 4];
    let distinct = |messages: &[rabbitmq::Received]| {
        messages.iter().filter_map(|m| m.position).collect::<std::collections::BTreeSet<_>>().len()
    };
    consumer.wait_until(DEADLINE, |m| distinct(m) >= want.len()).await.expect("every dead letter over AMQP");
    // Linger a little: an OK result routed here by mistake would show up too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = consumer.received();
    let mut positions = Vec::new();
    for message in &received {
        assert_eq!(message.kind, "ordo.dead-letter", "{message:?}");
        assert_eq!(message.routing_key, format!("dead-letter.{stream}"), "{message:?}");
        let position = message.position.expect("a position header");
        // At least once: a repeat only ever carries a position already delivered.
        if positions.last().is_none_or(|&last| position > last) {
            positions.push(position);
        } else {
            assert!(positions.contains(&position), "out of order: {position} after {positions:?}");
        }
    }
    assert_eq!(positions, want, "{received:#?}");
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).expect("a JSON body");
    assert_eq!(body["status"], "FAILED", "{body}");
    assert_eq!(body["error"], format!("{stream}#1 failed"), "{body}");

    drop(cluster);
    consumer.delete().await.expect("the test's queue and exchange are deleted");
}
