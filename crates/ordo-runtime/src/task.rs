//! Tasks owned by the code that spawned them.

use std::time::Duration;

use tokio::task::JoinHandle;

/// A spawned task that is aborted when dropped, so no task outlives the
/// service's `run` however it ends.
pub struct Owned<T>(JoinHandle<T>);

impl<T: Send + 'static> Owned<T> {
    /// Spawns `future` on the current runtime, owned.
    pub fn spawn<F>(future: F) -> Self
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        Self(tokio::spawn(future))
    }
}

impl<T> Owned<T> {
    /// Waits at most `within` for the task (already told to stop) to end.
    pub async fn finish(mut self, within: Duration) -> Option<T> {
        tokio::time::timeout(within, &mut self.0).await.ok()?.ok()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_task_is_aborted_and_a_finished_one_gives_its_output() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let pending = Owned::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(pending);
        assert!(rx.await.is_err(), "the aborted task dropped its sender");
        assert_eq!(Owned::spawn(async { 7 }).finish(Duration::from_secs(5)).await, Some(7));
        let slow = Owned::spawn(std::future::pending::<u8>());
        assert_eq!(slow.finish(Duration::from_millis(10)).await, None, "not ended in time");
    }
}
