//! Ordo's stateful worker (figure 3 of the paper): receives stream events from
//! the harmonizer over a long-lived `Work` stream, runs up to `--concurrency`
//! operations at once (they finish in any order), hands each result to a
//! reassembler and, once the reassembler acknowledged it, acks the dispatch to
//! the harmonizer. Results never go back to the harmonizer directly.
//!
//! Each `Work` call is read all the time, even while every concurrency slot
//! is taken: events wait in a small bounded queue for a slot (when it is full
//! the worker stops reading, and HTTP/2 flow control pushes back on the
//! harmonizer), while cancel items are acted on at once. An attempt ends
//! without a result when the harmonizer cancels it (it timed out there and
//! was retried elsewhere, or given up) or when its own deadline
//! (`WorkItem.timeout_ms`, counted from its arrival) passes: its operation
//! is dropped and its slot freed, and nothing is delivered or acked for it.
//!
//! A transient operation failure ([`OpError::transient`]) is handed back
//! (`WorkAck.retry`) while the harmonizer allows more attempts; a permanent
//! one, or one on the last attempt, is released as FAILED with a dead letter.
//!
//! When a `Work` call breaks (the harmonizer died), running and queued
//! attempts are NOT cancelled: they finish and deliver, because nobody else
//! may re-dispatch them (a `Submit` that answered PROCESSING relies on it).
//!
//! On SIGTERM the worker stops taking new events (queued and newly arriving
//! ones are left unstarted and unacked), lets running operations finish and
//! deliver until `--drain-timeout`, then cancels what is left (unacked too)
//! and exits; the harmonizer re-dispatches everything unacked when the call
//! ends.

pub mod ops;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use ordo_core::{latency::Latency, limits};
use ordo_proto::v1::{
    Completed, DeadLetter, Event, EventResult, ListOperationsRequest, ListOperationsResponse, OperationInfo,
    OperationKind, ResultStatus, WorkAck, WorkItem,
    stateful_worker_server::{StatefulWorker, StatefulWorkerServer},
    stateless_client::StatelessClient,
};
use ordo_runtime::{Shutdown, app::CommonArgs, client::TracedChannel, server::GrpcServer, telemetry};
use result_sink::ResultSink;
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

pub use ops::{OpContext, OpError, Operation, Registry};

/// Events read from one `Work` call that wait for a concurrency slot. Past
/// it the call is not read (back-pressure), so cancels wait too; an
/// attempt's own deadline still ends it then.
const QUEUED_PER_CALL: usize = 256;
/// Part of an attempt's time kept for handing a failing attempt back before
/// the harmonizer's own timeout fires (a tenth, at most this).
const HAND_BACK_MARGIN: Duration = Duration::from_secs(2);

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
    let stateless = StatelessClient::new(ordo_runtime::client::traced(&config.stateless)?);
    let tasks = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let drain = config.common.drain_timeout;
    let worker = WorkerService {
        inner: Arc::new(Inner {
            registry,
            stateless,
            sink,
            permits: Arc::new(Semaphore::new(config.concurrency)),
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
            tasks: tasks.clone(),
        }),
    };
    // The drain deadline: what still runs then is cancelled, unacked, so the
    // harmonizer re-dispatches it and this process can exit in time.
    let deadline = tokio::spawn({
        let shutdown = shutdown.clone();
        let hard_stop = hard_stop.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
            hard_stop.cancel();
        }
    });
    let served =
        GrpcServer::new().with_service(StatefulWorkerServer::new(worker)).serve(listener, shutdown, drain).await;
    tasks.close();
    tasks.wait().await;
    deadline.abort();
    served
}

