//! One `Process` call: events of any number of streams in, each accepted
//! event's result out once, per stream in release order.
//!
//! Per stream the call keeps the sequences it accepted (so a duplicate is
//! dropped, one result only), the ones still awaiting a result, and the
//! stream's lowest unreleased sequence `next`, which bounds the window.
//! An event at or beyond `next + window` holds the call (no further reads:
//! HTTP/2 back-pressure) until the window moves, or is rejected with
//! OUT_OF_RANGE after `--window-wait`.
//!
//! With `--stream-processing-threshold`, a stream whose head (lowest awaited
//! sequence) has waited that long gets a PROCESSING result for it at once —
//! at most one per sequence per call — and the real result still follows.
//! One timer per stream head, in a heap; stale timers are skipped when due.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    sync::Arc,
    time::Duration,
};

use ordo_core::ranges::RangeSet;
use ordo_proto::v1::{Event, EventResult, FollowBatch, OrderingMode};
use ordo_runtime::telemetry;
use tokio::{sync::mpsc, time::Instant};
use tonic::{Status, Streaming};
use tracing::Span;

use crate::{
    Shared,
    error::Error,
    follower::Follower,
    registry::Route,
    state::{self, StreamMeta},
};

struct StreamState {
    mode: OrderingMode,
    next: u64,
    accepted: RangeSet,
    /// Sequences accepted on this call whose result has not come yet.
    awaiting: BTreeMap<u64, Awaited>,
    /// The head sequence a PROCESSING timer is armed for.
    armed: Option<u64>,
}

struct Awaited {
    since: Instant,
    processing_sent: bool,
}

impl StreamState {
    fn wait_for(&mut self, sequence: u64) {
        self.awaiting.insert(sequence, Awaited { since: Instant::now(), processing_sent: false });
    }
}

struct Blocked {
    event: Event,
    route: Route,
    deadline: Instant,
}

type Out = mpsc::Sender<Result<EventResult, Status>>;

pub async fn run(shared: Arc<Shared>, mut inbound: Streaming<Event>, out: Out, call_span: Span) {
    let mut call = Call {
        shared: shared.clone(),
        streams: HashMap::new(),
        follower: Follower::start(shared.push_gateway.clone()),
        out,
        call_span,
        threshold: shared.config.stream_processing_threshold,
        timers: BinaryHeap::new(),
    };
    let mut reading = true;
    let mut blocked: Option<Blocked> = None;
    loop {
        if !reading && blocked.is_none() && call.streams.values().all(|s| s.awaiting.is_empty()) {
            break;
        }
        let deadline = blocked.as_ref().map(|b| b.deadline);
        let timer = call.timers.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            event = inbound.message(), if reading && blocked.is_none() => match event {
                Ok(Some(event)) => blocked = call.handle(event).await,
                Ok(None) => reading = false,
                Err(status) => {
                    tracing::debug!(%status, "client stream ended");
                    break;
                }
            },
            batch = call.follower.batches.recv() => {
                let Some(batch) = batch else { break };
                if !call.forward(batch).await {
                    break;
                }
                if let Some(b) = blocked.take() {
                    blocked = call.retry_blocked(b).await;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(b) = blocked.take() {
                    let error = call.beyond_window(&b.event);
                    call.reject(&b.event, error).await;
                }
            }
            _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                if !call.send_processing().await {
                    break;
                }
            }
            _ = shared.shutdown.cancelled(), if reading => {
                // Drain: no new events, but every accepted one still gets its result.
                reading = false;
                if let Some(b) = blocked.take() {
                    call.reject(&b.event, Error::ShuttingDown).await;
                }
            }
            _ = call.out.closed() => break,
        }
    }
}

struct Call {
    shared: Arc<Shared>,
    streams: HashMap<String, StreamState>,
    follower: Follower,
    out: Out,
    call_span: Span,
    /// `--stream-processing-threshold`, if on.
    threshold: Option<Duration>,
    /// (when, stream, head sequence): min-heap of PROCESSING timers.
    timers: BinaryHeap<Reverse<(Instant, String, u64)>>,
}

impl Call {
    /// Arms the PROCESSING timer of `stream_id`'s head if it has none yet.
    fn arm(&mut self, stream_id: &str) {
        let Some(threshold) = self.threshold else { return };
        let Some(stream) = self.streams.get_mut(stream_id) else { return };
        let Some((&head, awaited)) = stream.awaiting.first_key_value() else { return };
        if awaited.processing_sent || stream.armed == Some(head) {
            return;
        }
        stream.armed = Some(head);
        self.timers.push(Reverse((awaited.since + threshold, stream_id.to_owned(), head)));
    }

