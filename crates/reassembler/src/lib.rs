//! Ordo's Task Re-assembler. Accepts results from any worker (or the
//! harmonizer), stores them in Redis and releases each stream's results
//! strictly in sequence order, via one atomic Lua script per batch.
//!
//! All reorder state lives in Redis, so a restarted reassembler loses nothing
//! and replicas can serve the same streams at once. The client side that
//! workers and the harmonizer use to deliver results is its own crate,
//! `result-sink`, so they never link this server.

pub mod batcher;
pub mod config;
pub mod dead_letters;
pub mod local;
mod metrics;
pub mod service;
pub mod store;

use tokio::net::TcpListener;

pub use config::{Config, StoreArgs};
use ordo_runtime::{
    Shutdown,
    readiness::{Dependency, Readiness},
    server::GrpcServer,
};

/// Runs the reassembler until `shutdown`, then drains open batches.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    metrics::describe();
    // Lazy: health is served (NOT_SERVING) at once, even while Redis is down.
    let conn = ordo_runtime::redis_conn::connect(&config.redis_url)?;
    let (readiness, _watcher) = Readiness::watch(vec![Dependency::redis(conn.clone())], shutdown.clone());
    // The hard end of draining, counted from the signal.
    let deadline = tokio::spawn(ordo_runtime::shutdown::drain_deadline(shutdown.clone(), config.common.drain_timeout));
    let store = store::Store::new(conn, config.store.store_config());
    tokio::spawn(sample_pending(store.clone(), shutdown.clone()));
    let (batcher, batch_loop) = batcher::Batcher::start(store.clone(), config.store.max_batch, shutdown.clone());
    let service = service::ReassemblerService::new(batcher, store, readiness.clone(), shutdown.clone());
    let served = GrpcServer::new()
        .with_readiness(readiness)
        .with_service(service.into_server())
        .serve(listener, shutdown.clone(), config.common.drain_timeout)
        .await;
    // Also when the server failed: the batching loop must end either way.
    shutdown.cancel();
    // The loop stores what was queued and finishes its script calls; past the
    // drain deadline (plus a little) whatever is left is unacked, and its
    // senders redeliver it elsewhere.
    let hard_stop = async {
        let _ = deadline.await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    tokio::select! {
        finished = batch_loop => finished?,
        () = hard_stop => tracing::warn!("script calls still running at the drain deadline; their senders redeliver"),
    }
    served
}

/// How often the results pending in Redis are sampled.
const PENDING_SAMPLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Keys visited per sample at most (a bound on its cost): a keyspace larger
/// than this is covered over several samples, and the gauges are set once
/// per whole pass.
const PENDING_SCAN_KEYS: usize = 100_000;

/// Samples the results pending in Redis (every replica sees the same Redis:
/// aggregate with `max`, not `sum`).
async fn sample_pending(store: store::Store, shutdown: Shutdown) {
    let mut ticker = tokio::time::interval(PENDING_SAMPLE);
    let mut scan = store::PendingScan::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match scan.step(&store, PENDING_SCAN_KEYS).await {
            Ok(Some((streams, results))) => {
                metrics::PENDING_STREAMS.set(streams as f64);
                metrics::PENDING_RESULTS.set(results as f64);
            }
            Ok(None) => {}
            Err(error) => {
                metrics::SAMPLE_ERRORS.increment(1);
                tracing::debug!(%error, "cannot sample the pending results");
            }
        }
    }
}
