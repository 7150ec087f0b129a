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
//!
//! The same binaries run against one Redis node or a Redis Cluster, chosen by
//! the URL: `redis+cluster://[user:password@]host:port[,host:port…]` (or
//! `rediss+cluster://` for TLS) names some of a cluster's nodes, from which
//! the client learns the rest. [`RedisConn`] ([`connect`]) is the one
//! connection type for both: it implements [`ConnectionLike`], so commands,
//! pipelines and scripts run on it unchanged. On a cluster a command goes to
//! the master of its key's slot (following MOVED/ASK and failovers), and a
//! pipeline or script must keep to one slot.

use std::{future::Future, time::Duration};

use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RetryMethod, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
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

/// Request retries inside the cluster client (MOVED, ASK, TRYAGAIN,
/// CLUSTERDOWN, a lost node), before [`call`] retries on top: enough to ride
/// out a failover's slot-table refresh without hiding an outage for long.
const CLUSTER_RETRIES: u32 = 4;

/// One connection to Redis, a single node or a cluster (see the module docs).
/// Cheap to clone: clones share one multiplexed connection (per node).
#[derive(Clone)]
pub enum RedisConn {
    /// A single node (`redis://`, `rediss://`, `unix://`).
    Single(ConnectionManager),
    /// A Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a Redis Cluster: each command, pipeline and script
    /// call must then keep its keys in one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// One node that holds part of the keyspace: the single node, or one master
/// of a cluster as the cluster client addresses it (`host:port` from its
/// slot table). Returned by [`RedisConn::masters`], used by
/// [`RedisConn::query_on`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Master {
    /// The one node of a single-node connection.
    Single,
    /// A master of a cluster.
    Node {
        /// As in the cluster's slot table (`CLUSTER SLOTS`).
        host: String,
        /// The node's client port.
        port: u16,
    },
}

impl std::fmt::Display for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single => f.write_str("the redis node"),
            Self::Node { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Master {
    /// `host:port` (the cluster client's address of a node) as a master.
    fn parse(address: &str) -> Option<Self> {
        let (host, port) = address.rsplit_once(':')?;
        Some(Self::Node { host: host.to_owned(), port: port.parse().ok()? })
    }
}

impl RedisConn {
    /// Every node that holds part of the keyspace: `[Master::Single]` on a
    /// single node; on a cluster every master in the client's slot table,
    /// each answering a PING (so each is connected for [`Self::query_on`]).
    /// A master that does not answer fails the call (a transient error while
    /// a failover is under way: wrap in [`call`]); the client refreshes its
    /// slot table after such errors, so a retry sees the promoted replica.
    pub async fn masters(&self) -> redis::RedisResult<Vec<Master>> {
        let Self::Cluster(conn) = self else { return Ok(vec![Master::Single]) };
        let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        // Without a response policy the client answers a map of
        // `host:port` → that node's reply.
        let Value::Map(replies) = conn.clone().route_command(redis::cmd("PING"), routing).await? else {
            return Err(unexpected("CLUSTER masters: the client did not answer a map of nodes"));
        };
        let mut masters = Vec::with_capacity(replies.len());
        for (address, reply) in replies {
            reply.extract_error()?;
            let address: String = FromRedisValue::from_redis_value(address)?;
            masters.push(
                Master::parse(&address)
                    .ok_or_else(|| unexpected("CLUSTER masters: a node address is not host:port"))?,
            );
        }
        masters.sort();
        Ok(masters)
    }

    /// Runs `cmd` on one master from [`Self::masters`] of this connection
    /// (not on the master of a key's slot: for keyless commands such as SCAN,
    /// DBSIZE, INFO).
    pub async fn query_on<T: FromRedisValue>(&self, master: &Master, cmd: &Cmd) -> redis::RedisResult<T> {
        match (self, master) {
            (Self::Single(conn), Master::Single) => cmd.query_async(&mut conn.clone()).await,
            (Self::Cluster(conn), Master::Node { host, port }) => {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port });
                let value = conn.clone().route_command(cmd.clone(), routing).await?.extract_error()?;
                Ok(T::from_redis_value(value)?)
            }
            _ => Err(RedisError::from((
                redis::ErrorKind::Client,
                "query_on: a master of another kind of connection (single node against cluster)",
            ))),
        }
    }
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

/// Runs `cmd` on every master ([`RedisConn::masters`]) at once; each master's
/// answer in the order of the masters. The first error fails the whole call.
pub async fn for_each_master<T: FromRedisValue>(conn: &RedisConn, cmd: &Cmd) -> redis::RedisResult<Vec<(Master, T)>> {
    let masters = conn.masters().await?;
    futures::future::try_join_all(masters.into_iter().map(|master| async move {
        let answer = conn.query_on(&master, cmd).await?;
        Ok::<_, RedisError>((master, answer))
    }))
    .await
}

