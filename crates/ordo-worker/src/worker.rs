//! The worker (figure 3 of the paper): receives stream events from the
//! harmonizer over a long-lived `Work` stream, runs up to `--concurrency`
//! operations at once (they finish in any order), hands each result to a
//! reassembler and, once the reassembler acknowledged it, acks the dispatch
//! to the harmonizer. Results never go back to the harmonizer directly.
//!
//! The first message of every `Work` call announces what the worker serves
//! ([`Capabilities`]), and so does a message whenever that changes (a new
//! registry version): the harmonizer sends a worker only events of
//! operations it serves. Each attempt runs with the definition of its
//! operation in the registry version the event was accepted under
//! (`WorkItem.registry_version`): native (compiled in) or remote, within the
//! operation's `timeout` and `concurrency`.
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

use ordo_runtime::sync::lock;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use ordo_core::{duration, latency::Latency, limits};
use ordo_proto::v1::{
    Capabilities, Completed, DeadLetter, Event, EventResult, ListOperationsRequest, ListOperationsResponse,
    ResultStatus, WorkAck, WorkItem,
    stateful_worker_server::{StatefulWorker, StatefulWorkerServer},
};
use ordo_registry::Follower;
use ordo_runtime::{
    Shutdown,
    readiness::{Dependency, Readiness},
    server::GrpcServer,
    telemetry,
};
use result_sink::{ResultSink, StoreResults};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, Span};

use crate::{
    args::{OperationFilter, WorkerArgs},
    capabilities::{self, Target},
    limits::OpLimits,
    operation::{OpContext, OpError, Operations},
    remote::{Invocation, Remotes},
};

/// Events read from one `Work` call that wait for a concurrency slot. Past
/// it the call is not read (back-pressure), so cancels wait too; an
/// attempt's own deadline still ends it then.
const QUEUED_PER_CALL: usize = 256;
/// How often a full queue is swept for attempts past their deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(10);
/// Part of an attempt's time kept for handing a failing attempt back before
/// the harmonizer's own timeout fires (a tenth, at most this).
const HAND_BACK_MARGIN: Duration = Duration::from_secs(2);
/// Acks (and announcements) queued per `Work` call.
const ACKS_PER_CALL: usize = 4096;

/// A worker: your operations plus everything around them. See the crate
/// documentation for an example.
#[derive(Debug, Clone, Default)]
pub struct Worker {
    operations: Operations,
}

