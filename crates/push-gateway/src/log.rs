//! Reads of a stream's release log (written only by the reassembler).

use ordo_core::keys;
use ordo_proto::v1::EventResult;
use prost::Message;
use redis::{aio::ConnectionManager, streams::StreamRangeReply};

/// Entries read per round trip when catching up.
pub const PAGE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("position {wanted} of stream {stream:?} is older than retention (oldest retained: {oldest})")]
    Expired { stream: String, wanted: u64, oldest: u64 },
    #[error("corrupt log entry {id} of stream {stream:?}")]
    Corrupt { stream: String, id: String },
}

#[derive(Clone)]
pub struct Log {
    conn: ConnectionManager,
}

/// One page of the log.
#[derive(Debug, Default)]
pub struct Page {
    pub results: Vec<EventResult>,
    /// The stream's lowest unreleased sequence when the page was read.
    pub next_sequence: u64,
}

impl Log {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }

    /// Results from release position `from` on (at most [`PAGE`]). Fails with
    /// [`LogError::Expired`] when `from` was trimmed away.
    pub async fn read_from(&self, stream: &str, from: u64) -> Result<Page, LogError> {
        let mut conn = self.conn.clone();
        let (next, released, oldest, page): (Option<u64>, Option<u64>, StreamRangeReply, StreamRangeReply) =
            redis::pipe()
                .hget(keys::meta(stream), "next")
                .hget(keys::meta(stream), "released")
                .xrange_count(keys::log(stream), "-", "+", 1)
                .xrange_count(keys::log(stream), keys::log_id(from), "+", PAGE)
                .query_async(&mut conn)
                .await?;
        let released = released.unwrap_or(0);
        let oldest = match oldest.ids.first() {
            Some(entry) => keys::position_of(&entry.id).unwrap_or(0),
            None => released,
        };
        if from < oldest {
            return Err(LogError::Expired { stream: stream.to_owned(), wanted: from, oldest });
        }
        let mut results = Vec::with_capacity(page.ids.len());
        for entry in page.ids {
            let corrupt = || LogError::Corrupt { stream: stream.to_owned(), id: entry.id.clone() };
            let Some(redis::Value::BulkString(body)) = entry.map.get("r") else { return Err(corrupt()) };
            let mut result = EventResult::decode(body.as_slice()).map_err(|_| corrupt())?;
            // Older log entries carry their position in the id only.
            if let Some(position) = keys::position_of(&entry.id) {
                result.position = position;
            }
            results.push(result);
        }
        Ok(Page { results, next_sequence: next.unwrap_or(0) })
    }
}

impl Log {
    /// Fails with [`LogError::Expired`] if `from` is older than retention.
    pub async fn check(&self, stream: &str, from: u64) -> Result<(), LogError> {
        let mut conn = self.conn.clone();
        let (released, oldest): (Option<u64>, StreamRangeReply) = redis::pipe()
            .hget(keys::meta(stream), "released")
            .xrange_count(keys::log(stream), "-", "+", 1)
            .query_async(&mut conn)
            .await?;
        let oldest = match oldest.ids.first() {
            Some(entry) => keys::position_of(&entry.id).unwrap_or(0),
            None => released.unwrap_or(0),
        };
        if from < oldest {
            return Err(LogError::Expired { stream: stream.to_owned(), wanted: from, oldest });
        }
        Ok(())
    }
}
