//! The live tail: sharded pub/sub on the release channels of exactly the
//! slots whose streams somebody follows, fanned out in memory to the
//! subscribers of each stream.
//!
//! The release script SPUBLISHes every stream's releases to its slot's channel
//! `ordo:released:{<tag>}` ([`keys::released_channel`]), on one node and on a
//! Redis Cluster alike; on one node a channel carries a group of
//! [`keys::SINGLE_NODE_SLOTS_PER_CHANNEL`] slots (named by its first), and
//! "slot" below means that first slot. A message holds the batches of every
//! stream of one script call on that channel (`ReleasedBatches`), fanned out
//! under one lock. The hub keeps, per slot, the followed streams in it:
//! the first [`Subscription`] of a stream in a slot makes the slot wanted,
//! the last one leaving makes it unwanted, and one task ([`Hub::listen`])
//! SSUBSCRIBEs / SUNSUBSCRIBEs the channels to match, on one RESP3
//! connection (single node) or the cluster client (which routes each slot's
//! command to its master). So a gateway's Redis traffic grows with what its
//! subscribers follow, and idle streams (and slots) cost it nothing.
//!
//! Delivery to a subscriber never blocks the hub: each has a bounded buffer,
//! and when it is full the subscriber is flagged *lagged* and later catches up
//! from the release log instead. Memory per subscriber is therefore bounded
//! whatever its speed. Nothing is lost across a subscription change, a
//! pub/sub reconnect or a failover either: whenever Redis confirms a slot's
//! subscription (the first time, after a reconnect, after a failover moved
//! the slot), every subscriber of a stream in that slot is flagged lagged, so
//! it re-reads the log from its cursor: whatever was released while the slot
//! was not heard is in the log.
//!
//! A stream has an entry in the hub only while somebody subscribes to it
//! (the last [`Subscription`] dropped removes it; `ordo_push_hub_streams`
//! counts them, `ordo_push_hub_slots` the slots subscribed).
//!
//! Besides per-stream subscribers, a [`Firehose`] hears the id of every
//! stream with a release (the AMQP publisher holds one while it leads): it
//! wants every slot while it lives, has the same bounded buffer, and its
//! lagged flag is raised once every slot is heard (at first, and again after
//! any reconnect or failover), so its owner scans for what it missed.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use ordo_core::{
    hash::{Map, Set},
    keys,
};
use ordo_proto::v1::{ReleasedBatch, ReleasedBatches};
use redis::{
    PushInfo, PushKind, Value,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
};
use tokio::sync::{Notify, mpsc};

use crate::Shutdown;

/// SSUBSCRIBE / SUNSUBSCRIBE commands in flight at once (a firehose wants
/// every slot: 16,384 commands, one channel each).
const PARALLEL_COMMANDS: usize = 64;
/// How long a subscription may go unconfirmed before it is asked for again.
const CONFIRM_WITHIN: Duration = Duration::from_secs(3);

/// On a Redis Cluster, every subscriber re-reads its release log this often
/// (from its cursor; usually nothing). A safety net for releases the live
/// tail missed without any sign: the cluster client re-subscribes by itself
/// after a failover moved a slot, and a release published on the new master
/// before that subscription is live reaches no one. Seen once in CI (results
/// of 6 of 8 streams stalled after a forced failover plus a killed master);
/// the missed confirmation is the suspect, not proven.
const CLUSTER_CATCH_UP: Duration = Duration::from_secs(5);

struct Entry {
    id: u64,
    tx: mpsc::Sender<Arc<ReleasedBatch>>,
    lag: Lag,
}

/// How an entry is told that it missed live releases.
enum Lag {
    /// A [`Subscription`]'s own flag.
    Own(Arc<Signal>),
    /// A [`Group`]'s set of lagged streams.
    Group(Arc<GroupLag>),
}

impl Entry {
    /// `stream` (this entry's) may have missed releases: re-read its log.
    fn raise(&self, stream: &str) {
        match &self.lag {
            Lag::Own(signal) => signal.raise(),
            Lag::Group(group) => group.raise(stream),
        }
    }
}

/// The streams of a [`Group`] that missed live releases.
#[derive(Default)]
pub struct GroupLag {
    streams: Mutex<Set<String>>,
    notify: Notify,
}

impl GroupLag {
    fn raise(&self, stream: &str) {
        let mut streams = self.streams.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !streams.contains(stream) {
            streams.insert(stream.to_owned());
        }
        drop(streams);
        self.notify.notify_one();
    }

    /// The streams that lagged since the last call (each once).
    pub fn take(&self) -> Vec<String> {
        let mut streams = self.streams.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        streams.drain().collect()
    }

    /// Returns once some stream lagged (possibly before this call).
    pub async fn raised(&self) {
        self.notify.notified().await;
    }
}