/// Runs many single-slot commands, each given with the hash slot of its
/// keys, and answers each in the order given: one pipeline (one round trip)
/// on a single node; on a cluster one pipeline per slot, all sent at once.
/// For reads that many streams need at the same moment (the harmonizer
/// opening the new streams of a burst of events, the push-gateway's
/// catch-up reads), instead of a round trip each. The first error fails
/// the whole call; transient errors are retried as by [`call`].
pub async fn query_each<T: FromRedisValue + Send>(
    conn: &RedisConn,
    commands: &[(u16, Cmd)],
) -> redis::RedisResult<Vec<T>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    call(|| async move {
        if !conn.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, command) in commands {
                pipe.add_command(command.clone());
            }
            return pipe.query_async::<Vec<T>>(&mut conn.clone()).await;
        }
        let mut slots: std::collections::BTreeMap<u16, Vec<usize>> = std::collections::BTreeMap::new();
        for (index, (slot, _)) in commands.iter().enumerate() {
            slots.entry(*slot).or_default().push(index);
        }
        let calls = slots.into_values().map(|indices| {
            let mut pipe = redis::pipe();
            for &index in &indices {
                pipe.add_command(commands[index].1.clone());
            }
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<T>>(&mut conn).await.map(|answers| (indices, answers)) }
        });
        let mut answers: Vec<Option<T>> = std::iter::repeat_with(|| None).take(commands.len()).collect();
        for group in futures::future::join_all(calls).await {
            let (indices, values) = group?;
            if values.len() != indices.len() {
                return Err(unexpected("a pipeline answered a different number of replies than it sent"));
            }
            for (index, value) in indices.into_iter().zip(values) {
                answers[index] = Some(value);
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.ok_or_else(|| unexpected("a pipeline left a command unanswered")))
            .collect()
    })
    .await
}

/// Every key matching the glob `pattern` on every master (`SCAN … MATCH
/// pattern COUNT count`, each master's cursor to its end), sorted, each
/// once. One call SCANs the whole keyspace: for sampling and listings, not
/// for paths that run per event.
pub async fn scan_keys(conn: &RedisConn, pattern: &str, count: usize) -> redis::RedisResult<Vec<String>> {
    let masters = conn.masters().await?;
    let per_master = futures::future::try_join_all(masters.iter().map(|master| async move {
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = conn
                .query_on(master, redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count))
                .await?;
            keys.extend(page);
            if next == 0 {
                return Ok::<_, RedisError>(keys);
            }
            cursor = next;
        }
    }))
    .await?;
    // SCAN may return a key more than once (rehashing); a replica is never
    // scanned, so a key is on one master only.
    let mut keys: Vec<String> = per_master.into_iter().flatten().collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
pub fn is_cluster_url(url: &str) -> bool {
    url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://")
}

/// A connection to the single node or cluster `url` names, that connects on
/// first use and reconnects by itself. Fails only for a malformed URL.
pub fn connect(url: &str) -> anyhow::Result<RedisConn> {
    if !is_cluster_url(url) {
        return lazy(url).map(RedisConn::Single);
    }
    let client = cluster_client_with(url, crate::tls::settings())?;
    let config = ClusterConfig::new().set_connection_timeout(CONNECTION_TIMEOUT).set_response_timeout(RESPONSE_TIMEOUT);
    // Pending: the nodes are connected in the background and on demand.
    Ok(RedisConn::Cluster(client.get_pending_async_connection_with_config(config)))
}

/// The node URLs of a cluster URL: `redis+cluster://u:p@h1:1,h2:2/` →
/// `redis://u:p@h1:1`, `redis://u:p@h2:2` (credentials apply to every node).
fn cluster_nodes(url: &str) -> anyhow::Result<Vec<String>> {
    let invalid = |why: &str| anyhow::anyhow!("invalid redis cluster url {:?}: {why}", redact(url));
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Err(invalid("the scheme must be redis+cluster:// or rediss+cluster://"));
    };
    let (userinfo, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains(['/', '?', '#']) {
        return Err(invalid("a cluster has no database number or options: only host:port[,host:port…]"));
    }
    let nodes: Vec<String> = hosts.split(',').map(|host| format!("{scheme}://{userinfo}{}", host.trim())).collect();
    if hosts.split(',').any(|host| host.trim().is_empty()) {
        return Err(invalid("expected host:port[,host:port…]"));
    }
    Ok(nodes)
}

/// A cluster client for a `redis+cluster://` / `rediss+cluster://` URL, with
/// TLS as in [`client_with`].
pub fn cluster_client_with(url: &str, tls: &crate::tls::TlsSettings) -> anyhow::Result<ClusterClient> {
    build_cluster_client(url, cluster_builder_with(url, tls)?)
}

/// A cluster client for sharded pub/sub (the push-gateway's live tail): as
/// [`cluster_client_with`] with the process's TLS, but speaking RESP3 and
/// handing every push (messages, subscription confirmations, disconnections)
/// to `pushes`, which must not block.
pub fn cluster_pubsub_client(url: &str, pushes: impl redis::aio::AsyncPushSender) -> anyhow::Result<ClusterClient> {
    let builder = cluster_builder_with(url, crate::tls::settings())?
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(pushes);
    build_cluster_client(url, builder)
}

