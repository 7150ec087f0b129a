//! Reads of a stream's reorder state (written only by the reassembler).
//! A read that fails because Redis just restarted (the connection broke) is
//! retried, bounded and jittered, before the event is rejected.

use ordo_core::keys;
use ordo_proto::v1::OrderingMode;
use ordo_runtime::redis_conn::RedisConn;

#[derive(Debug, Clone, Copy)]
pub struct StreamMeta {
    /// Lowest unreleased sequence.
    pub next: u64,
    /// Next release position.
    pub released: u64,
    /// The stream's mode, if any result was stored yet.
    pub mode: Option<OrderingMode>,
}

pub async fn read(conn: &RedisConn, stream: &str) -> redis::RedisResult<StreamMeta> {
    let mut command = redis::cmd("HMGET");
    command.arg(keys::meta(stream)).arg(&["next", "released", "mode"]);
    let (next, released, mode): (Option<u64>, Option<u64>, Option<u8>) = ordo_runtime::redis_conn::call(|| {
        let mut conn = conn.clone();
        let command = &command;
        async move { command.query_async(&mut conn).await }
    })
    .await?;
    Ok(StreamMeta {
        next: next.unwrap_or(0),
        released: released.unwrap_or(0),
        mode: mode.map(|m| if m == 2 { OrderingMode::Unordered } else { OrderingMode::Ordered }),
    })
}

/// The mode a stream runs in: the stored one, else the one its event asks for.
pub fn effective_mode(stored: Option<OrderingMode>, requested: OrderingMode) -> OrderingMode {
    match stored {
        Some(mode) => mode,
        None if requested == OrderingMode::Unordered => OrderingMode::Unordered,
        None => OrderingMode::Ordered,
    }
}
