//! Dispatch of accepted events until each has a durable result: stateful
//! events over one long-lived `Work` stream per worker, stateless events
//! through the stateless service.
//!
//! **Routing by capability.** Every worker announces what it serves
//! (`WorkAck.capabilities`, the first message of each `Work` call and again
//! whenever it changes); a link serves nothing until then. An event goes to
//! the least-loaded healthy link whose latest capabilities contain its
//! operation ([`Routing`]). An event whose operation no link serves waits
//! for one (back-pressure) for at most its attempt's time; then that attempt
//! is used up (`no live worker serves operation "x"`), so nothing waits
//! forever. Whether a new event is accepted at all is [`Pool::admit`].
//!
//! **An event keeps its registry version.** Every stateful event carries the
//! definition of its operation from the version it was accepted under
//! (`WorkItem.registry_version`) through every attempt: its attempts
//! (`attempts`, else `--max-attempts`, sent as `max_attempts`) and its
//! attempt time (the larger of `--event-timeout` and the operation's
//! `timeout` + 1 s, sent as `timeout_ms`).
//!
//! An event stays in its link's in-flight table until the worker acks it
//! (which it does only after a reassembler stored the result). When a
//! worker's stream breaks, every in-flight event of that link is dispatched
//! again; so is every event past its attempt time, and every attempt the
//! worker hands back after a transient failure (`WorkAck.retry`). Whenever
//! the pool abandons an attempt that is still running (its timeout), it sends
//! a cancel item for it on the same link, ahead of queued events, so the
//! worker frees its slot at once. After its attempts the pool delivers a
//! FAILED result (with its dead letter) in the event's place, so a stream
//! never stalls on a lost event. A late result of an earlier attempt is
//! harmless: the reassembler keeps the first result of each (stream,
//! sequence).
//!
//! **Links come and go with discovery.** The pool keeps one link per
//! endpoint of its [`Peers`] watch (`--workers`, `dns://` names re-resolved).
//! A new endpoint gets a link; a link whose endpoint disappeared is
//! retired: it takes no new event at once, keeps its `Work` call open until
//! the worker acked what it holds (a pod leaving a headless Service drains),
//! and then ends like a broken link: whatever it still holds (the worker
//! died, or its attempts time out) is dispatched again elsewhere, the path
//! of a lost worker.
//!
//! [`Pool::in_flight`] answers whether an event is still being worked on
//! (dispatched, or waiting to be dispatched again), from an index kept in
//! step with the in-flight tables by a ticket each event carries until it is
//! settled.

use ordo_runtime::sync::{lock, read, write};
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::Stream;
use ordo_core::hash::Map;
use ordo_proto::v1::{
    Capabilities, Completed, DeadLetter, Event, EventResult, ResultStatus, WorkItem,
    stateful_worker_client::StatefulWorkerClient, stateless_client::StatelessClient,
};
use ordo_registry::OperationSpec;
use ordo_runtime::{backoff::Backoff, client::TracedChannel, discovery::Peers};
use result_sink::ResultSink;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Items queued per worker link beyond what the worker has taken.
const LINK_QUEUE: usize = 1024;
/// Cancels queued per worker link; beyond it a cancel is dropped and the
/// worker ends the attempt at its own deadline instead.
const CANCEL_QUEUE: usize = 1024;
/// What an operation's own `timeout` gets on top in the harmonizer: the
/// worker's call times out first, and its hand-back arrives in time.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(1);
/// How often a retired link looks whether its worker acked all it held
/// (acks wake it sooner; this catches events the timeout sweep took).
const DRAIN_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub event_timeout: Duration,
    pub max_attempts: u32,
}

impl PoolConfig {
    /// Attempts an event of `spec` gets: its `attempts`, else `--max-attempts`.
    pub fn attempts(&self, spec: &OperationSpec) -> u32 {
        spec.attempts.unwrap_or(self.max_attempts).max(1)
    }

    /// One attempt's time: `--event-timeout`, or the operation's `timeout`
    /// + 1 s when that is longer.
    pub fn attempt_timeout(&self, spec: &OperationSpec) -> Duration {
        match spec.timeout {
            Some(timeout) => self.event_timeout.max(timeout.saturating_add(TIMEOUT_MARGIN)),
            None => self.event_timeout,
        }
    }
}

/// What [`Pool::occupancy`] samples.
#[derive(Debug, Default, Clone, Copy)]
pub struct Occupancy {
    /// Stateful events dispatched and not settled.
    pub events: usize,
    /// Streams with such events.
    pub streams: usize,
    /// The widest span (highest − lowest + 1) of a stream's unsettled sequences.
    pub widest: u64,
}

/// One event the pool holds.
#[derive(Debug)]
struct Held {
    /// How many tickets are out for it.
    tickets: u32,
    /// When its first ticket was taken.
    since: Instant,
    /// When its claim was last written for other harmonizers to see
    /// (`crate::claims`); `None`: not claimed.
    claimed: Option<Instant>,
}

/// Events the pool holds, per stream and sequence, and the claims to take
/// back from Redis because their event settled.
#[derive(Debug, Default)]
struct Index {
    held: Mutex<Map<String, Map<u64, Held>>>,
    settled_claims: Mutex<Vec<(String, u64)>>,
}

impl Index {
    fn holds(&self, stream_id: &str, sequence: u64) -> bool {
        lock(&self.held).get(stream_id).is_some_and(|stream| stream.contains_key(&sequence))
    }

    /// See [`Pool::claims_due`].
    fn claims_due(&self, now: Instant, after: Duration, renew: Duration) -> Vec<(String, u64)> {
        let mut due = Vec::new();
        let mut held = lock(&self.held);
        for (stream, sequences) in held.iter_mut() {
            for (&sequence, event) in sequences.iter_mut() {
                let stale = event.claimed.is_none_or(|at| now.saturating_duration_since(at) >= renew);
                if stale && now.saturating_duration_since(event.since) >= after {
                    event.claimed = Some(now);
                    due.push((stream.clone(), sequence));
                }
            }
        }
        due
    }

    fn take_settled_claims(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *lock(&self.settled_claims))
    }
}

/// Holds an event in the [`Index`] from its first dispatch until it is
/// settled (acked as delivered, or given up and FAILED recorded). It moves
/// with the event through re-dispatches, so the index never says "not in
/// flight" in between; dropping it is the only way out.
struct Ticket {
    index: Arc<Index>,
    stream_id: String,
    sequence: u64,
}

impl Ticket {
    fn new(index: &Arc<Index>, event: &Event) -> Self {
        let fresh = || Held { tickets: 0, since: Instant::now(), claimed: None };
        let mut held = lock(&index.held);
        // Look up before inserting: most events' streams are held already, and
        // `entry` would allocate the key every time.
        match held.get_mut(&event.stream_id) {
            Some(stream) => stream.entry(event.sequence).or_insert_with(fresh).tickets += 1,
            None => {
                let mut stream = Map::default();
                stream.insert(event.sequence, Held { tickets: 1, ..fresh() });
                held.insert(event.stream_id.clone(), stream);
            }
        }
        drop(held);
        Self { index: index.clone(), stream_id: event.stream_id.clone(), sequence: event.sequence }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut index = lock(&self.index.held);
        let Some(stream) = index.get_mut(&self.stream_id) else { return };
        let mut claimed = false;
        if let Some(held) = stream.get_mut(&self.sequence) {
            held.tickets = held.tickets.saturating_sub(1);
            if held.tickets == 0 {
                claimed = held.claimed.is_some();
                stream.remove(&self.sequence);
            }
        }
        if stream.is_empty() {
            index.remove(&self.stream_id);
        }
        drop(index);
        if claimed {
            lock(&self.index.settled_claims).push((self.stream_id.clone(), self.sequence));
        }
    }
}

/// An event held in flight by [`Pool::hold`] until dropped.
pub struct Hold {
    _ticket: Ticket,
}

/// A stateful event and everything it keeps until it is settled.
struct Job {
    event: Event,
    /// Its operation as defined in the registry version it was accepted under.
    spec: Arc<OperationSpec>,
    /// That version (stamped on every dispatch).
    version: u64,
    /// The attempt being made (1 for the first).
    attempt: u32,
    /// Held (for its `Drop`) until the job is settled.
    _ticket: Ticket,
}

struct InFlight {
    job: Job,
    deadline: Instant,
}

/// The sending side of one open `Work` call.
#[derive(Clone)]
struct LinkTx {
    items: mpsc::Sender<WorkItem>,
    /// Sent before any queued item (see [`outbound`]).
    cancels: mpsc::Sender<WorkItem>,
}

