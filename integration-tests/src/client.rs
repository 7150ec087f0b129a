//! Talking to the harmonizer the way a user does: build events, drive one
//! `Harmonizer.Process` call (send from feeder tasks, collect results with a
//! deadline), and check what came back (exactly once, in order).
//!
//! Nothing here unwraps data from the network: failures are `anyhow` errors
//! that say how far the call got.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use ordo_proto::v1::{Event, EventResult, OrderingMode, ResultStatus, harmonizer_client::HarmonizerClient};
use tokio::{
    sync::mpsc,
    task::{JoinError, JoinHandle},
    time::{Instant, timeout_at},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The attribute that sets an operation's simulated latency.
pub const LATENCY: &str = "latency";

/// After the expected results arrived, how long [`ProcessCall::finish`]
/// keeps listening for extra (duplicate) results at most. Only an upper
/// bound: it returns as soon as the harmonizer ends the call.
pub const LINGER: Duration = Duration::from_millis(300);

/// Room for events queued towards the harmonizer.
const SEND_BUFFER: usize = 1024;

/// An event of `stream_id` at `sequence`.
pub fn event(stream_id: &str, sequence: u64, operation: &str, payload: impl Into<Bytes>) -> Event {
    Event {
        stream_id: stream_id.to_owned(),
        sequence,
        operation: operation.to_owned(),
        payload: payload.into(),
        ..Default::default()
    }
}

/// `event` with attribute `key` = `value`.
pub fn with_attr(mut event: Event, key: &str, value: &str) -> Event {
    event.attributes.insert(key.to_owned(), value.to_owned());
    event
}

/// `event` with release mode `mode`.
pub fn with_mode(mut event: Event, mode: OrderingMode) -> Event {
    event.set_mode(mode);
    event
}

/// One event per character of `text` on one stream: sequences `0..n`,
/// payload the character, attribute `latency`, release mode `mode`.
pub fn text_events(stream_id: &str, text: &str, operation: &str, latency: &str, mode: OrderingMode) -> Vec<Event> {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            let e = event(stream_id, i as u64, operation, c.to_string().into_bytes());
            with_mode(with_attr(e, LATENCY, latency), mode)
        })
        .collect()
}

/// Streams `text` one character per event on stream `stream_id` through one
/// `Harmonizer.Process` call, waits (at most `deadline`) until as many
/// results for that stream arrived as there are characters, listens
/// [`LINGER`] longer for duplicates, and returns that stream's results in
/// arrival order.
pub async fn stream_text(
    client: &HarmonizerClient<Channel>,
    stream_id: &str,
    text: &str,
    operation: &str,
    latency: &str,
    mode: OrderingMode,
    deadline: Duration,
) -> anyhow::Result<Vec<EventResult>> {
    let events = text_events(stream_id, text, operation, latency, mode);
    let expected = BTreeMap::from([(stream_id.to_owned(), events.len())]);
    let mut call = ProcessCall::open(client);
    call.feed(events, None);
    call.wait_for_counts(&expected, deadline).await?;
    let results = call.finish(LINGER).await?;
    Ok(results.into_iter().filter(|r| r.stream_id == stream_id).collect())
}

