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

/// The one command that reads a stream's state.
fn query(stream: &str) -> redis::Cmd {
    let mut command = redis::cmd("HMGET");
    command.arg(keys::meta(stream)).arg(&["next", "released", "mode"]);
    command
}

type Fields = (Option<u64>, Option<u64>, Option<u8>);

fn meta_of((next, released, mode): Fields) -> StreamMeta {
    StreamMeta {
        next: next.unwrap_or(0),
        released: released.unwrap_or(0),
        mode: mode.map(|m| if m == 2 { OrderingMode::Unordered } else { OrderingMode::Ordered }),
    }
}

/// One stream's state (retried as [`ordo_runtime::redis_conn::call`] retries).
pub async fn read(conn: &RedisConn, stream: &str) -> redis::RedisResult<StreamMeta> {
    let mut metas = read_many(conn, &[stream]).await?;
    metas
        .pop()
        .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "no reply for a stream")))
}

/// The state of many streams, in their order, in one round trip (on a
/// cluster one per slot, sent at once): what a burst of events of new
/// streams needs before it can be admitted.
pub async fn read_many(conn: &RedisConn, streams: &[&str]) -> redis::RedisResult<Vec<StreamMeta>> {
    let commands: Vec<(u16, redis::Cmd)> = streams.iter().map(|s| (keys::stream_slot(s), query(s))).collect();
    let fields: Vec<Fields> = ordo_runtime::redis_conn::query_each(conn, &commands).await?;
    Ok(fields.into_iter().map(meta_of).collect())
}

/// The mode a stream runs in: the stored one, else the one its event asks for.
pub fn effective_mode(stored: Option<OrderingMode>, requested: OrderingMode) -> OrderingMode {
    match stored {
        Some(mode) => mode,
        None if requested == OrderingMode::Unordered => OrderingMode::Unordered,
        None => OrderingMode::Ordered,
    }
}
