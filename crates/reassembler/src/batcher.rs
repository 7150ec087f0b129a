//! Coalesces the result batches of every connected worker into few script
//! calls: whatever arrived while the previous calls ran goes into the next
//! one (up to `max_batch` results), with a few calls in flight at once so the
//! Redis round trip overlaps with collecting the next batch.
//!
//! On shutdown the loop closes its queue (new submits fail with [`Closed`],
//! so senders redeliver elsewhere), stores what was already queued, waits for
//! the script calls in flight, and ends: it does not wait for every handle to
//! be dropped, since Deliver streams that workers keep open hold them.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use ordo_runtime::Shutdown;

use crate::store::{Item, Store};

/// Batches in flight at once (pipelined on one multiplexed connection; on a
/// cluster each batch is one script call per slot, sent at once).
const MAX_CALLS_IN_FLIGHT: usize = 4;

/// Per item, whether it was new; or why Redis failed, with the items back
/// (so that a caller can submit them again without having kept a copy).
pub type Outcome = Result<Vec<bool>, Failed>;

/// A script call that finally failed, and the items it carried of this submit.
#[derive(Debug)]
pub struct Failed {
    pub error: Arc<redis::RedisError>,
    pub items: Vec<Item>,
}

type Reply = oneshot::Sender<Outcome>;

/// Handle to the batching loop.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Vec<Item>, Reply)>,
}

/// The batching loop ended (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the reassembler is shutting down")]
pub struct Closed;

impl Batcher {
    /// Starts the loop; it ends when every handle is dropped, or after
    /// `shutdown` once what was queued is stored.
    pub fn start(store: Store, max_batch: usize, shutdown: Shutdown) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(store, rx, max_batch.max(1), shutdown));
        (Self { tx }, task)
    }

    /// Stores `items`; resolves once they are durably in Redis.
    pub async fn submit(&self, items: Vec<Item>) -> Result<Outcome, Closed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((items, reply)).await.map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<(Vec<Item>, Reply)>, max_batch: usize, shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    let mut calls = tokio::task::JoinSet::new();
    let mut closing = false;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let first = tokio::select! {
            _ = shutdown.cancelled(), if !closing => {
                // Queued parts are still received (and stored); new sends fail.
                closing = true;
                rx.close();
                continue;
            }
            first = rx.recv() => first,
        };
        let Some(first) = first else { break };
        let mut parts = vec![first];
        let mut size = parts[0].0.len();
        while size < max_batch {
            match rx.try_recv() {
                Ok(part) => {
                    size += part.0.len();
                    parts.push(part);
                }
                Err(_) => break,
            }
        }
        let store = store.clone();
        calls.spawn(async move {
            let _permit = permit;
            let mut items = Vec::with_capacity(size);
            let mut replies = Vec::with_capacity(parts.len());
            for (part, reply) in parts {
                replies.push((part.len(), reply));
                items.extend(part);
            }
            // A Redis restart (or a cluster failover) breaks a connection
            // once: the store retries each script call, so the senders see an
            // ack, not an error, when Redis is back in time.
            crate::metrics::BATCH_SIZE.record(items.len() as f64);
            let result = store.apply(&items).await.map_err(Arc::new);
            if let Err(error) = &result {
                tracing::warn!(%error, results = items.len(), "release script failed; senders will redeliver");
            }
            let mut offset = 0;
            let mut items = items.into_iter();
            for (len, reply) in replies {
                let _ = reply.send(match &result {
                    Ok(flags) => Ok(flags[offset..offset + len].to_vec()),
                    Err(error) => Err(Failed { error: error.clone(), items: items.by_ref().take(len).collect() }),
                });
                offset += len;
            }
        });
        // Reap finished calls so the set stays small.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}
