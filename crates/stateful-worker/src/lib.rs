//! Ordo's stateful worker (figure 3 of the paper): receives stream events from
//! the harmonizer over a long-lived `Work` stream, runs up to `--concurrency`
//! operations at once (they finish in any order), hands each result to a
//! reassembler and, once the reassembler acknowledged it, acks the dispatch to
//! the harmonizer. Results never go back to the harmonizer directly.
//!
//! On SIGTERM it stops taking new events, finishes and delivers the ones it
//! holds, then ends its streams (the harmonizer re-dispatches anything it
//! never received).

pub mod ops;

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use futures::Stream;
use ordo_core::latency::{self, Latency};
use ordo_proto::v1::{
    Completed, EventResult, ListOperationsRequest, ListOperationsResponse, OperationInfo, OperationKind, WorkAck,
    WorkItem,
    stateful_worker_server::{StatefulWorker, StatefulWorkerServer},
    stateless_client::StatelessClient,
};
use ordo_runtime::{Shutdown, app::CommonArgs, server::GrpcServer, telemetry};
use reassembler::client::ResultSink;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

pub use ops::{OpContext, OpError, Operation, Registry};

/// Ordo stateful worker: runs stream operations concurrently and delivers
/// their results to the reassemblers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "stateful-worker", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "WORKER_LISTEN", default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,
    /// Reassembler replicas (comma-separated host:port); results are spread
    /// over the healthy ones and redelivered elsewhere if one dies.
    #[arg(long, env = "ORDO_REASSEMBLERS", default_value = "127.0.0.1:50054", value_delimiter = ',')]
    pub reassemblers: Vec<String>,
    /// The stateless service, for operations that call back into it.
    #[arg(long, env = "ORDO_STATELESS", default_value = "127.0.0.1:50052")]
    pub stateless: String,
    /// Operations run at once by this worker; further events wait (back-pressure).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 1024)]
    pub concurrency: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

ordo_runtime::service_config!(Config, validate = Config::check);

impl Config {
    /// Cross-field checks clap cannot express.
    fn check(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if self.reassemblers.iter().all(|r| r.trim().is_empty()) {
            return Err("--reassemblers needs at least one address".into());
        }
        Ok(())
    }
}

pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(config, Registry::builtin(), listener, shutdown).await
}

/// Like [`run`] with your own operations.
pub async fn run_with(
    config: Config,
    registry: Registry,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let reassemblers: Vec<String> =
        config.reassemblers.iter().map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect();
    let sink = ResultSink::start(&reassemblers)?;
    let ctx = OpContext { stateless: StatelessClient::new(ordo_runtime::client::traced(&config.stateless)?) };
    let tasks = TaskTracker::new();
    let worker = WorkerService {
        inner: Arc::new(Inner {
            registry,
            ctx,
            sink,
            permits: Arc::new(Semaphore::new(config.concurrency)),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        }),
    };
    GrpcServer::new()
        .with_service(StatefulWorkerServer::new(worker))
        .serve(listener, shutdown, config.common.drain_timeout)
        .await?;
    tasks.close();
    tasks.wait().await;
    Ok(())
}

struct Inner {
    registry: Registry,
    ctx: OpContext,
    sink: ResultSink,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    tasks: TaskTracker,
}

#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

impl Inner {
    /// Runs one event to a result. Never fails: problems become FAILED results.
    async fn execute(&self, item: &WorkItem) -> EventResult {
        let Some(event) = item.event.as_ref() else {
            return EventResult::default();
        };
        let model = match event.attributes.get(latency::ATTRIBUTE).map(|text| Latency::parse(text)) {
            None => Latency::None,
            Some(Ok(model)) => model,
            Some(Err(error)) => return EventResult::failed(event, error.to_string()),
        };
        let delay = model.sample(&mut rand::rng());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match self.registry.get(&event.operation) {
            None => EventResult::failed(event, format!("operation {:?} is not known to this worker", event.operation)),
            Some(op) => match op.call(&self.ctx, event).await {
                Ok(payload) => EventResult::ok(event, payload),
                Err(error) => EventResult::failed(event, error.0),
            },
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<WorkAck, Status>> + Send>>;

#[tonic::async_trait]
impl StatefulWorker for WorkerService {
    type WorkStream = AckStream;

    async fn work(&self, request: Request<Streaming<WorkItem>>) -> Result<Response<Self::WorkStream>, Status> {
        let mut inbound = request.into_inner();
        let (acks, ack_rx) = tokio::sync::mpsc::channel::<Result<WorkAck, Status>>(4096);
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            let call_tasks = TaskTracker::new();
            loop {
                // Take the permit first: a full worker stops reading, and HTTP/2
                // flow control pushes back on the harmonizer.
                let permit = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    permit = inner.permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                let item = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    item = inbound.message() => match item {
                        Ok(Some(item)) => item,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "work stream from harmonizer ended");
                            break;
                        }
                    },
                };
                let inner = inner.clone();
                let acks = acks.clone();
                call_tasks.spawn(async move {
                    let Some(event) = item.event.as_ref() else { return };
                    let span =
                        telemetry::event_span("worker.process", &event.stream_id, event.sequence, &event.trace_context);
                    let mode = event.mode;
                    let mut result = inner.execute(&item).instrument(span.clone()).await;
                    drop(permit);
                    result.trace_context = telemetry::inject(&span, &result.trace_context);
                    let ack = WorkAck {
                        dispatch_id: item.dispatch_id,
                        stream_id: result.stream_id.clone(),
                        sequence: result.sequence,
                        delivered: true,
                    };
                    // Only a durably stored result may be acked: otherwise the
                    // harmonizer must be free to re-dispatch it.
                    if inner.sink.deliver(Completed { result: Some(result), mode }).await.is_ok() {
                        let _ = acks.send(Ok(ack)).await;
                    }
                });
            }
            call_tasks.close();
            call_tasks.wait().await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let operations = self
            .inner
            .registry
            .iter()
            .map(|op| OperationInfo {
                name: op.name().into(),
                kind: OperationKind::Stateful as i32,
                description: op.description().into(),
            })
            .collect();
        Ok(Response::new(ListOperationsResponse { operations }))
    }
}
