//! Ordo's push gateway: serves each stream's released results in order from
//! any cursor, then keeps tailing. A client that reconnects with its last seen
//! position + 1 misses nothing; a cursor older than retention gets
//! OUT_OF_RANGE, never a silent gap.
//!
//! It reads reorder state and never writes it: [`hub`] tails the release
//! channel, [`log`] reads the release logs, [`session`] joins the two.

pub mod hub;
pub mod log;
pub mod service;
pub mod session;

use std::net::SocketAddr;

pub use ordo_runtime::Shutdown;
use ordo_runtime::{
    app::{CommonArgs, ServiceConfig},
    server::GrpcServer,
};
use tokio::net::TcpListener;

/// Ordo push gateway: streams released results to subscribers, in order,
/// resumable from any retained position.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "push-gateway", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "PUSH_GATEWAY_LISTEN", default_value = "0.0.0.0:50055")]
    pub listen: SocketAddr,
    /// Redis holding the release logs.
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Released batches buffered per subscriber; a subscriber that falls
    /// further behind is served from the log instead (memory stays bounded).
    #[arg(long, env = "PUSH_GATEWAY_SUBSCRIBER_BUFFER", default_value_t = 1024)]
    pub subscriber_buffer: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl ServiceConfig for Config {
    fn listen(&self) -> SocketAddr {
        self.listen
    }
    fn common(&self) -> &CommonArgs {
        &self.common
    }
    fn validate(&self) -> Result<(), String> {
        if self.subscriber_buffer == 0 {
            return Err("--subscriber-buffer must be at least 1".into());
        }
        Ok(())
    }
}

pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let conn = ordo_runtime::redis_conn::connect(&config.redis_url, &shutdown).await?;
    let hub = hub::Hub::new(config.subscriber_buffer);
    let tail = tokio::spawn(hub.clone().listen(ordo_runtime::redis_conn::client(&config.redis_url)?, shutdown.clone()));
    let service = service::PushGatewayService::new(hub, log::Log::new(conn), shutdown.clone());
    let served = GrpcServer::new()
        .with_service(service.into_server())
        .serve(listener, shutdown, config.common.drain_timeout)
        .await;
    tail.abort();
    served
}
