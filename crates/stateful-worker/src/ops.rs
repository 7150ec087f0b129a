//! Stateful (asynchronous) operations. New operations plug in by implementing
//! [`Operation`] and adding them to a [`Registry`]. The worker applies the
//! event's simulated latency (`latency` attribute) before calling the
//! operation, so every operation honours it.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use futures::future::BoxFuture;
use ordo_proto::v1::{Event, stateless_client::StatelessClient};
use ordo_runtime::client::TracedChannel;

/// What an operation may use besides its event.
#[derive(Clone)]
pub struct OpContext {
    /// The stateless service, for operations that call back into it.
    pub stateless: StatelessClient<TracedChannel>,
}

/// Why an operation produced no output; becomes a FAILED result.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

/// An asynchronous stream operation run by the stateful worker.
pub trait Operation: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// Runs the operation on one event. Called concurrently; completions may
    /// finish in any order — ordering is the reassembler's job.
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

/// The attribute naming the stateless operation `callback` calls.
pub const CALL_ATTRIBUTE: &str = "call";

/// The paper's asynchronous callback: after the simulated latency, calls the
/// stateless service and returns its answer.
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
            let mut client = ctx.stateless.clone();
            let result = client
                .execute(remote)
                .await
                .map_err(|status| OpError(format!("stateless call failed: {}", status.message())))?
                .into_inner();
            match result.status() {
                ordo_proto::ResultStatus::Ok => Ok(result.payload),
                _ => Err(OpError(result.error)),
            }
        })
    }
}