impl Worker {
    /// A worker running `operations` natively (its built-in registry,
    /// version 0), and every remote operation of the registry it follows.
    pub fn new(operations: Operations) -> Self {
        Self { operations }
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains (for
    /// at most `--drain-timeout`) and returns. Fails at once for invalid
    /// flags or operation names; never because Redis (the registry) is
    /// unreachable: the worker then serves its built-in operations until it
    /// can read the registry. With `--store-results redis` its health is
    /// NOT_SERVING while Redis does not answer.
    pub async fn run(self, args: WorkerArgs, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
        args.validate().map_err(anyhow::Error::msg)?;
        self.operations.check().map_err(anyhow::Error::msg)?;
        let conn = ordo_runtime::redis_conn::connect(&args.redis_url)?;
        let follower = Follower::start(conn, self.operations.catalog(), args.registry_pin, shutdown.clone()).await;
        self.serve(args, follower, listener, shutdown).await
    }

    /// [`Worker::run`] with a registry follower of the caller's.
    pub(crate) async fn serve(
        self,
        args: WorkerArgs,
        follower: Follower,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        args.validate().map_err(anyhow::Error::msg)?;
        let name = match &args.name {
            Some(name) => name.trim().to_owned(),
            None => format!("{}:{}", hostname(), listener.local_addr()?.port()),
        };
        let sink = ResultSink::for_setting(
            args.store_results,
            &args.reassembler_list(),
            &args.discovery,
            &args.redis_url,
            &args.store,
        )?;
        let tasks = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let drain = args.common.drain_timeout;
        // Subscribed before the first computation: no change is missed.
        let mut changes = follower.changes();
        let compute = {
            let (natives, filter, name, concurrency) =
                (self.operations.clone(), args.operations.clone(), name.clone(), args.concurrency);
            move |follower: &Follower| {
                capabilities::capabilities(&follower.current(), &natives, &filter, &name, concurrency)
            }
        };
        let (announce, _) = watch::channel(compute(&follower));
        log_capabilities(&announce.borrow());
        crate::metrics::describe();
        crate::metrics::CONCURRENCY_LIMIT.set(args.concurrency as f64);
        let inner = Arc::new(Inner {
            natives: self.operations,
            follower: follower.clone(),
            filter: args.operations.clone(),
            name,
            remotes: Remotes::default(),
            limits: OpLimits::default(),
            capabilities: announce.clone(),
            sink,
            permits: Arc::new(Semaphore::new(args.concurrency)),
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
            tasks: tasks.clone(),
        });
        // A new registry version may change what this worker serves.
        let recompute = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = changes.changed() => if changed.is_err() { return },
                    }
                    let next = compute(&follower);
                    announce.send_if_modified(|caps| {
                        if *caps == next {
                            return false;
                        }
                        *caps = next;
                        log_capabilities(caps);
                        true
                    });
                }
            }
        });
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
        // Storing results itself, the worker cannot finish work while Redis
        // is down (the results wait, retried, in its batcher): its health
        // says so. Delivering to reassemblers, it needs Redis only for the
        // registry, which it can do without.
        let (readiness, _watcher) = match args.store_results {
            StoreResults::Redis => {
                let (readiness, watcher) = Readiness::watch(
                    vec![Dependency::redis(ordo_runtime::redis_conn::connect(&args.redis_url)?)],
                    shutdown.clone(),
                );
                (readiness, Some(watcher))
            }
            StoreResults::Reassembler => (Readiness::always(), None),
        };
        let service = WorkerService { inner };
        let served = GrpcServer::new()
            .with_readiness(readiness)
            .with_service(StatefulWorkerServer::new(service))
            .serve(listener, shutdown, drain)
            .await;
        tasks.close();
        tasks.wait().await;
        deadline.abort();
        recompute.abort();
        served
    }
}

fn log_capabilities(caps: &Capabilities) {
    tracing::info!(
        worker = %caps.worker,
        registry_version = caps.registry_version,
        operations = caps.operations.join(","),
        "serving operations"
    );
}

/// The machine's host name (for the default worker name).
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

struct Inner {
    natives: Operations,
    follower: Follower,
    filter: OperationFilter,
    /// Announced in the capabilities (`--name`).
    name: String,
    remotes: Remotes,
    limits: OpLimits,
    /// What this worker serves now.
    capabilities: watch::Sender<Capabilities>,
    sink: ResultSink,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    /// Cancelled at the drain deadline: ends every attempt still running.
    hard_stop: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Clone)]
struct WorkerService {
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
    /// Cancelled by a cancel item (the drain deadline, `Inner::hard_stop`,
    /// ends a running attempt as well).
    token: CancellationToken,
    /// When the harmonizer gives up on it (`None`: no limit).
    deadline: Option<Instant>,
    /// Until when operations may retry their dependencies.
    budget: Option<Instant>,
}

impl Attempt {
    fn new(item: WorkItem) -> Self {
        let now = Instant::now();
        let timeout = (item.timeout_ms > 0).then(|| Duration::from_millis(item.timeout_ms));
        // `checked_add`: an absurd timeout from the wire means no deadline, not a panic.
        let deadline = timeout.and_then(|t| now.checked_add(t));
        let budget = timeout.and_then(|t| now.checked_add(t - (t / 10).min(HAND_BACK_MARGIN)));
        // A token of its own, not a child of the drain's: a child is linked
        // into its parent under the parent's lock, on every attempt, by
        // every runtime thread. The drain deadline is watched beside it.
        Self { item, token: CancellationToken::new(), deadline, budget }
    }

