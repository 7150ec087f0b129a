//! Dispatch of accepted events until each has a durable result: stateful
//! events over one long-lived `Work` stream per worker (least-loaded healthy
//! worker first), stateless events through the stateless service.
//!
//! An event stays in its link's in-flight table until the worker acks it
//! (which it does only after a reassembler stored the result). When a
//! worker's stream breaks, every in-flight event of that link is dispatched
//! again; so is every event past `--event-timeout`. After `--max-attempts`
//! the pool delivers a FAILED result in the event's place, so a stream never
//! stalls on a lost event. A late result of an earlier attempt is harmless:
//! the reassembler keeps the first result of each (stream, sequence).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ordo_proto::v1::{
    Completed, Event, EventResult, WorkItem, stateful_worker_client::StatefulWorkerClient,
    stateless_client::StatelessClient,
};
use ordo_runtime::client::TracedChannel;
use reassembler::client::ResultSink;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Items queued per worker link beyond what the worker has taken.
const LINK_QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub event_timeout: Duration,
    pub max_attempts: u32,
}

struct InFlight {
    event: Event,
    attempt: u32,
    deadline: Instant,
}

struct Link {
    endpoint: String,
    sender: Mutex<Option<mpsc::Sender<WorkItem>>>,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    healthy: AtomicBool,
}

impl Link {
    fn load(&self) -> usize {
        lock(&self.in_flight).len()
    }
    fn sender(&self) -> Option<mpsc::Sender<WorkItem>> {
        lock(&self.sender).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are plain map operations; a poisoned lock is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Inner {
    links: Vec<Link>,
    sink: ResultSink,
    stateless: StatelessClient<TracedChannel>,
    config: PoolConfig,
    next_dispatch: AtomicU64,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn start(
        workers: &[String],
        sink: ResultSink,
        stateless: StatelessClient<TracedChannel>,
        config: PoolConfig,
        shutdown: ordo_runtime::Shutdown,
    ) -> Result<Self, ordo_runtime::client::EndpointError> {
        let mut clients = Vec::new();
        let mut links = Vec::new();
        for endpoint in workers {
            clients.push(StatefulWorkerClient::new(ordo_runtime::client::traced(endpoint)?));
            links.push(Link {
                endpoint: endpoint.clone(),
                sender: Mutex::new(None),
                in_flight: Mutex::new(HashMap::new()),
                healthy: AtomicBool::new(false),
            });
        }
        let inner = Arc::new(Inner { links, sink, stateless, config, next_dispatch: AtomicU64::new(1) });
        for (index, client) in clients.into_iter().enumerate() {
            tokio::spawn(drive_link(Arc::downgrade(&inner), index, client, shutdown.clone()));
        }
        tokio::spawn(sweep_timeouts(Arc::downgrade(&inner), shutdown));
        Ok(Self { inner })
    }

    /// Hands a stateful event to a worker. Resolves once it is queued on a
    /// link (back-pressure: waits while every worker is full or down).
    pub async fn dispatch(&self, event: Event) {
        dispatch(&self.inner, event, 1, None).await;
    }

    /// Runs a stateless event and records its result, retrying while the
    /// stateless service is unavailable.
    pub fn run_stateless(&self, event: Event) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let result = execute_stateless(&inner, &event).await;
            let _ = inner.sink.deliver(Completed { result: Some(result), mode: event.mode }).await;
        });
    }

    /// Executes a stateless event (no recording).
    pub async fn execute_stateless(&self, event: &Event) -> EventResult {
        execute_stateless(&self.inner, event).await
    }

    /// Stores a result the harmonizer produced itself; resolves once durable.
    pub async fn record(&self, result: EventResult, mode: i32) -> bool {
        self.inner.sink.deliver(Completed { result: Some(result), mode }).await.is_ok()
    }

    pub fn healthy_workers(&self) -> usize {
        self.inner.links.iter().filter(|l| l.healthy.load(Ordering::Relaxed)).count()
    }
}

async fn execute_stateless(inner: &Inner, event: &Event) -> EventResult {
    let mut last_error = String::new();
    for attempt in 1..=inner.config.max_attempts {
        let mut client = inner.stateless.clone();
        match tokio::time::timeout(inner.config.event_timeout, client.execute(event.clone())).await {
            Ok(Ok(response)) => return response.into_inner(),
            Ok(Err(status))
                if status.code() == tonic::Code::NotFound || status.code() == tonic::Code::InvalidArgument =>
            {
                return EventResult::failed(event, status.message());
            }
            Ok(Err(status)) => last_error = format!("stateless service: {}", status.message()),
            Err(_) => last_error = "stateless service timed out".into(),
        }
        tracing::debug!(attempt, error = %last_error, "stateless attempt failed");
        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
    }
    EventResult::failed(event, format!("gave up after {} attempts: {last_error}", inner.config.max_attempts))
}

