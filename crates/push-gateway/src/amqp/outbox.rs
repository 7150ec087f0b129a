//! The Redis side of the AMQP outbox. The release logs *are* the outbox;
//! this module keeps, per exchange, what has been confirmed by the broker
//! and who may publish. These are the push-gateway's own keys; it never
//! writes reorder state:
//!
//! - `ordo:amqp:{exchange}:cursor` — hash: stream id → next release position
//!   to publish. Moved only after the broker confirmed every message before
//!   it, and only by compare-and-set, so a stale publisher can never move it
//!   back or past what it confirmed.
//! - `ordo:amqp:{exchange}:leader` — the lease of the one gateway replica that
//!   publishes to this exchange (owner id, expires unless renewed).
//!
//! On a Redis Cluster every command and script here touches one key, so
//! each goes to that key's master; the scans for streams with unpublished
//! results walk every master's keyspace in turn
//! ([`RedisConn::masters`], [`RedisConn::query_on`]), and what they read per
//! stream (its meta, in its own slot) is one command per stream, sent at once.

use std::time::Duration;

use futures::future::try_join_all;
use ordo_core::keys;
use ordo_runtime::redis_conn::{Master, RedisConn};
use redis::AsyncCommands;

/// Sets a cursor field only if it still holds the expected value ('' = unset).
/// KEYS[1] = cursor hash; ARGV = stream, expected, new ('' deletes).
const CAS: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
";

/// Takes the lease if free, renews it if ours. KEYS[1] = lease; ARGV = owner, ttl ms.
const ACQUIRE: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Gives the lease up if ours. KEYS[1] = lease; ARGV[1] = owner.
const RESIGN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Streams examined per SCAN step.
const SCAN_COUNT: usize = 500;

#[derive(Clone)]
pub struct Outbox {
    conn: RedisConn,
    cursor_key: String,
    lease_key: String,
    owner: String,
    cas: redis::Script,
    acquire: redis::Script,
    resign: redis::Script,
}

impl Outbox {
    pub fn new(conn: RedisConn, exchange: &str) -> Self {
        let owner = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        Self {
            conn,
            cursor_key: format!("ordo:amqp:{exchange}:cursor"),
            lease_key: format!("ordo:amqp:{exchange}:leader"),
            owner,
            cas: redis::Script::new(CAS),
            acquire: redis::Script::new(ACQUIRE),
            resign: redis::Script::new(RESIGN),
        }
    }

    /// The next position to publish of `stream`, if it ever published.
    pub async fn cursor(&self, stream: &str) -> redis::RedisResult<Option<u64>> {
        let mut conn = self.conn.clone();
        conn.hget(&self.cursor_key, stream).await
    }

    /// Moves the cursor from `expected` to `to` (`None` = unset); false if
    /// someone else moved it first.
    pub async fn compare_and_set(
        &self,
        stream: &str,
        expected: Option<u64>,
        to: Option<u64>,
    ) -> redis::RedisResult<bool> {
        let text = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut conn = self.conn.clone();
        let set: i64 = self
            .cas
            .key(&self.cursor_key)
            .arg(stream)
            .arg(text(expected))
            .arg(text(to))
            .invoke_async(&mut conn)
            .await?;
        Ok(set == 1)
    }

