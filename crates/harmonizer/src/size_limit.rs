//! Oversized unary requests: tonic refuses a request message over the
//! decoding limit before any handler runs, with OUT_OF_RANGE and a decoder's
//! message. Ordo's contract is RESOURCE_EXHAUSTED naming the limit (as for an
//! oversized frame on a `Process` call), so this wrapper rewrites that one
//! status on the way out. Streaming calls see the error in their handler and
//! answer it there (`process.rs`).

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::HeaderMap;
use tonic::{Code, Status, body::Body, server::NamedService};

/// Wraps a generated tonic server.
#[derive(Debug, Clone)]
pub struct SizeLimitStatus<S> {
    inner: S,
    limit: usize,
}

impl<S> SizeLimitStatus<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S: NamedService> NamedService for SizeLimitStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for SizeLimitStatus<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite(response.headers_mut(), limit);
            Ok(response)
        })
    }
}

/// Turns tonic's "decoded message length too large" OUT_OF_RANGE into
/// RESOURCE_EXHAUSTED with the limit; leaves every other status alone.
fn rewrite(headers: &mut HeaderMap, limit: usize) {
    let Some(status) = Status::from_header_map(headers) else { return };
    if status.code() != Code::OutOfRange || !status.message().contains("decoded message length too large") {
        return;
    }
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .map(|n| format!("{n} bytes"))
        .unwrap_or_else(|| "the request".into());
    let replacement = Status::resource_exhausted(format!(
        "request message of {found} exceeds the message size limit of {limit} bytes (payloads: --max-payload-bytes)"
    ));
    if let Err(error) = replacement.add_header(headers) {
        tracing::warn!(%error, "cannot rewrite an oversize request's status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_decoder_size_error() {
        let mut headers = HeaderMap::new();
        Status::out_of_range("Error, decoded message length too large: found 20000000 bytes, the limit is: 16 bytes")
            .add_header(&mut headers)
            .expect("header");
        rewrite(&mut headers, 16);
        let status = Status::from_header_map(&headers).expect("status");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("20000000 bytes") && status.message().contains("limit of 16"));

        let mut headers = HeaderMap::new();
        Status::out_of_range("beyond the window").add_header(&mut headers).expect("header");
        rewrite(&mut headers, 16);
        assert_eq!(Status::from_header_map(&headers).map(|s| s.code()), Some(Code::OutOfRange));
    }
}
