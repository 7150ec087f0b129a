//! The one long-lived `Harmonizer.Process` call: new events go out as the
//! intake numbers them; results come back in order per stream, and each
//! settled result acks the JetStream deliveries of its event. When the call
//! breaks, a new one resends every event in flight, per key in sequence order
//! (a resend of a released sequence is answered from the release log, so
//! duplicates are harmless).
//!
//! Refusals: a transient one (no live worker, beyond the window, shutting
//! down) is sent again a second later; one that says the sequence is settled
//! already (a released gap, a result no longer kept) acks; any other
//! (unknown operation, bad attributes, …) dead-letters the message, and the
//! key's missing sequence is released as GAP after the gap timeout, so the
//! key never stalls.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ordo_proto::{Event, EventResult, ResultStatus, v1::harmonizer_client::HarmonizerClient};
use ordo_runtime::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{Shared, metrics};

/// The largest result the call accepts (as the CLI: results carry payloads).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a transiently refused event waits before it is sent again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Drives calls until `stop` and nothing is in flight any more.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    harmonizer: String,
    mut outbound: mpsc::Receiver<(String, u64)>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let channel = ordo_runtime::client::traced(&harmonizer)?;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if stop.is_cancelled() && shared.lock_flight().is_empty() {
            return Ok(());
        }
        let mut client = HarmonizerClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (requests, rx) = mpsc::channel::<Event>(256);
        let responses = match client.process(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), %harmonizer, "cannot open a Process call; retrying");
                tokio::select! {
                    () = backoff.wait() => {}
                    () = stop.cancelled() => if shared.lock_flight().is_empty() { return Ok(()) },
                }
                continue;
            }
        };
        let over = CancellationToken::new();
        let reader = tokio::spawn(read_results(shared.clone(), responses, over.clone()));
        let sent = send(&shared, &requests, &mut outbound, &over, &stop, &mut backoff).await;
        over.cancel();
        reader.abort();
        if sent {
            return Ok(());
        }
        tracing::info!(%harmonizer, "the Process call ended; resending what is in flight on a new one");
        tokio::select! {
            () = backoff.wait() => {}
            () = stop.cancelled() => {}
        }
    }
}

/// Feeds one call: what is in flight first, then new events and retries.
/// True when it ended because the source stopped with nothing in flight.
async fn send(
    shared: &Shared,
    requests: &mpsc::Sender<Event>,
    outbound: &mut mpsc::Receiver<(String, u64)>,
    over: &CancellationToken,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> bool {
    // Sending can wait on the harmonizer's window; the reader task keeps
    // reading results meanwhile, so the two never wait on each other.
    let push = |event: Event| async move {
        tokio::select! {
            sent = requests.send(event) => sent.is_ok(),
            () = over.cancelled() => false,
        }
    };
    let resend = shared.lock_flight().events();
    if !resend.is_empty() {
        metrics::RESENT.increment(resend.len() as u64);
    }
    for event in resend {
        if !push(event).await {
            return false;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut healthy_since = Instant::now();
    // Closed once the intake stopped: the call goes on for what is in flight.
    let mut intake_open = true;
    loop {
        tokio::select! {
            biased;
            () = over.cancelled() => return false,
            next = outbound.recv(), if intake_open => {
                let Some((key, sequence)) = next else {
                    intake_open = false;
                    continue;
                };
                let event = shared.lock_flight().event(&key, sequence);
                if let Some(event) = event
                    && !push(event).await
                {
                    return false;
                }
            }
            _ = tick.tick() => {
                if healthy_since.elapsed() > Duration::from_secs(5) {
                    backoff.reset();
                    healthy_since = Instant::now();
                }
                if stop.is_cancelled() && shared.lock_flight().is_empty() {
                    return true;
                }
                for (key, sequence) in shared.due_retries(Instant::now()) {
                    let event = shared.lock_flight().event(&key, sequence);
                    if let Some(event) = event {
                        metrics::RESENT.increment(1);
                        if !push(event).await {
                            return false;
                        }
                    }
                }
            }
        }
    }
}

/// Reads the call's results until it ends, then cancels `over`.
async fn read_results(shared: Arc<Shared>, mut responses: tonic::Streaming<EventResult>, over: CancellationToken) {
    loop {
        match responses.message().await {
            Ok(Some(result)) => on_result(&shared, result).await,
            Ok(None) => break,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "the Process call failed");
                break;
            }
        }
    }
    over.cancel();
}

/// What one result means for the event in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Released (or settled before): ack its deliveries.
    Settled,
    /// Not yet: nothing to do.
    Pending,
    /// Refused for now: send it again later.
    Retry,
    /// Refused for good: dead-letter its deliveries.
    Refused,
}