/// One open `Harmonizer.Process` call. Events go in through feeder tasks or
/// [`ProcessCall::send`]; results are collected, in arrival order, by the
/// `wait_*` methods. Dropping it aborts the call.
#[derive(Debug)]
pub struct ProcessCall {
    tx: Option<mpsc::Sender<Event>>,
    results: mpsc::UnboundedReceiver<Result<EventResult, tonic::Status>>,
    received: Vec<EventResult>,
    ended: Option<String>,
    call: JoinHandle<()>,
    feeders: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl ProcessCall {
    /// Opens the call. It runs on its own task, so events can be queued
    /// before the harmonizer answered with response headers.
    pub fn open(client: &HarmonizerClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        let (results, call) = spawn_process(client.clone(), ReceiverStream::new(rx));
        Self { tx: Some(tx), results, received: Vec::new(), ended: None, call, feeders: Vec::new() }
    }

    /// Queues one event (waits while the send buffer is full).
    pub async fn send(&self, event: Event) -> anyhow::Result<()> {
        let tx = self.tx.as_ref().context("the sending side is closed")?;
        tx.send(event).await.map_err(|_| anyhow::anyhow!("the Process call has ended; cannot send"))
    }

    /// A sender of events on this call (for a test's own feeder task), or
    /// `None` once the sending side is closed.
    pub fn sender(&self) -> Option<mpsc::Sender<Event>> {
        self.tx.clone()
    }

    /// Sends `event(seq)` for `seq` in `0..n` from a task of its own, one
    /// every `pace` (the first at once), counting what it sent, so a test
    /// knows where in the stream something it broke fell. It stops early,
    /// quietly, when the call ends. Not one of the call's feeders:
    /// [`ProcessCall::fed`] and [`ProcessCall::finish`] ignore it; wait for it
    /// with [`CountedFeed::join`]. `None` once the sending side is closed.
    pub fn feed_counted(
        &self,
        n: u64,
        pace: Duration,
        event: impl Fn(u64) -> Event + Send + 'static,
    ) -> Option<CountedFeed> {
        let sender = self.sender()?;
        let sent = Arc::new(AtomicU64::new(0));
        let task = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(pace);
                for seq in 0..n {
                    pace.tick().await;
                    if sender.send(event(seq)).await.is_err() {
                        return;
                    }
                    sent.store(seq + 1, Ordering::SeqCst);
                }
            })
        };
        Some(CountedFeed { sent, task })
    }

    /// Sends `events` from a task, one every `pace` if given (to keep a
    /// stream going while a test breaks something), else as fast as the call
    /// takes them.
    pub fn feed(&mut self, events: Vec<Event>, pace: Option<Duration>) {
        let Some(tx) = self.tx.clone() else { return };
        self.feeders.push(tokio::spawn(async move {
            let mut ticker = pace.map(tokio::time::interval);
            for event in events {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let what = format!("{}#{}", event.stream_id, event.sequence);
                tx.send(event).await.map_err(|_| anyhow::anyhow!("the Process call ended before {what} was sent"))?;
            }
            Ok(())
        }));
    }

    /// True once every feeder has sent all its events.
    pub fn fed(&self) -> bool {
        self.feeders.iter().all(JoinHandle::is_finished)
    }

    /// Every result received so far, in arrival order.
    pub fn received(&self) -> &[EventResult] {
        &self.received
    }

    /// How many results of `stream_id` were received so far.
    pub fn count(&self, stream_id: &str) -> usize {
        self.received.iter().filter(|r| r.stream_id == stream_id).count()
    }

    /// Receives until `done(received)` holds; fails at `deadline`, or when the
    /// call fails or ends first, saying how far it got.
    pub async fn wait_until(
        &mut self,
        deadline: Duration,
        mut done: impl FnMut(&[EventResult]) -> bool,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        while !done(&self.received) {
            if let Some(reason) = &self.ended {
                bail!("the Process call {reason}; {}", self.progress());
            }
            match timeout_at(until, self.results.recv()).await {
                Ok(Some(Ok(result))) => self.received.push(result),
                Ok(Some(Err(status))) => self.ended = Some(format!("failed: {status:?}")),
                Ok(None) => self.ended = Some("was ended by the harmonizer".into()),
                Err(_) => bail!("timed out after {deadline:?}; {}", self.progress()),
            }
        }
        Ok(())
    }

    /// Receives until at least `n` results arrived for every `(stream, n)`.
    pub async fn wait_for_counts(
        &mut self,
        expected: &BTreeMap<String, usize>,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        self.wait_until(deadline, |received| {
            let counts = counts_by_stream(received);
            expected.iter().all(|(stream, n)| counts.get(stream.as_str()).copied().unwrap_or(0) >= *n)
        })
        .await
        .with_context(|| format!("waiting for {expected:?} results"))
    }

    /// Receives until at least `n` results arrived in total.
    pub async fn wait_for_total(&mut self, n: usize, deadline: Duration) -> anyhow::Result<()> {
        self.wait_until(deadline, |received| received.len() >= n).await
    }

    /// Closes the sending side (after the feeders are done; a feeder still
    /// running is aborted), keeps receiving for at most `linger` or until the
    /// harmonizer ends the call, and returns everything received.
    pub async fn finish(mut self, linger: Duration) -> anyhow::Result<Vec<EventResult>> {
        for feeder in self.feeders.drain(..) {
            if !feeder.is_finished() {
                feeder.abort();
                continue;
            }
            if let Ok(Err(error)) = feeder.await {
                bail!("a feeder failed: {error:#}");
            }
        }
        self.tx = None;
        let until = Instant::now() + linger;
        while self.ended.is_none() {
            match timeout_at(until, self.results.recv()).await {
                Ok(Some(Ok(result))) => self.received.push(result),
                Ok(Some(Err(status))) => {
                    // A call failing after the half-close loses nothing the
                    // test waited for; only report a failure with no results.
                    if self.received.is_empty() {
                        bail!("the Process call failed: {status:?}");
                    }
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(std::mem::take(&mut self.received))
    }

    fn progress(&self) -> String {
        let counts = counts_by_stream(&self.received);
        let mut shown: Vec<String> = counts.iter().take(20).map(|(s, n)| format!("{s:?}: {n}")).collect();
        if counts.len() > 20 {
            shown.push(format!("… {} more streams", counts.len() - 20));
        }
        let rejected = self.received.iter().filter(|r| r.status() == ResultStatus::Rejected).count();
        format!(
            "received {} results ({rejected} REJECTED), per stream: {{{}}}; all events sent: {}",
            self.received.len(),
            shown.join(", "),
            self.fed()
        )
    }
}

impl Drop for ProcessCall {
    fn drop(&mut self) {
        self.call.abort();
        for feeder in &self.feeders {
            feeder.abort();
        }
    }
}

/// A feeder started by [`ProcessCall::feed_counted`].
#[derive(Debug)]
pub struct CountedFeed {
    sent: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl CountedFeed {
    /// How many events were sent so far: sequences `0..sent()`.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until the feeder ends: every event sent, or the call ended first.
    pub async fn join(self) -> Result<(), JoinError> {
        self.task.await
    }
}

/// Runs one `Harmonizer.Process` call on its own task (so a harmonizer
/// that does not answer never blocks the caller), sending what `events`
/// yields. Every result arrives on the returned receiver; if the call fails,
/// its status comes last. The receiver closes when the call ends.
pub fn spawn_process<S>(
    mut client: HarmonizerClient<Channel>,
    events: S,
) -> (mpsc::UnboundedReceiver<Result<EventResult, tonic::Status>>, JoinHandle<()>)
where
    S: futures::Stream<Item = Event> + Send + 'static,
{
    let (results_tx, results) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        match client.process(events).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(result)) => {
                            if results_tx.send(Ok(result)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(status) => {
                            let _ = results_tx.send(Err(status));
                            return;
                        }
                    }
                }
            }
            Err(status) => {
                let _ = results_tx.send(Err(status));
            }
        }
    });
    (results, task)
}