/// Set when a subscriber missed live messages; it must re-read the log.
#[derive(Default)]
pub struct Signal {
    lagged: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn raise(&self) {
        self.lagged.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// True (once) if the subscriber lagged since the last call.
    pub fn take(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    pub async fn raised(&self) {
        self.notify.notified().await;
    }
}

/// What the hub wants from Redis and what Redis confirmed, per slot. Pure
/// bookkeeping (no I/O), so the reference counting is unit-tested alone.
struct Slots {
    /// Consecutive slots per release channel ([`keys::release_channel_stride`], at least 1):
    /// every "slot" here is the first slot of a channel's group, the one
    /// that names the channel ([`keys::release_channel_slot`]).
    stride: u16,
    /// Followed streams per slot (only slots with some).
    streams: HashMap<u16, Set<String>>,
    /// Live firehoses: while there is one, every slot is wanted.
    firehoses: usize,
    /// Slots the listener asked Redis for (SSUBSCRIBE succeeded, no
    /// SUNSUBSCRIBE since, not dropped by Redis since).
    requested: Vec<bool>,
    /// Slots whose subscription Redis confirmed and has not dropped since.
    live: Vec<bool>,
    live_count: usize,
    /// Slots whose wanted state may differ from `requested`.
    dirty: HashSet<u16>,
    /// Subscriptions asked for and not confirmed yet, since when.
    unconfirmed: HashMap<u16, Instant>,
    /// How long a subscribed slot stays subscribed after its last followed
    /// stream left (`--hub-slot-hold`): streams that come and go in the
    /// same slot then cost no SSUBSCRIBE/SUNSUBSCRIBE, and no lagged
    /// re-read of the log on each new confirmation. Bounded: there are
    /// [`keys::SLOTS`] slots at most.
    hold: Duration,
    /// Subscribed slots with no followed stream, since when (unsubscribed
    /// once held for `hold`).
    idle: HashMap<u16, Instant>,
    /// When `idle` is looked at next (at most every [`IDLE_SWEEP`]: the
    /// listener asks for changes on every first and last subscriber).
    next_sweep: Instant,
}

/// How often held idle slots are checked for expiry.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

impl Default for Slots {
    fn default() -> Self {
        let slots = usize::from(keys::SLOTS);
        Self {
            stride: keys::release_channel_stride(true),
            streams: HashMap::new(),
            firehoses: 0,
            requested: vec![false; slots],
            live: vec![false; slots],
            live_count: 0,
            dirty: HashSet::new(),
            unconfirmed: HashMap::new(),
            hold: Duration::ZERO,
            idle: HashMap::new(),
            next_sweep: Instant::now(),
        }
    }
}

/// What the listener must do for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Subscribe(u16),
    Unsubscribe(u16),
}

impl Slots {
    /// The (channel) slot of `stream`'s releases.
    fn slot_of(&self, stream: &str) -> u16 {
        keys::release_channel_slot(keys::stream_slot(stream), self.stride)
    }

    /// Every channel slot: what a firehose wants.
    fn every(&self) -> impl Iterator<Item = u16> + use<> {
        (0..keys::SLOTS).step_by(usize::from(self.stride))
    }

    /// How many channels there are.
    fn channels(&self) -> usize {
        usize::from(keys::SLOTS).div_ceil(usize::from(self.stride))
    }

    fn wanted(&self, slot: u16) -> bool {
        self.firehoses > 0 || self.streams.contains_key(&slot)
    }

    /// A stream got its first subscriber.
    fn follow(&mut self, stream: &str) {
        let slot = self.slot_of(stream);
        self.idle.remove(&slot);
        let streams = self.streams.entry(slot).or_default();
        if streams.is_empty() && self.firehoses == 0 {
            self.dirty.insert(slot);
        }
        streams.insert(stream.to_owned());
    }

    /// A stream lost its last subscriber.
    fn unfollow(&mut self, stream: &str) {
        let slot = self.slot_of(stream);
        let Some(streams) = self.streams.get_mut(&slot) else { return };
        streams.remove(stream);
        if streams.is_empty() {
            self.streams.remove(&slot);
            if self.firehoses == 0 {
                if self.hold.is_zero() || !self.requested[usize::from(slot)] {
                    self.dirty.insert(slot);
                } else {
                    self.idle.insert(slot, Instant::now());
                }
            }
        }
    }

    fn add_firehose(&mut self) {
        self.firehoses += 1;
        if self.firehoses == 1 {
            self.dirty.extend(self.every());
        }
    }

    fn remove_firehose(&mut self) {
        self.firehoses = self.firehoses.saturating_sub(1);
        if self.firehoses == 0 {
            self.dirty.extend(self.every());
        }
    }

    /// Everything the listener must do now: for each dirty slot, subscribe
    /// if wanted and not requested, unsubscribe if requested and no longer
    /// wanted. Marks them requested / not requested as it goes (the caller
    /// marks a failed one dirty again with [`Self::failed`]).
    fn changes(&mut self) -> Vec<Change> {
        self.changes_at(Instant::now())
    }

    /// [`Self::changes`] at `now`: idle slots held for `hold` are let go.
    fn changes_at(&mut self, now: Instant) -> Vec<Change> {
        if !self.idle.is_empty() && now >= self.next_sweep {
            self.next_sweep = now + IDLE_SWEEP;
            let hold = self.hold;
            let expired: Vec<u16> = self
                .idle
                .iter()
                .filter(|(_, since)| now.saturating_duration_since(**since) >= hold)
                .map(|(s, _)| *s)
                .collect();
            for slot in expired {
                self.idle.remove(&slot);
                self.dirty.insert(slot);
            }
        }
        let mut dirty: Vec<u16> = self.dirty.drain().collect();
        dirty.sort_unstable();
        let mut changes = Vec::new();
        for slot in dirty {
            let i = usize::from(slot);
            match (self.wanted(slot), self.requested[i]) {
                (true, false) => {
                    self.requested[i] = true;
                    self.unconfirmed.insert(slot, Instant::now());
                    changes.push(Change::Subscribe(slot));
                }
                (false, true) => {
                    self.requested[i] = false;
                    changes.push(Change::Unsubscribe(slot));
                }
                _ => {}
            }
        }
        changes
    }

