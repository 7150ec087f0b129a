//! The reassembler inside another process. A worker or a harmonizer started
//! with `--store-results redis` stores its results through [`Local`] instead
//! of delivering them over `Deliver` to a reassembler: the same items (and
//! `reassembler.store` spans), the same batching, release script and
//! metrics, on a Redis connection of its own; one process hop (and one gRPC
//! encode and decode) less per result. The reassembler service is then
//! needed only for its read calls (`GetStream`, the dead letters) and for
//! the processes that still deliver to it.
//!
//! [`Local::store`] resolves once the result is in Redis, as
//! `ResultSink::deliver` resolves once a reassembler acked it: that is what
//! lets a worker ack its dispatch. A script call that fails even after the
//! store's own retries (Redis down for longer) is submitted again after a
//! growing delay, for as long as it takes; the caller's attempt waits, and
//! the harmonizer's `--event-timeout` re-dispatches it elsewhere meanwhile.

use std::time::Duration;

use ordo_proto::v1::Completed;
use ordo_runtime::{Shutdown, backoff::Backoff, redis_conn::RedisConn};

use crate::{
    batcher::{Batcher, Closed},
    config::StoreArgs,
    service,
    store::Store,
};

/// Stores results in Redis from this process. Cheap to clone; the batching
/// loop ends once the last clone is dropped (after storing what it holds).
#[derive(Clone)]
pub struct Local {
    batcher: Batcher,
}

impl Local {
    /// Starts the batching loop on `conn` (one node or a cluster). Must be
    /// called within a Tokio runtime, after the metrics recorder is installed.
    pub fn start(conn: RedisConn, args: &StoreArgs) -> Self {
        crate::metrics::describe();
        let store = Store::new(conn, args.store_config());
        // Never cancelled: the owner's drain still stores what it finishes;
        // the loop ends when the last handle is gone.
        let (batcher, _loop) = Batcher::start(store, args.max_batch, Shutdown::new());
        Self { batcher }
    }

    /// Stores (and, when its turn has come, releases) `completed`; resolves
    /// once it is in Redis, a duplicate included. A result without a stream
    /// id is dropped with a warning, as the reassembler drops it.
    pub async fn store(&self, completed: Completed) -> Result<(), Closed> {
        let Some((item, status)) = service::item_of(completed) else {
            tracing::warn!("dropping a result without stream id");
            return Ok(());
        };
        let letter = [!item.dead_letter.is_empty()];
        let mut items = vec![item];
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match self.batcher.submit(items).await? {
                Ok(flags) => {
                    service::count(&flags, &[status], &letter);
                    return Ok(());
                }
                Err(failed) => {
                    tracing::debug!(error = %failed.error, "release script failed; storing the result again");
                    items = failed.items;
                    backoff.wait().await;
                }
            }
        }
    }
}
