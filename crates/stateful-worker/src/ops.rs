//! Stateful (asynchronous) operations. New operations plug in by implementing
//! [`Operation`] and adding them to a [`Registry`]. The worker applies the
//! event's simulated latency (`latency` attribute) before calling the
//! operation, so every operation honours it.
//!
//! An operation says whether a failure is worth another try
//! ([`OpError::transient`]: a dependency was briefly unreachable) or final
//! ([`OpError::permanent`]: the event itself is wrong). Operations that call
//! other services retry transient errors themselves within
//! [`OpContext::budget`]; the worker hands a still-transient failure back to
//! the harmonizer for another attempt while attempts remain, and releases
//! FAILED only for a permanent error or on the last attempt.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
pub use ordo_core::limits::CALL_ATTRIBUTE;
use ordo_proto::v1::{Event, stateless_client::StatelessClient};
use ordo_runtime::{backoff::Backoff, client::TracedChannel};
use tokio::time::Instant;

/// What an operation may use besides its event. Built per attempt.
#[derive(Clone)]
pub struct OpContext {
    /// The stateless service, for operations that call back into it.
    pub stateless: StatelessClient<TracedChannel>,
    /// Until when the operation may keep retrying a dependency: a little
    /// before the attempt's deadline, so that a still-failing attempt can be
    /// handed back before the harmonizer gives up on it. `None`: no deadline.
    pub budget: Option<Instant>,
}

impl OpContext {
    /// Time left of [`OpContext::budget`] (`None`: unlimited).
    pub fn remaining(&self) -> Option<Duration> {
        self.budget.map(|budget| budget.saturating_duration_since(Instant::now()))
    }
}

/// Why an operation produced no output. A permanent error becomes a FAILED
/// result; a transient one is tried again (another attempt) while the
/// harmonizer allows more attempts.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub message: String,
    /// True when another attempt may succeed (a dependency was unavailable).
    pub transient: bool,
}

impl OpError {
    /// A failure another attempt may not repeat (unreachable dependency, timeout).
    pub fn transient(message: impl Into<String>) -> Self {
        Self { message: message.into(), transient: true }
    }

    /// A failure of the event itself: retrying gives the same answer.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), transient: false }
    }
}

/// Plain messages are permanent errors (what `OpError(String)` used to mean).
impl From<String> for OpError {
    fn from(message: String) -> Self {
        Self::permanent(message)
    }
}

impl From<&str> for OpError {
    fn from(message: &str) -> Self {
        Self::permanent(message)
    }
}

/// An asynchronous stream operation run by the stateful worker.
pub trait Operation: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// Runs the operation on one event. Called concurrently; completions may
    /// finish in any order — ordering is the reassembler's job. The future is
    /// dropped when the harmonizer abandons the attempt, so it must not rely
    /// on running to completion.
    fn call<'a>(&'a self, ctx: &'a OpContext, event: &'a Event) -> BoxFuture<'a, Result<Bytes, OpError>>;
}

/// Operations by name.
#[derive(Clone, Default)]
pub struct Registry {
    ops: HashMap<&'static str, Arc<dyn Operation>>,
}

impl Registry {
    pub fn with(mut self, op: impl Operation) -> Self {
        self.ops.insert(op.name(), Arc::new(op));
        self
    }

    /// The built-in operations.
    pub fn builtin() -> Self {
        Self::default().with(AsyncEcho).with(AsyncUpper).with(Callback)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Operation>> {
        self.ops.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Operation>> {
        let mut ops: Vec<_> = self.ops.values().collect();
        ops.sort_by_key(|op| op.name());
        ops.into_iter()
    }
}

/// Names and descriptions of the built-in operations (for the harmonizer's
/// default registry).
pub fn builtin_catalog() -> Vec<(&'static str, &'static str)> {
    Registry::builtin().iter().map(|op| (op.name(), op.description())).collect()
}

pub struct AsyncEcho;

impl Operation for AsyncEcho {
    fn name(&self) -> &'static str {
        "async-echo"
    }
    fn description(&self) -> &'static str {
        "returns the payload after the simulated latency"
    }
    fn call<'a>(&'a self, _: &'a OpContext, event: &'a Event) -> BoxFuture<'a, Result<Bytes, OpError>> {
        Box::pin(async move { Ok(event.payload.clone()) })
    }
}

pub struct AsyncUpper;

