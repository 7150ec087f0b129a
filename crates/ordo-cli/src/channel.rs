//! Connecting to an Ordo service. The CLI connects eagerly (unlike the
//! services' lazy channels) so that a wrong address fails at once with a clear
//! message instead of on the first call.

use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint};

/// Largest message the CLI accepts: results may carry payloads up to the
/// harmonizer's limit (1 MiB by default, configurable), so stay well above it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long establishing the TCP + HTTP/2 connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr` (`host:port` or `http://host:port`). `call_timeout`
/// bounds every call on the channel; leave it `None` for long-lived streams.
pub async fn connect(addr: &str, call_timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let mut endpoint = Endpoint::from_shared(uri)
        .with_context(|| format!("invalid address {addr:?} (expected host:port)"))?
        .connect_timeout(call_timeout.map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT)))
        .tcp_nodelay(true);
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint.connect().await.with_context(|| format!("cannot connect to {addr}"))
}
