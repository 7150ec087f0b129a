//! Redis connections: a multiplexed, auto-reconnecting connection manager, so
//! a Redis restart costs failed calls (which callers retry), not a restart of
//! the service.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Connects, retrying until Redis answers or `shutdown` is cancelled.
pub async fn connect(url: &str, shutdown: &crate::Shutdown) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid redis url {url:?}: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut delay = Duration::from_millis(100);
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => return Ok(conn),
            Err(error) => {
                tracing::warn!(%url, %error, "redis not reachable yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("shut down before redis was reachable"),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A plain client for pub/sub connections.
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid redis url {url:?}: {e}"))
}