impl Operation for AsyncUpper {
    fn name(&self) -> &'static str {
        "async-upper"
    }
    fn description(&self) -> &'static str {
        "ASCII upper case of the payload, after the simulated latency"
    }
    fn call<'a>(&'a self, _: &'a OpContext, event: &'a Event) -> BoxFuture<'a, Result<Bytes, OpError>> {
        Box::pin(async move { Ok(event.payload.to_ascii_uppercase().into()) })
    }
}

/// First and longest pause between two tries of a stateless call.
const CALLBACK_BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(500));
/// Shortest time worth another try of a stateless call (connect + answer).
const CALLBACK_MIN_TRY: Duration = Duration::from_millis(100);
/// Tries of a stateless call when the attempt has no deadline.
const CALLBACK_TRIES_WITHOUT_DEADLINE: usize = 8;

/// gRPC codes of a stateless call that another try may not repeat: the
/// service (or the way to it) was down, overloaded or slow. Everything else
/// (NOT_FOUND, INVALID_ARGUMENT, ...) is an answer about the event.
pub fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// The paper's asynchronous callback: after the simulated latency, calls the
/// stateless service and returns its answer. A transient failure of that
/// call (connect error, UNAVAILABLE, timeout) is retried with the shared
/// jittered backoff while the attempt's budget lasts; what still fails then
/// is reported transient, so the attempt is handed back and tried again.
pub struct Callback;

impl Operation for Callback {
    fn name(&self) -> &'static str {
        "callback"
    }
    fn description(&self) -> &'static str {
        "calls the stateless operation named by attribute `call` (default echo) after the simulated latency"
    }
    fn call<'a>(&'a self, ctx: &'a OpContext, event: &'a Event) -> BoxFuture<'a, Result<Bytes, OpError>> {
        Box::pin(async move {
            let mut remote = event.clone();
            remote.operation = event.attributes.get(CALL_ATTRIBUTE).cloned().unwrap_or_else(|| "echo".into());
            let mut backoff = Backoff::new(CALLBACK_BACKOFF.0, CALLBACK_BACKOFF.1);
            let mut tries = 0;
            loop {
                tries += 1;
                let mut client = ctx.stateless.clone();
                let call = client.execute(remote.clone());
                let answer = match ctx.remaining() {
                    // A hung service must not outlive the budget either.
                    Some(left) => tokio::time::timeout(left, call)
                        .await
                        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within the attempt"))),
                    None => call.await,
                };
                let status = match answer {
                    Ok(response) => {
                        let result = response.into_inner();
                        return match result.status() {
                            ordo_proto::ResultStatus::Ok => Ok(result.payload),
                            _ => Err(OpError::permanent(result.error)),
                        };
                    }
                    Err(status) => status,
                };
                let message = format!("stateless call failed ({:?}): {}", status.code(), status.message());
                if !is_transient(status.code()) {
                    return Err(OpError::permanent(message));
                }
                let mut delay = backoff.next_delay();
                let out_of_time = match ctx.remaining() {
                    // Use the budget to its end: the last pause is shortened
                    // so that one more try of at least CALLBACK_MIN_TRY fits.
                    Some(left) => match left.checked_sub(CALLBACK_MIN_TRY) {
                        Some(spare) if !spare.is_zero() => {
                            delay = delay.min(spare);
                            false
                        }
                        _ => true,
                    },
                    None => tries >= CALLBACK_TRIES_WITHOUT_DEADLINE,
                };
                if out_of_time {
                    return Err(OpError::transient(format!("{message} (after {tries} tries)")));
                }
                tracing::debug!(tries, ?delay, error = %message, "stateless call failed; trying again");
                tokio::time::sleep(delay).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callback_reports_an_unreachable_service_as_transient_within_its_budget() {
        // A port nothing listens on: every try is a connect error.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let stateless = StatelessClient::new(ordo_runtime::client::traced(&addr).expect("endpoint"));
        let budget = Duration::from_millis(600);
        let ctx = OpContext { stateless, budget: Some(Instant::now() + budget) };
        let event = Event { stream_id: "s".into(), operation: "callback".into(), ..Default::default() };
        let start = Instant::now();
        let error = Callback.call(&ctx, &event).await.expect_err("nothing answers");
        assert!(error.transient, "{error}");
        assert!(error.message.contains("tries"), "it tried more than once: {error}");
        assert!(
            start.elapsed() < budget + Duration::from_millis(500),
            "it stopped within its budget: {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn plain_messages_are_permanent_errors() {
        assert!(!OpError::from("bad input").transient);
        assert!(OpError::transient("down").transient);
        assert!(is_transient(tonic::Code::Unavailable) && !is_transient(tonic::Code::NotFound));
    }
}
