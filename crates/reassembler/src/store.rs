//! The Redis side of the reassembler: the release script, reads of a
//! stream's reorder state and of the dead-letter log. This module owns every
//! write to reorder state and to the dead-letter log.
//!
//! Each call's releases are SPUBLISHed to the sharded release channels of
//! its streams' slots ([`keys::release_channel_slot`]), one message per
//! channel, on a single node and on a cluster alike.
//! On a single node a batch is one script call and its dead letters go to
//! the global log. On a Redis Cluster one script call may touch one hash
//! slot only, so a batch is split by the slot of its streams and the calls
//! (one per slot) are sent at once, each with its slot's dead-letter log
//! ([`keys::dead_letters`]). Each call is retried on its own, so a
//! transient error of one slot (a failover) does not re-send the others.
//!
//! With `wait_replicas` set, every call is followed, on the same connection,
//! by `WAIT wait_replicas timeout`; fewer acknowledging replicas fail the
//! call, so its senders redeliver (harmless: the first result wins) instead
//! of being acked for a write that a failover could still lose.

use std::collections::HashMap;

use ordo_core::keys;
use ordo_proto::v1::{OrderingMode, StreamState};
use ordo_runtime::redis_conn::{self, RedisConn};

/// Every stream's pending hash ([`keys::pending`]); braces are literal in a SCAN pattern.
const PENDING_PATTERN: &str = "ordo:{*}:pend";
/// Every per-slot dead-letter log ([`keys::dead_letters`]), on a cluster.
const DEAD_LETTERS_PATTERN: &str = "ordo:dlq:{*}";

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
    /// Idle time after which a stream's pending hash and log expire (0 = never).
    pub ttl_ms: u64,
    /// How much longer its meta (the dedup tombstone) lives; used only with
    /// `ttl_ms` above 0.
    pub tombstone_ms: u64,
    /// Dead letters kept (approximate, trimmed in blocks).
    pub dead_letter_retention: u64,
    /// Replicas that must acknowledge each script call's writes (`WAIT`)
    /// before its results are acked; 0 = do not wait.
    pub wait_replicas: u32,
    /// How long `WAIT` may block, in ms (0 would block forever: never used).
    pub wait_timeout_ms: u64,
}

#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
    script: redis::Script,
    config: StoreConfig,
}

impl Store {
    pub fn new(conn: impl Into<RedisConn>, config: StoreConfig) -> Self {
        Self { conn: conn.into(), script: redis::Script::new(include_str!("release.lua")), config }
    }

    /// Stores and releases `items`: one atomic script call on a single node,
    /// one per slot on a cluster (see the module docs), each retried on
    /// transient errors. Returns, per item and in input order, whether it was
    /// new (`false` = duplicate); an error if any call finally failed (the
    /// other calls' results are stored: a redelivery finds them duplicates).
    pub async fn apply(&self, items: &[Item]) -> redis::RedisResult<Vec<bool>> {
        if !self.conn.is_cluster() {
            let all: Vec<usize> = (0..items.len()).collect();
            let flags = self.apply_retrying(items, &all, None).await?;
            let mut accepted = vec![false; items.len()];
            for (&i, flag) in all.iter().zip(flags) {
                accepted[i] = flag;
            }
            return Ok(accepted);
        }
        let mut slots: Vec<u16> = Vec::new();
        let mut by_slot: HashMap<u16, Vec<usize>> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let slot = keys::stream_slot(&item.stream_id);
            by_slot
                .entry(slot)
                .or_insert_with(|| {
                    slots.push(slot);
                    Vec::new()
                })
                .push(i);
        }
        let calls = slots.iter().map(|slot| {
            let members = &by_slot[slot];
            async move { (members, self.apply_retrying(items, members, Some(*slot)).await) }
        });
        let mut accepted = vec![false; items.len()];
        let mut failed = None;
        for (members, outcome) in futures::future::join_all(calls).await {
            match outcome {
                Ok(flags) => {
                    for (&i, flag) in members.iter().zip(flags) {
                        accepted[i] = flag;
                    }
                }
                Err(error) => failed = Some(error),
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(accepted),
        }
    }

    /// One script call for `items[members]` (all in `slot` on a cluster),
    /// retried on transient errors: flags in `members` order.
    async fn apply_retrying(
        &self,
        items: &[Item],
        members: &[usize],
        slot: Option<u16>,
    ) -> redis::RedisResult<Vec<bool>> {
        ordo_runtime::redis_conn::call(|| async {
            let started = std::time::Instant::now();
            let result = self.apply_once(items, members, slot).await;
            match &result {
                Ok(_) => crate::metrics::SCRIPT_DURATION.record(started.elapsed().as_secs_f64()),
                Err(_) => crate::metrics::REDIS_ERRORS.increment(1),
            }
            result
        })
        .await
    }

