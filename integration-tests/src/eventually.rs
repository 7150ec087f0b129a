//! `eventually`: poll a condition until it holds or a deadline passes.
//! Tests assert with this instead of sleeping for a fixed time.

use std::{fmt::Debug, future::Future, time::Duration};

use tokio::time::Instant;

/// What a polled check returns: `bool`, `Option<T>` or `Result<T, E>`.
pub trait Outcome {
    type Value;
    /// `Ok` when the condition holds; `Err` says why not (shown on timeout).
    fn into_outcome(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn into_outcome(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("the condition was false".into()) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_outcome(self) -> Result<T, String> {
        self.ok_or_else(|| "the check returned None".into())
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_outcome(self) -> Result<T, String> {
        self.map_err(|error| format!("{error:?}"))
    }
}

/// Polls `check` (first at once, then with a growing pause of at most
/// 250 ms) until it holds, and returns its value.
///
/// # Panics
/// When `deadline` passes first, with the last reason the check gave.
pub async fn eventually<F, Fut, O>(deadline: Duration, check: F) -> O::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
    O: Outcome,
{
    match try_eventually(deadline, check).await {
        Ok(value) => value,
        Err(reason) => panic!("{reason}"),
    }
}

/// Like [`eventually`], but returns the timeout as an error.
pub async fn try_eventually<F, Fut, O>(deadline: Duration, mut check: F) -> Result<O::Value, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
    O: Outcome,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match check().await.into_outcome() {
            Ok(value) => return Ok(value),
            Err(reason) if start.elapsed() >= deadline => {
                return Err(format!("condition not met within {deadline:?}; last check: {reason}"));
            }
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            (n >= 3).then_some(n)
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn times_out_with_the_last_reason() {
        let result = try_eventually(Duration::from_millis(50), || async { Err::<(), _>("not yet") }).await;
        let message = result.expect_err("must time out");
        assert!(message.contains("not yet"), "{message}");
    }
}