fn outcome(result: &EventResult) -> Outcome {
    match ResultStatus::try_from(result.status) {
        Ok(ResultStatus::Ok | ResultStatus::Failed | ResultStatus::Gap) => Outcome::Settled,
        Ok(ResultStatus::Rejected) => match Code::from(result.code) {
            // Released, its result no longer kept; or a settled gap.
            Code::OutOfRange if result.error.contains("no longer kept") => Outcome::Settled,
            Code::FailedPrecondition => Outcome::Settled,
            Code::Unavailable
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled => Outcome::Retry,
            _ => Outcome::Refused,
        },
        _ => Outcome::Pending,
    }
}

async fn on_result(shared: &Shared, result: EventResult) {
    let Some(key) = shared.key_of(&result.stream_id).map(str::to_owned) else { return };
    match outcome(&result) {
        Outcome::Pending => {}
        Outcome::Retry => {
            tracing::debug!(%key, sequence = result.sequence, error = %result.error, "refused for now; sending again");
            shared.retry_later(key, result.sequence, Instant::now() + RETRY_AFTER);
        }
        Outcome::Settled => {
            let entry = shared.lock_flight().settle(&key, result.sequence);
            shared.update_in_flight();
            if let Some(entry) = entry {
                for (_, delivery) in entry.deliveries {
                    match delivery.ack().await {
                        Ok(()) => metrics::ACKED.increment(1),
                        Err(error) => tracing::debug!(%error, "ack (the message will be redelivered and acked again)"),
                    }
                }
                shared.wake_sink(key);
            }
        }
        Outcome::Refused => {
            let entry = shared.lock_flight().settle(&key, result.sequence);
            shared.update_in_flight();
            if let Some(entry) = entry {
                let reason = format!("refused by the harmonizer ({:?}): {}", Code::from(result.code), result.error);
                for (position, delivery) in entry.deliveries {
                    shared.dead_letter(&delivery, position, &reason).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: Code, error: &str) -> EventResult {
        EventResult {
            status: ResultStatus::Rejected as i32,
            code: code as i32,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn results_settle_wait_retry_or_refuse() {
        for status in [ResultStatus::Ok, ResultStatus::Failed, ResultStatus::Gap] {
            assert_eq!(outcome(&EventResult { status: status as i32, ..Default::default() }), Outcome::Settled);
        }
        let processing = EventResult { status: ResultStatus::Processing as i32, ..Default::default() };
        assert_eq!(outcome(&processing), Outcome::Pending);
        assert_eq!(outcome(&rejected(Code::Unavailable, "operation \"x\" has no live worker")), Outcome::Retry);
        assert_eq!(outcome(&rejected(Code::OutOfRange, "sequence 9000 is beyond the window")), Outcome::Retry);
        assert_eq!(
            outcome(&rejected(Code::OutOfRange, "was released, but its result is no longer kept: expired")),
            Outcome::Settled
        );
        assert_eq!(outcome(&rejected(Code::FailedPrecondition, "gap settled")), Outcome::Settled);
        assert_eq!(outcome(&rejected(Code::NotFound, "unknown operation")), Outcome::Refused);
        assert_eq!(outcome(&rejected(Code::InvalidArgument, "malformed attributes")), Outcome::Refused);
    }
}
