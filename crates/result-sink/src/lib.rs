//! [`ResultSink`], the client side of the reassembler: how workers and the
//! harmonizer hand results to the reassemblers, or, with `--store-results
//! redis` ([`StoreResults`]), store them into Redis themselves with the
//! reassembler's batching and script (`reassembler::local`). `deliver` resolves only once a reassembler acknowledged the
//! result as durably stored, which is what lets a worker ack its dispatch.
//!
//! One driver task per reassembler endpoint keeps a `Deliver` stream open,
//! batches whatever is queued, and tracks unacknowledged batches. When a
//! stream breaks, its unacknowledged results go to another healthy
//! reassembler (or back to the same one once it returns): redelivery is safe
//! because the release script drops duplicates.
//!
//! The endpoints are a [`Peers`] watch (`dns://` names re-resolved): a new
//! endpoint gets a driver; the driver of an endpoint that disappeared is
//! retired: it takes no new result, waits (for at most [`RETIRE_GRACE`])
//! for the acks of what it sent, then hands everything it still holds to
//! the other drivers (waiting for one while there is none), as a broken
//! driver's [`reroute`] does.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use ordo_proto::v1::{Completed, DeliverBatch, reassembler_client::ReassemblerClient};
use ordo_runtime::{
    backoff::Backoff,
    discovery::Peers,
    sync::{read, write},
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Results per DeliverBatch.
const MAX_BATCH: usize = 256;
/// Unacknowledged batches per connection before the driver stops sending.
const MAX_UNACKED: usize = 64;
const QUEUE: usize = 8192;
/// How long a retired driver waits for the acks of what it sent before it
/// hands it to another reassembler (which stores it at most once more).
pub const RETIRE_GRACE: Duration = Duration::from_secs(10);

struct Pending {
    completed: Completed,
    done: oneshot::Sender<()>,
}

struct Driver {
    endpoint: String,
    tx: mpsc::Sender<Pending>,
    healthy: AtomicBool,
    /// Cancelled when its endpoint left the peers.
    retired: CancellationToken,
}

struct Inner {
    /// The live drivers; a retired one leaves at once (its task finishes
    /// what it holds on its own).
    drivers: std::sync::RwLock<Vec<Arc<Driver>>>,
    next: AtomicUsize,
    /// Bumped whenever a driver is added: [`route`] waits for one when there is none.
    added: watch::Sender<u64>,
    /// Stops following the peers once the last sink clone is gone.
    _following: DropGuard,
}

/// The sink was dropped before the result was acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("result sink closed before the reassembler acknowledged the result")]
pub struct SinkClosed;

/// Where a process's results go (`--store-results`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreResults {
    /// Over `Deliver` to the reassembler replicas (`--reassemblers`).
    #[default]
    Reassembler,
    /// Into Redis from this process, with the reassembler's batching and
    /// release script (`reassembler::local::Local`): one hop less per result.
    Redis,
}

/// Delivers results to a set of reassembler replicas, or stores them in
/// Redis from this process ([`ResultSink::local`]). Cheap to clone.
#[derive(Clone)]
pub struct ResultSink {
    target: Target,
}

#[derive(Clone)]
enum Target {
    Reassemblers(Arc<Inner>),
    Redis(reassembler::local::Local),
}

impl ResultSink {
    /// Starts one driver per endpoint `endpoints` holds now, and follows it:
    /// drivers are added and retired as the endpoints change. Drivers finish
    /// their backlog and exit once every clone of the sink is dropped. Fails
    /// when an endpoint held now is malformed. Must be called within a Tokio
    /// runtime.
    pub fn start(mut endpoints: Peers) -> Result<Self, ordo_runtime::client::EndpointError> {
        let following = CancellationToken::new();
        let inner = Arc::new(Inner {
            drivers: std::sync::RwLock::default(),
            next: AtomicUsize::new(0),
            added: watch::Sender::new(0),
            _following: following.clone().drop_guard(),
        });
        let now = endpoints.borrow_and_update().clone();
        connect(&inner, &now)?;
        tokio::spawn(follow(Arc::downgrade(&inner), endpoints, following));
        Ok(Self { target: Target::Reassemblers(inner) })
    }

