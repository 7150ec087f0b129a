//! Native operations: the [`Operation`] trait, what an operation gets per
//! attempt ([`OpContext`]), how it fails ([`OpError`]), and the named set a
//! worker runs ([`Operations`]).
//!
//! The worker applies the event's simulated latency (`latency` attribute)
//! before calling the operation, so every operation honours it.
//!
//! An operation says whether a failure is worth another try
//! ([`OpError::transient`]: a dependency was briefly unreachable) or final
//! ([`OpError::permanent`]: the event itself is wrong). Operations that call
//! other services retry transient errors themselves within
//! [`OpContext::budget`]; the worker hands a still-transient failure back to
//! the harmonizer for another attempt while attempts remain, and releases
//! FAILED only for a permanent error or on the last attempt.

use std::{collections::BTreeMap, fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use ordo_proto::v1::Event;
use ordo_registry::{Catalog, Kind, OperationSpec};
use tokio::time::Instant;

/// What [`Operation::call`] returns.
pub type OpFuture<'a> = BoxFuture<'a, Result<Bytes, OpError>>;

/// What an operation may use besides its event. Built per attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpContext {
    /// 1 for the first attempt of the event.
    pub attempt: u32,
    /// Attempts the harmonizer allows in all (at least `attempt`).
    pub max_attempts: u32,
    /// Until when the operation may keep retrying a dependency: a little
    /// before the attempt's deadline (and at most the operation's
    /// `timeout`), so that a still-failing attempt can be handed back before
    /// the harmonizer gives up on it. `None`: no deadline.
    pub budget: Option<Instant>,
    /// Version of the operation registry the event was accepted under (0:
    /// the worker's built-in operations).
    pub registry_version: u64,
    /// The registry's definition of the operation in that version.
    pub spec: Arc<OperationSpec>,
}

impl OpContext {
    /// A context for a first (and only) attempt without deadline; for
    /// calling an operation outside a worker, e.g. in its tests.
    pub fn new(spec: impl Into<Arc<OperationSpec>>) -> Self {
        Self { attempt: 1, max_attempts: 1, budget: None, registry_version: 0, spec: spec.into() }
    }

    /// Attempt `attempt` of `max_attempts`.
    pub fn with_attempt(mut self, attempt: u32, max_attempts: u32) -> Self {
        self.attempt = attempt.max(1);
        self.max_attempts = max_attempts.max(self.attempt);
        self
    }

    pub fn with_budget(mut self, budget: Option<Instant>) -> Self {
        self.budget = budget;
        self
    }

    pub fn with_registry_version(mut self, version: u64) -> Self {
        self.registry_version = version;
        self
    }

    /// Time left of [`OpContext::budget`] (`None`: unlimited).
    pub fn remaining(&self) -> Option<Duration> {
        self.budget.map(|budget| budget.saturating_duration_since(Instant::now()))
    }

    /// True on the last attempt the harmonizer allows: a transient failure
    /// now is released as FAILED.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// Why an operation produced no output. A permanent error becomes a FAILED
/// result; a transient one is tried again (another attempt) while the
/// harmonizer allows more attempts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// Plain messages are permanent errors.
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

/// An asynchronous stream operation run by a worker.
///
/// ```no_run
/// use ordo_worker::{Bytes, Event, OpContext, OpFuture, Operation};
///
/// struct Shout;
///
/// impl Operation for Shout {
///     fn name(&self) -> &str {
///         "shout"
///     }
///     fn description(&self) -> &str {
///         "upper-cases the payload"
///     }
///     fn call<'a>(&'a self, _ctx: &'a OpContext, event: &'a Event) -> OpFuture<'a> {
///         Box::pin(async move { Ok(Bytes::from(event.payload.to_ascii_uppercase())) })
///     }
/// }
/// ```
pub trait Operation: Send + Sync + 'static {
    /// The operation's name in the registry (`[A-Za-z0-9._-]`, at most 128 bytes).
    fn name(&self) -> &str;
    /// One line for `ListOperations`.
    fn description(&self) -> &str {
        ""
    }
    /// Runs the operation on one event. Called concurrently; completions may
    /// finish in any order — ordering is the reassembler's job. The future is
    /// dropped when the harmonizer abandons the attempt (or the operation's
    /// `timeout` passes), so it must not rely on running to completion.
    fn call<'a>(&'a self, ctx: &'a OpContext, event: &'a Event) -> OpFuture<'a>;
}

