//! Reads of a result already stored for (stream, sequence): waiting for its
//! predecessors (the stream's pending hash) or released (its log; in ORDERED
//! mode the release position is the sequence). The reassembler keeps the
//! first result of each sequence, so this is the one answer every caller of
//! that sequence must get.

use ordo_core::keys;
use ordo_proto::v1::{EventResult, OrderingMode};
use ordo_runtime::redis_conn::RedisConn;
use prost::Message;

/// The stored result of (stream, sequence), if there is one. UNORDERED
/// streams can only be looked up while pending (their log is by position).
pub async fn read(
    conn: &RedisConn,
    stream: &str,
    sequence: u64,
    mode: OrderingMode,
) -> redis::RedisResult<Option<EventResult>> {
    let mut conn = conn.clone();
    let id = keys::log_id(sequence);
    let (pending, logged): (Option<Vec<u8>>, redis::streams::StreamRangeReply) = redis::pipe()
        .hget(keys::pending(stream), sequence)
        .xrange(keys::log(stream), &id, &id)
        .query_async(&mut conn)
        .await?;
    // An UNORDERED stream's pending entries are empty markers of released sequences.
    if let Some(body) = pending.filter(|b| !b.is_empty())
        && let Ok(result) = EventResult::decode(body.as_slice())
    {
        return Ok(Some(result));
    }
    if mode == OrderingMode::Unordered {
        return Ok(None);
    }
    let body = logged.ids.first().and_then(|entry| entry.get::<Vec<u8>>("r"));
    Ok(body.and_then(|b| EventResult::decode(b.as_slice()).ok()).filter(|r| r.sequence == sequence))
}
