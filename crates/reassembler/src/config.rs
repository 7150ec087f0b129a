//! Reassembler configuration (flags and env vars).

use std::{net::SocketAddr, time::Duration};

use ordo_runtime::app::CommonArgs;

use crate::store::StoreConfig;

/// Ordo reassembler: stores worker results in Redis and releases each
/// stream's results strictly in sequence order.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "reassembler", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "REASSEMBLER_LISTEN", default_value = "0.0.0.0:50054")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "REASSEMBLER_METRICS_LISTEN", default_value = "0.0.0.0:9094", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    /// Redis holding the reorder state: one node (`redis://`, `rediss://`)
    /// or a Redis Cluster (`redis+cluster://host:port[,host:port…]`,
    /// `rediss+cluster://`). Use AOF persistence in production: reorder
    /// state must survive a Redis restart.
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    match text.strip_suffix('h') {
        Some(hours) => hours.parse::<u64>().map(|h| Duration::from_secs(h * 3600)).map_err(|e| e.to_string()),
        None => ordo_core::duration::parse(text),
    }
}

ordo_runtime::service_config!(Config, validate = Config::check);

impl Config {
    /// Cross-field checks clap cannot express.
    fn check(&self) -> Result<(), String> {
        self.store.check()
    }
}

/// How results are stored and released in Redis: the reassembler's flags,
/// and those of a worker or harmonizer that stores its results itself
/// (`--store-results redis`). Every process that writes a stream's release
/// log should use the same values, hence the same variables everywhere.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Storing results")]
pub struct StoreArgs {
    /// Replicas that must acknowledge every script call (Redis `WAIT`)
    /// before its results are acked to their senders; 0 = do not wait. With
    /// 1 or more, a failover to an acknowledging replica loses no acked result.
    #[arg(long, env = "REASSEMBLER_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,
    /// How long one `WAIT` may block; fewer replicas by then fail the call
    /// (its senders redeliver).
    #[arg(long, env = "REASSEMBLER_REDIS_WAIT_TIMEOUT", default_value = "500ms", value_parser = ordo_core::duration::parse)]
    pub redis_wait_timeout: Duration,
    /// Released results kept in each stream's log (approximate, trimmed in blocks).
    #[arg(long, env = "REASSEMBLER_RETENTION", default_value_t = 100_000)]
    pub retention: u64,
    /// Dead letters (FAILED and GAP results, `ordo dlq`) kept in the
    /// dead-letter log across all streams (approximate, trimmed in blocks;
    /// the oldest go first).
    #[arg(long, env = "REASSEMBLER_DEAD_LETTER_RETENTION", default_value_t = 100_000)]
    pub dead_letter_retention: u64,
    /// A stream's pending results and release log expire after this long
    /// without a release, up to 1/16 longer: the expiry is renewed once less
    /// than this is left, not on every call (0 = never, and then neither
    /// does its meta).
    #[arg(long, env = "REASSEMBLER_STREAM_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub stream_ttl: Duration,
    /// How much longer a stream's meta (`next`, `released`, `mode`: the
    /// dedup tombstone, 120 bytes) outlives its log: a sequence resent
    /// after the log expired is refused with OUT_OF_RANGE instead of being
    /// processed again. 0 = the meta expires with the log (the stream looks
    /// new after `--stream-ttl`).
    #[arg(long, env = "REASSEMBLER_TOMBSTONE_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub tombstone_ttl: Duration,
    /// Most results per Redis script call.
    #[arg(long, env = "REASSEMBLER_MAX_BATCH", default_value_t = 512)]
    pub max_batch: usize,
}

impl StoreArgs {
    /// Cross-field checks clap cannot express.
    pub fn check(&self) -> Result<(), String> {
        if self.retention == 0 {
            return Err("--retention must be at least 1".into());
        }
        if self.dead_letter_retention == 0 {
            return Err("--dead-letter-retention must be at least 1".into());
        }
        if self.redis_wait_replicas > 0 && self.redis_wait_timeout.is_zero() {
            return Err("--redis-wait-timeout must be above 0 (WAIT 0 blocks forever)".into());
        }
        if self.max_batch == 0 {
            return Err("--max-batch must be at least 1".into());
        }
        Ok(())
    }

    /// The store's settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            retention: self.retention,
            ttl_ms: self.stream_ttl.as_millis() as u64,
            tombstone_ms: self.tombstone_ttl.as_millis() as u64,
            dead_letter_retention: self.dead_letter_retention,
            wait_replicas: self.redis_wait_replicas,
            wait_timeout_ms: self.redis_wait_timeout.as_millis() as u64,
        }
    }
}