    /// Sends PROCESSING for every stream head whose timer is due and that is
    /// still the head, still awaited. False if the client is gone.
    async fn send_processing(&mut self) -> bool {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Some(Reverse((_, stream_id, sequence))) = self.timers.pop() else { break };
            let Some(stream) = self.streams.get_mut(&stream_id) else { continue };
            if stream.armed == Some(sequence) {
                stream.armed = None;
            }
            let Some((&head, awaited)) = stream.awaiting.first_key_value() else { continue };
            if head != sequence || awaited.processing_sent {
                continue;
            }
            if let Some(awaited) = stream.awaiting.get_mut(&head) {
                awaited.processing_sent = true;
            }
            if self.out.send(Ok(EventResult::processing_of(&stream_id, sequence))).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn reject(&self, event: &Event, error: Error) {
        let status = Status::from(error);
        let _ = self.out.send(Ok(EventResult::rejected(&event.stream_id, event.sequence, &status))).await;
    }

    fn beyond_window(&self, event: &Event) -> Error {
        let next = self.streams.get(&event.stream_id).map_or(0, |s| s.next);
        let window = self.shared.config.window;
        Error::BeyondWindow {
            stream: event.stream_id.clone(),
            sequence: event.sequence,
            next,
            window,
            limit: next.saturating_add(window),
        }
    }

    /// Handles one client event; returns it back if it must wait for the window.
    async fn handle(&mut self, event: Event) -> Option<Blocked> {
        let route = match self.shared.registry.validate(&event) {
            Ok(route) => route,
            Err(error) => {
                self.reject(&event, error).await;
                return None;
            }
        };
        if !self.streams.contains_key(&event.stream_id) {
            match state::read(&self.shared.redis, &event.stream_id).await {
                Ok(meta) => self.open_stream(&event, meta),
                Err(error) => {
                    self.reject(&event, Error::Redis(error)).await;
                    return None;
                }
            }
        }
        let window = self.shared.config.window;
        let stream = self.streams.get_mut(&event.stream_id)?;
        let sequence = event.sequence;
        if stream.accepted.contains(sequence) {
            return None; // duplicate on this call: its one result is (or was) on its way
        }
        if sequence < stream.next {
            // Already released: serve it from the log (its position is its sequence).
            if stream.mode == OrderingMode::Unordered {
                let error = Error::AlreadyReleased { stream: event.stream_id.clone(), sequence };
                self.reject(&event, error).await;
                return None;
            }
            stream.accepted.insert(sequence);
            stream.wait_for(sequence);
            self.follower.follow(&event.stream_id, sequence);
            self.arm(&event.stream_id);
            return None;
        }
        if sequence >= stream.next.saturating_add(window) {
            let deadline = Instant::now() + self.shared.config.window_wait;
            return Some(Blocked { event, route, deadline });
        }
        self.admit(event, route).await;
        None
    }

    fn open_stream(&mut self, event: &Event, meta: StreamMeta) {
        let mode = state::effective_mode(meta.mode, event.mode());
        self.follower.follow(&event.stream_id, meta.released);
        self.streams.insert(
            event.stream_id.clone(),
            StreamState { mode, next: meta.next, accepted: RangeSet::new(), awaiting: BTreeMap::new(), armed: None },
        );
    }

    async fn admit(&mut self, mut event: Event, route: Route) {
        let Some(stream) = self.streams.get_mut(&event.stream_id) else { return };
        stream.accepted.insert(event.sequence);
        stream.wait_for(event.sequence);
        event.mode = stream.mode as i32;
        self.arm(&event.stream_id);
        let span = telemetry::entry_span(
            "harmonizer.dispatch",
            &event.stream_id,
            event.sequence,
            &event.trace_context,
            &self.call_span,
        );
        event.trace_context = telemetry::inject(&span, &event.trace_context);
        match route {
            Route::Stateful => self.shared.pool.dispatch(event).await,
            Route::Stateless => self.shared.pool.run_stateless(event),
        }
    }

    async fn retry_blocked(&mut self, blocked: Blocked) -> Option<Blocked> {
        let next = self.streams.get(&blocked.event.stream_id).map_or(0, |s| s.next);
        if blocked.event.sequence < next.saturating_add(self.shared.config.window) {
            self.admit(blocked.event, blocked.route).await;
            None
        } else {
            Some(blocked)
        }
    }

    /// Forwards the results this call awaits. False if the client is gone.
    async fn forward(&mut self, batch: FollowBatch) -> bool {
        let Some(stream) = self.streams.get_mut(&batch.stream_id) else { return true };
        if !batch.error.is_empty() {
            // The cursor can't be served (older than retention): say so for each awaited event.
            let status = Status::out_of_range(batch.error);
            let awaiting: Vec<u64> = std::mem::take(&mut stream.awaiting).into_keys().collect();
            for sequence in awaiting {
                if self.out.send(Ok(EventResult::rejected(&batch.stream_id, sequence, &status))).await.is_err() {
                    return false;
                }
            }
            return true;
        }
        stream.next = stream.next.max(batch.next_sequence);
        for result in batch.results {
            if stream.awaiting.remove(&result.sequence).is_some() {
                let _span = telemetry::event_span(
                    "harmonizer.respond",
                    &result.stream_id,
                    result.sequence,
                    &result.trace_context,
                );
                if self.out.send(Ok(result)).await.is_err() {
                    return false;
                }
            }
        }
        // A new head starts its own wait for PROCESSING.
        self.arm(&batch.stream_id);
        true
    }
}