    /// Cancelled, past its deadline, or past the drain deadline (`stopped`:
    /// `Inner::hard_stop` is cancelled).
    fn is_over(&self, now: Instant, stopped: bool) -> bool {
        stopped || self.token.is_cancelled() || self.deadline.is_some_and(|d| d <= now)
    }
}

/// Cancel handles of one call's attempts (queued or running), by dispatch
/// id. Dispatch ids are unique per harmonizer, and each harmonizer has its
/// own call, so the map is per call.
type Cancels = Arc<Mutex<HashMap<u64, CancellationToken>>>;

/// A final FAILED result, recorded as a dead letter too.
fn failed(event: &Event, attempts: u32, error: String) -> Completed {
    let dead_letter = DeadLetter::of(event.clone(), ResultStatus::Failed, attempts, error.clone());
    Completed { result: Some(EventResult::failed(event, error)), mode: event.mode, dead_letter: Some(dead_letter) }
}

/// The earlier of two optional instants (`None`: never).
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The ack that announces what the worker serves.
fn announcement(capabilities: Capabilities) -> WorkAck {
    WorkAck { capabilities: Some(capabilities), ..Default::default() }
}

impl Inner {
    /// Runs one event to an outcome. Never fails: problems become FAILED
    /// results or hand-backs.
    async fn execute(&self, item: &WorkItem, event: &Event, budget: Option<Instant>, span: &Span) -> Outcome {
        let attempt = item.attempt.max(1);
        // 0: a harmonizer that does not say; never hand back then.
        let max_attempts = item.max_attempts.max(attempt);
        match self.call(item, event, attempt, max_attempts, budget, span).await {
            Ok(payload) => Outcome::Completed(Box::new(Completed {
                result: Some(EventResult::ok(event, payload)),
                mode: event.mode,
                dead_letter: None,
            })),
            Err(error) if error.transient && attempt < max_attempts => Outcome::HandBack(error.message),
            Err(error) => Outcome::Completed(Box::new(failed(event, attempt, error.message))),
        }
    }

