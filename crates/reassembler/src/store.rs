//! The Redis side of the reassembler: the release script, reads of a
//! stream's reorder state and of the dead-letter log. This module owns every
//! write to reorder state and to the dead-letter log.

use std::collections::HashMap;

use ordo_core::keys;
use ordo_proto::v1::{OrderingMode, StreamState};
use redis::aio::ConnectionManager;

/// Every stream's pending hash ([`keys::pending`]); braces are literal in a SCAN pattern.
const PENDING_PATTERN: &str = "ordo:{*}:pend";

/// One completed result on its way into Redis.
#[derive(Debug, Clone)]
pub struct Item {
    pub stream_id: String,
    pub sequence: u64,
    pub mode: OrderingMode,
    /// Encoded `EventResult`.
    pub body: Vec<u8>,
    /// Encoded `DeadLetter` recorded if (and only if) this result is the one
    /// stored; empty for none.
    pub dead_letter: Vec<u8>,
}

/// One entry of the dead-letter log, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// The entry id (`<ms>-<n>`), the dead letter's id.
    pub id: String,
    pub stream_id: String,
    pub sequence: u64,
    /// Encoded `DeadLetter` (its `id` unset).
    pub letter: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Released results kept per stream log.
    pub retention: u64,
    /// Idle time after which a stream's keys expire (0 = never).
    pub ttl_ms: u64,
    /// Dead letters kept (approximate, trimmed in blocks).
    pub dead_letter_retention: u64,
}

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    script: redis::Script,
    config: StoreConfig,
}

impl Store {
    pub fn new(conn: ConnectionManager, config: StoreConfig) -> Self {
        Self { conn, script: redis::Script::new(include_str!("release.lua")), config }
    }

    /// Stores and releases `items` in one atomic script call. Returns, per
    /// item and in input order, whether it was new (`false` = duplicate).
    pub async fn apply(&self, items: &[Item]) -> redis::RedisResult<Vec<bool>> {
        // Group by stream (first-seen order) because the script walks streams.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            groups
                .entry(item.stream_id.as_str())
                .or_insert_with(|| {
                    order.push(item.stream_id.as_str());
                    Vec::new()
                })
                .push(i);
        }
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(keys::DEAD_LETTERS)
            .arg(self.config.retention)
            .arg(keys::RELEASED_CHANNEL)
            .arg(self.config.ttl_ms)
            .arg(self.config.dead_letter_retention);
        let mut input_order = Vec::with_capacity(items.len());
        for stream in &order {
            let members = &groups[stream];
            invocation.key(keys::meta(stream)).key(keys::pending(stream)).key(keys::log(stream));
            let mode = match items[members[0]].mode {
                OrderingMode::Unordered => "2",
                _ => "1",
            };
            invocation.arg(*stream).arg(mode).arg(members.len());
            for &i in members {
                invocation.arg(items[i].sequence).arg(items[i].body.as_slice()).arg(items[i].dead_letter.as_slice());
                input_order.push(i);
            }
        }
        let mut conn = self.conn.clone();
        let flags: Vec<u8> = invocation.invoke_async(&mut conn).await?;
        let mut accepted = vec![false; items.len()];
        for (flag, &i) in flags.iter().zip(&input_order) {
            accepted[i] = *flag == b'1';
        }
        Ok(accepted)
    }

    /// Sums the pending hashes of every stream (results stored and waiting
    /// for a predecessor; in UNORDERED streams, released markers above the
    /// contiguous floor), scanning at most `max_keys` keys: `(streams, results)`.
    pub async fn pending_results(&self, max_keys: usize) -> redis::RedisResult<(u64, u64)> {
        let mut conn = self.conn.clone();
        let (mut cursor, mut streams, mut results) = (0u64, 0u64, 0u64);
        let mut scanned = 0usize;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(PENDING_PATTERN)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.hlen(key);
                }
                let lengths: Vec<u64> = pipe.query_async(&mut conn).await?;
                streams += lengths.iter().filter(|&&n| n > 0).count() as u64;
                results += lengths.iter().sum::<u64>();
            }
            scanned += keys.len();
            cursor = next;
            if cursor == 0 || scanned >= max_keys {
                return Ok((streams, results));
            }
        }
    }

    /// The reorder state of one stream.
    pub async fn stream_state(&self, stream_id: &str) -> redis::RedisResult<StreamState> {
        let mut conn = self.conn.clone();
        let (meta, pending, oldest): (Vec<Option<u64>>, u64, redis::streams::StreamRangeReply) = redis::pipe()
            .cmd("HMGET")
            .arg(keys::meta(stream_id))
            .arg(&["next", "released", "mode"])
            .hlen(keys::pending(stream_id))
            .xrange_count(keys::log(stream_id), "-", "+", 1)
            .query_async(&mut conn)
            .await?;
        let field = |i: usize| meta.get(i).copied().flatten().unwrap_or(0);
        let released = field(1);
        let oldest_retained = oldest.ids.first().and_then(|entry| keys::position_of(&entry.id)).unwrap_or(released);
        Ok(StreamState {
            stream_id: stream_id.to_owned(),
            mode: match field(2) {
                2 => OrderingMode::Unordered as i32,
                _ => OrderingMode::Ordered as i32,
            },
            next_sequence: field(0),
            released,
            pending,
            oldest_retained,
        })
    }

    /// Up to `count` dead letters after entry `after` (exclusive; `None`:
    /// from the oldest), oldest first. `after` must be a valid stream id.
    pub async fn dead_letters_after(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> redis::RedisResult<Vec<DeadLetterEntry>> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys::DEAD_LETTERS)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.iter().filter_map(entry).collect())
    }

    /// The dead letter with entry id `id`, if still retained.
    pub async fn dead_letter(&self, id: &str) -> redis::RedisResult<Option<DeadLetterEntry>> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(keys::DEAD_LETTERS).arg(id).arg(id).query_async(&mut conn).await?;
        Ok(reply.ids.iter().find_map(entry))
    }
}

/// A dead-letter log entry; `None` (logged) for one the script did not write.
fn entry(raw: &redis::streams::StreamId) -> Option<DeadLetterEntry> {
    let bytes = |field: &str| match raw.map.get(field) {
        Some(redis::Value::BulkString(bytes)) => Some(bytes.clone()),
        Some(redis::Value::SimpleString(text)) => Some(text.clone().into_bytes()),
        _ => None,
    };
    let parsed = (|| {
        let stream_id = String::from_utf8(bytes("stream")?).ok()?;
        let sequence = std::str::from_utf8(&bytes("sequence")?).ok()?.parse().ok()?;
        Some(DeadLetterEntry { id: raw.id.clone(), stream_id, sequence, letter: bytes("letter")? })
    })();
    if parsed.is_none() {
        tracing::warn!(id = %raw.id, key = keys::DEAD_LETTERS, "skipping a malformed dead-letter entry");
    }
    parsed
}
