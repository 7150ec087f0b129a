//! The remote invokers against real in-process servers: a tonic
//! `ordo.v1.Operation` server and an axum HTTP server, both on 127.0.0.1:0.

use std::{collections::HashMap, time::Duration};

use axum::{
    extract::Path,
    http::{HeaderMap as AxumHeaders, StatusCode},
};
use ordo_proto::v1::{
    InvokeError, InvokeResponse,
    operation_server::{Operation as InvokeService, OperationServer},
};
use tokio_stream::wrappers::TcpListenerStream;

use super::*;

/// Answers by operation name, so one server covers every case.
#[derive(Clone, Default)]
struct TestOperation;

#[tonic::async_trait]
impl InvokeService for TestOperation {
    async fn invoke(
        &self,
        request: tonic::Request<InvokeRequest>,
    ) -> Result<tonic::Response<InvokeResponse>, tonic::Status> {
        let grpc_timeout = request.metadata().get("grpc-timeout").is_some();
        let request = request.into_inner();
        let answer = |outcome| Ok(tonic::Response::new(InvokeResponse { outcome: Some(outcome) }));
        let error = |message: &str, retry| Outcome::Error(InvokeError { message: message.into(), retry });
        match request.operation.as_str() {
            "describe" => {
                let mut attributes: Vec<_> = request.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                attributes.sort();
                let text = format!(
                    "{}|{}|{}|{}|{}|{}|{}|{}|{}",
                    request.operation,
                    request.stream_id,
                    request.sequence,
                    request.attempt,
                    String::from_utf8_lossy(&request.payload),
                    attributes.join(","),
                    request.trace_context.get("traceparent").map(String::as_str).unwrap_or(""),
                    grpc_timeout,
                    request.deadline_unix_ms,
                );
                answer(Outcome::Payload(text.into()))
            }
            "empty-payload" => answer(Outcome::Payload(Bytes::new())),
            "retry" => answer(error("busy, try later", true)),
            "final" => answer(error("bad event", false)),
            "unavailable" => Err(tonic::Status::unavailable("going down")),
            "exhausted" => Err(tonic::Status::resource_exhausted("overloaded")),
            "invalid" => Err(tonic::Status::invalid_argument("not a number")),
            "neither" => Ok(tonic::Response::new(InvokeResponse { outcome: None })),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                answer(Outcome::Payload(Bytes::from_static(b"late")))
            }
            other => Err(tonic::Status::not_found(format!("no operation {other}"))),
        }
    }
}

pub(crate) async fn grpc_server() -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(OperationServer::new(TestOperation))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Endpoint::Grpc(format!("http://{addr}"))
}

/// Answers by path: `/echo`, `/status/{code}`, `/slow`, `/big`.
pub(crate) async fn http_server() -> String {
    async fn echo(headers: AxumHeaders, body: axum::body::Bytes) -> (StatusCode, String) {
        let mut lines: Vec<String> = headers
            .iter()
            .filter(|(name, _)| {
                name.as_str().starts_with("ordo-") || ["content-type", "traceparent"].contains(&name.as_str())
            })
            .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        lines.push(format!("body: {}", String::from_utf8_lossy(&body)));
        (StatusCode::OK, lines.join("\n"))
    }
    async fn status(Path(code): Path<u16>) -> (StatusCode, AxumHeaders, String) {
        let mut headers = AxumHeaders::new();
        if code / 100 == 3 {
            headers.insert("location", axum::http::HeaderValue::from_static("/echo"));
        }
        // A long body: only its first bytes are quoted.
        let body = format!("status {code} {}", "x".repeat(400));
        (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), headers, body)
    }
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "late"
    }
    async fn big() -> Vec<u8> {
        vec![b'a'; MAX_RESULT_BYTES + 1]
    }
    let app = axum::Router::new()
        .route("/echo", axum::routing::post(echo))
        .route("/status/{code}", axum::routing::post(status))
        .route("/slow", axum::routing::post(slow))
        .route("/big", axum::routing::post(big));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// An address nothing listens on.
