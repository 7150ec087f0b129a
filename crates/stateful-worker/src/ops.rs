//! The demo operations. `async-echo` and `async-upper` are the payload back
//! (as is, upper-cased) after the simulated latency (`latency` attribute,
//! applied by the worker before every operation); `callback` is the paper's
//! asynchronous callback into the stateless service.
//!
//! `callback` retries a transient failure of the stateless call itself
//! within [`OpContext::budget`]; what still fails then is reported
//! transient, so the worker hands the attempt back to the harmonizer while
//! attempts remain.

use std::time::Duration;

use ordo_core::limits::CALL_ATTRIBUTE;
use ordo_proto::v1::stateless_client::StatelessClient;
use ordo_runtime::{backoff::Backoff, client::TracedChannel};
use ordo_worker::{Event, OpContext, OpError, OpFuture, Operation, Operations, is_transient};

/// The demo operations; `callback` calls `stateless`.
pub fn demo(stateless: StatelessClient<TracedChannel>) -> Operations {
    Operations::new().with(AsyncEcho).with(AsyncUpper).with(Callback { stateless })
}

pub struct AsyncEcho;

impl Operation for AsyncEcho {
    fn name(&self) -> &str {
        "async-echo"
    }
    fn description(&self) -> &str {
        "returns the payload after the simulated latency"
    }
    fn call<'a>(&'a self, _: &'a OpContext, event: &'a Event) -> OpFuture<'a> {
        Box::pin(async move { Ok(event.payload.clone()) })
    }
}

pub struct AsyncUpper;

impl Operation for AsyncUpper {
    fn name(&self) -> &str {
        "async-upper"
    }
    fn description(&self) -> &str {
        "ASCII upper case of the payload, after the simulated latency"
    }
    fn call<'a>(&'a self, _: &'a OpContext, event: &'a Event) -> OpFuture<'a> {
        Box::pin(async move { Ok(event.payload.to_ascii_uppercase().into()) })
    }
}

/// First and longest pause between two tries of a stateless call.
const CALLBACK_BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(500));
/// Shortest time worth another try of a stateless call (connect + answer).
const CALLBACK_MIN_TRY: Duration = Duration::from_millis(100);
/// Tries of a stateless call when the attempt has no deadline.
const CALLBACK_TRIES_WITHOUT_DEADLINE: usize = 8;

/// The paper's asynchronous callback: after the simulated latency, calls the
/// stateless service and returns its answer. A transient failure of that
/// call (connect error, UNAVAILABLE, timeout) is retried with the shared
/// jittered backoff while the attempt's budget lasts; what still fails then
/// is reported transient, so the attempt is handed back and tried again.
pub struct Callback {
    stateless: StatelessClient<TracedChannel>,
}

impl Operation for Callback {
    fn name(&self) -> &str {
        "callback"
    }
    fn description(&self) -> &str {
        "calls the stateless operation named by attribute `call` (default echo) after the simulated latency"
    }
    fn call<'a>(&'a self, ctx: &'a OpContext, event: &'a Event) -> OpFuture<'a> {
        Box::pin(async move {
            let mut remote = event.clone();
            remote.operation = event.attributes.get(CALL_ATTRIBUTE).cloned().unwrap_or_else(|| "echo".into());
            let mut backoff = Backoff::new(CALLBACK_BACKOFF.0, CALLBACK_BACKOFF.1);
            let mut tries = 0;
            loop {
                tries += 1;
                let mut client = self.stateless.clone();
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
    use ordo_worker::{Bytes, Kind, OperationSpec};
    use tokio::time::Instant;

    use super::*;

    fn unreachable() -> StatelessClient<TracedChannel> {
        // A port nothing listens on: every try is a connect error.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        StatelessClient::new(ordo_runtime::client::traced(&addr).expect("endpoint"))
    }

    #[tokio::test]
    async fn callback_reports_an_unreachable_service_as_transient_within_its_budget() {
        let budget = Duration::from_millis(600);
        let ctx =
            OpContext::new(OperationSpec::new("callback", Kind::Stateful)).with_budget(Some(Instant::now() + budget));
        let event = Event { stream_id: "s".into(), operation: "callback".into(), ..Default::default() };
        let start = Instant::now();
        let error = Callback { stateless: unreachable() }.call(&ctx, &event).await.expect_err("nothing answers");
        assert!(error.transient, "{error}");
        assert!(error.message.contains("tries"), "it tried more than once: {error}");
        assert!(
            start.elapsed() < budget + Duration::from_millis(500),
            "it stopped within its budget: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn the_demo_operations() {
        let ops = demo(unreachable());
        assert_eq!(ops.names().collect::<Vec<_>>(), ["async-echo", "async-upper", "callback"]);
        assert!(ops.check().is_ok());
        let ctx = OpContext::new(OperationSpec::new("async-upper", Kind::Stateful));
        let event = Event { payload: Bytes::from_static(b"abc"), ..Default::default() };
        let upper = ops.get("async-upper").expect("demo op");
        assert_eq!(upper.call(&ctx, &event).await, Ok(Bytes::from_static(b"ABC")));
        let echo = ops.get("async-echo").expect("demo op");
        assert_eq!(echo.call(&ctx, &event).await, Ok(Bytes::from_static(b"abc")));
    }
}
