//! Ordo's Service Harmonizer: the front door of figure 4. It validates each
//! event, routes it by operation (stateless work to the stateless service,
//! stateful stream work to the stateful workers), keeps a bounded window per
//! stream, and returns each stream's results — released in order by the
//! reassembler, followed through the push gateway — to the caller.
//!
//! It holds no durable state: everything needed to recover lives in Redis and
//! in the workers' acknowledgements.

pub mod claims;
pub mod config;
pub mod error;
pub mod follower;
mod linger;
pub mod metrics;
pub mod pool;
pub mod process;
pub mod registry;
mod size_limit;
pub mod state;
mod stored;
pub mod streams;
mod submit;

use std::{pin::Pin, sync::Arc};

pub use config::Config;
use futures::Stream;
use ordo_proto::v1::{
    Event, EventResult, ListOperationsRequest, ListOperationsResponse, OperationInfo,
    harmonizer_server::{Harmonizer, HarmonizerServer},
    push_gateway_client::PushGatewayClient,
    stateless_client::StatelessClient,
};
use ordo_runtime::discovery;
use ordo_runtime::{
    Shutdown,
    readiness::{Dependency, Readiness},
    server::GrpcServer,
};
use result_sink::ResultSink;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How long Redis may be unreachable before events that need it are refused
/// at once (shorter outages are ridden out by the retries in `state::read`).
pub const REDIS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// State shared by every call.
pub struct Shared {
    pub config: Config,
    pub registry: registry::Registry,
    pub pool: pool::Pool,
    /// Where results the harmonizer produces itself (GAP) are recorded.
    pub sink: ResultSink,
    /// Where released results are followed from.
    pub releases: follower::Releases,
    pub redis: ordo_runtime::redis_conn::RedisConn,
    /// The other harmonizers on this Redis, as far as the claims know
    /// (`None`: `--claim-after off`, no claims at all).
    pub presence: Option<Arc<claims::Presence>>,
    /// Whether Redis answers: events that need it are refused at once while
    /// it has been down a while, instead of each waiting out the retries.
    pub readiness: Readiness,
    pub shutdown: Shutdown,
    /// Which streams a call's token may write (off: every call may write any).
    pub auth: ordo_runtime::auth::Auth,
}

pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    metrics::describe();
    // Lazy: health is served (NOT_SERVING) at once, even while Redis is down.
    let redis = ordo_runtime::redis_conn::connect(&config.redis_url)?;
    let (readiness, _watcher) = Readiness::watch(vec![Dependency::redis(redis.clone())], shutdown.clone());
    let sink = ResultSink::for_setting(
        config.store_results,
        &config::clean(&config.reassemblers),
        &config.discovery,
        &config.redis_url,
        &config.store,
    )?;
    let stateless = StatelessClient::new(ordo_runtime::client::traced(&config.stateless)?);
    let pool = pool::Pool::start(
        discovery::watch(&config.workers, &config.discovery)?,
        sink.clone(),
        stateless,
        pool::PoolConfig { event_timeout: config.event_timeout, max_attempts: config.max_attempts },
        shutdown.clone(),
    )?;
    let builtin = registry::builtin(&config::clean(&config.stateless_ops), &config::clean(&config.stateful_ops));
    let follower = ordo_registry::Follower::start(redis.clone(), builtin, config.registry_pin, shutdown.clone()).await;
    let registry = registry::Registry::new(follower, config.max_payload_bytes, config.gap_timeout);
    let releases = match config.follow_releases {
        config::FollowReleases::PushGateway => follower::Releases::Gateway(
            PushGatewayClient::new(ordo_runtime::client::traced(&config.push_gateway)?)
                .max_decoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES),
        ),
        config::FollowReleases::Redis => follower::Releases::Redis(push_gateway::follow::Local::start(
            &config.redis_url,
            redis.clone(),
            config.hub_slot_hold,
        )?),
    };
    let auth = ordo_runtime::auth::Auth::from_args(&config.auth).map_err(anyhow::Error::msg)?;
    auth.log_startup("harmonizer");
    let drain = config.common.drain_timeout;
    tokio::spawn(sample_window(pool.clone(), config.window, shutdown.clone()));
    let presence = config.claim_after.map(|claim_after| {
        let presence = Arc::new(claims::Presence::new());
        tokio::spawn(claims::run(pool.clone(), redis.clone(), claim_after, presence.clone()));
        presence
    });
    let shared = Arc::new(Shared {
        config,
        registry,
        pool,
        sink,
        releases,
        redis,
        presence,
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        auth,
    });
    let leaving = shared.presence.clone().map(|presence| (presence, shared.redis.clone()));
    let server = HarmonizerServer::new(HarmonizerService { shared })
        .max_decoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES);
    let served = GrpcServer::new()
        .with_readiness(readiness)
        .with_service(size_limit::SizeLimitStatus::new(server, ordo_runtime::server::MAX_MESSAGE_BYTES))
        .serve(listener, shutdown, drain)
        .await;
    // Drained: the others need not wait a lease for this one (a process
    // that is killed instead lapses after it).
    if let Some((presence, redis)) = leaving {
        presence.leave(&redis).await;
    }
    served
}