struct Inner {
    registry: Registry,
    stateless: StatelessClient<TracedChannel>,
    sink: ResultSink,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    /// Cancelled at the drain deadline: ends every attempt still running.
    hard_stop: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

/// How an attempt ended when it was not cancelled.
enum Outcome {
    /// A result to deliver (OK, or a final FAILED with its dead letter).
    Completed(Box<Completed>),
    /// A transient failure with attempts left: the harmonizer tries again.
    HandBack(String),
}

/// An attempt read from the call, waiting for or holding a slot.
struct Attempt {
    item: WorkItem,
    /// Cancelled by a cancel item or at the drain deadline.
    token: CancellationToken,
    /// When the harmonizer gives up on it (`None`: no limit).
    deadline: Option<Instant>,
    /// Until when operations may retry their dependencies.
    budget: Option<Instant>,
}

impl Attempt {
    fn new(item: WorkItem, hard_stop: &CancellationToken) -> Self {
        let now = Instant::now();
        let timeout = (item.timeout_ms > 0).then(|| Duration::from_millis(item.timeout_ms));
        // `checked_add`: an absurd timeout from the wire means no deadline, not a panic.
        let deadline = timeout.and_then(|t| now.checked_add(t));
        let budget = timeout.and_then(|t| now.checked_add(t - (t / 10).min(HAND_BACK_MARGIN)));
        Self { item, token: hard_stop.child_token(), deadline, budget }
    }

    fn is_over(&self, now: Instant) -> bool {
        self.token.is_cancelled() || self.deadline.is_some_and(|d| d <= now)
    }
}

/// Cancel handles of one call's attempts (queued or running), by dispatch
/// id. Dispatch ids are unique per harmonizer, and each harmonizer has its
/// own call, so the map is per call.
type Cancels = Arc<Mutex<HashMap<u64, CancellationToken>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are plain map operations; a poisoned lock is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A final FAILED result, recorded as a dead letter too.
fn failed(event: &Event, attempts: u32, error: String) -> Completed {
    let dead_letter = DeadLetter::of(event.clone(), ResultStatus::Failed, attempts, error.clone());
    Completed { result: Some(EventResult::failed(event, error)), mode: event.mode, dead_letter: Some(dead_letter) }
}

impl Inner {
    /// Runs one event to an outcome. Never fails: problems become FAILED
    /// results or hand-backs.
    async fn execute(&self, ctx: &OpContext, item: &WorkItem, event: &Event) -> Outcome {
        let attempt = item.attempt.max(1);
        // 0: a harmonizer that does not say; never hand back then.
        let max_attempts = item.max_attempts.max(attempt);
        let model = match event.attributes.get(limits::LATENCY_ATTRIBUTE).map(|text| Latency::parse(text)) {
            None => Latency::None,
            Some(Ok(model)) => model,
            Some(Err(error)) => return Outcome::Completed(Box::new(failed(event, attempt, error.to_string()))),
        };
        let delay = model.sample(&mut rand::rng());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let Some(op) = self.registry.get(&event.operation) else {
            let error = format!("operation {:?} is not known to this worker", limits::echo(&event.operation));
            return Outcome::Completed(Box::new(failed(event, attempt, error)));
        };
        match op.call(ctx, event).await {
            Ok(payload) => Outcome::Completed(Box::new(Completed {
                result: Some(EventResult::ok(event, payload)),
                mode: event.mode,
                dead_letter: None,
            })),
            Err(error) if error.transient && attempt < max_attempts => Outcome::HandBack(error.message),
            Err(error) => Outcome::Completed(Box::new(failed(event, attempt, error.message))),
        }
    }

