//! Drives one `Harmonizer.Process` call the way a benchmark client must: it
//! keeps at most `max_in_flight` events outstanding (sent, result not yet
//! received), stamps every send and every receive with the wall clock (the
//! clock the worker stamps `completed_unix_nanos` with), and checks what
//! comes back: each event's result exactly once, REJECTED never, and in
//! ORDERED mode every stream strictly in sequence order.
//!
//! Received messages are never unwrapped: a result for an unknown stream or
//! sequence is counted as foreign, a rejection ends the call with an error.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use ordo_proto::{Event, OrderingMode, ResultStatus, v1::harmonizer_client::HarmonizerClient};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::stats::Latencies;

/// Largest message accepted from the harmonizer.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Events queued between the sending task and the HTTP/2 stream.
const SEND_QUEUE: usize = 256;

/// Nanoseconds since the Unix epoch (the clock of `completed_unix_nanos`).
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}

/// A fresh connection to the harmonizer at `addr` (`host:port`).
pub async fn connect(addr: &str) -> anyhow::Result<HarmonizerClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("invalid harmonizer address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the harmonizer at {addr}"))?;
    Ok(HarmonizerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// One received result, reduced to what the measurements need.
#[derive(Debug, Clone)]
pub struct Received {
    /// Index of the event in the call's event list.
    pub index: usize,
    /// Index of the event's stream in the call's stream list.
    pub stream: usize,
    pub sequence: u64,
    pub ok: bool,
    /// The payload, when the caller asked to keep payloads.
    pub payload: Option<Vec<u8>>,
    pub completed_unix_nanos: u64,
    pub received_unix_nanos: u64,
}

/// What one call sent and received.
#[derive(Debug)]
pub struct CallOutcome {
    pub mode: OrderingMode,
    pub streams: Vec<String>,
    /// Send time of each event (index as in the event list).
    pub sent_unix_nanos: Vec<u64>,
    /// Results in arrival order, the first one of each event only.
    pub received: Vec<Received>,
    /// Results of an event that already had one (Ordo promises none).
    pub duplicates: usize,
    /// Results for streams or sequences this call did not send.
    pub foreign: usize,
}

/// Options of [`run_call`].
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    /// Events outstanding at most (sent, no result yet).
    pub max_in_flight: usize,
    /// The whole call, sending included, must finish within this.
    pub deadline: Duration,
    /// Keep result payloads (the experiment compares them with the input).
    pub keep_payloads: bool,
}

/// Sends `events` (in list order) over one `Process` call and collects one
/// result per event. All events must use the same release mode.
pub async fn run_call(
    client: &HarmonizerClient<Channel>,
    events: Vec<Event>,
    options: CallOptions,
) -> anyhow::Result<CallOutcome> {
    let total = events.len();
    let mode = events.first().map_or(OrderingMode::Ordered, Event::mode);
    let mut streams: Vec<String> = Vec::new();
    let mut stream_numbers: HashMap<String, usize> = HashMap::new();
    // Per stream, event index by sequence.
    let mut lookup: Vec<Vec<Option<usize>>> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let number = *stream_numbers.entry(event.stream_id.clone()).or_insert_with(|| {
            streams.push(event.stream_id.clone());
            lookup.push(Vec::new());
            streams.len() - 1
        });
        let by_sequence = &mut lookup[number];
        let sequence = usize::try_from(event.sequence).context("sequence does not fit in memory")?;
        if by_sequence.len() <= sequence {
            by_sequence.resize(sequence + 1, None);
        }
        by_sequence[sequence] = Some(index);
    }

    let permits = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
    let (tx, rx) = mpsc::channel::<Event>(SEND_QUEUE);
    let (finished, finished_rx) = oneshot::channel::<()>();
    let sender_permits = permits.clone();
    // The request side stays open until every result is in (the harmonizer
    // would serve a half-closed call to the end too, but a benchmark should
    // not depend on that).
    let sender = tokio::spawn(async move {
        let mut sent = vec![0u64; total];
        for (index, event) in events.into_iter().enumerate() {
            let Ok(permit) = sender_permits.acquire().await else { break };
            permit.forget();
            sent[index] = unix_nanos();
            if tx.send(event).await.is_err() {
                break;
            }
        }
        let _ = finished_rx.await;
        drop(tx);
        sent
    });

    let until = tokio::time::Instant::now() + options.deadline;
    let mut client = client.clone();
    let response = tokio::time::timeout_at(until, client.process(ReceiverStream::new(rx)))
        .await
        .context("the Process call did not open in time")?
        .context("the Process call failed to open")?;
    let mut inbound = response.into_inner();
    let mut seen: Vec<Vec<bool>> = lookup.iter().map(|l| vec![false; l.len()]).collect();
    let mut outcome = CallOutcome {
        mode,
        streams,
        sent_unix_nanos: Vec::new(),
        received: Vec::with_capacity(total),
        duplicates: 0,
        foreign: 0,
    };
    while outcome.received.len() < total {
        let message = match tokio::time::timeout_at(until, inbound.message()).await {
            Ok(message) => message,
            Err(_) => {
                bail!("timed out after {:?} with {} of {total} results", options.deadline, outcome.received.len())
            }
        };
        let result = match message {
            Ok(Some(result)) => result,
            Ok(None) => bail!("the harmonizer ended the call with {} of {total} results", outcome.received.len()),
            Err(status) => bail!("the Process call failed after {} results: {status}", outcome.received.len()),
        };
        let received_unix_nanos = unix_nanos();
        let status = result.status();
        if status == ResultStatus::Rejected {
            bail!(
                "event {}#{} was rejected (code {}): {}",
                result.stream_id,
                result.sequence,
                result.code,
                result.error
            );
        }
        if status != ResultStatus::Ok && status != ResultStatus::Failed {
            outcome.foreign += 1;
            continue;
        }
        let Some(&stream) = stream_numbers.get(&result.stream_id) else {
            outcome.foreign += 1;
            continue;
        };
        let slot = usize::try_from(result.sequence).ok().and_then(|s| lookup[stream].get(s).copied().flatten());
        let Some(index) = slot else {
            outcome.foreign += 1;
            continue;
        };
        let sequence_slot = result.sequence as usize;
        if std::mem::replace(&mut seen[stream][sequence_slot], true) {
            outcome.duplicates += 1;
            continue;
        }
        permits.add_permits(1);
        outcome.received.push(Received {
            index,
            stream,
            sequence: result.sequence,
            ok: status == ResultStatus::Ok,
            payload: options.keep_payloads.then(|| result.payload.to_vec()),
            completed_unix_nanos: result.completed_unix_nanos,
            received_unix_nanos,
        });
    }
    let _ = finished.send(());
    outcome.sent_unix_nanos = sender.await.context("the sending task panicked")?;
    // Let the harmonizer end the call itself; whatever else arrives is counted.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(Some(_)) = inbound.message().await {
            outcome.duplicates += 1;
        }
    })
    .await;
    Ok(outcome)
}

