//! The sink: every released result of key K is published to `<prefix>.K`,
//! in release order, with `Nats-Msg-Id: <K>:<position>`. As in the AMQP
//! outbox, the release logs are the outbox: per key a cursor in Redis (the
//! next position to publish, `ordo:{source:N}:sink`) moves only after
//! JetStream acknowledged every message before it, by compare-and-set. A key
//! publishes one message at a time (the next only after the previous PubAck),
//! so a failed publish can never let a later position overtake it; keys
//! publish in parallel. After a restart (of the source, NATS or Redis) the
//! sink resumes from the cursors; what it publishes twice (acknowledged but
//! the cursor not yet moved) JetStream drops by its message id, within the
//! results stream's duplicate window.
//!
//! It wakes for a key when one of its results comes back on the `Process`
//! call, and sweeps every key the source has numbered every `--sink-sweep`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, stream},
};
use futures::StreamExt as _;
use ordo_core::keys;
use ordo_proto::{EventResult, ResultStatus};
use prost::Message as _;
use redis::streams::StreamRangeReply;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Shared, metrics};

/// Results read from a release log per round trip.
const PAGE: usize = 256;
/// Keys published at once.
const PARALLEL_KEYS: usize = 16;
/// How long one PubAck may take before the publish counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The results stream's duplicate window (when the sink creates it).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The field of a release-log entry holding the encoded result.
const RESULT_FIELD: &str = "r";

/// Headers of each published result besides `Nats-Msg-Id`.
pub const STATUS_HEADER: &str = "Ordo-Status";
pub const SEQUENCE_HEADER: &str = "Ordo-Sequence";
pub const POSITION_HEADER: &str = "Ordo-Position";
pub const ERROR_HEADER: &str = "Ordo-Error";

/// The sink's settings.
#[derive(Debug, Clone)]
pub(crate) struct Sink {
    pub prefix: String,
    pub stream: String,
    pub sweep: Duration,
}

impl Sink {
    /// Publishes until `stop`, then finishes what is released (bounded by the drain).
    pub(crate) async fn run(
        self,
        shared: Arc<Shared>,
        js: jetstream::Context,
        mut wake: mpsc::Receiver<String>,
        stop: CancellationToken,
    ) {
        let mut backoff = ordo_runtime::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let created = js
                .get_or_create_stream(stream::Config {
                    name: self.stream.clone(),
                    subjects: vec![format!("{}.>", self.prefix)],
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, stream = %self.stream, "cannot find or create the results stream; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = backoff.wait() => {}
                    }
                }
            }
        }
        let mut tick = tokio::time::interval(self.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let keys: BTreeSet<String> = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    // Whatever was released by now goes out before the source stops.
                    self.sweep_all(&shared, &js).await;
                    return;
                }
                key = wake.recv() => {
                    let Some(key) = key else { return };
                    let mut keys = BTreeSet::from([key]);
                    while let Ok(more) = wake.try_recv() {
                        keys.insert(more);
                    }
                    keys
                }
                _ = tick.tick() => {
                    self.sweep_all(&shared, &js).await;
                    continue;
                }
            };
            self.publish_keys(&shared, &js, keys.into_iter().collect()).await;
        }
    }

    /// Every key the source numbered; samples the lag.
    async fn sweep_all(&self, shared: &Shared, js: &jetstream::Context) {
        let keys = match shared.mapping.keys().await {
            Ok(keys) => keys.into_iter().map(|(key, _)| key).collect(),
            Err(error) => {
                metrics::REDIS_ERRORS.increment(1);
                tracing::debug!(%error, "sink: cannot list the keys");
                return;
            }
        };
        let lag = self.publish_keys(shared, js, keys).await;
        metrics::SINK_LAG.set(lag as f64);
    }

    /// Publishes what each key has released past its cursor; returns how
    /// many results are left unpublished (failures).
    async fn publish_keys(&self, shared: &Shared, js: &jetstream::Context, keys: Vec<String>) -> u64 {
        futures::stream::iter(keys)
            .map(|key| async move {
                match self.publish_key(shared, js, &key).await {
                    Ok(left) => left,
                    Err(error) => {
                        tracing::warn!(%key, error = format!("{error:#}"), "sink: publishing stopped; resumes from the cursor");
                        1
                    }
                }
            })
            .buffer_unordered(PARALLEL_KEYS)
            .fold(0u64, |sum, left| async move { sum + left })
            .await
    }

    /// Publishes `key`'s released results from its cursor on, one at a time,
    /// moving the cursor after each page. Ok(0) when it caught up.
    async fn publish_key(&self, shared: &Shared, js: &jetstream::Context, key: &str) -> anyhow::Result<u64> {
        let stream_id = shared.stream_id(key);
        let subject = format!("{}.{key}", self.prefix);
        loop {
            let cursor = shared.mapping.cursor(key).await?;
            let from = cursor.unwrap_or(0);
            let (released, page) = read_log(shared, &stream_id, from).await?;
            if page.is_empty() {
                return Ok(released.saturating_sub(from));
            }
            let mut next = from;
            for (position, result) in page {
                if position < next {
                    continue;
                }
                if position > next {
                    tracing::warn!(%key, wanted = next, oldest = position, "sink: results were trimmed from the release log before they were published");
                }
                let headers = headers(key, position, &result);
                let ack = js
                    .publish_with_headers(subject.clone(), headers, result.payload.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("publish to {subject}: {e}"))?;
                tokio::time::timeout(PUBLISH_TIMEOUT, ack)
                    .await
                    .map_err(|_| anyhow::anyhow!("no PubAck for {subject} within {PUBLISH_TIMEOUT:?}"))?
                    .map_err(|e| anyhow::anyhow!("PubAck for {subject}: {e}"))?;
                metrics::SINK_PUBLISHED.increment(1);
                next = position + 1;
            }
            if !shared.mapping.advance(key, cursor, next).await? {
                // Someone else moved it (a second sink of the same name): read it again.
                tracing::warn!(%key, "sink: the cursor moved under us");
            }
        }
    }
}