    /// A sink that stores results in Redis from this process
    /// (`--store-results redis`).
    pub fn local(local: reassembler::local::Local) -> Self {
        Self { target: Target::Redis(local) }
    }

    /// The sink `--store-results` asks for: the reassemblers `endpoints`
    /// name (followed with `discovery`), or Redis at `redis_url` with the
    /// `store` settings, on a connection of its own: at saturation a script
    /// call waits for up to three others on its connection (tens of ms), and
    /// the owner's other Redis traffic (registry polls, stream-state reads)
    /// must not queue behind them.
    pub fn for_setting(
        setting: StoreResults,
        endpoints: &[String],
        discovery: &ordo_runtime::discovery::DiscoveryArgs,
        redis_url: &str,
        store: &reassembler::StoreArgs,
    ) -> anyhow::Result<Self> {
        Ok(match setting {
            StoreResults::Reassembler => Self::start(ordo_runtime::discovery::watch(endpoints, discovery)?)?,
            StoreResults::Redis => {
                Self::local(reassembler::local::Local::start(ordo_runtime::redis_conn::connect(redis_url)?, store))
            }
        })
    }

    /// The endpoints of the live (not retired) drivers; none when storing
    /// into Redis from this process.
    pub fn endpoints(&self) -> Vec<String> {
        match &self.target {
            Target::Reassemblers(inner) => read(&inner.drivers).iter().map(|driver| driver.endpoint.clone()).collect(),
            Target::Redis(_) => Vec::new(),
        }
    }

    /// Hands `completed` to a reassembler (or stores it in Redis); resolves
    /// once it is durably stored.
    pub async fn deliver(&self, completed: Completed) -> Result<(), SinkClosed> {
        match &self.target {
            Target::Reassemblers(inner) => {
                let (done, acked) = oneshot::channel();
                route(inner, Pending { completed, done }).await?;
                acked.await.map_err(|_| SinkClosed)
            }
            Target::Redis(local) => local.store(completed).await.map_err(|_| SinkClosed),
        }
    }
}

/// Adds a driver for each of `endpoints` without one, and retires the
/// drivers of endpoints not among them.
fn connect(inner: &Arc<Inner>, endpoints: &[String]) -> Result<(), ordo_runtime::client::EndpointError> {
    let mut drivers = write(&inner.drivers);
    drivers.retain(|driver| {
        let wanted = endpoints.contains(&driver.endpoint);
        if !wanted {
            tracing::info!(endpoint = %driver.endpoint, "reassembler address gone; retiring its driver");
            driver.retired.cancel();
        }
        wanted
    });
    let mut added = false;
    for endpoint in endpoints {
        if drivers.iter().any(|driver| driver.endpoint == *endpoint) {
            continue;
        }
        let client = ReassemblerClient::new(ordo_runtime::client::traced(endpoint)?);
        let (tx, rx) = mpsc::channel(QUEUE);
        let driver = Arc::new(Driver {
            endpoint: endpoint.clone(),
            tx,
            healthy: AtomicBool::new(true),
            retired: CancellationToken::new(),
        });
        drivers.push(driver.clone());
        tokio::spawn(drive(driver, Arc::downgrade(inner), rx, client));
        added = true;
    }
    drop(drivers);
    if added {
        inner.added.send_modify(|generation| *generation = generation.wrapping_add(1));
    }
    Ok(())
}

/// Keeps the drivers in line with the endpoints as they change, until the
/// sink is gone.
async fn follow(inner: Weak<Inner>, mut endpoints: Peers, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = endpoints.changed() => if changed.is_err() { return },
        }
        let now = endpoints.borrow_and_update().clone();
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = connect(&inner, &now) {
            tracing::error!(%error, "a reassembler endpoint cannot be dialed");
        }
    }
}