/// An operation made of a closure ([`Operations::with_fn`]).
struct FnOperation<F> {
    name: String,
    description: String,
    f: F,
}

impl<F, Fut> Operation for FnOperation<F>
where
    F: Fn(OpContext, Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, OpError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> &str {
        &self.description
    }
    fn call<'a>(&'a self, ctx: &'a OpContext, event: &'a Event) -> OpFuture<'a> {
        Box::pin((self.f)(ctx.clone(), event.clone()))
    }
}

/// The operations compiled into a worker, by name (cheap to clone).
///
/// ```no_run
/// use ordo_worker::{Bytes, OpError, Operations};
///
/// let operations = Operations::new().with_fn("reverse", "reverses the UTF-8 payload", |_ctx, event| async move {
///     let text = std::str::from_utf8(&event.payload).map_err(|e| OpError::permanent(e.to_string()))?;
///     Ok(Bytes::from(text.chars().rev().collect::<String>()))
/// });
/// assert!(operations.get("reverse").is_some());
/// ```
#[derive(Clone, Default)]
pub struct Operations {
    ops: BTreeMap<String, Arc<dyn Operation>>,
}

impl fmt::Debug for Operations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ops.keys()).finish()
    }
}

impl Operations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `op` (replacing an operation of the same name).
    pub fn with(self, op: impl Operation) -> Self {
        self.with_arc(Arc::new(op))
    }

    /// Adds a shared operation (replacing one of the same name).
    pub fn with_arc(mut self, op: Arc<dyn Operation>) -> Self {
        self.ops.insert(op.name().to_owned(), op);
        self
    }

    /// Adds an operation made of an async closure. It gets its own copies
    /// of the context and the event, so its future may own them.
    pub fn with_fn<F, Fut>(self, name: impl Into<String>, description: impl Into<String>, f: F) -> Self
    where
        F: Fn(OpContext, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, OpError>> + Send + 'static,
    {
        self.with(FnOperation { name: name.into(), description: description.into(), f })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Operation>> {
        self.ops.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.ops.contains_key(name)
    }

    /// The operations, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Operation>> {
        self.ops.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ops.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The worker's built-in registry (version 0): every operation,
    /// stateful, without endpoint.
    pub fn catalog(&self) -> Catalog {
        Catalog::builtin(
            self.iter().map(|op| OperationSpec::new(op.name(), Kind::Stateful).with_description(op.description())),
        )
    }

    /// Every name must be one the registry accepts.
    pub fn check(&self) -> Result<(), String> {
        self.names().try_for_each(ordo_registry::document::check_name)
    }
}

/// gRPC codes another try may not repeat: the service (or the way to it)
/// was down, overloaded or slow. Everything else (NOT_FOUND,
/// INVALID_ARGUMENT, ...) is an answer about the event.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages_are_permanent_errors() {
        assert!(!OpError::from("bad input").transient);
        assert!(OpError::transient("down").transient);
        assert!(is_transient(tonic::Code::Unavailable) && !is_transient(tonic::Code::NotFound));
    }

    #[tokio::test]
    async fn closures_are_operations_and_names_are_checked() {
        let ops = Operations::new().with_fn("twice", "doubles", |ctx, event| async move {
            assert_eq!(ctx.attempt, 2);
            Ok(Bytes::from([event.payload.as_ref(), event.payload.as_ref()].concat()))
        });
        let op = ops.get("twice").expect("registered");
        assert_eq!((op.name(), op.description()), ("twice", "doubles"));
        let ctx = OpContext::new(OperationSpec::new("twice", Kind::Stateful)).with_attempt(2, 3);
        assert!(!ctx.is_last_attempt());
        let event = Event { payload: Bytes::from_static(b"ab"), ..Default::default() };
        assert_eq!(op.call(&ctx, &event).await, Ok(Bytes::from_static(b"abab")));
        assert!(ops.check().is_ok());
        let catalog = ops.catalog();
        assert_eq!(catalog.version, 0);
        let spec = catalog.get("twice").expect("in the built-in catalog");
        assert_eq!((spec.kind, spec.endpoint.is_none(), spec.description.as_str()), (Kind::Stateful, true, "doubles"));

        let bad = Operations::new().with_fn("no spaces", "", |_, _| async { Ok(Bytes::new()) });
        assert!(bad.check().expect_err("refused").contains("' '"));
        assert!(Operations::new().with_fn("", "", |_, _| async { Ok(Bytes::new()) }).check().is_err());
    }
}
