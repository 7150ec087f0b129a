//! What every Ordo binary shares, designed once: start-up and exit codes
//! ([`app`]), telemetry and W3C trace propagation ([`telemetry`]), the gRPC
//! server builder with health, reflection and tracing ([`server`]), client
//! channels ([`client`]) and the peers behind address lists ([`discovery`]),
//! shutdown and drain ([`shutdown`]), Redis
//! connections and retries ([`redis_conn`]), and health that follows the
//! required dependencies ([`readiness`]), and the Prometheus endpoint
//! ([`metrics`]).
//!
//! It also sets the global allocator of every process that links it:
//! mimalloc. With glibc's malloc, allocation was a quarter to almost half of
//! the services' CPU once calls carry many streams (per-stream maps, strings
//! and batches; docs/benchmarks.md, "Issue 12 item 2").
//!
//! Service crates must not read env vars or bind sockets themselves: their
//! `main.rs` hands a parsed config, a bound listener and a shutdown token to
//! the library's `run`.

pub mod app;
pub mod auth;
pub mod backoff;
pub mod client;
pub mod discovery;
pub mod metrics;
pub mod readiness;
pub mod redis_conn;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod task;
pub mod telemetry;
pub mod tls;

pub use shutdown::Shutdown;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