fn refused() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}

fn event() -> Event {
    Event {
        stream_id: "stream-1".into(),
        sequence: 7,
        operation: "ignored: the registry name is sent".into(),
        payload: Bytes::from_static(b"hello"),
        attributes: HashMap::from([("colour".to_owned(), "blue".to_owned())]),
        ..Default::default()
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn call(event: &Event, deadline: Option<Duration>) -> Invocation<'_> {
    Invocation {
        event,
        attempt: 2,
        deadline: deadline.map(|d| Instant::now() + d),
        trace_context: HashMap::from([("traceparent".to_owned(), TRACEPARENT.to_owned())]),
    }
}

async fn invoke(remotes: &Remotes, endpoint: &Endpoint, operation: &str) -> Result<Bytes, OpError> {
    let event = event();
    remotes.invoke(endpoint, operation, call(&event, Some(Duration::from_secs(5)))).await
}

fn unix_ms_now() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis()).expect("fits")
}

#[tokio::test]
async fn grpc_ok_sends_the_event_and_returns_the_payload() {
    let endpoint = grpc_server().await;
    let remotes = Remotes::default();
    let before = unix_ms_now();
    let payload = invoke(&remotes, &endpoint, "describe").await.expect("ok");
    let text = String::from_utf8(payload.to_vec()).expect("utf-8");
    let fields: Vec<&str> = text.split('|').collect();
    assert_eq!(fields[..8], ["describe", "stream-1", "7", "2", "hello", "colour=blue", TRACEPARENT, "true"], "{text}");
    let deadline: u64 = fields[8].parse().expect("a number");
    assert!(deadline >= before + 4_000 && deadline <= unix_ms_now() + 5_000, "deadline {deadline} vs now {before}");
    // An empty result is a result.
    assert_eq!(invoke(&remotes, &endpoint, "empty-payload").await, Ok(Bytes::new()));
    assert_eq!(lock_len(&remotes.grpc), 1, "one cached client per endpoint");
}

#[tokio::test]
async fn grpc_failures_are_transient_or_final_as_the_contract_says() {
    let endpoint = grpc_server().await;
    let remotes = Remotes::default();
    let cases = [
        ("retry", true, "busy, try later"),
        ("final", false, "bad event"),
        ("unavailable", true, "going down"),
        ("exhausted", true, "overloaded"),
        ("invalid", false, "not a number"),
        ("neither", false, "neither a payload nor an error"),
        ("missing", false, "NotFound"),
    ];
    for (operation, transient, mentions) in cases {
        let error = invoke(&remotes, &endpoint, operation).await.expect_err(operation);
        assert_eq!(error.transient, transient, "{operation}: {error}");
        assert!(error.message.contains(mentions), "{operation}: {error}");
        assert!(error.message.starts_with(&endpoint.to_string()), "names the endpoint: {error}");
    }
}

#[tokio::test]
async fn grpc_timeouts_and_connect_errors_are_transient() {
    let endpoint = grpc_server().await;
    let remotes = Remotes::default();
    let event = event();
    let started = Instant::now();
    let error =
        remotes.invoke(&endpoint, "slow", call(&event, Some(Duration::from_millis(300)))).await.expect_err("too slow");
    assert!(error.transient && error.message.contains("no answer within"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3), "stopped at its deadline: {:?}", started.elapsed());
    let down = Endpoint::Grpc(format!("http://{}", refused()));
    let error = invoke(&remotes, &down, "describe").await.expect_err("nothing listens");
    assert!(error.transient && error.message.contains("Unavailable"), "{error}");
    // No time left: not even tried.
    let error = remotes.invoke(&endpoint, "describe", call(&event, Some(Duration::ZERO))).await.expect_err("late");
    assert!(error.transient && error.message.contains("no time left"), "{error}");
}

