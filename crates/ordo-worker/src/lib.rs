//! An embeddable Ordo stateful worker. Implement [`Operation`] (or write a
//! closure) for each of your operations, put them in [`Operations`] and run
//! a [`Worker`]: Ordo's harmonizer sends it stream events, and it runs them
//! concurrently and hands the results to the reassemblers, which release
//! each stream's results exactly once and strictly in sequence order.
//!
//! What comes with it:
//!
//! * **bounded concurrency** (`--concurrency`, and an operation's
//!   `concurrency` from the registry) with back-pressure towards the
//!   harmonizer;
//! * **cancellation** of attempts the harmonizer abandoned (a cancel, or the
//!   attempt's own deadline): the operation's future is dropped;
//! * **retries**: an [`OpError::transient`] failure is handed back to the
//!   harmonizer for another attempt while attempts remain, an
//!   [`OpError::permanent`] one is released as FAILED with a dead letter;
//! * **result delivery** to the reassemblers (acked to the harmonizer only
//!   once stored);
//! * **the operation registry**: the worker follows the registry in Redis
//!   (`--registry-pin` to pin it), serves the stateful operations of the
//!   version in use that are compiled into it or have an `endpoint` (gRPC
//!   `ordo.v1.Operation/Invoke` or HTTP POST, see [`remote`]), runs each
//!   attempt with the definition of the version its event was accepted
//!   under (`timeout`, `concurrency`), and announces what it serves to every
//!   harmonizer (`--operations` narrows it);
//! * **health** (`grpc.health.v1`), reflection, tracing (the `latency`
//!   attribute's simulated delay included), and **graceful shutdown**:
//!   SIGTERM drains running attempts for `--drain-timeout`.
//!
//! # A worker in one line
//!
//! ```no_run
//! use ordo_worker::{Bytes, OpError, Operations};
//!
//! fn main() -> std::process::ExitCode {
//!     let operations = Operations::new().with_fn("reverse", "reverses the UTF-8 payload", |_ctx, event| async move {
//!         let text = std::str::from_utf8(&event.payload).map_err(|e| OpError::permanent(e.to_string()))?;
//!         Ok(Bytes::from(text.chars().rev().collect::<String>()))
//!     });
//!     ordo_worker::main("my-worker", operations)
//! }
//! ```
//!
//! It takes the flags of [`WorkerArgs`] (`my-worker --help`). Publish a
//! registry version that names `reverse` (kind `stateful`, no endpoint)
//! with `ordo registry publish`, or start the harmonizer with
//! `--stateful-ops reverse`, and events of operation `reverse` come to it.
//!
//! # Flags of your own
//!
//! Flatten [`WorkerArgs`] into your clap config and call [`Worker::run`]:
//!
//! ```no_run
//! use ordo_worker::{Worker, WorkerArgs, Operations, ServiceConfig, CommonArgs};
//!
//! #[derive(Debug, Clone, clap::Parser)]
//! struct Config {
//!     #[command(flatten)]
//!     worker: WorkerArgs,
//!     /// Where my dependency lives.
//!     #[arg(long, default_value = "127.0.0.1:9000")]
//!     backend: String,
//! }
//!
//! impl ServiceConfig for Config {
//!     fn listen(&self) -> std::net::SocketAddr {
//!         self.worker.listen
//!     }
//!     fn common(&self) -> &CommonArgs {
//!         &self.worker.common
//!     }
//!     fn metrics_listen(&self) -> Option<std::net::SocketAddr> {
//!         self.worker.metrics_listen
//!     }
//!     fn validate(&self) -> Result<(), String> {
//!         self.worker.validate()
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     ordo_runtime::app::run("my-worker", |config: Config, listener, shutdown| async move {
//!         // Clients of your dependencies are made here, inside the runtime.
//!         let operations = Operations::new();
//!         Worker::new(operations).run(config.worker, listener, shutdown).await
//!     })
//! }
//! ```

mod args;
mod capabilities;
mod limits;
mod metrics;
mod operation;
pub mod remote;
mod worker;

use std::process::ExitCode;

pub use args::{OperationFilter, WorkerArgs};
pub use bytes::Bytes;
pub use operation::{OpContext, OpError, OpFuture, Operation, Operations, is_transient};
pub use ordo_proto::v1::Event;
pub use ordo_registry::{Catalog, Endpoint, Kind, OperationSpec, Pin};
pub use ordo_runtime::{
    Shutdown,
    app::{CommonArgs, ServiceConfig},
};
pub use worker::Worker;

/// The whole `main` of a worker binary: parses [`WorkerArgs`] (flags and
/// env vars; exit code 64 on a bad configuration), starts telemetry, binds
/// `--listen` and runs a [`Worker`] with `operations` until SIGTERM or
/// Ctrl-C. `service` names the process in logs, traces and `--help`.
///
/// `operations` are built before the async runtime starts: an operation
/// that needs a lazily connected client (a tonic channel) should make it on
/// first use, or use [`Worker::run`] inside `ordo_runtime::app::run` (see
/// the crate documentation).
pub fn main(service: &'static str, operations: Operations) -> ExitCode {
    // The first name wins: a process runs one worker.
    let _ = args::COMMAND_NAME.set(service);
    ordo_runtime::app::run(service, move |config: args::MainConfig, listener, shutdown| {
        Worker::new(operations).run(config.0, listener, shutdown)
    })
}