/// What a link's worker said it serves (its latest `Capabilities`).
#[derive(Debug)]
struct Served {
    operations: HashSet<String>,
    /// Its name (`Capabilities.worker`, else the link's address).
    worker: String,
}

struct Link {
    endpoint: String,
    sender: Mutex<Option<LinkTx>>,
    in_flight: Mutex<Map<u64, InFlight>>,
    healthy: AtomicBool,
    /// `None` until the worker's capabilities arrive on the open call: a
    /// link serves nothing before.
    served: RwLock<Option<Arc<Served>>>,
    /// Cancelled when its endpoint left the peers: no new events, and its
    /// driver ends once the worker acked what it holds.
    retired: CancellationToken,
    /// Its driver ended after it was retired: the slot may take a new link.
    closed: AtomicBool,
}

impl Link {
    fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            sender: Mutex::new(None),
            in_flight: Mutex::new(Map::default()),
            healthy: AtomicBool::new(false),
            served: RwLock::new(None),
            retired: CancellationToken::new(),
            closed: AtomicBool::new(false),
        }
    }
    fn load(&self) -> usize {
        lock(&self.in_flight).len()
    }
    fn sender(&self) -> Option<LinkTx> {
        lock(&self.sender).clone()
    }
    fn served(&self) -> Option<Arc<Served>> {
        read(&self.served).clone()
    }
    /// Healthy, not retired, and its worker's latest capabilities contain `operation`.
    fn serves(&self, operation: &str) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.retired.is_cancelled()
            && read(&self.served).as_ref().is_some_and(|served| served.operations.contains(operation))
    }
    /// Tells the worker to stop an attempt the pool no longer waits for.
    fn cancel(&self, dispatch_id: u64) {
        let Some(tx) = self.sender() else { return };
        let item = WorkItem { dispatch_id, cancel: true, ..Default::default() };
        if tx.cancels.try_send(item).is_err() {
            tracing::debug!(endpoint = %self.endpoint, dispatch_id, "cancel not sent; the worker's deadline ends the attempt");
        }
    }
}

/// The links and what each serves: picking a link for an operation, and
/// whether an operation has (or lately had) a live worker.
struct Routing {
    /// Indexed by slot: a link keeps its slot until its driver ended after
    /// it was retired; only then may a new link take the slot, so an index
    /// held by a driver always means its own link.
    links: RwLock<Vec<Arc<Link>>>,
    /// When a link last stopped serving each operation (it went down, or
    /// announced capabilities without it); entries older than `recent` are
    /// dropped.
    lost: Mutex<HashMap<String, Instant>>,
    /// How long an operation counts as lately served after its last link
    /// lost it (`--event-timeout`): a worker restarting.
    recent: Duration,
    /// Bumped whenever what any link serves may have changed.
    changes: watch::Sender<u64>,
}