/// Number of results per stream id.
pub fn counts_by_stream(results: &[EventResult]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(result.stream_id.as_str()).or_insert(0) += 1;
    }
    counts
}

/// Results grouped by stream id, each group in arrival order.
pub fn by_stream(results: &[EventResult]) -> BTreeMap<String, Vec<EventResult>> {
    let mut groups: BTreeMap<String, Vec<EventResult>> = BTreeMap::new();
    for result in results {
        groups.entry(result.stream_id.clone()).or_default().push(result.clone());
    }
    groups
}

/// The sequences of `results`, in arrival order.
pub fn sequences(results: &[EventResult]) -> Vec<u64> {
    results.iter().map(|r| r.sequence).collect()
}

/// The payloads of `results` concatenated in arrival order (lossy UTF-8).
pub fn payload_text(results: &[EventResult]) -> String {
    let bytes: Vec<u8> = results.iter().flat_map(|r| r.payload.iter().copied()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `Ok` when every sequence of `0..n` occurs exactly once (in any order);
/// otherwise which are missing, repeated or unexpected.
pub fn check_exactly_once(results: &[EventResult], n: u64) -> Result<(), String> {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for result in results {
        *seen.entry(result.sequence).or_insert(0) += 1;
    }
    let missing: Vec<u64> = (0..n).filter(|s| !seen.contains_key(s)).collect();
    let mut repeated: Vec<(u64, usize)> = seen.iter().filter(|(_, c)| **c > 1).map(|(s, c)| (*s, *c)).collect();
    repeated.sort_unstable();
    let mut unexpected: Vec<u64> = seen.keys().copied().filter(|s| *s >= n).collect();
    unexpected.sort_unstable();
    if missing.is_empty() && repeated.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} results for {n} events: {} missing (first: {:?}), {} repeated (first (seq, times): {:?}), {} unexpected (first: {:?})",
        results.len(),
        missing.len(),
        &missing[..missing.len().min(10)],
        repeated.len(),
        &repeated[..repeated.len().min(10)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)],
    ))
}