    /// Runs one attempt in its slot, then delivers and acks its outcome.
    async fn run_attempt(
        self: Arc<Self>,
        attempt: Attempt,
        permit: OwnedSemaphorePermit,
        acks: mpsc::Sender<Result<WorkAck, Status>>,
        cancels: Cancels,
    ) {
        let Attempt { item, token, deadline, budget } = attempt;
        let dispatch_id = item.dispatch_id;
        let Some(event) = item.event.as_ref() else {
            lock(&cancels).remove(&dispatch_id);
            return;
        };
        let span = telemetry::event_span("worker.process", &event.stream_id, event.sequence, &event.trace_context);
        let ctx = OpContext { stateless: self.stateless.clone(), budget };
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        // Dropping the operation's future is the cancellation: it frees the
        // slot at once, whatever the operation was waiting for.
        let outcome = tokio::select! {
            biased;
            _ = token.cancelled() => Err("cancelled"),
            _ = expired => Err("deadline passed"),
            outcome = self.execute(&ctx, &item, event).instrument(span.clone()) => Ok(outcome),
        };
        drop(permit);
        lock(&cancels).remove(&dispatch_id);
        let mut ack =
            WorkAck { dispatch_id, stream_id: event.stream_id.clone(), sequence: event.sequence, ..Default::default() };
        match outcome {
            Err(why) => {
                tracing::debug!(stream = %event.stream_id, sequence = event.sequence, attempt = item.attempt, why, "attempt abandoned; nothing delivered");
                return;
            }
            Ok(Outcome::HandBack(error)) => {
                tracing::info!(stream = %event.stream_id, sequence = event.sequence, attempt = item.attempt, %error, "transient failure; handing the attempt back");
                ack.retry = true;
                ack.error = error;
            }
            Ok(Outcome::Completed(mut completed)) => {
                if let Some(result) = completed.result.as_mut() {
                    result.trace_context = telemetry::inject(&span, &result.trace_context);
                }
                // Only a durably stored result may be acked: otherwise the
                // harmonizer must be free to re-dispatch it. The drain
                // deadline ends a delivery that cannot finish.
                let delivered = tokio::select! {
                    _ = self.hard_stop.cancelled() => false,
                    delivered = self.sink.deliver(*completed) => delivered.is_ok(),
                };
                if !delivered {
                    return;
                }
                ack.delivered = true;
            }
        }
        let _ = acks.send(Ok(ack)).await;
    }

    /// Serves one `Work` call: reads items all the time, starts queued
    /// events as slots free up, cancels on request, drains on shutdown.
    async fn serve_call(
        self: Arc<Self>,
        mut inbound: Streaming<WorkItem>,
        acks: mpsc::Sender<Result<WorkAck, Status>>,
    ) {
        let attempts = TaskTracker::new();
        let cancels: Cancels = Arc::default();
        let mut queue: VecDeque<Attempt> = VecDeque::new();
        let mut early = EarlyCancels::default();
        let mut reading = true;
        loop {
            if !reading && queue.is_empty() {
                break;
            }
            if queue.len() >= QUEUED_PER_CALL {
                // Full: make room from what was cancelled or expired meanwhile.
                let now = Instant::now();
                queue.retain(|a| !a.is_over(now));
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                permit = self.permits.clone().acquire_owned(), if !queue.is_empty() => {
                    let Ok(permit) = permit else { break };
                    let Some(attempt) = queue.pop_front() else { continue };
                    if attempt.is_over(Instant::now()) {
                        lock(&cancels).remove(&attempt.item.dispatch_id);
                        continue;
                    }
                    attempts.spawn(self.clone().run_attempt(attempt, permit, acks.clone(), cancels.clone()));
                }
                item = inbound.message(), if reading && queue.len() < QUEUED_PER_CALL => match item {
                    Ok(Some(item)) if item.cancel => {
                        if !cancel(&cancels, &mut queue, item.dispatch_id) {
                            early.insert(item.dispatch_id);
                        }
                    }
                    Ok(Some(item)) if early.take(item.dispatch_id) => {
                        tracing::debug!(dispatch_id = item.dispatch_id, "attempt cancelled before it arrived");
                    }
                    Ok(Some(item)) => {
                        let attempt = Attempt::new(item, &self.hard_stop);
                        lock(&cancels).insert(attempt.item.dispatch_id, attempt.token.clone());
                        queue.push_back(attempt);
                    }
                    // The harmonizer is gone: what was read still runs and delivers.
                    Ok(None) => reading = false,
                    Err(status) => {
                        tracing::debug!(%status, "work stream from harmonizer ended");
                        reading = false;
                    }
                },
            }
        }
        if !queue.is_empty() {
            // Shutting down: never started, never acked; the harmonizer
            // re-dispatches them when this call ends. (Not handed back with
            // `WorkAck.retry`: the harmonizer would count an attempt each
            // time, and with this worker its only one, burn them all at once.)
            tracing::info!(events = queue.len(), "shutting down: leaving queued events unstarted");
            let mut cancels = lock(&cancels);
            for attempt in queue.drain(..) {
                cancels.remove(&attempt.item.dispatch_id);
            }
        }
        // Draining: no new work, but cancels are still honoured until every
        // running attempt has ended.
        attempts.close();
        loop {
            tokio::select! {
                _ = attempts.wait() => break,
                item = inbound.message(), if reading => match item {
                    Ok(Some(item)) if item.cancel => {
                        cancel(&cancels, &mut queue, item.dispatch_id);
                    }
                    Ok(Some(item)) => {
                        tracing::debug!(dispatch_id = item.dispatch_id, "shutting down: event not taken");
                    }
                    Ok(None) | Err(_) => reading = false,
                },
            }
        }
    }
}

/// Acts on a cancel item: a queued attempt is dropped, a running one
/// stopped. False when the id is unknown (finished, or not arrived yet).
fn cancel(cancels: &Cancels, queue: &mut VecDeque<Attempt>, dispatch_id: u64) -> bool {
    let Some(token) = lock(cancels).remove(&dispatch_id) else { return false };
    token.cancel();
    queue.retain(|a| a.item.dispatch_id != dispatch_id);
    tracing::debug!(dispatch_id, "attempt cancelled by the harmonizer");
    true
}

/// Cancels that overtook their item: the harmonizer sends cancels ahead of
/// its queued items, so an attempt it gave up on while the item still
/// waited in its queue is cancelled before it arrives. Bounded: the oldest
/// is forgotten first (its attempt then ends at its own deadline).
#[derive(Default)]
struct EarlyCancels {
    ids: std::collections::HashSet<u64>,
    order: VecDeque<u64>,
}

impl EarlyCancels {
    const MAX: usize = 4096;

