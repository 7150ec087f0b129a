//! Server-Sent Events for browsers: `GET /streams/{stream_id}/events` streams
//! one stream's released results in order, one SSE event per result:
//!
//! ```text
//! id: 7
//! event: result
//! data: {"stream_id":"s","sequence":7,"position":7,"status":"OK",...}
//! ```
//!
//! The event id is the release position (the sequence, in ORDERED mode).
//! Where to start: the `Last-Event-ID` header (resume after that id: what a
//! browser's `EventSource` sends when it reconnects), else `?from=N` (first
//! position wanted), else 0. A start older than retention is refused with
//! `410 Gone` and a message naming the oldest retained position; if the
//! cursor expires while a slow client catches up, an `event: error` is sent
//! and the response ends (the reconnect then gets the 410).
//!
//! Each response is one [`session`] — the same catch-up + live tail as gRPC
//! Subscribe, with the same bounded buffers — so a slow reader falls back to
//! the release log instead of growing memory. This module owns the HTTP
//! listener and maps errors to HTTP statuses in one place ([`SseError`]).
//!
//! `GET /healthz` answers `200 ok` while Redis answers and the gateway is not
//! shutting down, `503` otherwise (the same truth as gRPC health).
//!
//! With authorization on (`--auth-*`), an event stream needs a bearer token
//! that may read the stream: `Authorization: Bearer <token>`, or
//! `?access_token=<token>` since a browser's `EventSource` cannot set
//! headers. No or a bad token: `401` with `WWW-Authenticate: Bearer`; a token
//! without read permission for the stream: `403`. CORS headers are sent only
//! for the origins of `--sse-allow-origin` (none by default).

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use ordo_runtime::readiness::Readiness;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    Shutdown,
    hub::Hub,
    json,
    log::{Log, LogError},
    service::MAX_STREAM_ID_BYTES,
    session,
};

/// What the SSE endpoint needs.
#[derive(Clone)]
pub struct SseState {
    pub hub: Arc<Hub>,
    pub log: Log,
    pub shutdown: Shutdown,
    pub keep_alive: Duration,
    /// Whether Redis answers (see [`ordo_runtime::readiness`]).
    pub readiness: Readiness,
    /// Who may read which streams (off: everyone).
    pub auth: ordo_runtime::auth::Auth,
}

/// Every way a request can fail, and its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("release log unreachable; retry with Last-Event-ID")]
    Unavailable,
    /// 401 (no or a bad token) or 403 (the token may not read the stream).
    #[error(transparent)]
    Denied(#[from] ordo_runtime::auth::Denied),
}

/// A Redis outage shorter than this is ridden out by retries (a restart);
/// once it lasts longer, requests are refused at once instead of waiting.
const REFUSE_AFTER: Duration = Duration::from_secs(1);

