//! [`ResultSink`], the client side of the reassembler (its own crate, so
//! services never link the reassembler's server): how workers and the
//! harmonizer hand results to the reassemblers. `deliver` resolves only once a reassembler acknowledged the
//! result as durably stored, which is what lets a worker ack its dispatch.
//!
//! One driver task per reassembler endpoint keeps a `Deliver` stream open,
//! batches whatever is queued, and tracks unacknowledged batches. When a
//! stream breaks, its unacknowledged results go to another healthy
//! reassembler (or back to the same one once it returns): redelivery is safe
//! because the release script drops duplicates.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use ordo_proto::v1::{Completed, DeliverBatch, reassembler_client::ReassemblerClient};
use ordo_runtime::backoff::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// Results per DeliverBatch.
const MAX_BATCH: usize = 256;
/// Unacknowledged batches per connection before the driver stops sending.
const MAX_UNACKED: usize = 64;
const QUEUE: usize = 8192;

struct Pending {
    completed: Completed,
    done: oneshot::Sender<()>,
}

struct Driver {
    tx: mpsc::Sender<Pending>,
    healthy: AtomicBool,
}

struct Inner {
    drivers: Vec<Driver>,
    next: AtomicUsize,
}

/// The sink was dropped before the result was acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("result sink closed before the reassembler acknowledged the result")]
pub struct SinkClosed;

/// Delivers results to a set of reassembler replicas. Cheap to clone.
#[derive(Clone)]
pub struct ResultSink {
    inner: Arc<Inner>,
}

impl ResultSink {
    /// Starts one driver per endpoint. Drivers finish their backlog and exit
    /// once every clone of the sink is dropped.
    pub fn start(endpoints: &[String]) -> Result<Self, ordo_runtime::client::EndpointError> {
        let mut drivers = Vec::with_capacity(endpoints.len());
        let mut receivers = Vec::with_capacity(endpoints.len());
        let mut channels = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            channels.push((endpoint.clone(), ordo_runtime::client::traced(endpoint)?));
            let (tx, rx) = mpsc::channel(QUEUE);
            drivers.push(Driver { tx, healthy: AtomicBool::new(true) });
            receivers.push(rx);
        }
        let inner = Arc::new(Inner { drivers, next: AtomicUsize::new(0) });
        for (index, (rx, (endpoint, channel))) in receivers.into_iter().zip(channels).enumerate() {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(drive(index, weak, rx, endpoint, ReassemblerClient::new(channel)));
        }
        Ok(Self { inner })
    }

    /// Hands `completed` to a reassembler; resolves once it is durably stored.
    pub async fn deliver(&self, completed: Completed) -> Result<(), SinkClosed> {
        let (done, acked) = oneshot::channel();
        route(&self.inner, None, Pending { completed, done }).await?;
        acked.await.map_err(|_| SinkClosed)
    }
}

/// Sends to the next healthy driver other than `avoid` (round robin), or to
/// any driver when none is healthy: the driver keeps retrying.
async fn route(inner: &Inner, avoid: Option<usize>, mut pending: Pending) -> Result<(), SinkClosed> {
    let n = inner.drivers.len();
    let start = inner.next.fetch_add(1, Ordering::Relaxed);
    for healthy_only in [true, false] {
        for k in 0..n {
            let i = (start + k) % n;
            let driver = &inner.drivers[i];
            if Some(i) == avoid || (healthy_only && !driver.healthy.load(Ordering::Relaxed)) {
                continue;
            }
            match driver.tx.try_send(pending) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) => pending = p,
            }
        }
    }
    // Everyone is busy: wait for room at the next healthy (or any) driver.
    let i = (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| Some(i) != avoid && inner.drivers[i].healthy.load(Ordering::Relaxed))
        .or_else(|| (0..n).find(|&i| Some(i) != avoid))
        .ok_or(SinkClosed)?;
    inner.drivers[i].tx.send(pending).await.map_err(|_| SinkClosed)
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
    me: usize,
    inner: Weak<Inner>,
    mut rx: mpsc::Receiver<Pending>,
    endpoint: String,
    client: ReassemblerClient<ordo_runtime::client::TracedChannel>,
) {
    let mut backlog: VecDeque<Pending> = VecDeque::new();
    // Reconnect pacing, jittered so workers that lost the same replica do not
    // come back in step.
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut next_id: u64 = 0;
    loop {
        // Don't open a call for nothing: wait for the first result.
        if backlog.is_empty() {
            match rx.recv().await {
                Some(p) => backlog.push_back(p),
                None => return,
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
        match call.await {
            Ok(response) => {
                let mut acks = response.into_inner();
                set_health(&inner, me, true);
                backoff.reset();
                loop {
                    if closed && backlog.is_empty() && unacked.is_empty() {
                        return;
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
                        item = next_item(&mut backlog, &mut rx), if !closed && unacked.len() < MAX_UNACKED => {
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
            Err(status) => {
                tracing::warn!(%endpoint, %status, "cannot open a delivery stream to reassembler");
            }
        }
        // Connection lost: everything unacked goes first, in batch order.
        set_health(&inner, me, false);
        let mut ids: Vec<u64> = unacked.keys().copied().collect();
        ids.sort_unstable();
        for id in ids.into_iter().rev() {
            for p in unacked.remove(&id).into_iter().flatten().rev() {
                backlog.push_front(p);
            }
        }
        while let Ok(p) = rx.try_recv() {
            backlog.push_back(p);
        }
        reroute(&inner, me, &mut backlog);
        if closed && backlog.is_empty() {
            return;
        }
        backoff.wait().await;
    }
}

fn set_health(inner: &Weak<Inner>, me: usize, healthy: bool) {
    if let Some(inner) = inner.upgrade() {
        inner.drivers[me].healthy.store(healthy, Ordering::Relaxed);
    }
}

/// Moves the backlog of a broken driver to healthy peers, keeping what they
/// have no room for.
fn reroute(inner: &Weak<Inner>, me: usize, backlog: &mut VecDeque<Pending>) {
    let Some(inner) = inner.upgrade() else { return };
    let peers: Vec<usize> =
        (0..inner.drivers.len()).filter(|&i| i != me && inner.drivers[i].healthy.load(Ordering::Relaxed)).collect();
    if peers.is_empty() {
        return;
    }
    let mut kept = VecDeque::new();
    for (k, p) in backlog.drain(..).enumerate() {
        let peer = &inner.drivers[peers[k % peers.len()]];
        if let Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) = peer.tx.try_send(p) {
            kept.push_back(p);
        }
    }
    if !kept.is_empty() || !backlog.is_empty() {
        tracing::debug!(kept = kept.len(), "kept results no healthy peer had room for");
    }
    *backlog = kept;
}