#[tokio::test]
async fn http_ok_posts_the_payload_with_the_metadata_in_headers() {
    let base = http_server().await;
    let endpoint = Endpoint::Http(format!("{base}/echo"));
    let remotes = Remotes::default();
    let mut event = event();
    event.attributes.insert("Mixed-Case".into(), "v2".into());
    let before = unix_ms_now();
    let payload = remotes.invoke(&endpoint, "shout", call(&event, Some(Duration::from_secs(5)))).await.expect("ok");
    let text = String::from_utf8(payload.to_vec()).expect("utf-8");
    let header = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_else(|| panic!("{name} in {text}"))
    };
    assert_eq!(header("content-type"), "application/octet-stream");
    assert_eq!(header("ordo-operation"), "shout");
    assert_eq!(header("ordo-stream-id"), "stream-1");
    assert_eq!(header("ordo-sequence"), "7");
    assert_eq!(header("ordo-attempt"), "2");
    assert_eq!(header("ordo-attr-colour"), "blue");
    assert_eq!(header("ordo-attr-mixed-case"), "v2", "names lower-cased");
    assert_eq!(header("traceparent"), TRACEPARENT);
    assert_eq!(header("body"), "hello");
    let deadline: u64 = header("ordo-deadline-unix-ms").parse().expect("a number");
    assert!(deadline >= before + 4_000 && deadline <= unix_ms_now() + 5_000, "{deadline}");
    remotes.invoke(&endpoint, "shout", call(&event, None)).await.expect("again, no deadline");
    assert_eq!(lock_len(&remotes.http), 1, "one cached client per endpoint");
}

#[tokio::test]
async fn http_4xx_is_final_5xx_is_retried() {
    let base = http_server().await;
    let remotes = Remotes::default();
    let cases =
        [(400, false), (404, false), (422, false), (408, true), (429, true), (500, true), (503, true), (302, false)];
    for (code, transient) in cases {
        let endpoint = Endpoint::Http(format!("{base}/status/{code}"));
        let error = invoke(&remotes, &endpoint, "op").await.expect_err("an error status");
        assert_eq!(error.transient, transient, "{code}: {error}");
        assert!(error.message.contains(&format!("HTTP {code}")), "{code}: {error}");
        assert!(error.message.contains(&format!("status {code} xxx")), "quotes the body: {error}");
        let quoted_xs = error.message.matches('x').count();
        assert_eq!(quoted_xs, QUOTED_BODY_BYTES - format!("status {code} ").len(), "the first bytes: {error}");
    }
}

#[tokio::test]
async fn http_timeouts_connect_errors_and_oversized_answers() {
    let base = http_server().await;
    let remotes = Remotes::default();
    let event = event();
    let started = Instant::now();
    let slow = Endpoint::Http(format!("{base}/slow"));
    let error =
        remotes.invoke(&slow, "op", call(&event, Some(Duration::from_millis(300)))).await.expect_err("too slow");
    assert!(error.transient && error.message.contains("no answer within"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    let down = Endpoint::Http(format!("http://{}/op", refused()));
    let error = invoke(&remotes, &down, "op").await.expect_err("nothing listens");
    assert!(error.transient, "{error}");

    let big = Endpoint::Http(format!("{base}/big"));
    let error = invoke(&remotes, &big, "op").await.expect_err("too big");
    assert!(!error.transient && error.message.contains("larger than"), "{error}");

    let mut bad = event.clone();
    bad.attributes.insert("no spaces allowed".into(), "v".into());
    let echo = Endpoint::Http(format!("{base}/echo"));
    let error = remotes.invoke(&echo, "op", call(&bad, None)).await.expect_err("not a header name");
    assert!(!error.transient && error.message.contains("no spaces allowed"), "{error}");
}

fn lock_len<T>(cache: &Mutex<HashMap<String, T>>) -> usize {
    cache.lock().map(|c| c.len()).unwrap_or(0)
}
