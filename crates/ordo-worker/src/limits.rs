//! Per-operation concurrency (an operation's `concurrency` in the
//! registry): at most that many calls of it at once in this worker, on top
//! of the worker's own `--concurrency`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ordo_registry::OperationSpec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One semaphore per (operation, limit): calls under registry versions that
/// agree on the limit share it; a version that changes the limit starts a
/// fresh one (calls under the old limit finish under it).
#[derive(Default)]
pub(crate) struct OpLimits {
    semaphores: Mutex<HashMap<(String, u32), Arc<Semaphore>>>,
}

/// Distinct (operation, limit) pairs kept; past it, idle ones are dropped.
const MAX_LIMITS: usize = 1024;

impl OpLimits {
    /// Waits for a slot of `spec`'s operation; `None` when it has no limit.
    pub(crate) async fn acquire(&self, spec: &OperationSpec) -> Option<OwnedSemaphorePermit> {
        let limit = spec.concurrency.filter(|&n| n > 0)?;
        let semaphore = {
            let mut semaphores = ordo_runtime::sync::lock(&self.semaphores);
            if semaphores.len() >= MAX_LIMITS && !semaphores.contains_key(&(spec.name.clone(), limit)) {
                // Only semaphores nobody holds or waits for (all permits back).
                semaphores.retain(|(_, n), s| s.available_permits() < *n as usize || Arc::strong_count(s) > 1);
            }
            semaphores
                .entry((spec.name.clone(), limit))
                .or_insert_with(|| Arc::new(Semaphore::new(limit as usize)))
                .clone()
        };
        // The semaphore is never closed.
        semaphore.acquire_owned().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use ordo_registry::Kind;

    use super::*;

    #[tokio::test]
    async fn at_most_the_limit_runs_at_once() {
        let limits = Arc::new(OpLimits::default());
        let spec = Arc::new(OperationSpec { concurrency: Some(3), ..OperationSpec::new("x", Kind::Stateful) });
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (limits, spec, running, peak) = (limits.clone(), spec.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let _permit = limits.acquire(&spec).await.expect("limited");
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        let unlimited = OperationSpec::new("y", Kind::Stateful);
        assert!(limits.acquire(&unlimited).await.is_none());
    }
}
