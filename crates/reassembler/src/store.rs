//! The Redis side of the reassembler: the release script and reads of a
//! stream's reorder state. This module owns every write to reorder state.

use std::collections::HashMap;

use ordo_core::keys;
use ordo_proto::v1::{OrderingMode, StreamState};
use redis::aio::ConnectionManager;

/// One completed result on its way into Redis.
#[derive(Debug, Clone)]
pub struct Item {
    pub stream_id: String,
    pub sequence: u64,
    pub mode: OrderingMode,
    /// Encoded `EventResult`.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Released results kept per stream log.
    pub retention: u64,
    /// Idle time after which a stream's keys expire (0 = never).
    pub ttl_ms: u64,
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
        invocation.arg(self.config.retention).arg(keys::RELEASED_CHANNEL).arg(self.config.ttl_ms);
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
                invocation.arg(items[i].sequence).arg(items[i].body.as_slice());
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
}
