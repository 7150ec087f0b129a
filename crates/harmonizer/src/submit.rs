//! The unary `Submit`: one event, answered inline when it can be.
//!
//! Stateless operations are executed and answered at once; their result is
//! also recorded in the stream so its sequence does not become a gap.
//! Stateful ones are dispatched, and the call waits up to
//! `--unary-threshold` for the released result; after that it answers
//! PROCESSING and the push gateway serves the result later. Submitting the
//! same (stream, sequence) again returns the same result: the reassembler
//! keeps only the first, and stateless results are looked up before and
//! after they are computed so a repeat with another payload still gets the
//! first. Over the message size limit: RESOURCE_EXHAUSTED (`size_limit.rs`).
//! A stateful event whose operation no live worker serves (and none did
//! within `--event-timeout`) waits up to `--worker-wait` for one, then is
//! refused with UNAVAILABLE. With authorization on, the token must allow
//! writing the event's stream (UNAUTHENTICATED / PERMISSION_DENIED).

use futures::StreamExt as _;
use ordo_proto::v1::{Event, EventResult, FollowRequest, OrderingMode, StreamCursor};
use ordo_runtime::telemetry;

use crate::{Shared, error::Error, registry::Route, state, stored};

pub async fn submit(
    shared: &Shared,
    grant: Result<ordo_runtime::auth::Grant, ordo_runtime::auth::Denied>,
    mut event: Event,
) -> Result<EventResult, Error> {
    let grant = grant?;
    if shared.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let checked = shared.registry.check(&event)?;
    grant.check_write(&event.stream_id)?;
    let route = checked.route;
    if shared.readiness.down_for(crate::REDIS_GRACE) {
        return Err(Error::Unavailable("reorder state (Redis)"));
    }
    let meta = state::read(&shared.redis, &event.stream_id).await?;
    let mode = state::effective_mode(meta.mode, event.mode());
    event.mode = mode as i32;
    let window = shared.config.window;
    if event.sequence >= meta.next.saturating_add(window) {
        return Err(Error::BeyondWindow {
            stream: event.stream_id.clone(),
            sequence: event.sequence,
            next: meta.next,
            window,
            limit: meta.next.saturating_add(window),
        });
    }
    let span = telemetry::entry_span(
        "harmonizer.submit",
        &event.stream_id,
        event.sequence,
        &event.trace_context,
        &tracing::Span::current(),
    );
    if !span.is_disabled() {
        span.record(telemetry::attr::OPERATION, checked.spec.name.as_str());
    }
    event.trace_context = telemetry::inject(&span, &event.trace_context);

    if route == Route::Stateless {
        // Only the first result of a sequence is stored and released: a
        // repeated Submit gets that one, whatever it sends now.
        if let Some(stored) = stored::read(&shared.redis, &event.stream_id, event.sequence, mode).await? {
            return answer(stored);
        }
        if event.sequence < meta.next && mode == OrderingMode::Unordered {
            return Err(Error::AlreadyReleased { stream: event.stream_id, sequence: event.sequence });
        }
        crate::metrics::accepted(&checked.spec.name);
        // In flight (no gap is declared over it, here or, once claimed, in
        // another harmonizer) until its result is recorded.
        let _held = shared.pool.hold(&event);
        let result = shared.pool.execute_stateless(&event, &checked.spec).await;
        if event.sequence < meta.next {
            return answer(result); // released, but already trimmed from the log
        }
        if !shared.pool.record_for(&event, result.clone()).await {
            return Err(Error::Unavailable("reassembler"));
        }
        // A concurrent Submit of the same sequence may have been stored first.
        let stored = stored::read(&shared.redis, &event.stream_id, event.sequence, mode).await?;
        return answer(stored.unwrap_or(result));
    }
    if event.sequence < meta.next && mode == OrderingMode::Unordered {
        return Err(Error::AlreadyReleased { stream: event.stream_id, sequence: event.sequence });
    }
    let dispatch = event.sequence >= meta.next;
    if dispatch {
        shared.pool.admit(&checked.spec.name, shared.config.worker_wait).await?;
    }
    // Follow before dispatching so the release can't slip past us. Follow,
    // not Subscribe: it is internal (mTLS, no token), and the caller's token
    // may write the stream without being allowed to read it. The gateway ends
    // a Follow call when its requests end, so `keep_open` lives until the wait is over.
    let from = if mode == OrderingMode::Ordered { event.sequence } else { meta.released };
    let (keep_open, requests) = tokio::sync::mpsc::unbounded_channel();
    let cursor = StreamCursor { stream_id: event.stream_id.clone(), from_sequence: from };
    let _ = keep_open.send(FollowRequest { add: vec![cursor], remove: Vec::new() });
    let mut batches = shared.releases.follow(requests).await.map_err(|status| {
        tracing::warn!(%status, from = shared.releases.name(), "cannot follow the stream");
        Error::Unavailable(shared.releases.name())
    })?;
    if dispatch {
        crate::metrics::accepted(&checked.spec.name);
        shared.pool.dispatch(event.clone(), checked.spec, checked.version).await;
    }
    let wait = async {
        while let Some(Ok(batch)) = batches.next().await {
            if !batch.error.is_empty() {
                // The cursor cannot be served (older than retention, or the
                // log expired): a released sequence is not processed again.
                if !dispatch {
                    let (stream, sequence) = (event.stream_id.clone(), event.sequence);
                    return Err(Error::ResultExpired { stream, sequence, reason: batch.error });
                }
                tracing::warn!(error = batch.error, from = shared.releases.name(), "cannot follow the stream");
                return Err(Error::Unavailable(shared.releases.name()));
            }
            if let Some(result) = batch.results.into_iter().find(|result| result.sequence == event.sequence) {
                return Ok(Some(result));
            }
        }
        Ok(None)
    };
    let waited = tokio::time::timeout(shared.config.unary_threshold, wait).await;
    drop(keep_open);
    match waited {
        Ok(Ok(Some(result))) => answer(result),
        Ok(Err(error)) => Err(error),
        _ => Ok(EventResult::processing(&event)),
    }
}

/// The answer for a stored result: a sequence settled as a gap was never
/// processed, so its event is refused rather than answered.
fn answer(result: EventResult) -> Result<EventResult, Error> {
    if result.status() == ordo_proto::ResultStatus::Gap {
        return Err(Error::GapSettled { stream: result.stream_id, sequence: result.sequence });
    }
    Ok(result)
}