/// Sends to the next healthy driver (round robin), or to any driver when
/// none is healthy: the driver keeps retrying. While there is no driver at
/// all (no reassembler address resolved yet), waits for one.
async fn route(inner: &Inner, mut pending: Pending) -> Result<(), SinkClosed> {
    let mut added = inner.added.subscribe();
    loop {
        added.borrow_and_update();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let target = {
            let drivers = read(&inner.drivers);
            let n = drivers.len();
            for healthy_only in [true, false] {
                for k in 0..n {
                    let driver = &drivers[(start + k) % n];
                    if healthy_only && !driver.healthy.load(Ordering::Relaxed) {
                        continue;
                    }
                    match driver.tx.try_send(pending) {
                        Ok(()) => return Ok(()),
                        Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) => pending = p,
                    }
                }
            }
            // Everyone is busy: wait for room at the next healthy (or any) driver.
            (0..n)
                .map(|k| &drivers[(start + k) % n])
                .find(|driver| driver.healthy.load(Ordering::Relaxed))
                .or_else(|| drivers.get(start % n.max(1)))
                .cloned()
        };
        match target {
            Some(driver) => match driver.tx.send(pending).await {
                Ok(()) => return Ok(()),
                // Retired meanwhile: its receiver closed; try the others.
                Err(mpsc::error::SendError(p)) => pending = p,
            },
            None => {
                if added.changed().await.is_err() {
                    return Err(SinkClosed);
                }
            }
        }
    }
}

async fn next_item(backlog: &mut VecDeque<Pending>, rx: &mut mpsc::Receiver<Pending>) -> Option<Pending> {
    match backlog.pop_front() {
        Some(p) => Some(p),
        None => rx.recv().await,
    }
}

fn take_more(batch: &mut Vec<Pending>, backlog: &mut VecDeque<Pending>, rx: &mut mpsc::Receiver<Pending>) {
    while batch.len() < MAX_BATCH {
        match backlog.pop_front().or_else(|| rx.try_recv().ok()) {
            Some(p) => batch.push(p),
            None => break,
        }
    }
}

async fn drive(
    me: Arc<Driver>,
    inner: Weak<Inner>,
    mut rx: mpsc::Receiver<Pending>,
    client: ReassemblerClient<ordo_runtime::client::TracedChannel>,
) {
    let endpoint = me.endpoint.clone();
    let mut backlog: VecDeque<Pending> = VecDeque::new();
    // Reconnect pacing, jittered so workers that lost the same replica do not
    // come back in step.
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut next_id: u64 = 0;
    loop {
        // Don't open a call for nothing: wait for the first result.
        if backlog.is_empty() {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(p) => backlog.push_back(p),
                    None => return,
                },
                _ = me.retired.cancelled() => {
                    retire(&me, &inner, &mut rx, backlog).await;
                    return;
                }
            }
        }
        let (out, out_rx) = mpsc::channel::<DeliverBatch>(MAX_UNACKED);
        let mut client = client.clone();
        let mut unacked: HashMap<u64, Vec<Pending>> = HashMap::new();
        let mut closed = false;
        let call = client.deliver(ReceiverStream::new(out_rx));
        // Send the first batch before awaiting the response headers.
        let first = {
            let mut batch = Vec::new();
            take_more(&mut batch, &mut backlog, &mut rx);
            batch
        };
        next_id += 1;
        let first_id = next_id;
        let _ = out.try_send(DeliverBatch {
            batch_id: first_id,
            results: first.iter().map(|p| p.completed.clone()).collect(),
        });
        unacked.insert(first_id, first);
        let opened = tokio::select! {
            opened = call => Some(opened),
            _ = me.retired.cancelled() => None,
        };
        match opened {
            Some(Ok(response)) => {
                let mut acks = response.into_inner();
                me.healthy.store(true, Ordering::Relaxed);
                backoff.reset();
                // Retired: no new results; wait (a while) for the acks of what was sent.
                let grace = tokio::time::sleep(RETIRE_GRACE);
                tokio::pin!(grace);
                let mut retiring = false;
                loop {
                    if closed && backlog.is_empty() && unacked.is_empty() {
                        return;
                    }
                    if retiring && unacked.is_empty() {
                        break;
                    }
                    tokio::select! {
                        ack = acks.message() => match ack {
                            Ok(Some(ack)) => {
                                for p in unacked.remove(&ack.batch_id).into_iter().flatten() {
                                    let _ = p.done.send(());
                                }
                            }
                            Ok(None) => {
                                tracing::warn!(%endpoint, "reassembler ended the delivery stream");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(%endpoint, %status, "delivery stream to reassembler broke");
                                break;
                            }
                        },
                        _ = me.retired.cancelled(), if !retiring => {
                            retiring = true;
                            grace.as_mut().reset(tokio::time::Instant::now() + RETIRE_GRACE);
                        }
                        _ = &mut grace, if retiring => {
                            tracing::warn!(%endpoint, unacked = unacked.len(), "retired reassembler did not ack in time; redelivering elsewhere");
                            break;
                        }
                        item = next_item(&mut backlog, &mut rx), if !closed && !retiring && unacked.len() < MAX_UNACKED => {
                            let Some(item) = item else { closed = true; continue };
                            let mut batch = vec![item];
                            take_more(&mut batch, &mut backlog, &mut rx);
                            next_id += 1;
                            let results = batch.iter().map(|p| p.completed.clone()).collect();
                            if out.send(DeliverBatch { batch_id: next_id, results }).await.is_err() {
                                backlog.extend(batch);
                                break;
                            }
                            unacked.insert(next_id, batch);
                        }
                    }
                }
            }
            Some(Err(status)) => {
                tracing::warn!(%endpoint, %status, "cannot open a delivery stream to reassembler");
            }
            None => {}
        }
        // Connection lost (or retired): everything unacked goes first, in batch order.
        me.healthy.store(false, Ordering::Relaxed);
        let mut ids: Vec<u64> = unacked.keys().copied().collect();
        ids.sort_unstable();
        for id in ids.into_iter().rev() {
            for p in unacked.remove(&id).into_iter().flatten().rev() {
                backlog.push_front(p);
            }
        }
        if me.retired.is_cancelled() {
            retire(&me, &inner, &mut rx, backlog).await;
            return;
        }
        while let Ok(p) = rx.try_recv() {
            backlog.push_back(p);
        }
        reroute(&inner, &me, &mut backlog);
        if closed && backlog.is_empty() {
            return;
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = me.retired.cancelled() => {}
        }
    }
}