    async fn apply_once(&self, items: &[Item], members: &[usize], slot: Option<u16>) -> redis::RedisResult<Vec<bool>> {
        // Group by stream (first-seen order) because the script walks streams.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for &i in members {
            let item = &items[i];
            groups
                .entry(item.stream_id.as_str())
                .or_insert_with(|| {
                    order.push(item.stream_id.as_str());
                    Vec::new()
                })
                .push(i);
        }
        let dead_letters = match slot {
            None => keys::DEAD_LETTERS.to_owned(),
            Some(slot) => keys::dead_letters(slot),
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(dead_letters)
            .arg(self.config.retention)
            .arg(self.config.ttl_ms)
            .arg(self.config.dead_letter_retention)
            .arg(self.config.ttl_ms.saturating_add(self.config.tombstone_ms));
        let mut input_order = Vec::with_capacity(members.len());
        let cluster = self.conn.is_cluster();
        for stream in &order {
            let members = &groups[stream];
            invocation.key(keys::meta(stream)).key(keys::pending(stream)).key(keys::log(stream));
            let mode = match items[members[0]].mode {
                OrderingMode::Unordered => "2",
                _ => "1",
            };
            // Releases go to a channel of the stream's slot (of its group of
            // slots on one node), so a push-gateway hears only what it follows;
            // the script publishes once per channel of the call.
            let channel = keys::stream_release_channel(stream, cluster);
            invocation.arg(*stream).arg(channel).arg(mode).arg(members.len());
            for &i in members {
                invocation.arg(items[i].sequence).arg(items[i].body.as_slice()).arg(items[i].dead_letter.as_slice());
                input_order.push(i);
            }
        }
        let mut conn = self.conn.clone();
        let flags: Vec<u8> = if self.config.wait_replicas == 0 {
            invocation.invoke_async(&mut conn).await?
        } else {
            self.invoke_and_wait(&invocation, &mut conn).await?
        };
        // Flags come in `input_order`; answer in `members` order.
        let position: HashMap<usize, usize> = members.iter().enumerate().map(|(k, &i)| (i, k)).collect();
        let mut accepted = vec![false; members.len()];
        for (flag, i) in flags.iter().zip(&input_order) {
            accepted[position[i]] = *flag == b'1';
        }
        Ok(accepted)
    }

    /// The script call, then `WAIT` on the same connection (one pipeline, so
    /// on a cluster both go to the slot's master); loads the script once if
    /// Redis does not have it (after a restart or a failover).
    async fn invoke_and_wait(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        conn: &mut RedisConn,
    ) -> redis::RedisResult<Vec<u8>> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation)
            .cmd("WAIT")
            .arg(self.config.wait_replicas)
            .arg(self.config.wait_timeout_ms.max(1));
        let (flags, replicas): (Vec<u8>, u32) = match pipe.query_async(conn).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                invocation.load_async(conn).await?;
                pipe.query_async(conn).await?
            }
            other => other?,
        };
        if replicas < self.config.wait_replicas {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "script writes not acknowledged by enough replicas",
                format!("{replicas} of {} within {} ms", self.config.wait_replicas, self.config.wait_timeout_ms),
            )));
        }
        Ok(flags)
    }

    /// Sums the pending hashes of every stream (results stored and waiting
    /// for a predecessor; in UNORDERED streams, released markers above the
    /// contiguous floor) in one whole pass over the keyspace:
    /// `(streams, results)`. On a cluster every master is scanned (each
    /// pending hash lives on the master of its stream's slot), one after the
    /// other. Its cost grows with the keyspace; the metrics sampler uses
    /// [`PendingScan`] instead, which spreads a pass over several samples.
    pub async fn pending_results(&self) -> redis::RedisResult<(u64, u64)> {
        let mut scan = PendingScan::default();
        loop {
            if let Some(counted) = scan.step(self, usize::MAX).await? {
                return Ok(counted);
            }
        }
    }

    /// HLEN of each of `keys`: one pipeline on a single node; on a cluster
    /// one command per key (the keys span slots), sent at once.
    async fn hash_lengths(&self, keys: &[String]) -> redis::RedisResult<Vec<u64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if !self.conn.is_cluster() {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.hlen(key);
            }
            return pipe.query_async(&mut self.conn.clone()).await;
        }
        futures::future::try_join_all(keys.iter().map(|key| {
            let mut conn = self.conn.clone();
            async move { redis::cmd("HLEN").arg(key).query_async::<u64>(&mut conn).await }
        }))
        .await
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

    /// Whether Redis is a cluster (per-slot dead-letter logs and channels).
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The dead-letter logs there are: on a single node the global log
    /// (`None`: no slot); on a cluster every per-slot log
    /// ([`keys::dead_letters`]) that exists on some master (SCAN of every
    /// master), with its slot, in slot order.
    pub async fn dead_letter_logs(&self) -> redis::RedisResult<Vec<(Option<u16>, String)>> {
        if !self.conn.is_cluster() {
            return Ok(vec![(None, keys::DEAD_LETTERS.to_owned())]);
        }
        let logs = redis_conn::scan_keys(&self.conn, DEAD_LETTERS_PATTERN, 1000).await?;
        let mut logs: Vec<(Option<u16>, String)> = logs
            .into_iter()
            // Only the keys the store writes (`ordo:dlq:{<tag>}`), each
            // under its slot.
            .filter_map(|key| {
                let slot = keys::key_slot(key.as_bytes());
                (key == keys::dead_letters(slot)).then_some((Some(slot), key))
            })
            .collect();
        logs.sort();
        Ok(logs)
    }

    /// Up to `count` entries of dead-letter log `log` from `start` (an
    /// XRANGE start: `-`, an entry id, or `(` and an entry id for after
    /// it), oldest first.
    pub async fn dead_letters_from(
        &self,
        log: &str,
        start: &str,
        count: usize,
    ) -> redis::RedisResult<Vec<DeadLetterEntry>> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(log).arg(start).arg("+").arg("COUNT").arg(count).query_async(&mut conn).await?;
        Ok(reply.ids.iter().filter_map(|raw| entry(log, raw)).collect())
    }

    /// Up to `count` entries of the global dead-letter log (a single node's)
    /// after entry `after` (exclusive; `None`: from the oldest).
    pub async fn dead_letters_after(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> redis::RedisResult<Vec<DeadLetterEntry>> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        self.dead_letters_from(keys::DEAD_LETTERS, &start, count).await
    }

    /// The entry `id` of dead-letter log `log`, if still retained.
    pub async fn dead_letter(&self, log: &str, id: &str) -> redis::RedisResult<Option<DeadLetterEntry>> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(log).arg(id).arg(id).query_async(&mut conn).await?;
        Ok(reply.ids.iter().find_map(|raw| entry(log, raw)))
    }
}

