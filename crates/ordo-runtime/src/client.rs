//! Client channels to other Ordo services: lazy (a peer that is down at
//! start-up is retried, not fatal), with keep-alives so a dead peer is noticed,
//! and with trace-context injection.

use std::time::Duration;

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::telemetry::TraceInterceptor;

/// A channel whose calls carry the caller's trace context.
pub type TracedChannel = InterceptedService<Channel, TraceInterceptor>;

/// Errors building a channel: only a malformed address can fail.
#[derive(Debug, thiserror::Error)]
#[error("invalid endpoint {endpoint:?}: {source}")]
pub struct EndpointError {
    endpoint: String,
    #[source]
    source: tonic::transport::Error,
}

/// Accepts `host:port` or a full `http://host:port` URI.
pub fn endpoint(address: &str) -> Result<Endpoint, EndpointError> {
    let uri = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
    Endpoint::from_shared(uri.clone())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(Some(4 * 1024 * 1024))
                .initial_connection_window_size(Some(8 * 1024 * 1024))
        })
        .map_err(|source| EndpointError { endpoint: address.to_owned(), source })
}

/// A lazily connected channel with trace propagation.
pub fn traced(address: &str) -> Result<TracedChannel, EndpointError> {
    Ok(InterceptedService::new(endpoint(address)?.connect_lazy(), TraceInterceptor))
}
