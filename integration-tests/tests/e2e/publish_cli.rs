//! `ordo publish` against a private nats-server, as an operator runs it:
//! it creates the stream, stores generated messages in order with the key
//! in the subject and the `Ordo-Key` header, deduplicates on `Nats-Msg-Id`,
//! publishes the lines of a file, and exits 1 with a clear message when no
//! stream captures the subject.

use async_nats::jetstream;
use integration_tests::{
    cli::{self, ordo},
    nats::NatsServer,
};

/// Subject, `Ordo-Key` header and payload of messages `first..=last` of `stream`.
async fn stored(js: &jetstream::Context, stream: &str, first: u64, last: u64) -> Vec<(String, String, String)> {
    let stream = js.get_stream(stream).await.expect("the stream exists");
    let mut out = Vec::new();
    for sequence in first..=last {
        let message = stream.get_raw_message(sequence).await.expect("a stored message");
        let key = message.headers.get("Ordo-Key").map(|v| v.as_str().to_owned()).unwrap_or_default();
        out.push((message.subject.to_string(), key, String::from_utf8_lossy(&message.payload).into_owned()));
    }
    out
}

async fn message_count(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn publish_creates_the_stream_keeps_order_and_deduplicates() {
    let nats = NatsServer::start().await.expect("a private nats-server");
    let url = nats.url();
    let generate = [
        "publish",
        "--nats",
        &url,
        "--create-stream",
        "EVENTS",
        "--subjects",
        "events.>",
        "--subject",
        "events.{key}",
        "--count",
        "6",
        "--keys",
        "2",
        "--msg-id",
        "m-{i}",
    ];
    let out = ordo(&generate, &["ORDO_NATS_URL"]).await;
    assert!(out.status.success(), "{}", cli::stderr(&out));
    assert!(
        cli::stdout(&out).contains("published=6 stored=6 duplicates=0 stream=EVENTS seq=1..6"),
        "{}",
        cli::stdout(&out)
    );
    assert!(cli::stderr(&out).contains("created stream EVENTS"), "{}", cli::stderr(&out));

    let client = async_nats::connect(&url).await.expect("connect");
    let js = jetstream::new(client);
    let expected: Vec<(String, String, String)> = (0..6)
        .map(|i| {
            let key = format!("key-{}", i % 2);
            (format!("events.{key}"), key.clone(), format!("{key}:{}", i / 2))
        })
        .collect();
    assert_eq!(stored(&js, "EVENTS", 1, 6).await, expected);

    // The same ids again: the stream's duplicate window keeps the first copies only.
    let again = ordo(&generate, &["ORDO_NATS_URL"]).await;
    assert!(again.status.success(), "{}", cli::stderr(&again));
    assert!(cli::stdout(&again).contains("stored=0 duplicates=6"), "{}", cli::stdout(&again));
    assert!(cli::stderr(&again).contains("stream EVENTS exists"), "{}", cli::stderr(&again));
    assert_eq!(message_count(&js, "EVENTS").await, 6);

    // Lines of a file, one message each, in order, under one key.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, "first\n\nthird\n").expect("write the lines");
    let path = file.to_string_lossy().into_owned();
    let lines = ["publish", "--nats", &url, "--subject", "events.{key}", "--key", "c1", "--file", &path];
    let out = ordo(&lines, &["ORDO_NATS_URL"]).await;
    assert!(out.status.success(), "{}", cli::stderr(&out));
    assert!(
        cli::stdout(&out).contains("published=3 stored=3 duplicates=0 stream=EVENTS seq=7..9"),
        "{}",
        cli::stdout(&out)
    );
    let c1 = |payload: &str| ("events.c1".to_owned(), "c1".to_owned(), payload.to_owned());
    assert_eq!(stored(&js, "EVENTS", 7, 9).await, vec![c1("first"), c1(""), c1("third")]);
}

#[tokio::test]
async fn publish_without_a_stream_or_with_a_bad_subject_fails_clearly() {
    let nats = NatsServer::start().await.expect("a private nats-server");
    let url = nats.url();
    let out = ordo(&["publish", "--nats", &url, "--subject", "nowhere.x", "--payload", "hi"], &["ORDO_NATS_URL"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", cli::stderr(&out));
    let err = cli::stderr(&out);
    assert!(err.contains("was not acknowledged") && err.contains("--create-stream"), "{err}");

    let out = ordo(&["publish", "--nats", &url, "--subject", "events.>", "--payload", "hi"], &["ORDO_NATS_URL"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", cli::stderr(&out));
    assert!(cli::stderr(&out).contains("cannot publish to subject \"events.>\""), "{}", cli::stderr(&out));

    let out = ordo(&["publish", "--nats", &url, "--subject", "events.x"], &["ORDO_NATS_URL"]).await;
    assert_eq!(out.status.code(), Some(2), "no input is a usage error: {}", cli::stderr(&out));
}