    /// A command of [`Self::changes`] failed: undo its mark, look again.
    fn failed(&mut self, change: Change) {
        let slot = match change {
            Change::Subscribe(slot) => {
                self.requested[usize::from(slot)] = false;
                self.unconfirmed.remove(&slot);
                slot
            }
            Change::Unsubscribe(slot) => {
                self.requested[usize::from(slot)] = true;
                slot
            }
        };
        self.dirty.insert(slot);
    }

    /// Redis confirmed a subscription: true if every slot is now live (the
    /// moment a firehose has heard everything).
    fn confirmed(&mut self, slot: u16) -> bool {
        self.unconfirmed.remove(&slot);
        let i = usize::from(slot);
        if !self.live[i] {
            self.live[i] = true;
            self.live_count += 1;
            return self.live_count == self.channels();
        }
        false
    }

    /// Redis dropped a subscription (our SUNSUBSCRIBE, or the slot moved to
    /// another node): not live, not requested; subscribed again if wanted.
    fn dropped(&mut self, slot: u16) {
        let i = usize::from(slot);
        if self.live[i] {
            self.live[i] = false;
            self.live_count -= 1;
        }
        self.requested[i] = false;
        self.unconfirmed.remove(&slot);
        self.idle.remove(&slot);
        if self.wanted(slot) {
            self.dirty.insert(slot);
        }
    }

    /// Subscriptions asked for more than `timeout` before `now` and never
    /// confirmed are asked for again: a reply can be taken for another's
    /// (a push Redis sends unasked, e.g. when a failover moves a slot,
    /// arriving while a command waits on that node), and a slot must not
    /// stay silent on such a mix-up. True if any was.
    fn overdue(&mut self, now: Instant, timeout: Duration) -> bool {
        let late: Vec<u16> =
            self.unconfirmed.iter().filter(|(_, at)| now.duration_since(**at) >= timeout).map(|(s, _)| *s).collect();
        for &slot in &late {
            self.unconfirmed.remove(&slot);
            self.requested[usize::from(slot)] = false;
            self.dirty.insert(slot);
        }
        !late.is_empty()
    }

    /// The pub/sub connection (or one cluster node's) broke: nothing is
    /// live or requested any more; every wanted slot is subscribed again.
    fn lost(&mut self) {
        self.requested.iter_mut().for_each(|r| *r = false);
        self.live.iter_mut().for_each(|l| *l = false);
        self.live_count = 0;
        self.unconfirmed.clear();
        self.idle.clear();
        if self.firehoses > 0 {
            self.dirty.extend(self.every());
        } else {
            self.dirty.extend(self.streams.keys().copied());
        }
    }

    fn requested_count(&self) -> usize {
        self.requested.iter().filter(|r| **r).count()
    }
}

#[derive(Default)]
struct State {
    subscribers: Map<String, Vec<Entry>>,
    firehoses: Vec<FirehoseEntry>,
    slots: Slots,
}

#[derive(Default)]
pub struct Hub {
    state: Mutex<State>,
    next_id: AtomicU64,
    buffer: usize,
    /// Wakes the listener: some slot is dirty, or the connection broke.
    changed: Notify,
}

struct FirehoseEntry {
    id: u64,
    tx: mpsc::Sender<String>,
    signal: Arc<Signal>,
}

/// Every stream id with a release, as they happen. When its buffer is full,
/// and whenever every slot is heard again (at first, after a reconnect or a
/// failover), [`Signal::take`] turns true: the owner must then find out what
/// it missed on its own (e.g. by scanning Redis). Unregisters on drop, and
/// with it the hub's want of every slot.
pub struct Firehose {
    hub: Arc<Hub>,
    id: u64,
    pub rx: mpsc::Receiver<String>,
    pub signal: Arc<Signal>,
}

impl Drop for Firehose {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        let before = state.firehoses.len();
        state.firehoses.retain(|f| f.id != self.id);
        if state.firehoses.len() < before {
            state.slots.remove_firehose();
        }
        drop(state);
        self.hub.changed.notify_one();
    }
}

/// A registered subscriber; unregisters on drop.
pub struct Subscription {
    hub: Arc<Hub>,
    stream: String,
    id: u64,
    pub rx: mpsc::Receiver<Arc<ReleasedBatch>>,
    pub signal: Arc<Signal>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unregister(std::iter::once(self.stream.as_str()), self.id);
    }
}

/// Many streams followed together (one `Follow` call): every release of
/// any of them arrives on the one channel `rx`, and a stream that missed
/// releases (a full channel, a slot subscription confirmed) is named in
/// [`Group::lag`] instead of flagging a task of its own. So a followed
/// stream costs the gateway a map entry, not a task and a channel.
/// Unregisters every stream on drop.
pub struct Group {
    hub: Arc<Hub>,
    id: u64,
    tx: mpsc::Sender<Arc<ReleasedBatch>>,
    pub rx: mpsc::Receiver<Arc<ReleasedBatch>>,
    pub lag: Arc<GroupLag>,
    streams: Set<String>,
}

impl Group {
    /// Follows `stream` too (nothing if it is followed already). Its
    /// releases arrive from now on; whatever came before is in its log.
    pub fn add(&mut self, stream: &str) {
        if self.streams.insert(stream.to_owned()) {
            let entry = Entry { id: self.id, tx: self.tx.clone(), lag: Lag::Group(self.lag.clone()) };
            self.hub.register(stream, entry);
        }
    }

