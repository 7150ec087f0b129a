//! `stateful-worker`: Ordo's demo worker, a thin user of the `ordo-worker`
//! crate with the demo operations (`async-echo`, `async-upper`,
//! `callback`). It takes every flag of `ordo_worker::WorkerArgs`, plus
//! `--stateless` for the `callback` operation.

mod ops;

use std::{net::SocketAddr, process::ExitCode};

use ordo_proto::v1::stateless_client::StatelessClient;
use ordo_worker::{CommonArgs, ServiceConfig, Worker, WorkerArgs};

/// Ordo stateful worker: runs stream operations concurrently and delivers
/// their results to the reassemblers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "stateful-worker", version)]
struct Config {
    #[command(flatten)]
    worker: WorkerArgs,
    /// The stateless service, for the `callback` operation.
    #[arg(long, env = "ORDO_STATELESS", default_value = "127.0.0.1:50052")]
    stateless: String,
}

impl ServiceConfig for Config {
    fn listen(&self) -> SocketAddr {
        self.worker.listen
    }
    fn common(&self) -> &CommonArgs {
        &self.worker.common
    }
    fn metrics_listen(&self) -> Option<SocketAddr> {
        self.worker.metrics_listen
    }
    fn validate(&self) -> Result<(), String> {
        self.worker.validate()
    }
}

fn main() -> ExitCode {
    ordo_runtime::app::run("stateful-worker", |config: Config, listener, shutdown| async move {
        // A lazy channel: the stateless service may start after this worker.
        let stateless = StatelessClient::new(ordo_runtime::client::traced(&config.stateless)?);
        Worker::new(ops::demo(stateless)).run(config.worker, listener, shutdown).await
    })
}