/// The end of a retired driver: takes nothing more, and hands all it still
/// holds (in order) to the other drivers, waiting for room or for a driver.
async fn retire(me: &Driver, inner: &Weak<Inner>, rx: &mut mpsc::Receiver<Pending>, mut backlog: VecDeque<Pending>) {
    // Closed first: a result routed to this driver a moment ago is in the
    // channel (taken below); any later one finds it closed and goes elsewhere.
    rx.close();
    while let Some(p) = rx.recv().await {
        backlog.push_back(p);
    }
    if backlog.is_empty() {
        tracing::info!(endpoint = %me.endpoint, "reassembler driver retired");
        return;
    }
    tracing::info!(endpoint = %me.endpoint, results = backlog.len(), "retired reassembler driver hands its results to the others");
    let Some(inner) = inner.upgrade() else { return };
    for p in backlog {
        // Fails only when the sink is gone: the callers stopped waiting.
        if route(&inner, p).await.is_err() {
            return;
        }
    }
}

/// Moves the backlog of a broken driver to healthy peers, keeping what they
/// have no room for.
fn reroute(inner: &Weak<Inner>, me: &Arc<Driver>, backlog: &mut VecDeque<Pending>) {
    let Some(inner) = inner.upgrade() else { return };
    let peers: Vec<Arc<Driver>> = read(&inner.drivers)
        .iter()
        .filter(|driver| !Arc::ptr_eq(driver, me) && driver.healthy.load(Ordering::Relaxed))
        .cloned()
        .collect();
    if peers.is_empty() {
        return;
    }
    let mut kept = VecDeque::new();
    for (k, p) in backlog.drain(..).enumerate() {
        let peer = &peers[k % peers.len()];
        if let Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) = peer.tx.try_send(p) {
            kept.push_back(p);
        }
    }
    if !kept.is_empty() || !backlog.is_empty() {
        tracing::debug!(kept = kept.len(), "kept results no healthy peer had room for");
    }
    *backlog = kept;
}