    /// Stops following `stream` (nothing if it is not followed).
    pub fn remove(&mut self, stream: &str) {
        if self.streams.remove(stream) {
            self.hub.unregister(std::iter::once(stream), self.id);
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.hub.unregister(self.streams.iter().map(String::as_str), self.id);
    }
}

/// Where the hub listens: the single node or the cluster of `--redis-url`.
#[derive(Debug, Clone)]
pub struct Source {
    url: String,
}

impl Source {
    /// Checks the URL (a malformed one fails here, at start-up).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        if !ordo_runtime::redis_conn::is_cluster_url(url) {
            ordo_runtime::redis_conn::client(url)?;
        }
        Ok(Self { url: url.to_owned() })
    }

    /// Consecutive slots per release channel there.
    fn stride(&self) -> u16 {
        keys::release_channel_stride(ordo_runtime::redis_conn::is_cluster_url(&self.url))
    }
}

/// The listener's connection: SSUBSCRIBE / SUNSUBSCRIBE one channel per
/// command (on a cluster the channels of one command must share a slot; on
/// one node one confirmation per command keeps replies in step).
enum PubSub {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl PubSub {
    async fn apply(&self, change: Change) -> redis::RedisResult<()> {
        let (command, slot) = match change {
            Change::Subscribe(slot) => ("SSUBSCRIBE", slot),
            Change::Unsubscribe(slot) => ("SUNSUBSCRIBE", slot),
        };
        let channel = keys::released_channel(slot);
        match self {
            Self::Single(conn) => redis::cmd(command).arg(channel).exec_async(&mut conn.clone()).await,
            Self::Cluster(conn) => {
                let mut conn = conn.clone();
                match change {
                    Change::Subscribe(_) => conn.ssubscribe(channel).await,
                    // Replicas serve sharded channels too, and the client's own
                    // resubscription after a failover may land on any node of
                    // the slot's shard: drop the channel on every node.
                    Change::Unsubscribe(_) => {
                        let every_node = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
                        let mut unsubscribe = redis::cmd(command);
                        unsubscribe.arg(channel);
                        conn.route_command(unsubscribe, every_node).await.map(drop)
                    }
                }
            }
        }
    }
}

impl Hub {
    /// A hub whose slots are unsubscribed as soon as nobody follows them.
    /// With a channel per slot (a cluster's layout).
    pub fn new(buffer: usize) -> Arc<Self> {
        Self::with_slot_hold(buffer, Duration::ZERO, keys::release_channel_stride(true))
    }

    /// A hub for `source`'s release channels that keeps a slot subscribed
    /// for `hold` after its last followed stream left (`--hub-slot-hold`).
    pub fn for_source(buffer: usize, hold: Duration, source: &Source) -> Arc<Self> {
        Self::with_slot_hold(buffer, hold, source.stride())
    }

    /// A hub whose channels each carry `stride` consecutive slots
    /// ([`keys::release_channel_stride`]).
    fn with_slot_hold(buffer: usize, hold: Duration, stride: u16) -> Arc<Self> {
        let hub = Self { buffer: buffer.max(1), ..Default::default() };
        {
            let mut state = hub.lock();
            state.slots.hold = hold;
            state.slots.stride = stride.max(1);
        }
        Arc::new(hub)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (plain inserts and removes).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(self: &Arc<Self>, stream: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Signal::default());
        self.register(stream, Entry { id, tx, lag: Lag::Own(signal.clone()) });
        Subscription { hub: self.clone(), stream: stream.to_owned(), id, rx, signal }
    }

    /// An empty [`Group`] whose channel holds `buffer` batches.
    pub fn group(self: &Arc<Self>, buffer: usize) -> Group {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Group { hub: self.clone(), id, tx, rx, lag: Arc::default(), streams: Set::default() }
    }

    /// Adds a subscriber of `stream`; its first makes the stream's slot wanted.
    fn register(&self, stream: &str, entry: Entry) {
        let mut state = self.lock();
        let State { subscribers, slots, .. } = &mut *state;
        let first = match subscribers.get_mut(stream) {
            Some(entries) => {
                entries.push(entry);
                false
            }
            None => {
                subscribers.insert(stream.to_owned(), vec![entry]);
                slots.follow(stream);
                true
            }
        };
        crate::metrics::HUB_STREAMS.set(subscribers.len() as f64);
        drop(state);
        if first {
            self.changed.notify_one();
        }
    }

    /// Removes subscriber `id` of each of `streams`; a stream's last one
    /// leaving makes its slot unwanted.
    fn unregister<'a>(&self, streams: impl Iterator<Item = &'a str>, id: u64) {
        let mut state = self.lock();
        let State { subscribers, slots, .. } = &mut *state;
        let mut unfollowed = false;
        for stream in streams {
            if let Some(entries) = subscribers.get_mut(stream) {
                entries.retain(|e| e.id != id);
                if entries.is_empty() {
                    subscribers.remove(stream);
                    slots.unfollow(stream);
                    unfollowed = true;
                }
            }
        }
        crate::metrics::HUB_STREAMS.set(subscribers.len() as f64);
        drop(state);
        if unfollowed {
            self.changed.notify_one();
        }
    }

