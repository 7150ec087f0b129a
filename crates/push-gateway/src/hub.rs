//! The live tail: one Redis pub/sub connection on `ordo:released`, fanned out
//! in memory to the subscribers of each stream.
//!
//! Delivery to a subscriber never blocks the hub: each has a bounded buffer,
//! and when it is full the subscriber is flagged *lagged* and later catches up
//! from the release log instead. After a pub/sub reconnect every subscriber is
//! flagged, since messages may have been missed. Memory per subscriber is
//! therefore bounded whatever its speed.
//!
//! A stream has an entry in the hub only while somebody subscribes to it
//! (the last [`Subscription`] dropped removes it; `ordo_push_hub_streams`
//! counts them), so idle streams cost the hub nothing.
//!
//! Besides per-stream subscribers, a [`Firehose`] hears the id of every
//! stream with a release (the AMQP outbox uses it to learn what to publish);
//! it has the same bounded buffer and lagged flag.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use ordo_proto::v1::ReleasedBatch;
use prost::Message;
use tokio::sync::{Notify, mpsc};

use crate::Shutdown;

struct Entry {
    id: u64,
    tx: mpsc::Sender<Arc<ReleasedBatch>>,
    signal: Arc<Signal>,
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

#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<HashMap<String, Vec<Entry>>>,
    firehoses: Mutex<Vec<FirehoseEntry>>,
    next_id: AtomicU64,
    buffer: usize,
}

struct FirehoseEntry {
    tx: mpsc::Sender<String>,
    signal: Arc<Signal>,
}

/// Every stream id with a release, as they happen. When its buffer is full,
/// or the live tail reconnected, [`Signal::take`] turns true: the owner must
/// then find out what it missed on its own (e.g. by scanning Redis).
pub struct Firehose {
    pub rx: mpsc::Receiver<String>,
    pub signal: Arc<Signal>,
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
        let mut subscribers = self.hub.lock();
        if let Some(entries) = subscribers.get_mut(&self.stream) {
            entries.retain(|e| e.id != self.id);
            if entries.is_empty() {
                subscribers.remove(&self.stream);
            }
        }
        crate::metrics::HUB_STREAMS.set(subscribers.len() as f64);
    }
}

impl Hub {
    pub fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Self { buffer: buffer.max(1), ..Default::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // A panic while holding this lock leaves the map consistent (plain inserts and removes).
        self.subscribers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(self: &Arc<Self>, stream: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Signal::default());
        let mut subscribers = self.lock();
        subscribers.entry(stream.to_owned()).or_default().push(Entry { id, tx, signal: signal.clone() });
        crate::metrics::HUB_STREAMS.set(subscribers.len() as f64);
        drop(subscribers);
        Subscription { hub: self.clone(), stream: stream.to_owned(), id, rx, signal }
    }

    /// Hears every stream with a release from now on; unregistered when the
    /// receiver is dropped.
    pub fn firehose(&self) -> Firehose {
        let (tx, rx) = mpsc::channel(self.buffer);
        let signal = Arc::new(Signal::default());
        self.lock_firehoses().push(FirehoseEntry { tx, signal: signal.clone() });
        Firehose { rx, signal }
    }

    fn lock_firehoses(&self) -> std::sync::MutexGuard<'_, Vec<FirehoseEntry>> {
        // Plain pushes and retains: consistent even after a panic.
        self.firehoses.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, batch: ReleasedBatch) {
        batch.results.iter().for_each(crate::metrics::released);
        self.lock_firehoses().retain(|firehose| match firehose.tx.try_send(batch.stream_id.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                firehose.signal.raise();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        let subscribers = self.lock();
        let Some(entries) = subscribers.get(&batch.stream_id) else { return };
        let batch = Arc::new(batch);
        for entry in entries {
            if entry.tx.try_send(batch.clone()).is_err() {
                entry.signal.raise();
            }
        }
    }

    fn all_lagged(&self) {
        for entry in self.lock().values().flatten() {
            entry.signal.raise();
        }
        for firehose in self.lock_firehoses().iter() {
            firehose.signal.raise();
        }
    }

    /// Listens on the release channel until `shutdown`, reconnecting forever.
    pub async fn listen(self: Arc<Self>, client: redis::Client, shutdown: Shutdown) {
        let mut backoff = ordo_runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let connected = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(ordo_core::keys::RELEASED_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = connected => connected,
            };
            match pubsub {
                Ok(mut pubsub) => {
                    tracing::info!("tailing released results");
                    backoff.reset();
                    // Anything released while we were away is only in the logs.
                    self.all_lagged();
                    let mut messages = pubsub.on_message();
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        match ReleasedBatch::decode(message.get_payload_bytes()) {
                            Ok(batch) => self.publish(batch),
                            Err(error) => tracing::warn!(%error, "undecodable released batch"),
                        }
                    }
                    tracing::warn!("release channel connection lost; reconnecting");
                }
                Err(error) => tracing::warn!(%error, "cannot subscribe to the release channel; retrying"),
            }
            self.all_lagged();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = backoff.wait() => {}
            }
        }
    }
}