fn build_cluster_client(url: &str, builder: redis::cluster::ClusterClientBuilder) -> anyhow::Result<ClusterClient> {
    builder.build().map_err(|e| anyhow::anyhow!("invalid redis cluster url {:?}: {e}", redact(url)))
}

fn cluster_builder_with(
    url: &str,
    tls: &crate::tls::TlsSettings,
) -> anyhow::Result<redis::cluster::ClusterClientBuilder> {
    let nodes = cluster_nodes(url)?;
    let mut builder = ClusterClient::builder(nodes)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .connection_timeout(CONNECTION_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .tcp_settings(tcp_settings());
    if url.starts_with("rediss+cluster://") {
        crate::tls::ensure_crypto_provider();
        let root_cert = tls.redis_ca_pem().map(<[u8]>::to_vec);
        let client_tls = tls.identity().map(|id| redis::ClientTlsConfig {
            client_cert: id.cert_pem().to_vec(),
            client_key: id.key_pem().to_vec(),
        });
        if root_cert.is_some() || client_tls.is_some() {
            builder = builder.certs(redis::TlsCertificates { client_tls, root_cert });
        }
    }
    Ok(builder)
}

/// A connection manager for the single node `url` that connects on first
/// use and reconnects by itself: the single-node half of [`connect`], which
/// every service uses (so every service takes a cluster URL). Fails for a
/// malformed URL, and for a cluster URL (a connection manager reaches one
/// node).
pub fn lazy(url: &str) -> anyhow::Result<ConnectionManager> {
    if is_cluster_url(url) {
        anyhow::bail!(
            "{:?} is a Redis Cluster URL, which one node's connection cannot serve: use redis_conn::connect",
            redact(url)
        );
    }
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
    let info = url.into_connection_info().map_err(invalid)?.set_tcp_settings(tcp_settings());
    if !url.starts_with("rediss://") {
        return redis::Client::open(info).map_err(invalid);
    }
    // redis builds its rustls config from the process's default provider.
    crate::tls::ensure_crypto_provider();
    let root_cert = tls.redis_ca_pem().map(<[u8]>::to_vec);
    let client_tls = tls
        .identity()
        .map(|id| redis::ClientTlsConfig { client_cert: id.cert_pem().to_vec(), client_key: id.key_pem().to_vec() });
    if root_cert.is_none() && client_tls.is_none() {
        // The system roots (a managed Redis with a public certificate).
        return redis::Client::open(info).map_err(invalid);
    }
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert }).map_err(invalid)
}

/// The TCP options of every Redis connection: `TCP_NODELAY`, which redis-rs
/// leaves off. With Nagle's algorithm on, a small command written while an
/// earlier one on the same connection is unacknowledged may wait for that
/// ACK; the reassembler keeps several script calls in flight on one
/// connection, and every service pipelines.
pub fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
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

/// PINGs through `conn` (on a cluster: a random node), within `timeout`: the
/// probe of a Redis dependency.
pub async fn ping<C: ConnectionLike + Clone + Send>(conn: &C, timeout: Duration) -> Result<(), String> {
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
    fn every_single_node_client_turns_nagle_off() {
        for url in ["redis://127.0.0.1:6390/", "redis://u:p@127.0.0.1:6390/2", "rediss://127.0.0.1:6390/"] {
            let client = client_with(url, &crate::tls::TlsSettings::default()).expect("valid url");
            assert!(client.get_connection_info().tcp_settings().nodelay(), "{url}");
        }
        assert!(client_with("redis://", &crate::tls::TlsSettings::default()).is_err());
    }

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

    #[test]
    fn cluster_urls_name_every_node_with_the_same_credentials() {
        assert!(is_cluster_url("redis+cluster://h:1"));
        assert!(is_cluster_url("rediss+cluster://h:1"));
        assert!(!is_cluster_url("redis://h:1"));
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@h1:7000,h2:7001/").expect("valid"),
            ["redis://u:p@h1:7000", "redis://u:p@h2:7001"]
        );
        assert_eq!(cluster_nodes("rediss+cluster://h:1").expect("valid"), ["rediss://h:1"]);
        for bad in ["redis+cluster://", "redis+cluster://h:1,,h:2", "redis+cluster://h:1/2", "redis://h:1"] {
            assert!(cluster_nodes(bad).is_err(), "{bad}");
        }
        let Err(error) = lazy("redis+cluster://127.0.0.1:1") else { panic!("a cluster url is refused") };
        let error = error.to_string();
        assert!(error.contains("redis_conn::connect"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_promptly() {
        let conn = connect("redis+cluster://127.0.0.1:1,127.0.0.1:2").expect("a valid url");
        assert!(conn.is_cluster());
        let started = std::time::Instant::now();
        assert!(ping(&conn, Duration::from_secs(5)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
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
