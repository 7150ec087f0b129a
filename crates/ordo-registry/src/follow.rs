//! Following the registry: a service keeps the version in use in memory
//! (read per event without a lock) and polls Redis every
//! [`POLL_PERIOD`] for the version it should use: its own pin
//! (`--registry-pin`), else the global pin, else the active version. A
//! change is picked up within a second, without a restart. Versions are
//! immutable, so versions other than the current one (an event in flight
//! that started under an older version) are cached once read.
//!
//! While Redis is unreachable the service keeps the version it has. Before
//! any version is published it uses its built-in catalog (version 0).

use ordo_runtime::sync::lock;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use ordo_runtime::Shutdown;
use ordo_runtime::redis_conn::RedisConn;
use tokio::sync::watch;

use crate::{
    spec::Catalog,
    store::{State, Store, StoreError},
};

/// How often the registry state is read.
pub const POLL_PERIOD: Duration = Duration::from_millis(250);
/// Versions kept in memory besides the current one.
const CACHED_VERSIONS: usize = 32;
/// How long the first read may hold a service's start.
const FIRST_READ: Duration = Duration::from_secs(1);

/// Which version a service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Follow the registry (its pin, else its active version).
    Follow,
    /// Always this version (0: the built-in catalog, ignoring the registry).
    Version(u64),
}

impl Pin {
    /// `None`/`follow` → follow; a number → pinned to it.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" | "follow" => Ok(Pin::Follow),
            n => n.parse::<u64>().map(Pin::Version).map_err(|_| format!("{n:?} is neither `follow` nor a version")),
        }
    }
}

struct Inner {
    store: Store,
    builtin: Arc<Catalog>,
    pin: Pin,
    current: ArcSwap<Catalog>,
    /// Whether `current` is a pinned version (own pin or the global one).
    pinned: std::sync::atomic::AtomicBool,
    cache: Mutex<BTreeMap<u64, Arc<Catalog>>>,
    changes: watch::Sender<u64>,
}

/// A service's view of the registry (cheap to clone).
#[derive(Clone)]
pub struct Follower {
    inner: Arc<Inner>,
}

impl Follower {
    /// Reads the registry once (for at most a second, so a service whose
    /// Redis is down still starts) and then follows it until `shutdown`.
    pub async fn start(conn: impl Into<RedisConn>, builtin: Catalog, pin: Pin, shutdown: Shutdown) -> Self {
        let builtin = Arc::new(builtin);
        let (changes, _) = watch::channel(builtin.version);
        let follower = Self {
            inner: Arc::new(Inner {
                store: Store::new(conn),
                current: ArcSwap::new(builtin.clone()),
                builtin,
                pin,
                pinned: std::sync::atomic::AtomicBool::new(matches!(pin, Pin::Version(_))),
                cache: Mutex::default(),
                changes,
            }),
        };
        if tokio::time::timeout(FIRST_READ, follower.refresh()).await.is_err() {
            tracing::warn!("operation registry not readable yet; using the built-in operations until it is");
        }
        let looping = follower.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(POLL_PERIOD);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                looping.refresh().await;
            }
        });
        follower
    }

    /// A follower that never reads Redis: always `catalog` (tests, tools).
    pub fn fixed(conn: impl Into<RedisConn>, catalog: Catalog) -> Self {
        let catalog = Arc::new(catalog);
        let (changes, _) = watch::channel(catalog.version);
        Self {
            inner: Arc::new(Inner {
                store: Store::new(conn),
                current: ArcSwap::new(catalog.clone()),
                builtin: catalog,
                pin: Pin::Version(0),
                pinned: std::sync::atomic::AtomicBool::new(true),
                cache: Mutex::default(),
                changes,
            }),
        }
    }

    /// The version in use now.
    pub fn current(&self) -> Arc<Catalog> {
        self.inner.current.load_full()
    }

    /// True when the version in use is pinned (not following new versions).
    pub fn pinned(&self) -> bool {
        self.inner.pinned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The built-in catalog (version 0).
    pub fn builtin(&self) -> Arc<Catalog> {
        self.inner.builtin.clone()
    }

    /// Notified with the new version number whenever the version in use changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Version `version`: the current one, a cached one, or read from Redis
    /// (`Ok(None)`: it does not exist).
    pub async fn version(&self, version: u64) -> Result<Option<Arc<Catalog>>, StoreError> {
        let current = self.current();
        if current.version == version {
            return Ok(Some(current));
        }
        if version == 0 {
            return Ok(Some(self.inner.builtin.clone()));
        }
        if let Some(hit) = lock(&self.inner.cache).get(&version) {
            return Ok(Some(hit.clone()));
        }
        // Boxed: rare (a version not cached), and a Redis read's future is
        // large; a caller awaiting `version` per event carries only a box.
        let Some(published) = Box::pin(self.inner.store.get(version)).await? else { return Ok(None) };
        let catalog = Arc::new(published.catalog);
        self.remember(catalog.clone());
        Ok(Some(catalog))
    }

    fn remember(&self, catalog: Arc<Catalog>) {
        let mut cache = lock(&self.inner.cache);
        cache.insert(catalog.version, catalog);
        while cache.len() > CACHED_VERSIONS {
            cache.pop_first();
        }
    }

    /// One poll: moves to the version this service should use, if it changed.
    async fn refresh(&self) {
        let (wanted, pinned) = match self.inner.pin {
            Pin::Version(v) => (v, true),
            Pin::Follow => match self.inner.store.state().await {
                Ok(state @ State { pin, .. }) => (state.effective(), pin.is_some()),
                Err(error) => {
                    tracing::debug!(%error, "cannot read the registry state; keeping the version in use");
                    return;
                }
            },
        };
        self.inner.pinned.store(pinned, std::sync::atomic::Ordering::Relaxed);
        if wanted == self.current().version {
            return;
        }
        let next = match self.version(wanted).await {
            Ok(Some(catalog)) => catalog,
            Ok(None) => {
                tracing::warn!(version = wanted, "registry version does not exist; keeping the version in use");
                return;
            }
            Err(error) => {
                tracing::warn!(version = wanted, %error, "cannot read registry version; keeping the version in use");
                return;
            }
        };
        let previous = self.inner.current.swap(next.clone());
        self.remember(previous.clone());
        tracing::info!(from = previous.version, to = next.version, pinned, "operation registry version changed");
        self.inner.changes.send_replace(next.version);
    }
}