/// The `Nats-Msg-Id` of a published result: `<key>:<position>`.
pub fn message_id(key: &str, position: u64) -> String {
    format!("{key}:{position}")
}

fn headers(key: &str, position: u64, result: &EventResult) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", message_id(key, position).as_str());
    let status = ResultStatus::try_from(result.status).map(|s| s.as_str_name()).unwrap_or("RESULT_STATUS_UNSPECIFIED");
    headers.insert(STATUS_HEADER, status.trim_start_matches("RESULT_STATUS_"));
    headers.insert(SEQUENCE_HEADER, result.sequence.to_string().as_str());
    headers.insert(POSITION_HEADER, position.to_string().as_str());
    if !result.error.is_empty() {
        // Header values are one line.
        let error: String = result.error.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
        headers.insert(ERROR_HEADER, error.as_str());
    }
    headers
}

/// The stream's `released` count and its log from `from` (one page).
async fn read_log(shared: &Shared, stream_id: &str, from: u64) -> anyhow::Result<(u64, Vec<(u64, EventResult)>)> {
    let mut pipe = redis::pipe();
    pipe.hget(keys::meta(stream_id), "released").xrange_count(keys::log(stream_id), keys::log_id(from), "+", PAGE);
    let mut conn = shared.mapping.connection();
    let (released, page): (Option<u64>, StreamRangeReply) = pipe.query_async(&mut conn).await.inspect_err(|_| {
        metrics::REDIS_ERRORS.increment(1);
    })?;
    let mut results = Vec::with_capacity(page.ids.len());
    for entry in page.ids {
        let position = keys::position_of(&entry.id)
            .ok_or_else(|| anyhow::anyhow!("release log entry {} is not ours", entry.id))?;
        let Some(redis::Value::BulkString(body)) = entry.map.get(RESULT_FIELD) else {
            anyhow::bail!("release log entry {} of {stream_id} has no result", entry.id);
        };
        let result = EventResult::decode(body.as_slice())
            .map_err(|e| anyhow::anyhow!("release log entry {} of {stream_id}: {e}", entry.id))?;
        results.push((position, result));
    }
    Ok((released.unwrap_or(0), results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_result_carries_its_id_status_and_positions() {
        let result = EventResult {
            status: ResultStatus::Failed as i32,
            sequence: 7,
            error: "boom\nagain".into(),
            ..Default::default()
        };
        let headers = headers("acct-1", 7, &result);
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("acct-1:7"));
        assert_eq!(headers.get(STATUS_HEADER).map(|v| v.as_str()), Some("FAILED"));
        assert_eq!(headers.get(SEQUENCE_HEADER).map(|v| v.as_str()), Some("7"));
        assert_eq!(headers.get(POSITION_HEADER).map(|v| v.as_str()), Some("7"));
        assert_eq!(headers.get(ERROR_HEADER).map(|v| v.as_str()), Some("boom again"));
    }
}