impl IntoResponse for SseError {
    fn into_response(self) -> Response {
        let status = match &self {
            SseError::Denied(denied) => return denied_response(denied),
            SseError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SseError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            SseError::Log(LogError::Expired { .. }) => StatusCode::GONE,
            SseError::Log(LogError::Redis(cause)) => {
                tracing::warn!(error = %cause, "redis unavailable");
                return (StatusCode::SERVICE_UNAVAILABLE, "release log unavailable; retry with Last-Event-ID\n")
                    .into_response();
            }
            SseError::Log(LogError::Corrupt { .. }) => {
                tracing::error!(error = %self, "corrupt release log");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, format!("{self}\n")).into_response()
    }
}

/// 401 and 403 as RFC 6750 says, with `WWW-Authenticate: Bearer`.
fn denied_response(denied: &ordo_runtime::auth::Denied) -> Response {
    use ordo_runtime::auth::Denied;
    let (status, challenge) = match denied {
        Denied::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, r#"Bearer realm="ordo", error="invalid_token""#),
        Denied::PermissionDenied(_) => (StatusCode::FORBIDDEN, r#"Bearer realm="ordo", error="insufficient_scope""#),
    };
    let mut response = (status, format!("{denied}\n")).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    response
}

/// The CORS layer for `--sse-allow-origin`: `None` (no CORS headers) for an
/// empty list, any origin for `*` alone, else exactly the origins listed.
pub fn cors(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    let origins: Vec<&str> = origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).collect();
    let allow = match origins.as_slice() {
        [] => return Ok(None),
        ["*"] => AllowOrigin::any(),
        _ => {
            let mut values = Vec::new();
            for origin in origins {
                // A browser's Origin is scheme://host[:port], never with a path: anything else never matches.
                let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
                let path_free = origin.splitn(4, '/').nth(3).is_none();
                if origin == "*" || !scheme_ok || !path_free {
                    return Err(format!(
                        "--sse-allow-origin {origin:?}: give `*` alone, or origins like https://app.example.com (scheme://host[:port], no path)"
                    ));
                }
                values.push(
                    HeaderValue::from_str(origin)
                        .map_err(|_| format!("--sse-allow-origin {origin:?} is not a valid origin"))?,
                );
            }
            AllowOrigin::list(values)
        }
    };
    Ok(Some(CorsLayer::new().allow_origin(allow).allow_methods([http::Method::GET]).allow_headers([
        header::HeaderName::from_static("last-event-id"),
        header::CACHE_CONTROL,
        header::AUTHORIZATION,
    ])))
}

/// The HTTP routes, with `cors` (from [`cors`]) when browsers of other
/// origins may read the events.
pub fn router(state: SseState, cors: Option<CorsLayer>) -> Router {
    let router = Router::new().route("/streams/{stream_id}/events", get(events)).route("/healthz", get(healthz));
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// The bearer token of a request: the `Authorization` header, else the
/// `access_token` query parameter (for `EventSource`, which cannot set headers).
fn token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Result<Option<&'a str>, ordo_runtime::auth::Denied> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| ordo_runtime::auth::Denied::Unauthenticated("the Authorization header is not ASCII".into()))?;
        return ordo_runtime::auth::bearer(Some(value));
    }
    Ok(query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .filter(|t| !t.is_empty()))
}

async fn healthz(State(state): State<SseState>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if state.readiness.is_ready() {
        "ok\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "release log (redis) unreachable\n").into_response()
    }
}

/// Serves `router` on `listener` until `shutdown`; open event streams end as
/// their sessions see the shutdown, and whatever is left after `drain` is dropped.
/// HTTPS with the process's `--tls-cert`/`--tls-key` when set ([`crate::https`]).
pub async fn serve(listener: TcpListener, router: Router, shutdown: Shutdown, drain: Duration) -> anyhow::Result<()> {
    let tls = ordo_runtime::tls::settings().http_server()?;
    serve_with(listener, router, tls, shutdown, drain).await
}

/// [`serve`] with explicit TLS (`None`: plain HTTP) instead of the process's.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: Shutdown,
    drain: Duration,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(listen = %addr, https = tls.is_some(), "serving Server-Sent Events");
    let server = async {
        match tls {
            Some(tls) => crate::https::serve(listener, router, tls, shutdown.clone()).await,
            None => axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .await
                .map_err(Into::into),
        }
    };
    tokio::select! {
        served = server => served,
        () = ordo_runtime::shutdown::drain_deadline(shutdown.clone(), drain) => Ok(()),
    }
}

/// The first position wanted: after `Last-Event-ID`, else `?from=`, else 0.
fn start_position(headers: &HeaderMap, query: Option<&str>) -> Result<u64, SseError> {
    if let Some(last) = headers.get("last-event-id") {
        let text = last.to_str().unwrap_or_default().trim();
        if !text.is_empty() {
            let last: u64 = text
                .parse()
                .map_err(|_| SseError::BadRequest(format!("Last-Event-ID {text:?} is not a position (a number)")))?;
            return Ok(last.saturating_add(1));
        }
    }
    for pair in query.unwrap_or_default().split('&') {
        if let Some(value) = pair.strip_prefix("from=") {
            return value
                .parse()
                .map_err(|_| SseError::BadRequest(format!("from={value:?} is not a position (a number)")));
        }
    }
    Ok(0)
}

