//! Remote operations: one call per attempt to an `ordo.v1.Operation/Invoke`
//! gRPC server (`grpc://host:port`) or a POST to an HTTP URL, with one
//! cached client per endpoint.
//!
//! How answers map to outcomes:
//!
//! | answer | outcome |
//! | --- | --- |
//! | gRPC `payload`, HTTP 2xx | the result (OK) |
//! | gRPC `error{retry: true}`, a transient gRPC code (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, UNKNOWN), HTTP 5xx, 408, 429, connect errors, no answer in time | transient: handed back for another attempt while attempts remain |
//! | gRPC `error{retry: false}`, any other gRPC code, an answer with neither payload nor error, HTTP 4xx (but 408, 429), 1xx/3xx (redirects are not followed), an answer larger than [`MAX_RESULT_BYTES`] | permanent: FAILED with a dead letter |

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use ordo_core::limits;
use ordo_proto::v1::{Event, InvokeRequest, invoke_response::Outcome, operation_client::OperationClient};
use ordo_registry::Endpoint;
use ordo_runtime::{client::TracedChannel, telemetry::Carrier};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::operation::{OpError, is_transient};

/// Largest result a remote operation may answer with.
pub const MAX_RESULT_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of an HTTP error answer's body quoted in the error message.
const QUOTED_BODY_BYTES: usize = 256;
/// Endpoints with a cached client; past it the cache starts over.
const MAX_CACHED_ENDPOINTS: usize = 256;
/// How long connecting to an HTTP endpoint may take.
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One call of a remote operation.
pub(crate) struct Invocation<'a> {
    pub event: &'a Event,
    pub attempt: u32,
    /// When the worker stops waiting (`None`: never).
    pub deadline: Option<Instant>,
    /// W3C trace context of the attempt.
    pub trace_context: Carrier,
}