    fn insert(&mut self, dispatch_id: u64) {
        if self.ids.insert(dispatch_id) {
            self.order.push_back(dispatch_id);
        }
        while self.order.len() > Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    /// True (and forgotten) when `dispatch_id` was cancelled before it came.
    fn take(&mut self, dispatch_id: u64) -> bool {
        self.ids.remove(&dispatch_id)
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<WorkAck, Status>> + Send>>;

#[tonic::async_trait]
impl StatefulWorker for WorkerService {
    type WorkStream = AckStream;

    async fn work(&self, request: Request<Streaming<WorkItem>>) -> Result<Response<Self::WorkStream>, Status> {
        let inbound = request.into_inner();
        let (acks, ack_rx) = mpsc::channel::<Result<WorkAck, Status>>(4096);
        self.inner.tasks.spawn(self.inner.clone().serve_call(inbound, acks));
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
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ListOperationsResponse { operations, ..Default::default() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_cancels_are_remembered_once_and_bounded() {
        let mut early = EarlyCancels::default();
        early.insert(7);
        assert!(early.take(7));
        assert!(!early.take(7), "a cancel applies to one arrival");
        for id in 0..(EarlyCancels::MAX as u64 + 10) {
            early.insert(id);
        }
        assert!(!early.take(0), "the oldest are forgotten past the bound");
        assert!(early.take(EarlyCancels::MAX as u64 + 9));
        assert!(early.ids.len() <= EarlyCancels::MAX && early.order.len() <= EarlyCancels::MAX);
    }

    #[test]
    fn an_absurd_timeout_means_no_deadline_not_a_panic() {
        let token = CancellationToken::new();
        let attempt = Attempt::new(WorkItem { timeout_ms: u64::MAX, ..Default::default() }, &token);
        assert!(attempt.deadline.is_none() || attempt.deadline.is_some_and(|d| d > Instant::now()));
        let attempt = Attempt::new(WorkItem { timeout_ms: 0, ..Default::default() }, &token);
        assert!(attempt.deadline.is_none() && attempt.budget.is_none() && !attempt.is_over(Instant::now()));
        let attempt = Attempt::new(WorkItem { timeout_ms: 1000, ..Default::default() }, &token);
        let (Some(deadline), Some(budget)) = (attempt.deadline, attempt.budget) else { panic!("a deadline") };
        assert!(budget < deadline, "the budget leaves time to hand the attempt back");
        token.cancel();
        assert!(attempt.is_over(Instant::now()), "the drain deadline ends queued attempts too");
    }
}
