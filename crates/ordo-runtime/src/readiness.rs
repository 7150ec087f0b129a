//! Whether a service can do its work right now: the required dependencies it
//! watches (Redis, for the services that keep or read reorder state), probed
//! periodically with a short timeout. One [`Readiness`] feeds the gRPC health
//! service ([`crate::server::GrpcServer::with_readiness`]), HTTP health
//! endpoints, and the services themselves, which refuse work at once while a
//! dependency has been down for a while instead of letting calls hang.
//!
//! A service with no dependency is always ready ([`Readiness::always`]).

use std::{sync::Arc, time::Duration};

use futures::future::{BoxFuture, join_all};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::Shutdown;

/// How often dependencies are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long one probe may take before the dependency counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A dependency the service cannot work without, and how to check it.
#[derive(Clone)]
pub struct Dependency {
    name: &'static str,
    probe: Probe,
}

impl Dependency {
    /// `probe` answers `Ok` when the dependency is usable.
    pub fn new<F, Fut>(name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        Self { name, probe: Arc::new(move || Box::pin(probe())) }
    }

    /// Redis, checked with a PING through the service's own connection (so a
    /// PONG also means that connection has reconnected).
    pub fn redis<C>(conn: C) -> Self
    where
        C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        Self::new("redis", move || {
            let conn = conn.clone();
            async move { crate::redis_conn::ping(&conn, PROBE_TIMEOUT).await }
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    ready: bool,
    /// When `ready` last changed (or the watch started).
    since: Instant,
}

/// Whether every watched dependency answered its last probe. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    rx: watch::Receiver<State>,
}

/// Owns the probing task; stops it when dropped.
#[derive(Debug)]
pub struct Watcher(JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Readiness {
    /// Ready forever: for services without dependencies.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(State { ready: true, since: Instant::now() });
        // The value never changes: a watch whose sender is gone keeps
        // reporting its last value.
        drop(tx);
        Self { rx }
    }

    /// Probes `dependencies` every [`PROBE_INTERVAL`] until `shutdown`. Not
    /// ready until the first round of probes succeeded.
    pub fn watch(dependencies: Vec<Dependency>, shutdown: Shutdown) -> (Self, Watcher) {
        let (tx, rx) = watch::channel(State { ready: false, since: Instant::now() });
        let task = tokio::spawn(async move {
            loop {
                let failures: Vec<String> = join_all(dependencies.iter().map(|dependency| async move {
                    match tokio::time::timeout(PROBE_TIMEOUT, (dependency.probe)()).await {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(format!("{}: {error}", dependency.name)),
                        Err(_) => Some(format!("{}: no answer within {PROBE_TIMEOUT:?}", dependency.name)),
                    }
                }))
                .await
                .into_iter()
                .flatten()
                .collect();
                let ready = failures.is_empty();
                if ready != tx.borrow().ready {
                    if ready {
                        tracing::info!("required dependencies reachable; serving");
                    } else {
                        tracing::warn!(
                            failures = failures.join("; "),
                            "a required dependency is unreachable; not serving"
                        );
                    }
                    tx.send_replace(State { ready, since: Instant::now() });
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
        });
        (Self { rx }, Watcher(task))
    }

    /// True when every dependency answered its last probe.
    pub fn is_ready(&self) -> bool {
        self.rx.borrow().ready
    }

    /// Whether the service should refuse work at once rather than try: its
    /// dependencies have been down for at least `grace`. A short outage (a
    /// Redis restart) is ridden out by retries instead.
    pub fn down_for(&self, grace: Duration) -> bool {
        let state = *self.rx.borrow();
        !state.ready && state.since.elapsed() >= grace
    }

    /// Waits until readiness changes; returns the new value, or `None` when
    /// the watcher stopped.
    pub async fn changed(&mut self) -> Option<bool> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().ready)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn follows_the_probe() {
        let up = Arc::new(AtomicBool::new(false));
        let probe_up = up.clone();
        let dependency = Dependency::new("test", move || {
            let up = probe_up.load(Ordering::SeqCst);
            async move { if up { Ok(()) } else { Err("down".to_owned()) } }
        });
        let (mut readiness, _watcher) = Readiness::watch(vec![dependency], Shutdown::new());
        assert!(!readiness.is_ready());
        up.store(true, Ordering::SeqCst);
        let became = tokio::time::timeout(Duration::from_secs(5), readiness.changed()).await;
        assert_eq!(became.ok().flatten(), Some(true));
        up.store(false, Ordering::SeqCst);
        let became = tokio::time::timeout(Duration::from_secs(5), readiness.changed()).await;
        assert_eq!(became.ok().flatten(), Some(false));
        assert!(!readiness.down_for(Duration::from_secs(60)));
        assert!(Readiness::always().is_ready());
    }
}