impl Invocation<'_> {
    /// Time left before the deadline; an error when none is.
    fn time_left(&self, endpoint: &Endpoint) -> Result<Option<Duration>, OpError> {
        match self.deadline {
            None => Ok(None),
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(OpError::transient(format!("{endpoint}: no time left for the call"))),
            },
        }
    }

    fn deadline_unix_ms(&self, left: Option<Duration>) -> u64 {
        left.and_then(|left| SystemTime::now().checked_add(left))
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Clients of the remote endpoints, one per endpoint (cheap to share).
#[derive(Default)]
pub(crate) struct Remotes {
    grpc: Mutex<HashMap<String, OperationClient<TracedChannel>>>,
    http: Mutex<HashMap<String, reqwest::Client>>,
}

fn cached<T: Clone, E>(
    cache: &Mutex<HashMap<String, T>>,
    key: &str,
    make: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let mut cache = ordo_runtime::sync::lock(cache);
    if let Some(hit) = cache.get(key) {
        return Ok(hit.clone());
    }
    if cache.len() >= MAX_CACHED_ENDPOINTS {
        cache.clear();
    }
    let client = make()?;
    cache.insert(key.to_owned(), client.clone());
    Ok(client)
}

/// `error` and its sources, on one line.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

impl Remotes {
    /// Calls `operation` at `endpoint` once.
    pub(crate) async fn invoke(
        &self,
        endpoint: &Endpoint,
        operation: &str,
        call: Invocation<'_>,
    ) -> Result<Bytes, OpError> {
        match endpoint {
            Endpoint::Grpc(uri) => self.grpc(endpoint, uri, operation, call).await,
            Endpoint::Http(url) => self.http(endpoint, url, operation, call).await,
        }
    }

    async fn grpc(
        &self,
        endpoint: &Endpoint,
        uri: &str,
        operation: &str,
        call: Invocation<'_>,
    ) -> Result<Bytes, OpError> {
        let mut client = cached(&self.grpc, uri, || {
            ordo_runtime::client::traced(uri)
                .map(|channel| OperationClient::new(channel).max_decoding_message_size(MAX_RESULT_BYTES))
        })
        .map_err(|e| OpError::permanent(format!("{endpoint}: {e}")))?;
        let left = call.time_left(endpoint)?;
        let event = call.event;
        let mut request = tonic::Request::new(InvokeRequest {
            operation: operation.to_owned(),
            stream_id: event.stream_id.clone(),
            sequence: event.sequence,
            attempt: call.attempt,
            payload: event.payload.clone(),
            attributes: event.attributes.clone(),
            deadline_unix_ms: call.deadline_unix_ms(left),
            trace_context: call.trace_context.clone(),
        });
        let answer = match left {
            Some(left) => {
                request.set_timeout(left);
                tokio::time::timeout(left, client.invoke(request))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("no answer within {left:?}"))))
            }
            None => client.invoke(request).await,
        };
        match answer {
            Ok(response) => match response.into_inner().outcome {
                Some(Outcome::Payload(payload)) => Ok(payload),
                Some(Outcome::Error(error)) => {
                    let message = format!("{endpoint}: {}", error.message);
                    Err(if error.retry { OpError::transient(message) } else { OpError::permanent(message) })
                }
                None => Err(OpError::permanent(format!("{endpoint}: answered with neither a payload nor an error"))),
            },
            // The channel's own deadline may end the call first (CANCELLED).
            Err(_) if call.deadline.is_some_and(|d| Instant::now() >= d) => {
                Err(OpError::transient(format!("{endpoint}: no answer within {:?}", left.unwrap_or_default())))
            }
            Err(status) => {
                let message = format!("{endpoint}: {:?}: {}", status.code(), status.message());
                Err(if is_transient(status.code()) { OpError::transient(message) } else { OpError::permanent(message) })
            }
        }
    }

    async fn http(
        &self,
        endpoint: &Endpoint,
        url: &str,
        operation: &str,
        call: Invocation<'_>,
    ) -> Result<Bytes, OpError> {
        let client = cached(&self.http, url, || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(HTTP_CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .build()
        })
        .map_err(|e| OpError::permanent(format!("{endpoint}: cannot set up an HTTP client: {}", describe(&e))))?;
        let left = call.time_left(endpoint)?;
        let headers =
            http_headers(operation, &call, left).map_err(|e| OpError::permanent(format!("{endpoint}: {e}")))?;
        let exchange = async {
            let mut response = client
                .post(url)
                .headers(headers)
                .body(call.event.payload.clone())
                .send()
                .await
                .map_err(|e| http_error(endpoint, &e))?;
            let status = response.status();
            let limit = if status.is_success() { MAX_RESULT_BYTES } else { QUOTED_BODY_BYTES };
            let mut body = BytesMut::new();
            let mut cut = false;
            while let Some(chunk) = response.chunk().await.map_err(|e| http_error(endpoint, &e))? {
                if body.len() + chunk.len() > limit {
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    cut = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, OpError>((status, body.freeze(), cut))
        };
        let (status, body, cut) = match left {
            Some(left) => tokio::time::timeout(left, exchange)
                .await
                .map_err(|_| OpError::transient(format!("{endpoint}: no answer within {left:?}")))??,
            None => exchange.await?,
        };
        if status.is_success() {
            if cut {
                return Err(OpError::permanent(format!(
                    "{endpoint}: HTTP {status}: the answer is larger than {MAX_RESULT_BYTES} bytes"
                )));
            }
            return Ok(body);
        }
        let quoted = String::from_utf8_lossy(&body);
        let quoted = quoted.trim();
        let message = if quoted.is_empty() {
            format!("{endpoint}: HTTP {status}")
        } else {
            format!("{endpoint}: HTTP {status}: {quoted}{}", if cut { "…" } else { "" })
        };
        let transient = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        if transient {
            return Err(OpError::transient(message));
        }
        if status.is_redirection() {
            return Err(OpError::permanent(format!("{message} (redirects are not followed)")));
        }
        Err(OpError::permanent(message))
    }
}

/// A failed HTTP exchange: transient unless the request itself was malformed.
fn http_error(endpoint: &Endpoint, error: &reqwest::Error) -> OpError {
    let message = format!("{endpoint}: {}", describe(error));
    if error.is_builder() { OpError::permanent(message) } else { OpError::transient(message) }
}

/// The metadata of an HTTP call, in headers (design brief §7).
fn http_headers(operation: &str, call: &Invocation<'_>, left: Option<Duration>) -> Result<HeaderMap, String> {
    let event = call.event;
    let value = |what: &str, text: &str| {
        HeaderValue::from_bytes(text.as_bytes())
            .map_err(|_| format!("{what} {:?} cannot be sent in an HTTP header", limits::echo(text)))
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert("ordo-operation", value("operation", operation)?);
    headers.insert("ordo-stream-id", value("stream id", &event.stream_id)?);
    headers.insert("ordo-sequence", HeaderValue::from(event.sequence));
    headers.insert("ordo-attempt", HeaderValue::from(call.attempt));
    headers.insert("ordo-deadline-unix-ms", HeaderValue::from(call.deadline_unix_ms(left)));
    for (name, text) in &event.attributes {
        let header = HeaderName::from_bytes(format!("ordo-attr-{name}").as_bytes())
            .map_err(|_| format!("attribute name {:?} cannot be sent as an HTTP header", limits::echo(name)))?;
        headers.insert(header, value("attribute value", text)?);
    }
    for key in ["traceparent", "tracestate"] {
        if let Some(text) = call.trace_context.get(key)
            && let Ok(text) = HeaderValue::from_str(text)
        {
            headers.insert(key, text);
        }
    }
    Ok(headers)
}

#[cfg(test)]
pub(crate) mod tests;