    /// Hears every stream with a release from now on (subscribing every
    /// slot); unregistered when dropped.
    pub fn firehose(self: &Arc<Self>) -> Firehose {
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Signal::default());
        let mut state = self.lock();
        state.firehoses.push(FirehoseEntry { id, tx, signal: signal.clone() });
        state.slots.add_firehose();
        if state.slots.live_count == state.slots.channels() {
            // Everything is heard already; what came before is the owner's to scan.
            signal.raise();
        }
        drop(state);
        self.changed.notify_one();
        Firehose { hub: self.clone(), id, rx, signal }
    }

    /// Fans out the batches of one release message (one lock for all).
    fn publish(&self, batches: Vec<ReleasedBatch>) {
        let mut state = self.lock();
        for batch in batches {
            batch.results.iter().for_each(crate::metrics::released);
            state.firehoses.retain(|firehose| match firehose.tx.try_send(batch.stream_id.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    firehose.signal.raise();
                    true
                }
                // Its owner is gone without dropping it yet; the drop unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => true,
            });
            let Some(entries) = state.subscribers.get(&batch.stream_id) else { continue };
            let batch = Arc::new(batch);
            for entry in entries {
                if entry.tx.try_send(batch.clone()).is_err() {
                    entry.raise(&batch.stream_id);
                }
            }
        }
    }

    /// One push from Redis, on the connection's reader (must not block).
    /// `broken` is raised when the connection broke, for a single node's
    /// connection, which does not reconnect by itself (a cluster client
    /// reconnects each node).
    fn on_push(&self, push: PushInfo, broken: Option<&AtomicBool>) {
        match push.kind {
            PushKind::SMessage => {
                let Some(Value::BulkString(payload)) = push.data.get(1) else { return };
                match ReleasedBatches::decode_message(payload) {
                    Ok(batches) => self.publish(batches),
                    Err(error) => tracing::warn!(%error, "undecodable release message"),
                }
            }
            PushKind::SSubscribe => {
                let Some(slot) = release_slot(push.data.first()) else { return };
                tracing::debug!(slot, "release channel subscribed");
                let mut state = self.lock();
                let everything = state.slots.confirmed(slot);
                // Heard from now on; anything before is in the log.
                if let Some(streams) = state.slots.streams.get(&slot) {
                    for stream in streams {
                        for entry in state.subscribers.get(stream).into_iter().flatten() {
                            entry.raise(stream);
                        }
                    }
                }
                if everything {
                    state.firehoses.iter().for_each(|firehose| firehose.signal.raise());
                }
            }
            PushKind::SUnsubscribe => {
                let Some(slot) = release_slot(push.data.first()) else { return };
                tracing::debug!(slot, "release channel unsubscribed");
                self.lock().slots.dropped(slot);
                self.changed.notify_one();
            }
            PushKind::Disconnection => {
                tracing::info!("a release channel connection broke; subscribing the followed slots again");
                self.lock().slots.lost();
                if let Some(broken) = broken {
                    broken.store(true, Ordering::Release);
                }
                self.changed.notify_one();
            }
            _ => {}
        }
    }

    /// Follows the release channels of the wanted slots until `shutdown`,
    /// reconnecting forever.
    pub async fn listen(self: Arc<Self>, source: Source, shutdown: Shutdown) {
        let mut backoff = ordo_runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            // Raised by the connection's reader when it broke (single node).
            let broken = Arc::new(AtomicBool::new(false));
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = self.connect(&source, broken.clone()) => connected,
            };
            match connected {
                Ok(pubsub) => {
                    tracing::info!("tailing released results");
                    backoff.reset();
                    // A fresh connection has no subscriptions: every wanted slot again.
                    self.lock().slots.lost();
                    if !self.serve(&pubsub, &broken, &shutdown).await {
                        return;
                    }
                    tracing::warn!("release channel connection lost; reconnecting");
                }
                Err(error) => tracing::warn!(%error, "cannot connect for the release channels; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = backoff.wait() => {}
            }
        }
    }

    async fn connect(self: &Arc<Self>, source: &Source, broken: Arc<AtomicBool>) -> anyhow::Result<PubSub> {
        let hub = self.clone();
        let single = !ordo_runtime::redis_conn::is_cluster_url(&source.url);
        // On a cluster one node's connection breaking is not the end of the
        // connection: the client reconnects it (every wanted slot is asked for again).
        let pushes = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            hub.on_push(push, single.then_some(broken.as_ref()));
            Ok(())
        };
        if single {
            let client = ordo_runtime::redis_conn::client(&source.url)?;
            let info = client.get_connection_info().clone();
            let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings))?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_push_sender(pushes);
            let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            return Ok(PubSub::Single(conn));
        }
        let client = ordo_runtime::redis_conn::cluster_pubsub_client(&source.url, pushes)?;
        let conn = client.get_async_connection().await?;
        Ok(PubSub::Cluster(conn))
    }

    /// Applies the wanted subscriptions as they change. Returns false on
    /// shutdown, true when the connection broke (reconnect).
    async fn serve(&self, pubsub: &PubSub, broken: &AtomicBool, shutdown: &Shutdown) -> bool {
        let mut retry = ordo_runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut caught_up = Instant::now();
        loop {
            if broken.load(Ordering::Acquire) {
                return true;
            }
            if matches!(pubsub, PubSub::Cluster(_)) && caught_up.elapsed() >= CLUSTER_CATCH_UP {
                caught_up = Instant::now();
                let state = self.lock();
                for (stream, entries) in &state.subscribers {
                    entries.iter().for_each(|entry| entry.raise(stream));
                }
            }
            let changes = {
                let mut state = self.lock();
                if state.slots.overdue(Instant::now(), CONFIRM_WITHIN) {
                    tracing::warn!("a release channel subscription was not confirmed in time; asking again");
                }
                state.slots.changes()
            };
            let outcomes: Vec<(Change, redis::RedisResult<()>)> = futures::stream::iter(
                changes.into_iter().map(|change| async move { (change, pubsub.apply(change).await) }),
            )
            .buffer_unordered(PARALLEL_COMMANDS)
            .collect()
            .await;
            let mut failure = None;
            {
                let mut state = self.lock();
                for (change, outcome) in outcomes {
                    if let Err(error) = outcome {
                        state.slots.failed(change);
                        failure.get_or_insert(error);
                    }
                }
                crate::metrics::HUB_SLOTS.set(state.slots.requested_count() as f64);
            }
            if let Some(error) = failure {
                if matches!(pubsub, PubSub::Single(_)) && (error.is_connection_dropped() || error.is_io_error()) {
                    return true;
                }
                // A cluster slot whose master is failing over: ask again soon.
                tracing::warn!(%error, "cannot change the release channel subscriptions; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    () = retry.wait() => {}
                }
                continue;
            }
            retry.reset();
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                () = self.changed.notified() => {}
                // Looks at unconfirmed subscriptions now and then.
                () = tokio::time::sleep(CONFIRM_WITHIN) => {}
            }
        }
    }
}