/// Picks the least-loaded healthy link, preferring one other than `avoid`.
fn pick(inner: &Inner, avoid: Option<usize>) -> Option<usize> {
    let healthy = |i: &usize| inner.links[*i].healthy.load(Ordering::Relaxed);
    let candidates: Vec<usize> = (0..inner.links.len()).filter(healthy).collect();
    candidates
        .iter()
        .copied()
        .filter(|&i| Some(i) != avoid)
        .min_by_key(|&i| inner.links[i].load())
        .or_else(|| candidates.first().copied())
}

async fn dispatch(inner: &Arc<Inner>, event: Event, attempt: u32, avoid: Option<usize>) {
    let mut avoid = avoid;
    let mut wait = Duration::from_millis(10);
    loop {
        let Some(index) = pick(inner, avoid) else {
            // No healthy worker: hold the event (back-pressure) until one is.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
            continue;
        };
        let link = &inner.links[index];
        let Some(sender) = link.sender() else {
            avoid = None;
            tokio::task::yield_now().await;
            continue;
        };
        let dispatch_id = inner.next_dispatch.fetch_add(1, Ordering::Relaxed);
        lock(&link.in_flight).insert(
            dispatch_id,
            InFlight { event: event.clone(), attempt, deadline: Instant::now() + inner.config.event_timeout },
        );
        let item = WorkItem { dispatch_id, event: Some(event.clone()), attempt };
        if sender.send(item).await.is_ok() {
            return;
        }
        // The link went down under us; it did not take the item.
        lock(&link.in_flight).remove(&dispatch_id);
        avoid = Some(index);
    }
}

/// Dispatches again after a failed attempt, or records FAILED in its place.
async fn retry(inner: Arc<Inner>, flight: InFlight, from: usize, reason: &str) {
    let stream = flight.event.stream_id.clone();
    let sequence = flight.event.sequence;
    if flight.attempt >= inner.config.max_attempts {
        tracing::warn!(stream, sequence, attempts = flight.attempt, reason, "giving up; releasing FAILED in its place");
        let result =
            EventResult::failed(&flight.event, format!("no result after {} attempts (last: {reason})", flight.attempt));
        let _ = inner.sink.deliver(Completed { result: Some(result), mode: flight.event.mode }).await;
        return;
    }
    tracing::info!(stream, sequence, attempt = flight.attempt + 1, reason, "re-dispatching");
    dispatch(&inner, flight.event, flight.attempt + 1, Some(from)).await;
}

async fn drive_link(
    inner: Weak<Inner>,
    index: usize,
    client: StatefulWorkerClient<TracedChannel>,
    shutdown: ordo_runtime::Shutdown,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(pool) = inner.upgrade() else { return };
        let link = &pool.links[index];
        let endpoint = link.endpoint.clone();
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let mut client = client.clone();
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            opened = client.work(ReceiverStream::new(rx)) => opened,
        };
        match opened {
            Ok(response) => {
                let mut acks = response.into_inner();
                *lock(&link.sender) = Some(tx);
                link.healthy.store(true, Ordering::Relaxed);
                tracing::info!(%endpoint, "worker connected");
                backoff = Duration::from_millis(50);
                drop(pool);
                loop {
                    let ack = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ack = acks.message() => ack,
                    };
                    let Some(pool) = inner.upgrade() else { return };
                    match ack {
                        Ok(Some(ack)) => {
                            lock(&pool.links[index].in_flight).remove(&ack.dispatch_id);
                        }
                        Ok(None) => {
                            tracing::warn!(%endpoint, "worker ended its work stream");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(%endpoint, %status, "work stream to worker broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::debug!(%endpoint, %status, "cannot open a work stream to worker");
                drop(pool);
            }
        }
        let Some(pool) = inner.upgrade() else { return };
        let link = &pool.links[index];
        // Stop new dispatches first, then take what the dead stream held.
        link.healthy.store(false, Ordering::Relaxed);
        lock(&link.sender).take();
        let orphans: Vec<InFlight> = lock(&link.in_flight).drain().map(|(_, f)| f).collect();
        if !orphans.is_empty() {
            tracing::warn!(%endpoint, events = orphans.len(), "re-dispatching the events of a lost worker");
        }
        for flight in orphans {
            tokio::spawn(retry(pool.clone(), flight, index, "worker lost"));
        }
        drop(pool);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn sweep_timeouts(inner: Weak<Inner>, shutdown: ordo_runtime::Shutdown) {
    let period = match inner.upgrade() {
        Some(pool) => (pool.config.event_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(pool) = inner.upgrade() else { return };
        let now = Instant::now();
        for (index, link) in pool.links.iter().enumerate() {
            let expired: Vec<InFlight> = {
                let mut in_flight = lock(&link.in_flight);
                let ids: Vec<u64> = in_flight.iter().filter(|(_, f)| f.deadline <= now).map(|(id, _)| *id).collect();
                ids.into_iter().filter_map(|id| in_flight.remove(&id)).collect()
            };
            for flight in expired {
                tokio::spawn(retry(pool.clone(), flight, index, "event timeout"));
            }
        }
    }
}
