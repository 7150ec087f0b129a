//! Ordo's stateless service: quick, pure operations answered at once (the
//! paper's "stateless" route). Pure means the same payload always gives the
//! same result, so these need no ordering of their own; the harmonizer still
//! records their results in the stream's log so mixed streams stay ordered.

mod metrics;
pub mod ops;

use std::net::SocketAddr;

use ordo_proto::v1::{
    Event, EventResult, ListOperationsRequest, ListOperationsResponse, OperationInfo, OperationKind,
    stateless_server::{Stateless, StatelessServer},
};
use ordo_runtime::{Shutdown, app::CommonArgs, server::GrpcServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Ordo stateless service: pure operations (echo, upper, lower, sha256,
/// json-validate) answered directly.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "stateless", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "STATELESS_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "STATELESS_METRICS_LISTEN", default_value = "0.0.0.0:9092", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    #[command(flatten)]
    pub common: CommonArgs,
}

ordo_runtime::service_config!(Config);

pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    metrics::describe();
    GrpcServer::new()
        .with_service(StatelessServer::new(StatelessService))
        .serve(listener, shutdown, config.common.drain_timeout)
        .await
}

#[derive(Debug, Clone, Copy)]
pub struct StatelessService;

#[tonic::async_trait]
impl Stateless for StatelessService {
    async fn execute(&self, request: Request<Event>) -> Result<Response<EventResult>, Status> {
        let event = request.into_inner();
        let op = ops::find(&event.operation).ok_or_else(|| {
            Status::not_found(format!(
                "unknown stateless operation {:?}; known: {}",
                event.operation,
                ops::names().join(", ")
            ))
        })?;
        let span = ordo_runtime::telemetry::event_span(
            "stateless.execute",
            &event.stream_id,
            event.sequence,
            &event.trace_context,
        );
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let (result, status) = match (op.run)(&event.payload) {
            Ok(output) => (EventResult::ok(&event, output), "ok"),
            Err(reason) => (EventResult::failed(&event, reason), "failed"),
        };
        metrics::executed(op.name, status, started.elapsed().as_secs_f64());
        Ok(Response::new(result))
    }

    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let operations = ops::CATALOG
            .iter()
            .map(|op| OperationInfo {
                name: op.name.into(),
                kind: OperationKind::Stateless as i32,
                description: op.description.into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ListOperationsResponse { operations, ..Default::default() }))
    }
}