impl Routing {
    fn new(endpoints: &[String], recent: Duration) -> Self {
        Self {
            links: RwLock::new(endpoints.iter().map(|endpoint| Arc::new(Link::new(endpoint))).collect()),
            lost: Mutex::default(),
            recent,
            changes: watch::Sender::new(0),
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// The link in slot `index`.
    fn link(&self, index: usize) -> Option<Arc<Link>> {
        read(&self.links).get(index).cloned()
    }

    /// Every slot's link, for a pass over them without holding the lock.
    fn snapshot(&self) -> Vec<(usize, Arc<Link>)> {
        read(&self.links).iter().cloned().enumerate().collect()
    }

    /// Brings the links in line with the peers now `wanted`: retires every
    /// live link whose endpoint is not wanted any more, and returns the
    /// wanted endpoints that have no live link yet (for [`Routing::add`]).
    fn reconcile(&self, wanted: &[String]) -> Vec<String> {
        let links = read(&self.links);
        let mut retired = Vec::new();
        for link in links.iter().filter(|link| !link.retired.is_cancelled()) {
            if !wanted.contains(&link.endpoint) {
                tracing::info!(endpoint = %link.endpoint, "worker address gone; retiring its link");
                link.retired.cancel();
                retired.extend(link.served().map(|served| served.operations.iter().cloned().collect::<Vec<_>>()));
            }
        }
        let missing = wanted
            .iter()
            .filter(|endpoint| !links.iter().any(|link| !link.retired.is_cancelled() && link.endpoint == **endpoint))
            .cloned()
            .collect();
        drop(links);
        if !retired.is_empty() {
            // Its operations count as served lately (events are admitted and
            // wait) while the remaining or new workers take over.
            self.remember_lost(retired.iter().flatten());
            self.changed();
        }
        missing
    }

    /// A new link to `endpoint`, in the first slot whose retired link has
    /// ended, else in a new slot; returns its slot.
    fn add(&self, endpoint: &str) -> usize {
        let mut links = write(&self.links);
        let link = Arc::new(Link::new(endpoint));
        match links.iter().position(|old| old.retired.is_cancelled() && old.closed.load(Ordering::Acquire)) {
            Some(index) => {
                links[index] = link;
                index
            }
            None => {
                links.push(link);
                links.len() - 1
            }
        }
    }

    /// The least-loaded healthy link serving `operation`, preferring one
    /// other than `avoid`.
    /// One pass, no allocation (it runs per dispatch).
    fn pick(&self, operation: &str, avoid: Option<usize>) -> Option<usize> {
        let mut first = None;
        let mut best: Option<(usize, usize)> = None;
        for (i, link) in read(&self.links).iter().enumerate() {
            if !link.serves(operation) {
                continue;
            }
            first.get_or_insert(i);
            if Some(i) == avoid {
                continue;
            }
            let load = link.load();
            if best.is_none_or(|(_, least)| load < least) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i).or(first)
    }

    /// Some healthy link serves `operation` now.
    fn serves(&self, operation: &str) -> bool {
        read(&self.links).iter().any(|link| link.serves(operation))
    }

    /// A link served `operation` within the last `recent`.
    fn served_recently(&self, operation: &str) -> bool {
        lock(&self.lost).get(operation).is_some_and(|at| at.elapsed() < self.recent)
    }

    /// The names of the healthy links' workers serving `operation` now.
    fn workers(&self, operation: &str) -> Vec<String> {
        let mut names: Vec<String> = read(&self.links)
            .iter()
            .filter(|link| link.serves(operation))
            .filter_map(|link| link.served().map(|served| served.worker.clone()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The rule of admission for a new stateful event: accepted when a
    /// healthy link serves its operation, or one did within `recent` (a
    /// worker restarting: the event waits for it in dispatch); otherwise when
    /// a serving link appears within `wait`; else UNAVAILABLE.
    async fn admit(&self, operation: &str, wait: Duration) -> Result<(), Error> {
        if self.may_admit(operation) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if self.serves(operation) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(Error::NoWorker(operation.to_owned())),
            }
        }
    }

    /// [`Routing::admit`] without waiting: true when an event of
    /// `operation` is accepted now.
    fn may_admit(&self, operation: &str) -> bool {
        self.serves(operation) || self.served_recently(operation)
    }

    fn remember_lost<'a>(&self, operations: impl Iterator<Item = &'a String>) {
        let now = Instant::now();
        let mut lost = lock(&self.lost);
        lost.retain(|_, at| now.duration_since(*at) < self.recent);
        for operation in operations {
            lost.insert(operation.clone(), now);
        }
    }

    /// The worker of link `index` announced what it serves.
    fn set_capabilities(&self, index: usize, capabilities: Capabilities) {
        let Some(link) = self.link(index) else { return };
        let worker = if capabilities.worker.is_empty() { link.endpoint.clone() } else { capabilities.worker };
        let served = Arc::new(Served { operations: capabilities.operations.into_iter().collect(), worker });
        tracing::info!(
            endpoint = %link.endpoint,
            worker = %served.worker,
            operations = ?{ let mut ops: Vec<&String> = served.operations.iter().collect(); ops.sort_unstable(); ops },
            registry_version = capabilities.registry_version,
            concurrency = capabilities.concurrency,
            "worker capabilities"
        );
        let previous = write(&link.served).replace(served.clone());
        if let Some(previous) = previous {
            self.remember_lost(previous.operations.difference(&served.operations));
        }
        self.changed();
    }

    /// Link `index` opened a `Work` call (it serves nothing until its
    /// worker's capabilities arrive).
    fn link_up(&self, index: usize) {
        let Some(link) = self.link(index) else { return };
        link.healthy.store(true, Ordering::Relaxed);
        self.changed();
    }

    /// Link `index`'s `Work` call ended: it serves nothing now.
    fn link_down(&self, index: usize) {
        let Some(link) = self.link(index) else { return };
        link.healthy.store(false, Ordering::Relaxed);
        if let Some(previous) = write(&link.served).take() {
            self.remember_lost(previous.operations.iter());
        }
        self.changed();
    }
}

/// Longest worker error kept in a reason (it ends up in a FAILED result).
const MAX_REASON_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_REASON_BYTES`] on a char boundary.
fn bounded(text: &str) -> &str {
    if text.len() <= MAX_REASON_BYTES {
        return text;
    }
    let mut end = MAX_REASON_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Why an attempt was used up waiting for a worker.
fn no_worker_reason(operation: &str) -> String {
    format!("no live worker serves operation {operation:?}")
}

/// A FAILED result the pool records in an event's place, with its dead letter.
fn failed(event: &Event, attempts: u32, error: String) -> Completed {
    let mut completed =
        Completed { result: Some(EventResult::failed(event, error)), mode: event.mode, dead_letter: None };
    attach_dead_letter(&mut completed, event, attempts);
    completed
}

/// Sets the dead letter of a FAILED result (other results have none).
fn attach_dead_letter(completed: &mut Completed, event: &Event, attempts: u32) {
    let Some(result) = completed.result.as_ref() else { return };
    if result.status() != ResultStatus::Failed {
        return;
    }
    completed.dead_letter = Some(DeadLetter::of(event.clone(), ResultStatus::Failed, attempts, result.error.clone()));
}

struct Inner {
    routing: Routing,
    sink: ResultSink,
    stateless: StatelessClient<TracedChannel>,
    config: PoolConfig,
    next_dispatch: AtomicU64,
    index: Arc<Index>,
    /// Events waiting in the background for a worker ([`Parked`]).
    parked: Arc<AtomicUsize>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// Starts a link per endpoint `workers` holds now, and follows it: links
    /// are added and retired as the endpoints change. Fails when an
    /// endpoint held now is malformed.
    pub fn start(
        mut workers: Peers,
        sink: ResultSink,
        stateless: StatelessClient<TracedChannel>,
        config: PoolConfig,
        shutdown: ordo_runtime::Shutdown,
    ) -> Result<Self, ordo_runtime::client::EndpointError> {
        let inner = Arc::new(Inner {
            routing: Routing::new(&[], config.event_timeout),
            sink,
            stateless,
            config,
            next_dispatch: AtomicU64::new(1),
            index: Arc::default(),
            parked: Arc::default(),
        });
        let now = workers.borrow_and_update().clone();
        connect(&inner, &now, &shutdown)?;
        tokio::spawn(follow_peers(Arc::downgrade(&inner), workers, shutdown.clone()));
        tokio::spawn(sweep_timeouts(Arc::downgrade(&inner), shutdown));
        Ok(Self { inner })
    }

    /// Hands a stateful event, checked against registry version `version`
    /// as `spec`, to a worker serving its operation. Resolves once it is
    /// queued on a link (back-pressure: waits while every serving worker is
    /// full or none is up, for at most the attempt's time; then the attempt
    /// is used up and the event goes on waiting in the background).
    ///
    /// An event whose operation no live worker serves at all right now (its
    /// workers are restarting) waits in the background instead, up to
    /// [`MAX_PARKED`] such events, so that one operation without a worker
    /// does not hold a call that also carries other operations' events and
    /// results; past that bound it waits here (back-pressure) as before.
    pub async fn dispatch(&self, event: Event, spec: Arc<OperationSpec>, version: u64) {
        let ticket = Ticket::new(&self.inner.index, &event);
        let job = Job { event, spec, version, attempt: 1, _ticket: ticket };
        crate::metrics::ATTEMPTS.increment(1);
        if !self.inner.routing.serves(&job.spec.name)
            && let Some(parked) = Parked::take(&self.inner.parked)
        {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let _parked = parked;
                first_placement(inner, job).await;
            });
            return;
        }
        first_placement(self.inner.clone(), job).await;
    }

    /// Whether a new stateful event of `operation` is accepted (see
    /// [`Routing::admit`]): at once when a live worker serves it or one did
    /// within `--event-timeout`, else once one appears within `wait`; else
    /// [`Error::NoWorker`] (UNAVAILABLE).
    pub async fn admit(&self, operation: &str, wait: Duration) -> Result<(), Error> {
        self.inner.routing.admit(operation, wait).await
    }

    /// [`Pool::admit`] without waiting.
    pub fn may_admit(&self, operation: &str) -> bool {
        self.inner.routing.may_admit(operation)
    }

    /// Notified whenever what the workers serve may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.routing.changes.subscribe()
    }

    /// Names of the live workers serving `operation` now.
    pub fn workers(&self, operation: &str) -> Vec<String> {
        self.inner.routing.workers(operation)
    }

    /// What the pool holds now (for the window gauges).
    pub fn occupancy(&self) -> Occupancy {
        let index = lock(&self.inner.index.held);
        let mut occupancy = Occupancy { streams: index.len(), ..Occupancy::default() };
        for sequences in index.values() {
            occupancy.events += sequences.len();
            let low = sequences.keys().min().copied().unwrap_or(0);
            let high = sequences.keys().max().copied().unwrap_or(0);
            occupancy.widest = occupancy.widest.max(high.saturating_sub(low).saturating_add(1));
        }
        occupancy
    }

    /// True while any attempt of this event is dispatched and unsettled,
    /// including while it waits to be dispatched again; false once a worker
    /// acked its result or the pool recorded FAILED in its place.
    pub fn in_flight(&self, stream_id: &str, sequence: u64) -> bool {
        self.inner.index.holds(stream_id, sequence)
    }

    /// The events to claim (or claim again) for other harmonizers to see:
    /// every one held since at least `after` whose claim is missing or was
    /// written `renew` ago or longer. Each is marked claimed as of `now`.
    pub(crate) fn claims_due(&self, now: Instant, after: Duration, renew: Duration) -> Vec<(String, u64)> {
        self.inner.index.claims_due(now, after, renew)
    }

    /// The claimed events that settled since the last call: their claims
    /// are to be removed.
    pub(crate) fn settled_claims(&self) -> Vec<(String, u64)> {
        self.inner.index.take_settled_claims()
    }

    /// Runs a stateless event and records its result, retrying while the
    /// stateless service is unavailable.
    pub fn run_stateless(&self, event: Event, spec: Arc<OperationSpec>) {
        let inner = self.inner.clone();
        // In flight (for the gap timer) until its result is durable: a
        // stateless event retrying through an outage is not a gap.
        let ticket = Ticket::new(&inner.index, &event);
        tokio::spawn(async move {
            let (result, attempts) = execute_stateless(&inner, &event, &spec).await;
            let mut completed = Completed { result: Some(result), mode: event.mode, dead_letter: None };
            attach_dead_letter(&mut completed, &event, attempts);
            let _ = inner.sink.deliver(completed).await;
            drop(ticket);
        });
    }

    /// Counts `event` as in flight ([`Pool::in_flight`], and claimed for
    /// other harmonizers once held `--claim-after`) until the guard is
    /// dropped: for work done outside the pool (a `Submit`'s stateless event).
    pub fn hold(&self, event: &Event) -> Hold {
        Hold { _ticket: Ticket::new(&self.inner.index, event) }
    }

    /// Executes a stateless event (no recording).
    pub async fn execute_stateless(&self, event: &Event, spec: &OperationSpec) -> EventResult {
        execute_stateless(&self.inner, event, spec).await.0
    }

    /// Stores `event`'s result that the harmonizer produced itself (a
    /// stateless one); resolves once durable. A FAILED one is recorded as a
    /// dead letter too.
    pub async fn record_for(&self, event: &Event, result: EventResult) -> bool {
        let mut completed = Completed { result: Some(result), mode: event.mode, dead_letter: None };
        attach_dead_letter(&mut completed, event, 1);
        self.inner.sink.deliver(completed).await.is_ok()
    }

    pub fn healthy_workers(&self) -> usize {
        read(&self.inner.routing.links).iter().filter(|l| l.healthy.load(Ordering::Relaxed)).count()
    }
}

/// Executes a stateless event. A transient failure (the service down or
/// restarting, UNAVAILABLE) is retried with the shared jittered backoff for
/// as long as the event's attempt budget lasts (its operation's attempts ×
/// its attempt time); a try that times out uses up one attempt. An answer
/// about the event itself (NOT_FOUND, INVALID_ARGUMENT) is final at once.
/// Returns the result and the tries made.
async fn execute_stateless(inner: &Inner, event: &Event, spec: &OperationSpec) -> (EventResult, u32) {
    let max_attempts = inner.config.attempts(spec);
    let timeout = inner.config.attempt_timeout(spec);
    let deadline = tokio::time::Instant::now() + timeout * max_attempts;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let (mut tries, mut timeouts) = (0u32, 0u32);
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut client = inner.stateless.clone();
        let error = match tokio::time::timeout(timeout.min(left), client.execute(event.clone())).await {
            Ok(Ok(response)) => return (response.into_inner(), tries),
            Ok(Err(status))
                if status.code() == tonic::Code::NotFound || status.code() == tonic::Code::InvalidArgument =>
            {
                return (EventResult::failed(event, status.message()), tries);
            }
            Ok(Err(status)) => format!("stateless service: {}", status.message()),
            Err(_) => {
                timeouts += 1;
                "stateless service timed out".to_owned()
            }
        };
        tracing::debug!(tries, %error, "stateless try failed");
        let pause = backoff.next_delay();
        if timeouts >= max_attempts || tokio::time::Instant::now() + pause >= deadline {
            let error = format!("gave up after {tries} tries within the attempt budget: {error}");
            return (EventResult::failed(event, error), tries);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Queues attempt `job.attempt` on the least-loaded healthy link serving
/// its operation (preferring one other than `avoid`). While no link serves
/// it, waits for one, for at most the attempt's time: then the attempt is
/// used up and the job comes back (`Err`).
async fn place(inner: &Arc<Inner>, job: Job, avoid: Option<usize>) -> Result<(), Job> {
    let mut avoid = avoid;
    let mut job = job;
    let timeout = inner.config.attempt_timeout(&job.spec);
    let give_up_at = tokio::time::Instant::now() + timeout;
    let mut changes = inner.routing.changes.subscribe();
    loop {
        changes.borrow_and_update();
        let Some(index) = inner.routing.pick(&job.spec.name, avoid) else {
            // No healthy worker serves it: hold the event (back-pressure)
            // until one does, or the attempt's time is up.
            match tokio::time::timeout_at(give_up_at, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Err(job),
            }
        };
        let Some(link) = inner.routing.link(index) else {
            avoid = None;
            continue;
        };
        let Some(tx) = link.sender() else {
            avoid = None;
            tokio::task::yield_now().await;
            continue;
        };
        let dispatch_id = inner.next_dispatch.fetch_add(1, Ordering::Relaxed);
        let item = WorkItem {
            dispatch_id,
            event: Some(job.event.clone()),
            attempt: job.attempt,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            max_attempts: inner.config.attempts(&job.spec),
            cancel: false,
            registry_version: job.version,
        };
        // In the table before it is sent: an ack may come back at once. The
        // clock already runs while the link queue is full, so a worker that
        // stopped reading (frozen) still times its events out.
        lock(&link.in_flight).insert(dispatch_id, InFlight { job, deadline: Instant::now() + timeout });
        // A worker that stopped reading (frozen) must not hold this call
        // forever: after the attempt's time the item goes elsewhere.
        let sent = match tx.items.try_send(item) {
            // The common case: room on the link, taken now (the deadline set above stands).
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(item)) => {
                matches!(tokio::time::timeout(timeout, tx.items.send(item)).await, Ok(Ok(())))
            }
        };
        let mut in_flight = lock(&link.in_flight);
        if sent {
            // Handed over: the attempt's time starts now, as on the worker.
            if let Some(flight) = in_flight.get_mut(&dispatch_id) {
                flight.deadline = Instant::now() + timeout;
            }
            return Ok(());
        }
        // The link went down under us, or did not take the item in time.
        // Unless the link's own clean-up (or the timeout sweep) already took
        // the event to re-dispatch it, try another link.
        let Some(flight) = in_flight.remove(&dispatch_id) else { return Ok(()) };
        drop(in_flight);
        job = flight.job;
        avoid = Some(index);
    }
}

/// Places a new event's first attempt; an attempt that found no serving
/// worker in its time is used up and retried (or FAILED) in the background.
async fn first_placement(inner: Arc<Inner>, job: Job) {
    if let Err(job) = place(&inner, job, None).await {
        let reason = no_worker_reason(&job.spec.name);
        tokio::spawn(retry(inner, job, None, reason));
    }
}

/// Events waiting in the background for a worker of their operation (see
/// [`Pool::dispatch`]) at most.
pub const MAX_PARKED: usize = 4096;

/// One of the [`MAX_PARKED`] places; given back when dropped.
struct Parked(Arc<AtomicUsize>);

impl Parked {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_PARKED).then_some(n + 1))
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Dispatches again after a failed attempt (preferring a link other than
/// `from`), or records FAILED in its place once its attempts are used up.
async fn retry(inner: Arc<Inner>, job: Job, from: Option<usize>, reason: String) {
    let (mut job, mut from, mut reason) = (job, from, reason);
    loop {
        let stream = job.event.stream_id.clone();
        let sequence = job.event.sequence;
        let attempt = job.attempt;
        if attempt >= inner.config.attempts(&job.spec) {
            tracing::warn!(stream, sequence, attempts = attempt, reason, "giving up; releasing FAILED in its place");
            let completed = failed(&job.event, attempt, format!("no result after {attempt} attempts (last: {reason})"));
            crate::metrics::GIVEN_UP.increment(1);
            let _ = inner.sink.deliver(completed).await;
            // Settled only once FAILED is durable.
            drop(job);
            return;
        }
        tracing::info!(stream, sequence, attempt = attempt + 1, reason, "re-dispatching");
        job.attempt += 1;
        crate::metrics::ATTEMPTS.increment(1);
        crate::metrics::RETRIES.increment(1);
        match place(&inner, job, from).await {
            Ok(()) => return,
            Err(back) => {
                reason = no_worker_reason(&back.spec.name);
                (job, from) = (back, None);
            }
        }
    }
}

/// The pause before re-dispatching an attempt a worker handed back: 50 ms
/// after the first, about doubling, at most 2 s, jittered.
fn hand_back_pause(attempt: u32) -> Duration {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    (1..attempt).for_each(|_| {
        backoff.next_delay();
    });
    backoff.next_delay()
}

/// The request stream of one `Work` call: cancels first, then queued items.
fn outbound(items: mpsc::Receiver<WorkItem>, cancels: mpsc::Receiver<WorkItem>) -> impl Stream<Item = WorkItem> {
    futures::stream::unfold((items, cancels), |(mut items, mut cancels)| async move {
        let next = tokio::select! {
            biased;
            Some(cancel) = cancels.recv() => Some(cancel),
            item = items.recv() => item,
        };
        next.map(|item| (item, (items, cancels)))
    })
}

/// Adds a link (and its driver) for each of `endpoints` without one, and
/// retires the links of endpoints not among them.
fn connect(
    inner: &Arc<Inner>,
    endpoints: &[String],
    shutdown: &ordo_runtime::Shutdown,
) -> Result<(), ordo_runtime::client::EndpointError> {
    for endpoint in inner.routing.reconcile(endpoints) {
        let client = StatefulWorkerClient::new(ordo_runtime::client::traced(&endpoint)?);
        let index = inner.routing.add(&endpoint);
        tokio::spawn(drive_link(Arc::downgrade(inner), index, client, shutdown.clone()));
    }
    Ok(())
}

/// Keeps the links in line with the worker endpoints as they change.
async fn follow_peers(inner: Weak<Inner>, mut workers: Peers, shutdown: ordo_runtime::Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = workers.changed() => if changed.is_err() { return },
        }
        let now = workers.borrow_and_update().clone();
        let Some(pool) = inner.upgrade() else { return };
        if let Err(error) = connect(&pool, &now, &shutdown) {
            tracing::error!(%error, "a worker endpoint cannot be dialed");
        }
    }
}

async fn drive_link(
    inner: Weak<Inner>,
    index: usize,
    client: StatefulWorkerClient<TracedChannel>,
    shutdown: ordo_runtime::Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let Some(pool) = inner.upgrade() else { return };
        let Some(link) = pool.routing.link(index) else { return };
        let endpoint = link.endpoint.clone();
        let (items, items_rx) = mpsc::channel(LINK_QUEUE);
        let (cancels, cancels_rx) = mpsc::channel(CANCEL_QUEUE);
        let mut client = client.clone();
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = link.retired.cancelled() => Err(tonic::Status::cancelled("its address was retired")),
            opened = client.work(outbound(items_rx, cancels_rx)) => opened,
        };
        match opened {
            Ok(response) => {
                let mut acks = response.into_inner();
                *lock(&link.sender) = Some(LinkTx { items, cancels });
                pool.routing.link_up(index);
                tracing::info!(%endpoint, "worker connected");
                backoff.reset();
                drop(pool);
                // Retired: ends once the worker acked all it held.
                let mut draining = false;
                loop {
                    if draining && lock(&link.in_flight).is_empty() {
                        tracing::info!(%endpoint, "retired worker acked all it held");
                        break;
                    }
                    let ack = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = link.retired.cancelled(), if !draining => {
                            draining = true;
                            continue;
                        }
                        _ = tokio::time::sleep(DRAIN_POLL), if draining => continue,
                        ack = acks.message() => ack,
                    };
                    let Some(pool) = inner.upgrade() else { return };
                    match ack {
                        Ok(Some(mut ack)) => {
                            if let Some(capabilities) = ack.capabilities.take() {
                                pool.routing.set_capabilities(index, capabilities);
                                if ack.dispatch_id == 0 {
                                    continue; // an announcement, not a dispatch ack
                                }
                            }
                            let flight = lock(&link.in_flight).remove(&ack.dispatch_id);
                            // A delivered ack settles the event (dropping its
                            // ticket); anything else is handed back to retry.
                            if let Some(flight) = flight
                                && !ack.delivered
                            {
                                crate::metrics::HAND_BACKS.increment(1);
                                let reason = format!("worker: {}", bounded(&ack.error));
                                let pool = pool.clone();
                                // A transient failure: pause before the next attempt (growing
                                // with attempts, jittered), so an operation that fails at once
                                // does not use up its attempts in milliseconds.
                                let pause = hand_back_pause(flight.job.attempt);
                                tokio::spawn(async move {
                                    tokio::time::sleep(pause).await;
                                    retry(pool, flight.job, Some(index), reason).await;
                                });
                            }
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
        // Stop new dispatches first, then take what the dead stream held.
        if link.healthy.load(Ordering::Relaxed) {
            pool.routing.link_down(index);
        }
        lock(&link.sender).take();
        let orphans: Vec<InFlight> = lock(&link.in_flight).drain().map(|(_, f)| f).collect();
        if !orphans.is_empty() {
            tracing::warn!(%endpoint, events = orphans.len(), "re-dispatching the events of a lost worker");
        }
        for flight in orphans {
            tokio::spawn(retry(pool.clone(), flight.job, Some(index), "worker lost".to_owned()));
        }
        drop(pool);
        if link.retired.is_cancelled() {
            tracing::info!(%endpoint, "worker link retired");
            // Last: from here on the slot may take a new link.
            link.closed.store(true, Ordering::Release);
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = link.retired.cancelled() => {}
            _ = backoff.wait() => {}
        }
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
        for (index, link) in pool.routing.snapshot() {
            let expired: Vec<(u64, InFlight)> = {
                let mut in_flight = lock(&link.in_flight);
                let ids: Vec<u64> = in_flight.iter().filter(|(_, f)| f.deadline <= now).map(|(id, _)| *id).collect();
                ids.into_iter().filter_map(|id| in_flight.remove(&id).map(|f| (id, f))).collect()
            };
            for (dispatch_id, flight) in expired {
                // Abandoned here, so stop it there: it would hold a slot.
                link.cancel(dispatch_id);
                crate::metrics::TIMEOUTS.increment(1);
                tokio::spawn(retry(pool.clone(), flight.job, Some(index), "event timeout".to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream_id: &str, sequence: u64) -> Event {
        Event { stream_id: stream_id.into(), sequence, ..Default::default() }
    }

    fn held(index: &Arc<Index>, stream_id: &str, sequence: u64) -> bool {
        index.holds(stream_id, sequence)
    }

    #[test]
    fn events_held_long_enough_are_claimed_renewed_and_released_when_settled() {
        let index: Arc<Index> = Arc::default();
        let (after, renew) = (Duration::from_millis(200), Duration::from_secs(2));
        let slow = Ticket::new(&index, &event("s", 1));
        let quick = Ticket::new(&index, &event("s", 2));
        let t0 = Instant::now();
        assert!(index.claims_due(t0, Duration::from_secs(3600), renew).is_empty(), "none is held that long");
        drop(quick);
        assert!(index.take_settled_claims().is_empty(), "an event settled before it was claimed has no claim");
        let t1 = t0 + after;
        assert_eq!(index.claims_due(t1, after, renew), vec![("s".to_owned(), 1)]);
        assert!(index.claims_due(t1 + renew / 2, after, renew).is_empty(), "claimed recently");
        assert_eq!(index.claims_due(t1 + renew, after, renew), vec![("s".to_owned(), 1)], "renewed");
        let again = Ticket::new(&index, &event("s", 1));
        drop(slow);
        assert!(index.take_settled_claims().is_empty(), "another dispatch of s#1 still holds it");
        drop(again);
        assert_eq!(index.take_settled_claims(), vec![("s".to_owned(), 1)]);
        assert!(index.take_settled_claims().is_empty(), "taken once");
    }

    #[test]
    fn an_event_is_in_flight_until_its_last_ticket_is_dropped() {
        let index: Arc<Index> = Arc::default();
        let first = Ticket::new(&index, &event("s", 3));
        // The same event dispatched twice at once (e.g. Process and Submit).
        let second = Ticket::new(&index, &event("s", 3));
        let other = Ticket::new(&index, &event("s", 4));
        assert!(held(&index, "s", 3) && held(&index, "s", 4));
        assert!(!held(&index, "s", 5) && !held(&index, "t", 3));
        drop(first);
        assert!(held(&index, "s", 3), "one dispatch of s#3 is still unsettled");
        drop(second);
        assert!(!held(&index, "s", 3));
        drop(other);
        assert!(lock(&index.held).is_empty(), "settled streams leave nothing behind");
    }

    #[tokio::test]
    async fn cancels_overtake_queued_items() {
        use futures::StreamExt as _;
        let (items, items_rx) = mpsc::channel(8);
        let (cancels, cancels_rx) = mpsc::channel(8);
        for dispatch_id in 1..=3 {
            items.try_send(WorkItem { dispatch_id, ..Default::default() }).expect("room");
        }
        cancels.try_send(WorkItem { dispatch_id: 2, cancel: true, ..Default::default() }).expect("room");
        drop((items, cancels));
        let sent: Vec<(u64, bool)> = outbound(items_rx, cancels_rx).map(|i| (i.dispatch_id, i.cancel)).collect().await;
        assert_eq!(sent, vec![(2, true), (1, false), (2, false), (3, false)]);
    }

    #[test]
    fn a_failed_placeholder_carries_its_dead_letter() {
        let mut e = event("s", 7);
        e.payload = b"input".to_vec().into();
        let completed = failed(&e, 3, "no result after 3 attempts".into());
        let result = completed.result.as_ref().map(EventResult::status);
        assert_eq!(result, Some(ResultStatus::Failed));
        let letter = completed.dead_letter.expect("a dead letter");
        assert_eq!(
            (letter.status(), letter.attempts, letter.error.as_str()),
            (ResultStatus::Failed, 3, "no result after 3 attempts")
        );
        assert_eq!(letter.event.map(|e| e.payload), Some(e.payload.clone()));
        assert!(letter.id.is_empty() && letter.at_unix_ms > 0);

        let mut ok = Completed { result: Some(EventResult::ok(&e, "out")), mode: 0, dead_letter: None };
        attach_dead_letter(&mut ok, &e, 1);
        assert!(ok.dead_letter.is_none(), "only FAILED results are dead letters");
    }

    fn op_event(stream_id: &str, sequence: u64, operation: &str) -> Event {
        Event { operation: operation.into(), ..event(stream_id, sequence) }
    }

    fn spec(name: &str) -> Arc<OperationSpec> {
        Arc::new(OperationSpec::new(name, ordo_registry::Kind::Stateful))
    }

    fn capabilities(worker: &str, operations: &[&str]) -> Capabilities {
        Capabilities {
            operations: operations.iter().map(|op| (*op).to_owned()).collect(),
            registry_version: 0,
            concurrency: 8,
            worker: worker.into(),
        }
    }

    /// Routing over three links that never connect; the tests set what each serves.
    fn routing(recent: Duration) -> Routing {
        Routing::new(&["a:1".into(), "b:1".into(), "c:1".into()], recent)
    }

    #[test]
    fn attempts_and_attempt_time_come_from_the_operation() {
        let config = PoolConfig { event_timeout: Duration::from_secs(2), max_attempts: 3 };
        let plain = OperationSpec::new("plain", ordo_registry::Kind::Stateful);
        assert_eq!((config.attempts(&plain), config.attempt_timeout(&plain)), (3, Duration::from_secs(2)));
        let slow = OperationSpec {
            attempts: Some(5),
            timeout: Some(Duration::from_secs(4)),
            ..OperationSpec::new("slow", ordo_registry::Kind::Stateful)
        };
        assert_eq!((config.attempts(&slow), config.attempt_timeout(&slow)), (5, Duration::from_secs(5)));
        let quick = OperationSpec {
            attempts: Some(1),
            timeout: Some(Duration::from_millis(100)),
            ..OperationSpec::new("quick", ordo_registry::Kind::Stateful)
        };
        assert_eq!(
            (config.attempts(&quick), config.attempt_timeout(&quick)),
            (1, Duration::from_secs(2)),
            "never shorter than --event-timeout"
        );
    }

    #[test]
    fn pick_chooses_the_least_loaded_healthy_link_serving_the_operation() {
        let routing = routing(Duration::from_secs(30));
        for index in 0..3 {
            routing.link_up(index);
        }
        assert_eq!(routing.pick("x", None), None, "no link serves anything before its capabilities");
        routing.set_capabilities(0, capabilities("wa", &["x"]));
        routing.set_capabilities(1, capabilities("wb", &["x", "y"]));
        // Link 2 is healthy but never announced anything.
        assert_eq!(routing.pick("x", None), Some(0), "equal load: the first");
        assert_eq!(routing.pick("y", None), Some(1));
        assert_eq!(routing.pick("z", None), None);
        assert_eq!(routing.pick("x", Some(0)), Some(1), "another serving link than the one to avoid");
        assert_eq!(routing.pick("y", Some(1)), Some(1), "the avoided link when it is the only one serving");

        // Load link 0: link 1 is the least loaded serving x.
        let index: Arc<Index> = Arc::default();
        let job = Job {
            event: event("s", 0),
            spec: spec("x"),
            version: 0,
            attempt: 1,
            _ticket: Ticket::new(&index, &event("s", 0)),
        };
        lock(&routing.link(0).expect("link 0").in_flight).insert(1, InFlight { job, deadline: Instant::now() });
        assert_eq!(routing.pick("x", None), Some(1));

        // An unhealthy link is never picked, whatever it announced.
        routing.link(1).expect("link 1").healthy.store(false, Ordering::Relaxed);
        assert_eq!(routing.pick("x", None), Some(0));
        assert_eq!(routing.pick("y", None), None);
        assert_eq!(routing.workers("x"), vec!["wa".to_owned()]);

        // New capabilities replace the old ones.
        routing.set_capabilities(0, capabilities("wa", &["y"]));
        assert_eq!((routing.pick("x", None), routing.pick("y", None)), (None, Some(0)));
    }

    #[tokio::test]
    async fn admission_without_a_serving_worker_is_unavailable_after_the_wait() {
        let routing = routing(Duration::from_secs(30));
        routing.link_up(0);
        routing.set_capabilities(0, capabilities("wa", &["y"]));
        let started = Instant::now();
        let refused = routing.admit("x", Duration::from_millis(100)).await;
        assert!(matches!(&refused, Err(Error::NoWorker(op)) if op == "x"), "{refused:?}");
        assert!(started.elapsed() >= Duration::from_millis(100), "refused only after the wait");
        let status = tonic::Status::from(refused.expect_err("refused"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(routing.admit("y", Duration::ZERO).await.is_ok(), "served now");
    }

    #[tokio::test]
    async fn admission_accepts_an_operation_served_recently() {
        let routing = routing(Duration::from_secs(30));
        routing.link_up(0);
        routing.set_capabilities(0, capabilities("wa", &["x", "y"]));
        routing.link_down(0); // the worker restarts
        assert!(!routing.serves("x"));
        assert!(routing.may_admit("x") && routing.may_admit("y"), "served within the last event timeout");
        assert!(routing.admit("x", Duration::ZERO).await.is_ok());
        assert!(!routing.may_admit("z"), "never served");

        // Announcing capabilities without an operation counts as losing it too.
        routing.link_up(1);
        routing.set_capabilities(1, capabilities("wb", &["w"]));
        routing.set_capabilities(1, capabilities("wb", &[]));
        assert!(routing.may_admit("w"));

        // Past the event timeout it is not recent any more.
        let forgetful = self::routing(Duration::ZERO);
        forgetful.link_up(0);
        forgetful.set_capabilities(0, capabilities("wa", &["x"]));
        forgetful.link_down(0);
        assert!(!forgetful.may_admit("x"));
        assert!(forgetful.admit("x", Duration::from_millis(10)).await.is_err());
    }

    #[tokio::test]
    async fn admission_waits_for_a_worker_that_appears() {
        let routing = Arc::new(routing(Duration::from_secs(30)));
        let later = routing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            later.link_up(2);
            later.set_capabilities(2, capabilities("wc", &["x"]));
        });
        let started = Instant::now();
        assert!(routing.admit("x", Duration::from_secs(5)).await.is_ok());
        assert!(started.elapsed() < Duration::from_secs(2), "accepted as soon as it appeared");
    }

    #[test]
    fn reconcile_retires_links_whose_address_left_and_names_the_new_ones() {
        let routing = routing(Duration::from_secs(30));
        for index in 0..3 {
            routing.link_up(index);
        }
        routing.set_capabilities(0, capabilities("wa", &["x"]));
        routing.set_capabilities(1, capabilities("wb", &["x"]));
        let added = routing.reconcile(&["b:1".into(), "c:1".into(), "d:1".into()]);
        assert_eq!(added, vec!["d:1".to_owned()], "only the address without a link");
        let a = routing.link(0).expect("link 0");
        assert!(a.retired.is_cancelled() && !a.serves("x"), "a retired link takes no new event");
        assert_eq!(routing.pick("x", None), Some(1));
        assert_eq!(routing.workers("x"), vec!["wb".to_owned()]);
        assert!(routing.may_admit("x"));

        // Its slot stays taken until its driver ended.
        assert_eq!(routing.add("d:1"), 3);
        assert_eq!(routing.reconcile(&["b:1".into(), "c:1".into(), "d:1".into()]), Vec::<String>::new());
        a.closed.store(true, Ordering::Release);
        assert_eq!(routing.add("e:1"), 0, "the ended link's slot is reused");
        assert_eq!(routing.link(0).map(|link| link.endpoint.clone()), Some("e:1".to_owned()));

        // An address that comes back gets a new link, not the retired one.
        routing.link(1).expect("link 1").retired.cancel();
        assert_eq!(
            routing.reconcile(&["b:1".into(), "c:1".into(), "d:1".into(), "e:1".into()]),
            vec!["b:1".to_owned()]
        );
        // Everything gone: every link retired, operations lately served.
        assert!(routing.reconcile(&[]).is_empty());
        assert!(routing.snapshot().iter().all(|(_, link)| link.retired.is_cancelled()));
        assert!(!routing.serves("x") && routing.may_admit("x"));
    }

    /// In-process stand-ins for workers and a reassembler, over real gRPC.
    mod fakes {
        use std::sync::atomic::AtomicBool;

        use ordo_proto::v1::{
            DeliverAck, DeliverBatch, GetDeadLetterRequest, GetStreamRequest, ListDeadLettersRequest,
            ListDeadLettersResponse, ListOperationsRequest, ListOperationsResponse, StreamState, WorkAck,
            reassembler_server::{Reassembler, ReassemblerServer},
            stateful_worker_server::{StatefulWorker, StatefulWorkerServer},
        };
        use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
        use tonic::{Request, Response, Status, Streaming};

        use super::*;

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Behaviour {
            /// Acks every item as delivered.
            Ack,
            /// Ends its work stream on its first item, unacked, and refuses
            /// every later call (a worker that died).
            DieOnFirst,
            /// Ends its work stream on its first item, unacked, refuses calls
            /// for 300 ms, then acks everything (a worker that restarted).
            RestartOnFirst,
            /// Acks every item as delivered after this long (a slow worker).
            AckAfter(Duration),
            /// Takes every item and never acks (a worker that hangs).
            Hold,
        }

        #[derive(Clone)]
        pub struct Worker {
            pub name: &'static str,
            /// What it announces first (`None`: an old worker that never does).
            pub operations: Option<Vec<&'static str>>,
            pub behaviour: Behaviour,
            pub received: Arc<Mutex<Vec<WorkItem>>>,
            pub dead: Arc<AtomicBool>,
            /// Down until then (restarting), once.
            pub down_until: Arc<Mutex<Option<Instant>>>,
        }

        impl Worker {
            pub fn new(name: &'static str, operations: Option<&[&'static str]>, behaviour: Behaviour) -> Self {
                Self {
                    name,
                    operations: operations.map(<[_]>::to_vec),
                    behaviour,
                    received: Arc::default(),
                    dead: Arc::default(),
                    down_until: Arc::default(),
                }
            }

            /// (operation, attempt) of every item received.
            pub fn got(&self) -> Vec<(String, u32)> {
                lock(&self.received)
                    .iter()
                    .map(|item| (item.event.as_ref().map(|e| e.operation.clone()).unwrap_or_default(), item.attempt))
                    .collect()
            }
        }

        #[tonic::async_trait]
        impl StatefulWorker for Worker {
            type WorkStream = ReceiverStream<Result<WorkAck, Status>>;

            async fn work(&self, request: Request<Streaming<WorkItem>>) -> Result<Response<Self::WorkStream>, Status> {
                if self.dead.load(Ordering::Relaxed) {
                    return Err(Status::unavailable("dead"));
                }
                if lock(&self.down_until).is_some_and(|until| Instant::now() < until) {
                    return Err(Status::unavailable("restarting"));
                }
                let mut items = request.into_inner();
                let (tx, rx) = mpsc::channel(64);
                if let Some(operations) = &self.operations {
                    let announce =
                        WorkAck { capabilities: Some(capabilities(self.name, operations)), ..Default::default() };
                    tx.send(Ok(announce)).await.map_err(|_| Status::internal("closed"))?;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    while let Ok(Some(item)) = items.message().await {
                        if item.cancel {
                            continue;
                        }
                        lock(&me.received).push(item.clone());
                        if me.behaviour == Behaviour::DieOnFirst {
                            me.dead.store(true, Ordering::Relaxed);
                            return; // dropping `tx` ends the work stream
                        }
                        if me.behaviour == Behaviour::RestartOnFirst {
                            let mut down_until = lock(&me.down_until);
                            if down_until.is_none() {
                                *down_until = Some(Instant::now() + Duration::from_millis(300));
                                return;
                            }
                        }
                        if me.behaviour == Behaviour::Hold {
                            continue;
                        }
                        if let Behaviour::AckAfter(pause) = me.behaviour {
                            tokio::time::sleep(pause).await;
                        }
                        let event = item.event.unwrap_or_default();
                        let ack = WorkAck {
                            dispatch_id: item.dispatch_id,
                            stream_id: event.stream_id,
                            sequence: event.sequence,
                            delivered: true,
                            ..Default::default()
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            }

            async fn list_operations(
                &self,
                _: Request<ListOperationsRequest>,
            ) -> Result<Response<ListOperationsResponse>, Status> {
                Err(Status::unimplemented("fake worker"))
            }
        }

        /// Stores nothing; acks every batch and keeps its results.
        #[derive(Clone, Default)]
        pub struct Sink {
            pub stored: Arc<Mutex<Vec<Completed>>>,
        }

        #[tonic::async_trait]
        impl Reassembler for Sink {
            type DeliverStream = ReceiverStream<Result<DeliverAck, Status>>;

            async fn deliver(
                &self,
                request: Request<Streaming<DeliverBatch>>,
            ) -> Result<Response<Self::DeliverStream>, Status> {
                let mut batches = request.into_inner();
                let (tx, rx) = mpsc::channel(64);
                let stored = self.stored.clone();
                tokio::spawn(async move {
                    while let Ok(Some(batch)) = batches.message().await {
                        let accepted = u32::try_from(batch.results.len()).unwrap_or(u32::MAX);
                        lock(&stored).extend(batch.results);
                        let ack = DeliverAck { batch_id: batch.batch_id, accepted, duplicates: 0 };
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            }

            async fn get_stream(&self, _: Request<GetStreamRequest>) -> Result<Response<StreamState>, Status> {
                Err(Status::unimplemented("fake reassembler"))
            }

            async fn list_dead_letters(
                &self,
                _: Request<ListDeadLettersRequest>,
            ) -> Result<Response<ListDeadLettersResponse>, Status> {
                Err(Status::unimplemented("fake reassembler"))
            }

            async fn get_dead_letter(&self, _: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
                Err(Status::unimplemented("fake reassembler"))
            }
        }

        async fn listen() -> (TcpListenerStream, String) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
            let address = listener.local_addr().expect("bound").to_string();
            (TcpListenerStream::new(listener), address)
        }

        pub async fn serve_worker(worker: Worker) -> String {
            let (incoming, address) = listen().await;
            let server = tonic::transport::Server::builder().add_service(StatefulWorkerServer::new(worker));
            tokio::spawn(server.serve_with_incoming(incoming));
            address
        }

        pub async fn serve_sink(sink: Sink) -> String {
            let (incoming, address) = listen().await;
            let server = tonic::transport::Server::builder().add_service(ReassemblerServer::new(sink));
            tokio::spawn(server.serve_with_incoming(incoming));
            address
        }

        /// A pool of `workers` recording into `sink`; the stateless service is unused.
        pub async fn pool(workers: &[String], sink: &Sink, config: PoolConfig) -> (Pool, ordo_runtime::Shutdown) {
            pool_following(ordo_runtime::discovery::fixed(workers), sink, config).await
        }

        /// A pool of the workers `peers` holds (as it changes) recording into `sink`.
        pub async fn pool_following(peers: Peers, sink: &Sink, config: PoolConfig) -> (Pool, ordo_runtime::Shutdown) {
            let sink = ResultSink::start(ordo_runtime::discovery::fixed(&[serve_sink(sink.clone()).await]))
                .expect("sink endpoint");
            let stateless = StatelessClient::new(ordo_runtime::client::traced("127.0.0.1:9").expect("endpoint"));
            let shutdown = ordo_runtime::Shutdown::new();
            let pool = Pool::start(peers, sink, stateless, config, shutdown.clone()).expect("pool");
            (pool, shutdown)
        }
    }

    /// Polls `done` every 10 ms for up to 10 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_go_only_to_workers_serving_their_operation_with_their_version_settings() {
        use fakes::{Behaviour, Worker};
        let alpha = Worker::new("worker-alpha", Some(&["alpha"]), Behaviour::Ack);
        let beta = Worker::new("worker-beta", Some(&["beta"]), Behaviour::Ack);
        let old = Worker::new("old-worker", None, Behaviour::Ack);
        let addresses = vec![
            fakes::serve_worker(old.clone()).await,
            fakes::serve_worker(alpha.clone()).await,
            fakes::serve_worker(beta.clone()).await,
        ];
        let config = PoolConfig { event_timeout: Duration::from_secs(2), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool(&addresses, &fakes::Sink::default(), config).await;
        let alpha_spec = Arc::new(OperationSpec {
            attempts: Some(5),
            timeout: Some(Duration::from_secs(4)),
            ..OperationSpec::new("alpha", ordo_registry::Kind::Stateful)
        });
        for sequence in 0..10 {
            // The first dispatch waits for the capabilities to arrive.
            pool.dispatch(op_event("a", sequence, "alpha"), alpha_spec.clone(), 7).await;
            pool.dispatch(op_event("b", sequence, "beta"), spec("beta"), 7).await;
        }
        until("every event is acked", || (0..10).all(|s| !pool.in_flight("a", s) && !pool.in_flight("b", s))).await;
        assert_eq!(alpha.got(), vec![("alpha".to_owned(), 1); 10]);
        assert_eq!(beta.got(), vec![("beta".to_owned(), 1); 10]);
        assert!(old.got().is_empty(), "a worker that announced nothing serves nothing");
        for item in lock(&alpha.received).iter() {
            assert_eq!((item.registry_version, item.max_attempts, item.timeout_ms), (7, 5, 5_000));
        }
        for item in lock(&beta.received).iter() {
            assert_eq!((item.registry_version, item.max_attempts, item.timeout_ms), (7, 3, 2_000));
        }
        assert_eq!(pool.workers("alpha"), vec!["worker-alpha".to_owned()]);
        assert_eq!(pool.workers("beta"), vec!["worker-beta".to_owned()]);
        assert!(pool.workers("gamma").is_empty());

        // ListOperations: the version in use, every field, who serves what.
        let catalog = ordo_registry::Catalog::new(
            7,
            1,
            [
                (*alpha_spec).clone(),
                OperationSpec::new("beta", ordo_registry::Kind::Stateful),
                OperationSpec::new("gamma", ordo_registry::Kind::Stateful),
                OperationSpec::new("echo", ordo_registry::Kind::Stateless),
            ],
        );
        let conn = ordo_runtime::redis_conn::lazy("redis://127.0.0.1:1").expect("a lazy connection");
        let registry = crate::registry::Registry::new(ordo_registry::Follower::fixed(conn, catalog), 1024, None);
        let listed = crate::list_operations(&registry, &pool);
        assert_eq!((listed.registry_version, listed.pinned), (7, true));
        let rows: Vec<(&str, Vec<String>, u32, u64)> = listed
            .operations
            .iter()
            .map(|op| (op.name.as_str(), op.workers.clone(), op.attempts, op.timeout_ms))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("alpha", vec!["worker-alpha".to_owned()], 5, 4_000),
                ("beta", vec!["worker-beta".to_owned()], 0, 0),
                ("echo", vec![], 0, 0),
                ("gamma", vec![], 0, 0),
            ]
        );
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_workers_event_goes_to_another_worker_serving_it() {
        use fakes::{Behaviour, Worker};
        let dying = Worker::new("dying", Some(&["alpha"]), Behaviour::DieOnFirst);
        let survivor = Worker::new("survivor", Some(&["alpha"]), Behaviour::Ack);
        let other = Worker::new("other", Some(&["beta"]), Behaviour::Ack);
        let addresses = vec![
            fakes::serve_worker(dying.clone()).await,
            fakes::serve_worker(survivor.clone()).await,
            fakes::serve_worker(other.clone()).await,
        ];
        let config = PoolConfig { event_timeout: Duration::from_secs(5), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool(&addresses, &fakes::Sink::default(), config).await;
        until("both alpha workers announced themselves", || pool.workers("alpha").len() == 2).await;
        // Equal load: the first link, the one that dies with the event.
        pool.dispatch(op_event("s", 0, "alpha"), spec("alpha"), 0).await;
        until("the event is acked", || !pool.in_flight("s", 0)).await;
        assert_eq!(dying.got(), vec![("alpha".to_owned(), 1)]);
        assert_eq!(survivor.got(), vec![("alpha".to_owned(), 2)], "re-dispatched at once to the other serving worker");
        assert!(other.got().is_empty(), "never to a worker that does not serve it");
        assert_eq!(pool.workers("alpha"), vec!["survivor".to_owned()]);
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_held_outside_the_pool_is_in_flight_and_claimed_until_dropped() {
        let config = PoolConfig { event_timeout: Duration::from_secs(5), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool(&[], &fakes::Sink::default(), config).await;
        let held = pool.hold(&event("s", 7));
        assert!(pool.in_flight("s", 7) && !pool.in_flight("s", 8));
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(pool.claims_due(later, Duration::from_millis(200), Duration::from_secs(2)), vec![("s".into(), 7)]);
        drop(held);
        assert!(!pool.in_flight("s", 7));
        assert_eq!(pool.settled_claims(), vec![("s".to_owned(), 7)], "its claim is to be removed");
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_only_worker_restarts_events_are_accepted_and_wait_for_it() {
        use fakes::{Behaviour, Worker};
        let worker = Worker::new("only", Some(&["alpha"]), Behaviour::RestartOnFirst);
        let addresses = vec![fakes::serve_worker(worker.clone()).await];
        let config = PoolConfig { event_timeout: Duration::from_secs(5), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool(&addresses, &fakes::Sink::default(), config).await;
        until("the worker announced itself", || pool.workers("alpha").len() == 1).await;
        pool.dispatch(op_event("s", 0, "alpha"), spec("alpha"), 0).await;
        until("the worker went down with the event", || pool.workers("alpha").is_empty()).await;
        assert!(pool.may_admit("alpha"), "served within the event timeout: new events are accepted");
        assert!(pool.admit("alpha", Duration::ZERO).await.is_ok());
        let started = Instant::now();
        pool.dispatch(op_event("s", 1, "alpha"), spec("alpha"), 0).await;
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "the caller is not held while no worker serves the operation: {:?}",
            started.elapsed()
        );
        until("both events are acked once it is back", || !pool.in_flight("s", 0) && !pool.in_flight("s", 1)).await;
        let mut got = worker.got();
        got.sort();
        assert_eq!(got, vec![("alpha".to_owned(), 1), ("alpha".to_owned(), 1), ("alpha".to_owned(), 2)]);
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_worker_uses_up_attempts_then_failed_is_recorded() {
        use fakes::{Behaviour, Worker};
        let other = Worker::new("other", Some(&["beta"]), Behaviour::Ack);
        let addresses = vec![fakes::serve_worker(other.clone()).await];
        let sink = fakes::Sink::default();
        let config = PoolConfig { event_timeout: Duration::from_millis(300), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool(&addresses, &sink, config).await;
        let alpha =
            Arc::new(OperationSpec { attempts: Some(2), ..OperationSpec::new("alpha", ordo_registry::Kind::Stateful) });
        let started = Instant::now();
        pool.dispatch(op_event("s", 4, "alpha"), alpha, 0).await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(200),
            "no worker serves it: it waits in the background, not in the caller: {waited:?}"
        );
        assert!(pool.in_flight("s", 4), "it waits for a worker (in flight: no gap is declared for it)");
        until("FAILED is recorded", || !pool.in_flight("s", 4)).await;
        assert!(started.elapsed() >= Duration::from_millis(600), "two attempts' time");
        let stored = lock(&sink.stored).clone();
        assert_eq!(stored.len(), 1);
        let result = stored[0].result.clone().expect("a result");
        assert_eq!((result.stream_id.as_str(), result.sequence, result.status()), ("s", 4, ResultStatus::Failed));
        assert!(
            result.error.contains("after 2 attempts")
                && result.error.contains("no live worker serves operation \"alpha\""),
            "{}",
            result.error
        );
        let letter = stored[0].dead_letter.clone().expect("its dead letter");
        assert_eq!(letter.attempts, 2);
        assert!(other.got().is_empty());
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_follow_the_peers_new_ones_get_work_gone_ones_drain_first() {
        use fakes::{Behaviour, Worker};
        let first = Worker::new("first", Some(&["alpha"]), Behaviour::AckAfter(Duration::from_millis(300)));
        let second = Worker::new("second", Some(&["alpha"]), Behaviour::Ack);
        let (first_address, second_address) =
            (fakes::serve_worker(first.clone()).await, fakes::serve_worker(second.clone()).await);
        let (peers, watched) = watch::channel(vec![first_address.clone()]);
        let config = PoolConfig { event_timeout: Duration::from_secs(5), max_attempts: 3 };
        let (pool, shutdown) = fakes::pool_following(watched, &fakes::Sink::default(), config).await;
        until("the first worker announced itself", || pool.workers("alpha") == vec!["first".to_owned()]).await;
        pool.dispatch(op_event("s", 0, "alpha"), spec("alpha"), 0).await;
        until("the only worker has it", || first.got().len() == 1).await;

        // The first address leaves while its worker still works on s#0; the second arrives.
        peers.send_replace(vec![second_address.clone()]);
        until("the second worker announced itself", || pool.workers("alpha") == vec!["second".to_owned()]).await;
        pool.dispatch(op_event("s", 1, "alpha"), spec("alpha"), 0).await;
        until("both events are acked", || !pool.in_flight("s", 0) && !pool.in_flight("s", 1)).await;
        assert_eq!(first.got(), vec![("alpha".to_owned(), 1)], "the retired worker finished what it held");
        assert_eq!(second.got(), vec![("alpha".to_owned(), 1)], "s#1 went to the new worker, s#0 was not re-sent");
        until("the retired link ended", || pool.healthy_workers() == 1).await;

        // Its address comes back: a new link, and work for it again.
        peers.send_replace(vec![second_address, first_address]);
        until("both serve", || pool.workers("alpha").len() == 2).await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gone_workers_unacked_event_is_dispatched_again_elsewhere() {
        use fakes::{Behaviour, Worker};
        let hung = Worker::new("hung", Some(&["alpha"]), Behaviour::Hold);
        let other = Worker::new("other", Some(&["alpha"]), Behaviour::Ack);
        let (hung_address, other_address) =
            (fakes::serve_worker(hung.clone()).await, fakes::serve_worker(other.clone()).await);
        let (peers, watched) = watch::channel(vec![hung_address]);
        let config = PoolConfig { event_timeout: Duration::from_millis(500), max_attempts: 3 };
        let sink = fakes::Sink::default();
        let (pool, shutdown) = fakes::pool_following(watched, &sink, config).await;
        until("the worker announced itself", || pool.workers("alpha").len() == 1).await;
        pool.dispatch(op_event("s", 0, "alpha"), spec("alpha"), 0).await;
        until("the worker has it", || hung.got().len() == 1).await;
        peers.send_replace(vec![other_address]);
        until("the event is acked", || !pool.in_flight("s", 0)).await;
        assert_eq!(hung.got(), vec![("alpha".to_owned(), 1)]);
        assert_eq!(other.got(), vec![("alpha".to_owned(), 2)], "not lost: the next attempt went to the other worker");
        assert!(lock(&sink.stored).is_empty(), "no FAILED placeholder");
        until("the retired link ended", || pool.healthy_workers() == 1).await;
        shutdown.cancel();
    }
}
