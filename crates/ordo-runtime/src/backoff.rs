//! The one retry and reconnect schedule of every Ordo service: exponential,
//! jittered (so replicas that lost the same dependency do not retry in step),
//! capped, from the `backon` crate. Loops that keep state between attempts
//! (reconnecting streams) hold a [`Backoff`]; one-shot operations use
//! [`retry`] with a bounded number of attempts.

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// A reconnect schedule: `min`, about twice as long each time (jittered),
/// never above `max`, forever until [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self { current: builder.build(), builder }
    }

    /// The next delay of the schedule.
    pub fn next_delay(&mut self) -> Duration {
        // Never exhausted (no max times); fall back to a fresh schedule if it were.
        match self.current.next() {
            Some(delay) => delay,
            None => {
                self.reset();
                self.current.next().unwrap_or(Duration::from_millis(100))
            }
        }
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

/// Runs `op` up to `attempts` times in all, waiting a jittered, growing delay
/// (from `min`, at most `max`) between attempts while `transient(&error)`.
/// Returns the first success or the last error.
pub async fn retry<T, E, F, Fut>(
    attempts: usize,
    min: Duration,
    max: Duration,
    transient: impl Fn(&E) -> bool,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let schedule = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(attempts.saturating_sub(1));
    op.retry(schedule).sleep(tokio::time::sleep).when(transient).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(160)), "{delays:?}");
        assert!(delays[10..].iter().all(|d| *d >= Duration::from_millis(80)), "capped delays stay at max: {delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(40));
    }

    #[tokio::test]
    async fn retry_stops_at_success_or_after_attempts() {
        let calls = AtomicUsize::new(0);
        let result: Result<u32, &str> = retry(
            5,
            Duration::from_millis(1),
            Duration::from_millis(4),
            |_| true,
            || async { if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err("not yet") } else { Ok(7) } },
        )
        .await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicUsize::new(0);
        let result: Result<u32, &str> = retry(
            3,
            Duration::from_millis(1),
            Duration::from_millis(4),
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("never")
            },
        )
        .await;
        assert_eq!(result, Err("never"));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "3 attempts in all");

        let calls = AtomicUsize::new(0);
        let result: Result<u32, &str> = retry(
            3,
            Duration::from_millis(1),
            Duration::from_millis(4),
            |e| *e != "fatal",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("fatal")
            },
        )
        .await;
        assert_eq!(result, Err("fatal"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a permanent error is not retried");
    }
}