/// Latencies and checks over the outcomes of one variant (one or more calls).
#[derive(Debug, Default)]
pub struct Measured {
    pub events: usize,
    pub failed: usize,
    pub duplicates: usize,
    pub foreign: usize,
    /// ORDERED results that arrived out of sequence order (must be 0).
    pub order_violations: usize,
    /// First send to last receive, seconds.
    pub elapsed_s: f64,
    /// Send → receive of each event.
    pub end_to_end: Latencies,
    /// Receive − completion of the event and of all its predecessors (ORDERED),
    /// or of the event itself (UNORDERED).
    pub reorder_overhead: Latencies,
}

/// Reduces call outcomes to the reported measurements.
pub fn measure(outcomes: &[CallOutcome]) -> Measured {
    let mut m = Measured::default();
    let first_send = outcomes.iter().flat_map(|o| o.sent_unix_nanos.iter().copied()).filter(|&t| t > 0).min();
    let last_receive = outcomes.iter().flat_map(|o| o.received.iter().map(|r| r.received_unix_nanos)).max();
    if let (Some(first), Some(last)) = (first_send, last_receive) {
        m.elapsed_s = last.saturating_sub(first) as f64 / 1e9;
    }
    for outcome in outcomes {
        m.duplicates += outcome.duplicates;
        m.foreign += outcome.foreign;
        let mut next_sequence = vec![0u64; outcome.streams.len()];
        let mut max_completed = vec![0u64; outcome.streams.len()];
        for r in &outcome.received {
            m.events += 1;
            if !r.ok {
                m.failed += 1;
            }
            if let Some(&sent) = outcome.sent_unix_nanos.get(r.index) {
                m.end_to_end.record_nanos(i128::from(r.received_unix_nanos) - i128::from(sent));
            }
            let released_after = if outcome.mode == OrderingMode::Unordered {
                r.completed_unix_nanos
            } else {
                if r.sequence != next_sequence[r.stream] {
                    m.order_violations += 1;
                }
                next_sequence[r.stream] = r.sequence + 1;
                max_completed[r.stream] = max_completed[r.stream].max(r.completed_unix_nanos);
                max_completed[r.stream]
            };
            if r.completed_unix_nanos > 0 {
                m.reorder_overhead.record_nanos(i128::from(r.received_unix_nanos) - i128::from(released_after));
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(stream: usize, sequence: u64, completed: u64, at: u64) -> Received {
        Received {
            index: sequence as usize,
            stream,
            sequence,
            ok: true,
            payload: None,
            completed_unix_nanos: completed,
            received_unix_nanos: at,
        }
    }

    #[test]
    fn reorder_overhead_waits_for_the_slowest_predecessor() {
        // Sequence 0 completes late (t=10 ms); 1 completed at 2 ms but can
        // only leave after 0: its overhead is measured from 10 ms, not 2 ms.
        let ms = 1_000_000;
        let outcome = CallOutcome {
            mode: OrderingMode::Ordered,
            streams: vec!["s".into()],
            sent_unix_nanos: vec![ms, ms],
            received: vec![received(0, 0, 10 * ms, 11 * ms), received(0, 1, 2 * ms, 12 * ms)],
            duplicates: 0,
            foreign: 0,
        };
        let m = measure(&[outcome]);
        assert_eq!(m.events, 2);
        assert_eq!(m.order_violations, 0);
        let overhead = m.reorder_overhead.summary().expect("two values");
        assert!((overhead.max_ms - 2.0).abs() < 0.01, "{overhead:?}");
        assert!((m.elapsed_s - 0.011).abs() < 1e-9);
    }

    #[test]
    fn out_of_order_ordered_results_are_counted() {
        let outcome = CallOutcome {
            mode: OrderingMode::Ordered,
            streams: vec!["s".into()],
            sent_unix_nanos: vec![1, 1],
            received: vec![received(0, 1, 5, 6), received(0, 0, 5, 7)],
            duplicates: 0,
            foreign: 0,
        };
        assert_eq!(measure(&[outcome]).order_violations, 2);
    }
}
