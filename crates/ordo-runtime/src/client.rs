//! Client channels to other Ordo services: lazy (a peer that is down at
//! start-up is retried, not fatal), with keep-alives so a dead peer is noticed,
//! and with trace-context injection.
//!
//! TLS follows the process ([`crate::tls`]): with `--tls-ca`, a bare
//! `host:port` is dialed over https, trusting that CA and presenting the
//! process's certificate (mTLS). An explicit `http://` stays plaintext (the
//! registry's remote operations are written `grpc://`, stored as `http://`),
//! an explicit `https://` is always TLS (system roots without `--tls-ca`).

use std::time::Duration;

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::telemetry::TraceInterceptor;

/// A channel whose calls carry the caller's trace context.
pub type TracedChannel = InterceptedService<Channel, TraceInterceptor>;

/// Errors building a channel: a malformed address (or a TLS setting tonic refuses).
#[derive(Debug, thiserror::Error)]
#[error("invalid endpoint {endpoint:?}: {source}")]
pub struct EndpointError {
    endpoint: String,
    #[source]
    source: tonic::transport::Error,
}

/// Accepts `host:port` or a full `http://host:port` / `https://host:port`
/// URI; TLS as the process is configured (see the module doc).
pub fn endpoint(address: &str) -> Result<Endpoint, EndpointError> {
    endpoint_with(address, crate::tls::settings())
}

/// [`endpoint`] with explicit TLS settings instead of the process's.
pub fn endpoint_with(address: &str, tls: &crate::tls::TlsSettings) -> Result<Endpoint, EndpointError> {
    let peer_tls = tls.grpc_client();
    let uri = if address.contains("://") {
        address.to_owned()
    } else if peer_tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let secure = uri.starts_with("https://");
    let error = |source| EndpointError { endpoint: address.to_owned(), source };
    let mut endpoint = Endpoint::from_shared(uri).map_err(error)?;
    if secure {
        crate::tls::ensure_crypto_provider();
        endpoint = endpoint.tls_config(peer_tls.unwrap_or_else(|| tls.grpc_client_or_system_roots())).map_err(error)?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024)))
}

/// A lazily connected channel with trace propagation (TLS as the process is
/// configured).
pub fn traced(address: &str) -> Result<TracedChannel, EndpointError> {
    Ok(InterceptedService::new(endpoint(address)?.connect_lazy(), TraceInterceptor))
}

/// [`traced`] with explicit TLS settings instead of the process's.
pub fn traced_with(address: &str, tls: &crate::tls::TlsSettings) -> Result<TracedChannel, EndpointError> {
    Ok(InterceptedService::new(endpoint_with(address, tls)?.connect_lazy(), TraceInterceptor))
}
