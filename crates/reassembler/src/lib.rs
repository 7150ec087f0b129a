//! Ordo's Task Re-assembler. Accepts results from any worker (or the
//! harmonizer), stores them in Redis and releases each stream's results
//! strictly in sequence order, via one atomic Lua script per batch.
//!
//! All reorder state lives in Redis, so a restarted reassembler loses nothing
//! and replicas can serve the same streams at once. [`client::ResultSink`] is
//! the client side that workers and the harmonizer use to deliver results.

pub mod batcher;
pub mod client;
pub mod config;
pub mod dead_letters;
pub mod service;
pub mod store;

use tokio::net::TcpListener;

pub use config::Config;
use ordo_runtime::{Shutdown, server::GrpcServer};

/// Runs the reassembler until `shutdown`, then drains open batches.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let conn = ordo_runtime::redis_conn::connect(&config.redis_url, &shutdown).await?;
    let store = store::Store::new(
        conn,
        store::StoreConfig {
            retention: config.retention,
            ttl_ms: config.stream_ttl.as_millis() as u64,
            dead_letter_retention: config.dead_letter_retention,
        },
    );
    let (batcher, batch_loop) = batcher::Batcher::start(store.clone(), config.max_batch);
    let service = service::ReassemblerService::new(batcher, store);
    GrpcServer::new()
        .with_service(service.into_server())
        .serve(listener, shutdown, config.common.drain_timeout)
        .await?;
    // Every handle is gone once the server is; the loop finishes open calls.
    batch_loop.await?;
    Ok(())
}