/// Aborts a session task when the response body is dropped (client gone).
struct AbortOnDrop(JoinHandle<Result<(), LogError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn events(
    State(state): State<SseState>,
    Path(stream_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, SseError> {
    let grant = state.auth.verify(token(&headers, query.as_deref())?)?;
    if stream_id.is_empty() || stream_id.len() > MAX_STREAM_ID_BYTES {
        return Err(SseError::BadRequest(format!("the stream id must be 1 to {MAX_STREAM_ID_BYTES} bytes")));
    }
    grant.check_read(&stream_id)?;
    let from = start_position(&headers, query.as_deref())?;
    if state.readiness.down_for(REFUSE_AFTER) {
        return Err(SseError::Unavailable);
    }
    state.log.check(&stream_id, from).await?;

    // One batch in flight: the session's live buffer is the hub's, bounded,
    // and a reader slower than that is served from the log.
    let (batches, mut batch_rx) = mpsc::channel(1);
    let session = tokio::spawn(session::follow(
        state.hub.clone(),
        state.log.clone(),
        stream_id,
        from,
        batches,
        state.shutdown.clone(),
    ));
    let mut session = AbortOnDrop(session);
    let subscriber = crate::metrics::Subscriber::new(&crate::metrics::SUBSCRIBERS_SSE);
    let body = async_stream::stream! {
        let _subscriber = subscriber;
        while let Some(batch) = batch_rx.recv().await {
            for result in &batch.results {
                let event = Event::default()
                    .id(result.position.to_string())
                    .event("result")
                    .data(json::encode(result));
                yield Ok::<_, Infallible>(event);
            }
        }
        if let Ok(Err(error)) = (&mut session.0).await {
            let message = serde_json::json!({ "error": error.to_string() }).to_string();
            yield Ok(Event::default().event("error").data(message));
        }
    };
    let mut response = Sse::new(body).keep_alive(KeepAlive::new().interval(state.keep_alive)).into_response();
    // Proxies (nginx) must not buffer an event stream.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_is_off_by_default_and_star_only_when_alone() {
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(cors(&[]).expect("empty is fine").is_none(), "no origin: no CORS layer");
        assert!(cors(&list(&[" ", ""])).expect("blank entries are ignored").is_none());
        assert!(cors(&list(&["*"])).expect("* alone").is_some());
        assert!(cors(&list(&["https://app.example.com", "http://127.0.0.1:8080"])).expect("a list").is_some());
        for bad in [&["*", "https://a.example"][..], &["https://a.example/"], &["https://a.example/x"], &["a.example"]]
        {
            assert!(cors(&list(bad)).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_token_comes_from_the_header_else_access_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(token(&headers, Some("from=3")), Ok(None));
        assert_eq!(token(&headers, Some("from=3&access_token=abc.def.ghi")), Ok(Some("abc.def.ghi")));
        assert_eq!(token(&headers, Some("access_token=")), Ok(None));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer h.e.ader"));
        assert_eq!(token(&headers, Some("access_token=q.u.ery")), Ok(Some("h.e.ader")), "the header wins");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        assert!(token(&headers, None).is_err());
    }

    #[test]
    fn last_event_id_wins_over_from() {
        let mut headers = HeaderMap::new();
        assert_eq!(start_position(&headers, None).ok(), Some(0));
        assert_eq!(start_position(&headers, Some("from=5")).ok(), Some(5));
        headers.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(start_position(&headers, Some("from=5")).ok(), Some(10));
        headers.insert("last-event-id", HeaderValue::from_static("nine"));
        assert!(matches!(start_position(&headers, None), Err(SseError::BadRequest(_))));
        assert!(matches!(start_position(&HeaderMap::new(), Some("from=x")), Err(SseError::BadRequest(_))));
    }
}