impl Shared {
    /// `operation` as a metrics label value: itself when the registry in
    /// use has it, else `unknown` (bounded cardinality).
    pub fn operation_label<'a>(&self, operation: &'a str) -> &'a str {
        if self.registry.catalog().get(operation).is_some() { operation } else { metrics::UNKNOWN }
    }
}

/// How often the window gauges are sampled.
const WINDOW_SAMPLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Samples what the pool holds: events in flight, streams with events in
/// flight, and the fullest window (the span of a stream's unsettled
/// sequences over `--window`).
async fn sample_window(pool: pool::Pool, window: u64, shutdown: Shutdown) {
    let mut ticker = tokio::time::interval(WINDOW_SAMPLE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let occupancy = pool.occupancy();
        metrics::IN_FLIGHT.set(occupancy.events as f64);
        metrics::WINDOW_STREAMS.set(occupancy.streams as f64);
        metrics::WINDOW_FILL.set(occupancy.widest as f64 / window.max(1) as f64);
    }
}

#[derive(Clone)]
pub struct HarmonizerService {
    shared: Arc<Shared>,
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<EventResult, Status>> + Send>>;

/// Results buffered per call before the call stops reading its followers.
const CALL_BUFFER: usize = 1024;

#[tonic::async_trait]
impl Harmonizer for HarmonizerService {
    type ProcessStream = ResultStream;

    async fn process(&self, request: Request<Streaming<Event>>) -> Result<Response<Self::ProcessStream>, Status> {
        // A missing or invalid token fails the call before any event is read.
        let grant = self.shared.auth.authorize(request.metadata())?;
        if self.shared.shutdown.is_cancelled() {
            return Err(error::Error::ShuttingDown.into());
        }
        let (out, rx) = tokio::sync::mpsc::channel(CALL_BUFFER);
        let span = tracing::Span::current();
        tokio::spawn(process::run(self.shared.clone(), request.into_inner(), out, span, grant));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit(&self, request: Request<Event>) -> Result<Response<EventResult>, Status> {
        let grant = self.shared.auth.authorize(request.metadata());
        let event = request.into_inner();
        // The spec (an Arc, no allocation) names the operation label if it is known.
        let spec = self.shared.registry.catalog().get(&event.operation).cloned();
        let started = std::time::Instant::now();
        match submit::submit(&self.shared, grant, event).await {
            Ok(result) => {
                // A PROCESSING answer is not the event's result: its latency is unknown here.
                if result.status() != ordo_proto::ResultStatus::Processing {
                    metrics::latency(started.elapsed());
                }
                Ok(Response::new(result))
            }
            Err(error) => {
                let status = Status::from(error);
                metrics::rejected(status.code(), spec.as_ref().map_or(metrics::UNKNOWN, |spec| spec.name.as_str()));
                Err(status)
            }
        }
    }

    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Ok(Response::new(list_operations(&self.shared.registry, &self.shared.pool)))
    }
}

/// The operations of the registry version in use, each with the live
/// workers serving it now.
fn list_operations(registry: &registry::Registry, pool: &pool::Pool) -> ListOperationsResponse {
    let catalog = registry.catalog();
    let operations = catalog
        .operations
        .values()
        .map(|spec| OperationInfo { workers: pool.workers(&spec.name), ..spec.info() })
        .collect();
    ListOperationsResponse { operations, registry_version: catalog.version, pinned: registry.pinned() }
}