    /// Takes or renews the publishing lease for `ttl`; false if another
    /// replica holds it.
    pub async fn lead(&self, ttl: Duration) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let held: i64 = self.acquire.key(&self.lease_key).arg(&self.owner).arg(ms).invoke_async(&mut conn).await?;
        Ok(held == 1)
    }

    /// Gives the lease up (at shutdown), so another replica takes over at once.
    pub async fn resign(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self.resign.key(&self.lease_key).arg(&self.owner).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Every stream with released results this exchange has not confirmed
    /// (cursor below `released`, or no cursor yet), found by scanning the
    /// streams' meta keys. Also drops cursors of streams whose state expired.
    pub async fn scan(&self) -> redis::RedisResult<Vec<String>> {
        let mut dirty = Vec::new();
        for master in self.conn.masters().await? {
            let mut position: u64 = 0;
            loop {
                let (next, _, page) = self.scan_page(&master, position).await?;
                dirty.extend(
                    page.into_iter()
                        .filter(|(_, released, cursor)| released.unwrap_or(0) != cursor.unwrap_or(0))
                        .map(|(stream, _, _)| stream),
                );
                position = next;
                if position == 0 {
                    break;
                }
            }
        }
        self.drop_expired_cursors().await?;
        Ok(dirty)
    }

    /// One SCAN page of the streams' meta keys on `master` from `position`:
    /// the next position, how many keys the page held, and per stream its
    /// `released` count and this exchange's cursor (either may be absent).
    async fn scan_page(
        &self,
        master: &Master,
        position: u64,
    ) -> redis::RedisResult<(u64, usize, Vec<(String, Option<u64>, Option<u64>)>)> {
        let (next, found): (u64, Vec<String>) = self
            .conn
            .query_on(
                master,
                redis::cmd("SCAN").arg(position).arg("MATCH").arg(keys::meta("*")).arg("COUNT").arg(SCAN_COUNT),
            )
            .await?;
        let streams: Vec<String> = found.iter().filter_map(|key| stream_of_meta(key)).collect();
        if streams.is_empty() {
            return Ok((next, found.len(), Vec::new()));
        }
        // One command per stream (each meta is in its stream's slot), sent at once.
        let released: Vec<Option<u64>> = try_join_all(streams.iter().map(|stream| {
            let mut conn = self.conn.clone();
            async move { conn.hget(keys::meta(stream), "released").await }
        }))
        .await?;
        let mut conn = self.conn.clone();
        let cursors: Vec<Option<u64>> =
            redis::cmd("HMGET").arg(&self.cursor_key).arg(&streams).query_async(&mut conn).await?;
        let page = streams
            .into_iter()
            .zip(released)
            .enumerate()
            .map(|(i, (stream, released))| (stream, released, cursors.get(i).copied().flatten()))
            .collect();
        Ok((next, found.len(), page))
    }

    /// Deletes cursor fields whose stream has no state left.
    async fn drop_expired_cursors(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let mut position: u64 = 0;
        loop {
            let (next, pairs): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&self.cursor_key)
                .arg(position)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await?;
            let fields: Vec<(String, String)> =
                pairs.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
            if !fields.is_empty() {
                let exists: Vec<bool> = try_join_all(fields.iter().map(|(stream, _)| {
                    let mut conn = self.conn.clone();
                    async move { conn.exists(keys::meta(stream)).await }
                }))
                .await?;
                for ((stream, cursor), exists) in fields.iter().zip(exists) {
                    if !exists {
                        let expected = cursor.parse().ok();
                        self.compare_and_set(stream, expected, None).await?;
                    }
                }
            }
            position = next;
            if position == 0 {
                return Ok(());
            }
        }
    }
}

impl Outbox {
    /// The outbox lag of this exchange: released results the broker has not
    /// confirmed, summed over the streams found by scanning at most
    /// `max_keys` meta keys (a bound on the cost of one sample; a deployment
    /// with more streams gets a lower bound). Read-only, unlike [`Self::scan`].
    pub async fn lag(&self, max_keys: usize) -> redis::RedisResult<u64> {
        let (mut scanned, mut lag) = (0usize, 0u64);
        for master in self.conn.masters().await? {
            let mut position = 0u64;
            loop {
                let (next, keys_seen, page) = self.scan_page(&master, position).await?;
                scanned += keys_seen;
                for (_, released, cursor) in page {
                    lag = lag.saturating_add(unconfirmed(released.unwrap_or(0), cursor));
                }
                position = next;
                if scanned >= max_keys {
                    return Ok(lag);
                }
                if position == 0 {
                    break;
                }
            }
        }
        Ok(lag)
    }
}

/// Released results of one stream not yet confirmed: positions from its
/// cursor (none yet: 0) up to `released`. A cursor past `released` means the
/// stream expired and started again under the same id; the publisher then
/// publishes it from 0, so all of it is unconfirmed.
fn unconfirmed(released: u64, cursor: Option<u64>) -> u64 {
    match cursor.unwrap_or(0) {
        cursor if cursor > released => released,
        cursor => released - cursor,
    }
}

/// The stream id of a meta key `ordo:{<stream>}:meta`.
fn stream_of_meta(key: &str) -> Option<String> {
    key.strip_prefix("ordo:{")?.strip_suffix("}:meta").map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_released_minus_confirmed_per_stream() {
        assert_eq!(unconfirmed(0, None), 0);
        assert_eq!(unconfirmed(12, None), 12, "never published: everything released is unconfirmed");
        assert_eq!(unconfirmed(12, Some(5)), 7);
        assert_eq!(unconfirmed(12, Some(12)), 0);
        assert_eq!(unconfirmed(3, Some(9)), 3, "a restarted stream is published again from 0");
    }

    #[test]
    fn meta_keys_name_their_stream() {
        assert_eq!(stream_of_meta(&keys::meta("a:b}c")).as_deref(), Some("a:b}c"));
        assert_eq!(stream_of_meta("ordo:{x}:log"), None);
    }
}
