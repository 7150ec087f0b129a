//! Redis connections: a multiplexed, auto-reconnecting connection manager, so
//! a Redis restart costs a retried call, not a restart of the service, and
//! the one rule for which Redis errors are worth retrying.
//!
//! Connections are lazy: a service starts (and answers health as NOT_SERVING)
//! while Redis is still unreachable, instead of blocking its whole start-up.
//! [`call`] is how services talk to Redis: transient errors (a connection that
//! broke because Redis restarted) are retried a few times with the shared
//! jittered backoff before the caller sees them.
//!
//! `rediss://` URLs connect over TLS (rustls), trusting `--redis-ca`, else
//! `--tls-ca`, else the system roots, and presenting `--tls-cert`/`--tls-key`
//! when Redis asks for a client certificate (see [`crate::tls`]).

use std::{future::Future, time::Duration};

use redis::{
    RedisError, RetryMethod,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::backoff;

/// How long one connection attempt may take. Short: health and callers must
/// learn promptly that Redis is unreachable.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command may wait for its answer. Reorder scripts take
/// milliseconds; a Redis that takes longer is frozen or overloaded, and the
/// caller is better told UNAVAILABLE than kept waiting.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts of one [`call`] in all (the first included).
const CALL_ATTEMPTS: usize = 4;

/// A connection manager for `url` that connects on first use and reconnects
/// by itself. Fails only for a malformed URL.
pub fn lazy(url: &str) -> anyhow::Result<ConnectionManager> {
    let client = client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        // Reconnect attempts inside one command: few and short, because
        // [`call`] retries on top and health reports the outage meanwhile.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| anyhow::anyhow!("cannot set up a redis connection to {:?}: {e}", redact(url)))
}

/// A plain client for pub/sub connections (TLS for `rediss://`, as the
/// process is configured).
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    client_with(url, crate::tls::settings())
}

/// [`client`] with explicit TLS settings instead of the process's.
pub fn client_with(url: &str, tls: &crate::tls::TlsSettings) -> anyhow::Result<redis::Client> {
    let invalid = |e: RedisError| anyhow::anyhow!("invalid redis url {:?}: {e}", redact(url));
    if !url.starts_with("rediss://") {
        return redis::Client::open(url).map_err(invalid);
    }
    // redis builds its rustls config from the process's default provider.
    crate::tls::ensure_crypto_provider();
    let root_cert = tls.redis_ca_pem().map(<[u8]>::to_vec);
    let client_tls = tls
        .identity()
        .map(|id| redis::ClientTlsConfig { client_cert: id.cert_pem().to_vec(), client_key: id.key_pem().to_vec() });
    if root_cert.is_none() && client_tls.is_none() {
        // The system roots (a managed Redis with a public certificate).
        return redis::Client::open(url).map_err(invalid);
    }
    redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert }).map_err(invalid)
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Whether retrying after `error` may succeed: the connection broke or was
/// refused (Redis restarting), or Redis asked to retry (loading, TRYAGAIN).
/// A timeout is not: Redis is frozen or overloaded, and another attempt would
/// only double the caller's wait.
pub fn is_transient(error: &RedisError) -> bool {
    if error.is_timeout() {
        return false;
    }
    error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.retry_method(),
            RetryMethod::Reconnect | RetryMethod::RetryImmediately | RetryMethod::WaitAndRetry
        )
}

/// Runs a Redis operation, retrying transient errors ([`is_transient`]) a few
/// times with a short jittered backoff (about a second in all), and returns
/// the first success or the last error.
pub async fn call<T, F, Fut>(op: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    backoff::retry(CALL_ATTEMPTS, Duration::from_millis(50), Duration::from_millis(500), is_transient, op).await
}

/// PINGs through `conn`, within `timeout`: the probe of a Redis dependency.
pub async fn ping(conn: &ConnectionManager, timeout: Duration) -> Result<(), String> {
    let mut conn = conn.clone();
    match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer to PING within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_are_transient_timeouts_are_not() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let script = RedisError::from((redis::ErrorKind::UnexpectedReturnType, "bad reply"));
        assert!(is_transient(&refused));
        assert!(is_transient(&reset));
        assert!(!is_transient(&timeout));
        assert!(!is_transient(&script));
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_promptly() {
        // Nothing listens on port 1; the lazy manager must not block creation
        // and the call must fail fast, not hang.
        let conn = lazy("redis://127.0.0.1:1").expect("a valid url");
        let started = std::time::Instant::now();
        assert!(ping(&conn, Duration::from_secs(3)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    }
}