/// `Ok` when the results are exactly sequences `0, 1, …, n-1` in arrival order.
pub fn check_in_order_exactly_once(results: &[EventResult], n: u64) -> Result<(), String> {
    check_exactly_once(results, n)?;
    match results.iter().enumerate().find(|(i, r)| r.sequence != *i as u64) {
        None => Ok(()),
        Some((i, _)) => {
            let from = i.saturating_sub(3);
            let around = &sequences(results)[from..(i + 4).min(results.len())];
            Err(format!(
                "out of order: result #{i} is sequence {} (arrival #{from}.. = {around:?})",
                results[i].sequence
            ))
        }
    }
}

/// `Ok` when every result has status OK; otherwise the first few that don't.
pub fn check_all_ok(results: &[EventResult]) -> Result<(), String> {
    let bad: Vec<String> = results
        .iter()
        .filter(|r| r.status() != ResultStatus::Ok)
        .take(5)
        .map(|r| format!("{}#{}: {:?} code={} error={:?}", r.stream_id, r.sequence, r.status(), r.code, r.error))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        let total = results.iter().filter(|r| r.status() != ResultStatus::Ok).count();
        Err(format!("{total} results are not OK, e.g. {bad:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(stream: &str, sequence: u64) -> EventResult {
        EventResult { stream_id: stream.into(), sequence, status: ResultStatus::Ok as i32, ..Default::default() }
    }

    #[test]
    fn text_events_are_one_character_each() {
        let events = text_events("s", "abc", "async-echo", "exp:10ms", OrderingMode::Unordered);
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].sequence, 2);
        assert_eq!(&events[1].payload[..], b"b");
        assert_eq!(events[0].attributes.get(LATENCY).map(String::as_str), Some("exp:10ms"));
        assert_eq!(events[0].mode(), OrderingMode::Unordered);
    }

    #[test]
    fn order_checks_catch_gaps_repeats_and_swaps() {
        let ok: Vec<_> = (0..5).map(|s| result("s", s)).collect();
        assert!(check_in_order_exactly_once(&ok, 5).is_ok());
        let swapped: Vec<_> = [0, 2, 1, 3, 4].into_iter().map(|s| result("s", s)).collect();
        assert!(check_exactly_once(&swapped, 5).is_ok());
        assert!(check_in_order_exactly_once(&swapped, 5).is_err());
        let repeated: Vec<_> = [0, 1, 1, 2, 3, 4].into_iter().map(|s| result("s", s)).collect();
        assert!(check_exactly_once(&repeated, 5).expect_err("repeat").contains("1 repeated"));
        let gap: Vec<_> = [0, 1, 3, 4].into_iter().map(|s| result("s", s)).collect();
        assert!(check_exactly_once(&gap, 5).expect_err("gap").contains("1 missing"));
    }
}