    /// One call of the event's operation as its registry version defines
    /// it: the simulated latency, then the operation, within its `timeout`
    /// and its `concurrency`.
    async fn call(
        &self,
        item: &WorkItem,
        event: &Event,
        attempt: u32,
        max_attempts: u32,
        budget: Option<Instant>,
        span: &Span,
    ) -> Result<Bytes, OpError> {
        let version = item.registry_version;
        let catalog = match self.follower.version(version).await {
            Ok(Some(catalog)) => catalog,
            Ok(None) => return Err(OpError::permanent(format!("registry version {version} does not exist"))),
            Err(error) => {
                return Err(OpError::transient(format!("cannot read registry version {version}: {error}")));
            }
        };
        let (spec, target) =
            capabilities::resolve(&catalog, &event.operation, &self.natives, &self.filter, &self.name)?;
        let model = match event.attributes.get(limits::LATENCY_ATTRIBUTE).map(|text| Latency::parse(text)) {
            None => Latency::None,
            Some(Ok(model)) => model,
            Some(Err(error)) => return Err(OpError::permanent(error.to_string())),
        };
        let _slot = self.limits.acquire(&spec).await;
        let timeout_at = spec.timeout.and_then(|t| Instant::now().checked_add(t));
        let delay = model.sample(&mut rand::rng());
        let run = async {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match target {
                Target::Native(op) => {
                    let ctx = OpContext {
                        attempt,
                        max_attempts,
                        budget: earliest(budget, timeout_at),
                        registry_version: catalog.version,
                        spec: spec.clone(),
                    };
                    op.call(&ctx, event).await
                }
                Target::Remote(endpoint) => {
                    let call = Invocation {
                        event,
                        attempt,
                        // Within the attempt's budget, so that a call that
                        // does not answer is handed back in time.
                        deadline: earliest(budget, timeout_at),
                        trace_context: telemetry::inject(span, &event.trace_context),
                    };
                    // Boxed: a remote call's future is large, and the native
                    // path (most attempts) should not carry its size through
                    // every attempt's task (each spawn copies the whole future).
                    Box::pin(self.remotes.invoke(&endpoint, &spec.name, call)).await
                }
            }
        };
        let (Some(at), Some(timeout)) = (timeout_at, spec.timeout) else { return run.await };
        let timed_out =
            || OpError::transient(format!("operation {:?} timed out after {}", spec.name, duration::format(timeout)));
        match tokio::time::timeout_at(at, run).await {
            // A remote call given the same deadline may notice it first.
            Ok(Err(error)) if error.transient && Instant::now() >= at => Err(timed_out()),
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out()),
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
        if !span.is_disabled() {
            // Every attempt is a span of the event's trace: which one, and where.
            span.record(telemetry::attr::ATTEMPT, item.attempt);
            span.record(telemetry::attr::WORKER, self.name.as_str());
            span.record(telemetry::attr::OPERATION, event.operation.as_str());
        }
        let running = crate::metrics::Running::start();
        let started = Instant::now();
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        // Dropping the operation's future is the cancellation: it frees the
        // slot at once, whatever the operation was waiting for.
        // The operation is polled first: one that is ready at once (most
        // are, at saturation) never polls the cancel futures, each of which
        // takes its token's lock to register and again to deregister. A
        // cancel that arrived before the start was seen by `is_over`; one
        // that arrives later ends the attempt at its next wake-up.
        let outcome = tokio::select! {
            biased;
            // Boxed: the attempt's task stays small (spawning copies the
            // whole future, several times; the operation's state is built
            // in its box once, when the attempt starts).
            outcome = Box::pin(self.execute(&item, event, budget, &span).instrument(span.clone())) => Ok(outcome),
            _ = token.cancelled() => Err("cancelled"),
            _ = self.hard_stop.cancelled() => Err("cancelled"),
            _ = expired => Err("deadline passed"),
        };
        drop(permit);
        drop(running);
        crate::metrics::DURATION.record(started.elapsed().as_secs_f64());
        lock(&cancels).remove(&dispatch_id);
        let mut ack =
            WorkAck { dispatch_id, stream_id: event.stream_id.clone(), sequence: event.sequence, ..Default::default() };
        match outcome {
            Err(why) => {
                match why {
                    "cancelled" => crate::metrics::CANCELS.increment(1),
                    _ => crate::metrics::TIMEOUTS.increment(1),
                }
                tracing::debug!(stream = %event.stream_id, sequence = event.sequence, attempt = item.attempt, why, "attempt abandoned; nothing delivered");
                return;
            }
            Ok(Outcome::HandBack(error)) => {
                tracing::info!(stream = %event.stream_id, sequence = event.sequence, attempt = item.attempt, %error, "transient failure; handing the attempt back");
                crate::metrics::HAND_BACKS.increment(1);
                ack.retry = true;
                ack.error = error;
            }
            Ok(Outcome::Completed(mut completed)) => {
                match completed.result.as_ref().map(|r| r.status()) {
                    Some(ordo_proto::ResultStatus::Ok) => crate::metrics::RESULTS_OK.increment(1),
                    _ => crate::metrics::RESULTS_FAILED.increment(1),
                }
                if let Some(result) = completed.result.as_mut() {
                    result.trace_context = telemetry::inject(&span, &result.trace_context);
                }
                // Only a durably stored result may be acked: otherwise the
                // harmonizer must be free to re-dispatch it. The drain
                // deadline ends a delivery that cannot finish.
                let delivered = tokio::select! {
                    // Biased: no random branch order to draw per attempt.
                    biased;
                    _ = self.hard_stop.cancelled() => false,
                    delivered = Box::pin(self.sink.deliver(*completed)) => delivered.is_ok(),
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
    /// events as slots free up, cancels on request, announces capability
    /// changes, drains on shutdown.
    async fn serve_call(
        self: Arc<Self>,
        mut inbound: Streaming<WorkItem>,
        acks: mpsc::Sender<Result<WorkAck, Status>>,
        mut capabilities: watch::Receiver<Capabilities>,
    ) {
        let attempts = TaskTracker::new();
        let cancels: Cancels = Arc::default();
        let mut queue: VecDeque<Attempt> = VecDeque::new();
        let mut early = EarlyCancels::default();
        let mut reading = true;
        let mut announcing = true;
        let mut swept = Instant::now();
        // Wakes the loop for the next sweep while the queue is full, so that
        // room made by expiries is found even when nothing else happens.
        let sweep = tokio::time::sleep_until(swept + SWEEP_EVERY);
        tokio::pin!(sweep);
        // Made once, not per turn of the loop (two turns per event): each new
        // one takes the drain token's lock to register and to deregister.
        let stopping = self.shutdown.cancelled();
        tokio::pin!(stopping);
        loop {
            if !reading && queue.is_empty() {
                break;
            }
            if queue.len() >= QUEUED_PER_CALL && swept.elapsed() >= SWEEP_EVERY {
                // Full: make room from what expired meanwhile (a cancel
                // removes its queued attempt itself). At most every
                // SWEEP_EVERY: while the queue stays full at saturation,
                // sweeping on every wake-up cost a pass over the whole queue
                // per event.
                let now = Instant::now();
                swept = now;
                sweep.as_mut().reset(now + SWEEP_EVERY);
                let stopped = self.hard_stop.is_cancelled();
                let mut handles = lock(&cancels);
                queue.retain(|a| {
                    let over = a.is_over(now, stopped);
                    if over {
                        handles.remove(&a.item.dispatch_id);
                    }
                    !over
                });
            }
            tokio::select! {
                biased;
                () = &mut stopping => break,
                changed = capabilities.changed(), if announcing && reading => match changed {
                    Ok(()) => {
                        let next = capabilities.borrow_and_update().clone();
                        if acks.send(Ok(announcement(next))).await.is_err() {
                            announcing = false;
                        }
                    }
                    Err(_) => announcing = false,
                },
                () = &mut sweep, if queue.len() >= QUEUED_PER_CALL => {}
                permit = self.permits.clone().acquire_owned(), if !queue.is_empty() => {
                    let Ok(permit) = permit else { break };
                    let Some(attempt) = queue.pop_front() else { continue };
                    if attempt.is_over(Instant::now(), self.hard_stop.is_cancelled()) {
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
                        let attempt = Attempt::new(item);
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
    ids: HashSet<u64>,
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
        let (acks, ack_rx) = mpsc::channel::<Result<WorkAck, Status>>(ACKS_PER_CALL);
        let mut capabilities = self.inner.capabilities.subscribe();
        // The first message of every call: what this worker serves.
        let now = capabilities.borrow_and_update().clone();
        if acks.try_send(Ok(announcement(now))).is_err() {
            return Err(Status::internal("cannot announce the worker's capabilities"));
        }
        self.inner.tasks.spawn(self.inner.clone().serve_call(inbound, acks, capabilities));
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let inner = &self.inner;
        let catalog = inner.follower.current();
        let operations =
            capabilities::served(&catalog, &inner.natives, &inner.filter).map(|spec| spec.info()).collect();
        Ok(Response::new(ListOperationsResponse {
            operations,
            registry_version: catalog.version,
            pinned: inner.follower.pinned(),
        }))
    }
}

#[cfg(test)]
mod tests;