/// The slot of a release channel named in a subscription push (`None` for
/// any other channel).
fn release_slot(channel: Option<&Value>) -> Option<u16> {
    let Some(Value::BulkString(name)) = channel else { return None };
    let slot = keys::key_slot(name);
    (keys::released_channel(slot).as_bytes() == name.as_slice()).then_some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stream ids in different slots, and a second one in the first's slot.
    /// Redis confirming the subscription of `slot`'s release channel.
    fn confirmation(slot: u16) -> PushInfo {
        PushInfo {
            kind: PushKind::SSubscribe,
            data: vec![Value::BulkString(keys::released_channel(slot).into_bytes()), Value::Int(1)],
        }
    }

    /// `changes` in slot order.
    fn by_slot(mut changes: Vec<Change>) -> Vec<Change> {
        changes.sort_by_key(|c| match c {
            Change::Subscribe(s) | Change::Unsubscribe(s) => *s,
        });
        changes
    }

    /// Slots held 30 s after their last stream left.
    fn held() -> Slots {
        Slots { hold: Duration::from_secs(30), ..Slots::default() }
    }

    fn streams() -> (String, String, String) {
        let a = "orders-1".to_owned();
        let slot_a = keys::stream_slot(&a);
        let b = (0..).map(|i| format!("other-{i}")).find(|s| keys::stream_slot(s) != slot_a).expect("another slot");
        let same = (0..).map(|i| format!("twin-{i}")).find(|s| keys::stream_slot(s) == slot_a).expect("same slot");
        (a, b, same)
    }

    #[test]
    fn a_slot_is_subscribed_by_its_first_stream_and_unsubscribed_by_its_last() {
        let (a, b, same) = streams();
        let (slot_a, slot_b) = (keys::stream_slot(&a), keys::stream_slot(&b));
        let mut slots = Slots::default();
        slots.follow(&a);
        slots.follow(&b);
        assert_eq!(by_slot(slots.changes()), by_slot(vec![Change::Subscribe(slot_a), Change::Subscribe(slot_b)]));
        slots.follow(&same);
        assert_eq!(slots.changes(), [], "a second stream in a subscribed slot changes nothing");
        slots.unfollow(&a);
        assert_eq!(slots.changes(), [], "the slot still has a followed stream");
        slots.unfollow(&same);
        assert_eq!(slots.changes(), [Change::Unsubscribe(slot_a)]);
        assert_eq!(slots.requested_count(), 1);
        slots.unfollow(&b);
        assert_eq!(slots.changes(), [Change::Unsubscribe(slot_b)]);
        assert_eq!(slots.requested_count(), 0);
        assert!(slots.streams.is_empty());
    }

    #[test]
    fn with_a_hold_an_idle_slot_stays_subscribed_until_the_hold_passes() {
        let (a, b, same) = streams();
        let slot_a = keys::stream_slot(&a);
        let mut slots = held();
        let start = Instant::now();
        slots.follow(&a);
        slots.follow(&b);
        assert_eq!(slots.changes_at(start).len(), 2);
        slots.unfollow(&a);
        assert_eq!(slots.changes_at(start), [], "held: no SUNSUBSCRIBE when the last stream leaves");
        assert_eq!(slots.requested_count(), 2);
        // A stream of the same slot comes within the hold: nothing to do.
        slots.follow(&same);
        assert_eq!(slots.changes_at(start + Duration::from_secs(40)), [], "followed again: not idle any more");
        slots.unfollow(&same);
        assert_eq!(slots.changes_at(start + Duration::from_secs(10)), [], "idle for less than the hold: kept");
        assert_eq!(
            slots.changes_at(start + Duration::from_secs(31)),
            [Change::Unsubscribe(slot_a)],
            "held for the whole hold: let go"
        );
        assert_eq!(slots.requested_count(), 1, "the other slot is still followed");
        assert!(slots.idle.is_empty());
    }

    #[test]
    fn a_held_slot_dropped_by_redis_is_not_subscribed_again() {
        let (a, _, _) = streams();
        let slot = keys::stream_slot(&a);
        let mut slots = held();
        slots.follow(&a);
        assert_eq!(slots.changes().len(), 1);
        slots.confirmed(slot);
        slots.unfollow(&a);
        slots.dropped(slot);
        assert_eq!(slots.changes(), [], "nobody follows it: not asked for again");
        assert_eq!(slots.requested_count(), 0);
        assert!(slots.idle.is_empty());
    }

    #[test]
    fn leaving_and_coming_back_before_the_listener_looks_changes_nothing() {
        let (a, _, _) = streams();
        let mut slots = Slots::default();
        slots.follow(&a);
        assert_eq!(slots.changes().len(), 1);
        slots.unfollow(&a);
        slots.follow(&a);
        assert_eq!(slots.changes(), [], "still subscribed, still wanted");
    }

    #[test]
    fn a_failed_command_is_tried_again() {
        let (a, _, _) = streams();
        let slot = keys::stream_slot(&a);
        let mut slots = Slots::default();
        slots.follow(&a);
        let changes = slots.changes();
        assert_eq!(changes, [Change::Subscribe(slot)]);
        slots.failed(changes[0]);
        assert_eq!(slots.changes(), [Change::Subscribe(slot)]);
        slots.unfollow(&a);
        let changes = slots.changes();
        assert_eq!(changes, [Change::Unsubscribe(slot)]);
        slots.failed(changes[0]);
        assert_eq!(slots.changes(), [Change::Unsubscribe(slot)]);
    }

    #[test]
    fn a_lost_connection_or_a_moved_slot_subscribes_again_only_what_is_wanted() {
        let (a, b, _) = streams();
        let (slot_a, slot_b) = (keys::stream_slot(&a), keys::stream_slot(&b));
        let mut slots = Slots::default();
        slots.follow(&a);
        slots.follow(&b);
        slots.changes();
        assert!(!slots.confirmed(slot_a) && !slots.confirmed(slot_b));
        slots.unfollow(&b);
        assert_eq!(slots.changes(), [Change::Unsubscribe(slot_b)]);
        slots.dropped(slot_b);
        assert_eq!(slots.changes(), [], "an unwanted slot's drop asks for nothing");
        slots.dropped(slot_a);
        assert_eq!(slots.changes(), [Change::Subscribe(slot_a)], "a wanted slot Redis dropped is asked for again");
        slots.lost();
        assert_eq!(slots.live_count, 0);
        assert_eq!(slots.changes(), [Change::Subscribe(slot_a)]);
    }

    #[test]
    fn a_firehose_wants_every_slot_and_hears_everything_once_all_are_confirmed() {
        let (a, _, _) = streams();
        let slot_a = keys::stream_slot(&a);
        let mut slots = Slots::default();
        slots.follow(&a);
        slots.changes();
        slots.add_firehose();
        let changes = slots.changes();
        assert_eq!(changes.len(), usize::from(keys::SLOTS) - 1, "every slot but the one already subscribed");
        assert!(!changes.contains(&Change::Subscribe(slot_a)));
        let all = (0..keys::SLOTS).map(|slot| slots.confirmed(slot)).filter(|&everything| everything).count();
        assert_eq!(all, 1, "the last confirmation, and only it, completes the set");
        slots.remove_firehose();
        let changes = slots.changes();
        assert_eq!(changes.len(), usize::from(keys::SLOTS) - 1, "all but the followed stream's slot are dropped");
        assert!(!changes.contains(&Change::Unsubscribe(slot_a)));
    }

    #[test]
    fn a_subscription_never_confirmed_is_asked_for_again() {
        let (a, b, _) = streams();
        let (slot_a, slot_b) = (keys::stream_slot(&a), keys::stream_slot(&b));
        let mut slots = Slots::default();
        slots.follow(&a);
        slots.follow(&b);
        slots.changes();
        let asked = Instant::now();
        slots.confirmed(slot_b);
        assert!(!slots.overdue(asked + Duration::from_secs(1), Duration::from_secs(3)), "not late yet");
        assert!(slots.overdue(asked + Duration::from_secs(3), Duration::from_secs(3)));
        assert_eq!(slots.changes(), [Change::Subscribe(slot_a)], "only the unconfirmed one, again");
        slots.confirmed(slot_a);
        assert!(!slots.overdue(asked + Duration::from_secs(60), Duration::from_secs(3)), "confirmed: never late");
    }

    #[test]
    fn only_release_channels_name_a_slot() {
        let channel = |name: &str| Value::BulkString(name.as_bytes().to_vec());
        for slot in [0, 1, 9_000, keys::SLOTS - 1] {
            assert_eq!(release_slot(Some(&channel(&keys::released_channel(slot)))), Some(slot));
        }
        assert_eq!(release_slot(Some(&channel("ordo:released"))), None);
        assert_eq!(release_slot(Some(&channel("something:{else}"))), None);
        assert_eq!(release_slot(None), None);
    }

    #[tokio::test]
    async fn hub_subscriptions_count_streams_per_slot_and_confirmations_flag_subscribers() {
        let (a, _, same) = streams();
        let slot = keys::stream_slot(&a);
        let hub = Hub::new(4);
        let first = hub.subscribe(&a);
        let second = hub.subscribe(&a);
        let twin = hub.subscribe(&same);
        assert_eq!(hub.lock().slots.changes(), [Change::Subscribe(slot)]);
        hub.on_push(confirmation(slot), None);
        assert!(first.signal.take() && second.signal.take() && twin.signal.take(), "all re-read the log");
        drop(first);
        drop(twin);
        assert_eq!(hub.lock().slots.changes(), [], "the stream still has a subscriber");
        drop(second);
        assert_eq!(hub.lock().slots.changes(), [Change::Unsubscribe(slot)]);
        assert!(hub.lock().subscribers.is_empty());
    }

    #[tokio::test]
    async fn a_group_hears_its_streams_on_one_channel_and_names_the_ones_that_lagged() {
        let (a, b, same) = streams();
        let slot = keys::stream_slot(&a);
        let hub = Hub::new(4);
        let mut group = hub.group(2);
        group.add(&a);
        group.add(&a);
        group.add(&b);
        let own = hub.subscribe(&a);
        assert_eq!(group.len(), 2);
        assert_eq!(hub.lock().subscribers.get(&a).map(Vec::len), Some(2), "the group is one subscriber of a");
        let batch = |stream: &str| ReleasedBatch { stream_id: stream.to_owned(), ..Default::default() };
        hub.publish(vec![batch(&a)]);
        hub.publish(vec![batch(&b)]);
        hub.publish(vec![batch(&same)]);
        assert_eq!(group.rx.recv().await.map(|b| b.stream_id.clone()), Some(a.clone()));
        assert_eq!(group.rx.recv().await.map(|b| b.stream_id.clone()), Some(b.clone()));
        assert!(group.rx.try_recv().is_err(), "a stream the group does not follow is not heard");
        assert!(group.lag.take().is_empty());
        // The channel holds 2: the third batch does not fit, and its stream is named.
        hub.publish(vec![batch(&b), batch(&b)]);
        hub.publish(vec![batch(&a)]);
        assert_eq!(group.lag.take(), std::slice::from_ref(&a));
        // A confirmed slot names the group's streams in it.
        hub.on_push(confirmation(slot), None);
        let mut lagged = group.lag.take();
        lagged.sort();
        let mut expected = vec![a.clone()];
        if keys::stream_slot(&b) == slot {
            expected.push(b.clone());
        }
        expected.sort();
        assert_eq!(lagged, expected);
        assert!(own.signal.take(), "the other subscriber of a is flagged on its own");
        group.remove(&b);
        assert!(!hub.lock().subscribers.contains_key(&b));
        drop(group);
        assert_eq!(hub.lock().subscribers.get(&a).map(Vec::len), Some(1), "only the subscription is left");
        drop(own);
        assert!(hub.lock().subscribers.is_empty());
    }

    /// Redis delivering `payload` on a release channel.
    fn message(payload: Vec<u8>) -> PushInfo {
        PushInfo {
            kind: PushKind::SMessage,
            data: vec![Value::BulkString(keys::released_channel(0).into_bytes()), Value::BulkString(payload)],
        }
    }

    #[tokio::test]
    async fn one_message_fans_out_the_batches_of_every_stream_in_it_and_a_bare_batch_is_still_heard() {
        use prost::Message as _;
        let (a, b, _) = streams();
        let hub = Hub::new(8);
        let mut group = hub.group(8);
        group.add(&a);
        group.add(&b);
        let batch = |stream: &str, next: u64| ReleasedBatch {
            stream_id: stream.to_owned(),
            next_sequence: next,
            results: vec![ordo_proto::EventResult { stream_id: stream.to_owned(), ..Default::default() }],
        };
        let both = ReleasedBatches { batches: vec![batch(&a, 1), batch("nobody-follows", 7), batch(&b, 3)] };
        let encoded = both.encode_to_vec();
        assert_eq!(encoded.first(), Some(&ReleasedBatches::TAG));
        hub.on_push(message(encoded), None);
        let heard = |b: Option<Arc<ReleasedBatch>>| b.map(|b| (b.stream_id.clone(), b.next_sequence));
        assert_eq!(heard(group.rx.recv().await), Some((a.clone(), 1)));
        assert_eq!(heard(group.rx.recv().await), Some((b.clone(), 3)));
        assert!(group.rx.try_recv().is_err(), "the unfollowed stream's batch goes nowhere");
        // What versions before `ReleasedBatches` published: one bare batch.
        hub.on_push(message(batch(&b, 4).encode_to_vec()), None);
        assert_eq!(heard(group.rx.recv().await), Some((b.clone(), 4)));
        // Garbage is dropped (with a warning), nothing is delivered.
        hub.on_push(message(vec![ReleasedBatches::TAG, 0xff]), None);
        hub.on_push(message(Vec::new()), None);
        assert!(group.rx.try_recv().is_err());
        assert!(group.lag.take().is_empty());
    }

    #[test]
    fn on_a_single_node_a_channel_carries_a_group_of_slots() {
        let stride = keys::release_channel_stride(false);
        let mut slots = Slots { stride, ..Slots::default() };
        let a = "orders-1".to_owned();
        let group = keys::release_channel_slot(keys::stream_slot(&a), stride);
        // Another stream in another slot of the same group, and one in another group.
        let near = (0..)
            .map(|i| format!("near-{i}"))
            .find(|s| {
                keys::stream_slot(s) != keys::stream_slot(&a)
                    && keys::release_channel_slot(keys::stream_slot(s), stride) == group
            })
            .expect("a stream in the same group");
        let far = (0..)
            .map(|i| format!("far-{i}"))
            .find(|s| keys::release_channel_slot(keys::stream_slot(s), stride) != group)
            .expect("a stream in another group");
        let far_group = keys::release_channel_slot(keys::stream_slot(&far), stride);
        slots.follow(&a);
        slots.follow(&near);
        slots.follow(&far);
        assert_eq!(
            by_slot(slots.changes()),
            by_slot(vec![Change::Subscribe(group), Change::Subscribe(far_group)]),
            "one channel for both streams of the group"
        );
        slots.unfollow(&a);
        assert_eq!(slots.changes(), [], "the group still has a followed stream");
        slots.unfollow(&near);
        assert_eq!(slots.changes(), [Change::Unsubscribe(group)]);
        // A firehose wants every channel: 64, and hears everything once all are confirmed.
        slots.add_firehose();
        let wanted = slots.changes();
        assert_eq!(wanted.len(), usize::from(keys::SLOTS / stride) - 1, "all channels but the one subscribed");
        assert!(wanted.iter().all(|c| matches!(c, Change::Subscribe(s) if s % stride == 0)));
        let complete = (0..keys::SLOTS).step_by(usize::from(stride)).filter(|&slot| slots.confirmed(slot)).count();
        assert_eq!(complete, 1, "the last channel's confirmation, and only it, completes the set");
    }
}