/// A dead-letter log entry; `None` (logged) for one the script did not write.
fn entry(log: &str, raw: &redis::streams::StreamId) -> Option<DeadLetterEntry> {
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
        tracing::warn!(id = %raw.id, key = log, "skipping a malformed dead-letter entry");
    }
    parsed
}

/// One pass of the pending-results sample over the keyspace, resumable: each
/// [`PendingScan::step`] visits a bounded number of keys (SCAN's `COUNT` per
/// call, the calls until the bound), so a Redis holding millions of streams'
/// keys costs each sample the same, and a pass spans as many samples as it
/// needs. On a cluster the masters are scanned one after the other.
#[derive(Debug, Default)]
pub struct PendingScan {
    /// The masters of this pass (read at its start), and the one being scanned.
    masters: Vec<redis_conn::Master>,
    master: usize,
    cursor: u64,
    streams: u64,
    results: u64,
}

/// SCAN's `COUNT` per call: about how many keys one call visits.
const SCAN_COUNT: usize = 1000;

impl PendingScan {
    /// Scans on for about `max_keys` keys visited; `Some((streams, results))`
    /// once the pass has covered the whole keyspace (the next step starts a
    /// new pass). An error ends the pass: the next step starts over.
    pub async fn step(&mut self, store: &Store, max_keys: usize) -> redis::RedisResult<Option<(u64, u64)>> {
        let stepped = self.scan(store, max_keys).await;
        if !matches!(stepped, Ok(None)) {
            *self = Self::default();
        }
        stepped
    }

    async fn scan(&mut self, store: &Store, max_keys: usize) -> redis::RedisResult<Option<(u64, u64)>> {
        if self.masters.is_empty() {
            self.masters = store.conn.masters().await?;
        }
        let mut visited = 0usize;
        while let Some(master) = self.masters.get(self.master) {
            let (next, keys): (u64, Vec<String>) = store
                .conn
                .query_on(
                    master,
                    redis::cmd("SCAN").arg(self.cursor).arg("MATCH").arg(PENDING_PATTERN).arg("COUNT").arg(SCAN_COUNT),
                )
                .await?;
            let lengths = store.hash_lengths(&keys).await?;
            self.streams += lengths.iter().filter(|&&n| n > 0).count() as u64;
            self.results += lengths.iter().sum::<u64>();
            self.cursor = next;
            if next == 0 {
                self.master += 1;
            }
            visited = visited.saturating_add(SCAN_COUNT);
            if visited >= max_keys && self.master < self.masters.len() {
                return Ok(None);
            }
        }
        Ok(Some((self.streams, self.results)))
    }
}
