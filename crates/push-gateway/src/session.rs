//! One subscriber following one stream: catch up from the release log, then
//! tail the live hub, falling back to the log whenever live delivery lagged or
//! skipped a position. Positions are contiguous per stream, so "next expected
//! position" is all the state a session needs to deliver each result exactly
//! once and in order.

use std::sync::Arc;

use ordo_proto::v1::{EventResult, FollowBatch};
use ordo_runtime::telemetry;
use tokio::sync::mpsc;

use crate::{
    Shutdown,
    hub::Hub,
    log::{Log, LogError, PAGE},
};

/// Sessions end when the receiver is gone (`Ok`) or the cursor can't be served.
pub async fn follow(
    hub: Arc<Hub>,
    log: Log,
    stream: String,
    from: u64,
    out: mpsc::Sender<FollowBatch>,
    shutdown: Shutdown,
) -> Result<(), LogError> {
    // Subscribe before reading the log, so nothing released in between is missed.
    let mut subscription = hub.subscribe(&stream);
    let mut next = from;
    if !catch_up(&log, &stream, &mut next, &out).await? {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = out.closed() => return Ok(()),
            batch = subscription.rx.recv() => {
                let Some(batch) = batch else { return Ok(()) };
                let lagged = subscription.signal.take();
                let first = batch.results.first().map(|r| r.position);
                if lagged || first.is_some_and(|p| p > next) {
                    if !catch_up(&log, &stream, &mut next, &out).await? {
                        return Ok(());
                    }
                    continue;
                }
                let results: Vec<EventResult> =
                    batch.results.iter().filter(|r| r.position >= next).cloned().collect();
                let Some(last) = results.last() else { continue };
                next = last.position + 1;
                if !emit(&out, &stream, batch.next_sequence, results).await {
                    return Ok(());
                }
            }
            _ = subscription.signal.raised() => {
                if subscription.signal.take() && !catch_up(&log, &stream, &mut next, &out).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends everything the log has from `next` on. False if the receiver is gone.
async fn catch_up(log: &Log, stream: &str, next: &mut u64, out: &mpsc::Sender<FollowBatch>) -> Result<bool, LogError> {
    loop {
        let page = read_retrying(log, stream, *next).await?;
        let count = page.results.len();
        let Some(last) = page.results.last() else { return Ok(true) };
        if page.results[0].position != *next {
            // Trimmed between our reads.
            return Err(LogError::Expired {
                stream: stream.to_owned(),
                wanted: *next,
                oldest: page.results[0].position,
            });
        }
        *next = last.position + 1;
        if !emit(out, stream, page.next_sequence.max(*next), page.results).await {
            return Ok(false);
        }
        if count < PAGE {
            return Ok(true);
        }
    }
}

/// Reads a page, riding out Redis outages: a subscriber must see a delay
/// while Redis restarts, never an error (its results are still coming).
async fn read_retrying(log: &Log, stream: &str, from: u64) -> Result<crate::log::Page, LogError> {
    let mut backoff =
        ordo_runtime::backoff::Backoff::new(std::time::Duration::from_millis(50), std::time::Duration::from_secs(1));
    loop {
        match log.read_from(stream, from).await {
            Err(LogError::Redis(error)) => {
                tracing::warn!(stream, %error, "release log unreadable; retrying");
                backoff.wait().await;
            }
            other => return other,
        }
    }
}

/// Opens each result's `push.deliver` span (a child of its trace) and
/// carries it on in the result's trace context.
pub(crate) fn trace_delivery(stream: &str, results: &mut [EventResult]) {
    for result in results {
        let span = telemetry::event_span("push.deliver", stream, result.sequence, &result.trace_context);
        if !span.is_disabled() {
            result.trace_context = telemetry::inject(&span, &result.trace_context);
        }
    }
}

async fn emit(
    out: &mpsc::Sender<FollowBatch>,
    stream: &str,
    next_sequence: u64,
    mut results: Vec<EventResult>,
) -> bool {
    trace_delivery(stream, &mut results);
    out.send(FollowBatch { stream_id: stream.to_owned(), next_sequence, results, error: String::new() }).await.is_ok()
}
