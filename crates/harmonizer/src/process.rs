//! One `Process` call: events of any number of streams in, each accepted
//! event's result out once, per stream in release order. The decisions
//! (window, duplicates, resends, PROCESSING and gap timers) are made by
//! [`Streams`]; this module only executes them: it reads events, opens
//! streams from Redis, dispatches, follows released results through the
//! push-gateway and writes results to the client.
//!
//! Events are read in bursts of those already received (at most [`BURST`]),
//! handled in order; the new streams of a burst are opened with one Redis
//! round trip, not one each. An event at or beyond `next + window` holds the
//! call (no further reads beyond its burst: HTTP/2 back-pressure) until the
//! window moves, or is rejected with
//! OUT_OF_RANGE after `--window-wait`. A stateful event whose operation no
//! live worker serves (and none did within `--event-timeout`) holds the call
//! the same way until a worker serving it appears, or is rejected with
//! UNAVAILABLE after `--worker-wait`. Results keep flowing meanwhile.
//!
//! Streams are followed only while they are in use: once every event the
//! call accepted on a stream is settled (its result, FAILED, GAP or refusal
//! was sent) and it stayed so for `linger::LINGER` (2 s), the call forgets
//! the stream and stops following it on the push-gateway, so memory per
//! call (here and on the gateway) is bounded by the streams in flight plus
//! at most `linger::MAX_LINGERING` settled ones, not by every stream the
//! call has seen (`linger.rs` says why it lingers). A later
//! event of that stream reads its state from Redis again and follows it
//! from its release position then (a sequence this call already answered is
//! a resend then, answered again from the release log).
//!
//! How a call ends:
//! - the client half-closes: the call ends once every event it accepted is
//!   settled (its result, FAILED or GAP, was sent), then with OK;
//! - a frame cannot be decoded (not protobuf, a string that is not UTF-8,
//!   over the message size limit): no more events are read, every result
//!   already owed is still sent, then the call ends with INVALID_ARGUMENT
//!   (RESOURCE_EXHAUSTED for size) naming the problem;
//! - the client goes away: the call ends at once; accepted events still run
//!   and are released (read them from the push-gateway);
//! - shutdown: no new events; owed results are sent until the drain
//!   timeout, then the call ends with UNAVAILABLE (unless the client had
//!   half-closed already): events sent after the shutdown began were not
//!   accepted and must be resent elsewhere.
//!
//! Authorization (`ordo_runtime::auth`): the call's bearer token is checked
//! once, when the call opens; a missing or invalid one fails the call with
//! UNAUTHENTICATED before any event is read. An event of a stream the token
//! may not write is refused like any other bad event: its own REJECTED
//! result (PERMISSION_DENIED), and the call goes on with the others.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use futures::FutureExt as _;

use ordo_core::{hash::Map, limits};
use ordo_proto::v1::{Completed, Event, EventResult, FollowBatch, OrderingMode};
use ordo_runtime::telemetry;
use tokio::{sync::mpsc, time::Instant};
use tonic::{Code, Status, Streaming};
use tracing::{Instrument as _, Span};

use crate::{
    Shared,
    error::Error,
    follower::Follower,
    linger::Lingering,
    registry::{Checked, Route},
    state,
    streams::{Admission, Due, Opened, Outgoing, Streams},
};

/// An event that holds the call (no further reads) until it can be admitted.
struct Blocked {
    event: Event,
    checked: Checked,
    deadline: Instant,
    wait: Wait,
}

/// What a [`Blocked`] event waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The window to move (then OUT_OF_RANGE at the deadline).
    Window,
    /// A live worker serving its operation (then UNAVAILABLE at the deadline).
    Worker,
}

type Out = mpsc::Sender<Result<EventResult, Status>>;

/// Events taken off the wire at once, of those already received: the new
/// streams among them are opened with one Redis round trip
/// ([`state::read_many`]) instead of one each, in order.
const BURST: usize = 256;

/// How taking the events already received ended.
enum Taken {
    /// The call is still open (nothing more had arrived, or [`BURST`] is full).
    Open,
    /// The client half-closed.
    Closed,
    /// A frame failed.
    Failed(Status),
}

/// Moves the events already received (without waiting) into `queue`, up to [`BURST`].
fn take_received(inbound: &mut Streaming<Event>, queue: &mut VecDeque<Event>) -> Taken {
    while queue.len() < BURST {
        match inbound.message().now_or_never() {
            None => break,
            Some(Ok(Some(event))) => queue.push_back(event),
            Some(Ok(None)) => return Taken::Closed,
            Some(Err(status)) => return Taken::Failed(status),
        }
    }
    Taken::Open
}

/// Why the client's side of the call stopped delivering events.
enum Inbound {
    Open,
    /// Half-closed by the client.
    Closed,
    /// No longer read because the harmonizer shuts down: events the client
    /// sent after that were never accepted, so the call ends with
    /// UNAVAILABLE (resend what has no result), not OK.
    Draining,
    /// A frame could not be decoded: the call ends with this status once
    /// every owed result is sent.
    Broken(Status),
}

pub async fn run(
    shared: Arc<Shared>,
    mut inbound: Streaming<Event>,
    out: Out,
    call_span: Span,
    grant: ordo_runtime::auth::Grant,
) {
    let mut call = Call {
        streams: Streams::new(shared.config.window, shared.config.stream_processing_threshold),
        follower: Follower::start(shared.releases.clone()),
        shared: shared.clone(),
        out,
        call_span,
        grant,
        lingering: Lingering::default(),
        queue: VecDeque::new(),
        opened: Map::default(),
    };
    let mut state = Inbound::Open;
    let mut blocked: Option<Blocked> = None;
    let mut workers = shared.pool.changes();
    loop {
        if !matches!(state, Inbound::Open) && blocked.is_none() && call.queue.is_empty() && call.streams.settled() {
            break;
        }
        let reading = matches!(state, Inbound::Open);
        let deadline = blocked.as_ref().map(|b| b.deadline);
        let waits_for_worker = blocked.as_ref().is_some_and(|b| b.wait == Wait::Worker);
        let timer = call.streams.next_due();
        let linger = call.lingering.next_due();
        tokio::select! {
            event = inbound.message(), if reading && blocked.is_none() && call.queue.is_empty() => {
                let ended = match event {
                    Ok(Some(event)) => {
                        call.queue.push_back(event);
                        take_received(&mut inbound, &mut call.queue)
                    }
                    Ok(None) => Taken::Closed,
                    Err(status) => Taken::Failed(status),
                };
                match ended {
                    Taken::Open => {}
                    Taken::Closed => state = Inbound::Closed,
                    Taken::Failed(status) => match frame_error(status) {
                        Some(status) => {
                            tracing::warn!(code = ?status.code(), message = status.message(), owed = call.streams.owed(),
                                "bad frame on a Process call: reading stops, owed results are still sent");
                            state = Inbound::Broken(status);
                        }
                        None => break,
                    },
                }
                blocked = call.handle_queued().await;
            },
            batch = call.follower.batches.recv() => {
                let Some(batch) = batch else { break };
                let stream = batch.stream_id.clone();
                if !call.forward(batch).await {
                    break;
                }
                call.forget_if_settled(&stream, blocked.as_ref());
                if let Some(b) = blocked.take() {
                    blocked = call.unblock(b, false).await;
                }
            }
            changed = workers.changed(), if waits_for_worker => {
                if changed.is_err() {
                    break; // the pool is gone: shutting down
                }
                if let Some(b) = blocked.take() {
                    blocked = call.unblock(b, false).await;
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(b) = blocked.take() {
                    blocked = call.unblock(b, true).await;
                }
            }
            _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                if !call.on_timers().await {
                    break;
                }
            }
            _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {
                call.forget_lingering(blocked.as_ref());
            }
            _ = shared.shutdown.cancelled(), if reading => {
                // Drain: no new events, but every accepted one still gets its result.
                state = Inbound::Draining;
                // The blocked event and those read after it were not accepted.
                let unaccepted: Vec<Event> = blocked.take().map(|b| b.event).into_iter().chain(call.queue.drain(..)).collect();
                call.opened.clear();
                for event in unaccepted {
                    call.reject(&event, Error::ShuttingDown).await;
                    call.forget_if_settled(&event.stream_id, None);
                }
            }
            _ = call.out.closed() => break,
        }
    }
    match state {
        Inbound::Broken(status) => {
            let _ = call.out.send(Err(status)).await;
        }
        Inbound::Draining => {
            let status = Status::unavailable(
                "harmonizer shutting down: every result owed on this call was sent; resend events that have no result on a new call",
            );
            let _ = call.out.send(Err(status)).await;
        }
        Inbound::Open | Inbound::Closed => {}
    }
}

/// The status a call ends with for a frame the server could not decode, or
/// `None` when the client itself is gone (reset, cancelled): then there is
/// nobody to tell.
fn frame_error(status: Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted if message.contains("too large") => {
            Some(Status::resource_exhausted(format!(
                "an event frame exceeds the message size limit of {} bytes ({message}); results owed on this call were sent first",
                ordo_runtime::server::MAX_MESSAGE_BYTES
            )))
        }
        Code::Internal | Code::InvalidArgument | Code::DataLoss => Some(Status::invalid_argument(format!(
            "an event frame could not be decoded as ordo.v1.Event ({}); results owed on this call were sent first",
            limits::echo(message)
        ))),
        _ => {
            tracing::debug!(%status, "client stream ended");
            None
        }
    }
}

struct Call {
    shared: Arc<Shared>,
    streams: Streams,
    follower: Follower,
    out: Out,
    call_span: Span,
    /// What the call's token allows (everything with auth off).
    grant: ordo_runtime::auth::Grant,
    /// Settled streams waiting to be forgotten.
    lingering: Lingering,
    /// Events read but not handled yet, in order: those after a blocked
    /// event, and the rest of a burst ([`BURST`]).
    queue: VecDeque<Event>,
    /// The state of new streams of the queued events, read together
    /// ([`Self::open_new_streams`]); taken when their first event is handled.
    opened: Map<String, state::StreamMeta>,
}

impl Call {
    /// Notes that `stream` is settled when every event this call accepted on
    /// it is, unless an event of it is `blocked` (waiting to be admitted, it
    /// needs the stream's window); then forgets the streams whose linger is
    /// over ([`Lingering`]). A forgotten stream's next event opens it again
    /// from Redis and follows it from there.
    fn forget_if_settled(&mut self, stream: &str, blocked: Option<&Blocked>) {
        if blocked.is_some_and(|b| b.event.stream_id == stream) {
            return;
        }
        if self.streams.is_settled(stream) {
            self.lingering.settled(stream, Instant::now());
        }
        self.forget_lingering(blocked);
    }

    /// Stops following and forgets every lingering stream that is due and
    /// still settled.
    fn forget_lingering(&mut self, blocked: Option<&Blocked>) {
        for stream in self.lingering.due(Instant::now()) {
            if blocked.is_some_and(|b| b.event.stream_id == stream) {
                continue;
            }
            if self.streams.forget_if_settled(&stream) {
                self.follower.stop(&stream);
            }
        }
    }

    /// Handles the queued events in order, until one must wait (returned).
    async fn handle_queued(&mut self) -> Option<Blocked> {
        self.open_new_streams().await;
        while let Some(event) = self.queue.pop_front() {
            let stream = event.stream_id.clone();
            let blocked = self.handle(event).await;
            self.forget_if_settled(&stream, blocked.as_ref());
            if blocked.is_some() {
                // Read again when the queue moves on: the wait may be long.
                self.opened.clear();
                return blocked;
            }
        }
        self.opened.clear();
        None
    }

    /// Reads the state of every stream the queued events open, in one round
    /// trip. A stream's state read a moment before its event is handled is as
    /// good as one read then: the call has nothing in flight on a stream it
    /// does not know. If the read fails, each stream is read on its own as
    /// its event is handled (and refused if that fails too).
    async fn open_new_streams(&mut self) {
        let mut seen = HashSet::new();
        let wanted: Vec<&str> = self
            .queue
            .iter()
            .map(|event| event.stream_id.as_str())
            .filter(|stream| !self.streams.knows(stream) && !self.opened.contains_key(*stream) && seen.insert(*stream))
            .collect();
        if wanted.len() < 2 || self.shared.readiness.down_for(crate::REDIS_GRACE) {
            return;
        }
        match state::read_many(&self.shared.redis, &wanted).await {
            Ok(metas) => {
                for (stream, meta) in wanted.into_iter().zip(metas) {
                    self.opened.insert(stream.to_owned(), meta);
                }
            }
            Err(error) => {
                tracing::debug!(%error, streams = wanted.len(), "batched read of new streams failed; reading each")
            }
        }
    }

    /// Tries a blocked event again (`expire`: its deadline passed), then goes
    /// on with the queued events if it no longer waits.
    async fn unblock(&mut self, blocked: Blocked, expire: bool) -> Option<Blocked> {
        let stream = blocked.event.stream_id.clone();
        let blocked = if expire { self.expire_blocked(blocked).await } else { self.retry_blocked(blocked).await };
        self.forget_if_settled(&stream, blocked.as_ref());
        if blocked.is_some() {
            return blocked;
        }
        self.handle_queued().await
    }

    async fn send(&self, result: EventResult) -> bool {
        self.out.send(Ok(result)).await.is_ok()
    }

    async fn reject(&self, event: &Event, error: Error) {
        let status = Status::from(error);
        crate::metrics::rejected(status.code(), self.shared.operation_label(&event.operation));
        let _ = self.send(EventResult::rejected(&limits::echo(&event.stream_id), event.sequence, &status)).await;
    }

    fn beyond_window(&self, event: &Event) -> Error {
        let (next, limit) = self.streams.window_of(&event.stream_id);
        Error::BeyondWindow {
            stream: event.stream_id.clone(),
            sequence: event.sequence,
            next,
            window: self.shared.config.window,
            limit,
        }
    }

    /// Handles one client event; returns it back if it must wait (for the
    /// window, or for a worker serving its operation).
    async fn handle(&mut self, event: Event) -> Option<Blocked> {
        let checked = match self.shared.registry.check(&event) {
            Ok(checked) => checked,
            Err(error) => {
                self.reject(&event, error).await;
                return None;
            }
        };
        if let Err(denied) = self.grant.check_write(&event.stream_id) {
            self.reject(&event, Error::Denied(denied)).await;
            return None;
        }
        let gap_timeout = checked.gap_timeout;
        let stream = event.stream_id.as_str();
        if !self.streams.knows(stream) {
            if self.shared.readiness.down_for(crate::REDIS_GRACE) {
                self.reject(&event, Error::Unavailable("reorder state (Redis)")).await;
                return None;
            }
            let meta = match self.opened.remove(stream) {
                Some(meta) => Ok(meta),
                None => state::read(&self.shared.redis, stream).await,
            };
            match meta {
                Ok(meta) => {
                    let mode = state::effective_mode(meta.mode, event.mode());
                    self.follower.follow(stream, meta.released);
                    self.streams.open(stream, Opened { mode, next: meta.next, released: meta.released, gap_timeout });
                }
                Err(error) => {
                    self.reject(&event, Error::Redis(error)).await;
                    return None;
                }
            }
        } else if checked.gap_from_attribute {
            self.streams.set_gap_timeout(stream, gap_timeout, Instant::now());
        }
        self.admit(event, checked).await
    }

    /// Admits an event of an opened stream: dispatches it, serves it from
    /// the log, refuses it, or returns it to wait. A stateful event to be
    /// dispatched whose operation has no live worker (nor had one lately)
    /// waits up to `--worker-wait` for one.
    async fn admit(&mut self, event: Event, checked: Checked) -> Option<Blocked> {
        let stream = event.stream_id.as_str();
        // The common case (a worker serves it) is decided first, so the
        // stream's state is classified twice only while no worker serves it.
        if checked.route == Route::Stateful
            && !self.shared.pool.may_admit(&checked.spec.name)
            && self.streams.classify(stream, event.sequence) == Admission::Dispatch
        {
            let deadline = Instant::now() + self.shared.config.worker_wait;
            return Some(Blocked { event, checked, deadline, wait: Wait::Worker });
        }
        match self.streams.admit(stream, event.sequence, Instant::now()) {
            Admission::Duplicate => None,
            Admission::ReleasedUnordered => {
                let error = Error::AlreadyReleased { stream: event.stream_id.clone(), sequence: event.sequence };
                self.reject(&event, error).await;
                None
            }
            Admission::FromLog { from } => {
                self.follower.follow(stream, from);
                None
            }
            Admission::BeyondWindow { .. } => {
                let deadline = Instant::now() + self.shared.config.window_wait;
                Some(Blocked { event, checked, deadline, wait: Wait::Window })
            }
            Admission::Dispatch => {
                self.dispatch(event, checked).await;
                None
            }
        }
    }

    async fn dispatch(&mut self, mut event: Event, checked: Checked) {
        crate::metrics::accepted(&checked.spec.name);
        event.mode = self.streams.mode(&event.stream_id).unwrap_or(OrderingMode::Ordered) as i32;
        // The root of the event's own trace (linked to the call's span): a
        // call of thousands of events is not one trace of thousands of spans.
        let span = telemetry::event_root_span(
            "harmonizer.dispatch",
            &event.stream_id,
            event.sequence,
            &event.trace_context,
            &self.call_span,
        );
        if !span.is_disabled() {
            span.record(telemetry::attr::OPERATION, checked.spec.name.as_str());
        }
        // What goes downstream is the event's context, not the call's.
        event.trace_context = telemetry::inject(&span, &event.trace_context);
        span.in_scope(|| {
            tracing::debug!(stream = %event.stream_id, sequence = event.sequence, operation = %checked.spec.name, "dispatching");
        });
        match checked.route {
            Route::Stateful => {
                self.shared.pool.dispatch(event, checked.spec, checked.version).instrument(span).await;
            }
            Route::Stateless => self.shared.pool.run_stateless(event, checked.spec),
        }
    }

    /// Tries a blocked event again (the window moved, or what the workers
    /// serve changed): it keeps waiting for the same thing until its deadline.
    async fn retry_blocked(&mut self, blocked: Blocked) -> Option<Blocked> {
        match blocked.wait {
            Wait::Window => {
                let (_, limit) = self.streams.window_of(&blocked.event.stream_id);
                if blocked.event.sequence >= limit {
                    return Some(blocked);
                }
            }
            Wait::Worker => {
                if !self.shared.pool.may_admit(&blocked.checked.spec.name) {
                    return Some(blocked);
                }
            }
        }
        self.admit(blocked.event, blocked.checked).await
    }

    /// A blocked event's deadline passed: unless it can go now, it is refused.
    async fn expire_blocked(&mut self, blocked: Blocked) -> Option<Blocked> {
        let wait = blocked.wait;
        let blocked = self.retry_blocked(blocked).await?;
        if blocked.wait != wait {
            return Some(blocked); // it waits for something else now, with its own deadline
        }
        let error = match wait {
            Wait::Window => self.beyond_window(&blocked.event),
            Wait::Worker => Error::NoWorker(blocked.checked.spec.name.clone()),
        };
        self.reject(&blocked.event, error).await;
        None
    }

    /// Forwards the results this call awaits. False if the client is gone.
    async fn forward(&mut self, batch: FollowBatch) -> bool {
        if !batch.error.is_empty() {
            // The cursor can't be served (older than retention): say so for each awaited event.
            let status = Status::out_of_range(batch.error);
            for out in self.streams.unservable(&batch.stream_id) {
                if !self.send_outgoing(out, Some(&status)).await {
                    return false;
                }
            }
            return true;
        }
        let outgoing = self.streams.released(&batch.stream_id, batch.next_sequence, batch.results, Instant::now());
        for out in outgoing {
            if !self.send_outgoing(out, None).await {
                return false;
            }
        }
        true
    }

    /// Sends one answer. False if the client is gone.
    async fn send_outgoing(&self, out: Outgoing, unservable: Option<&Status>) -> bool {
        let result = match out {
            Outgoing::Result(result) => {
                let _span = telemetry::event_span(
                    "harmonizer.respond",
                    &result.stream_id,
                    result.sequence,
                    &result.trace_context,
                );
                result
            }
            Outgoing::GapSettled { stream, sequence } => {
                let status = Status::from(Error::GapSettled { stream: stream.clone(), sequence });
                EventResult::rejected(&stream, sequence, &status)
            }
            Outgoing::Unservable { stream, sequence } => {
                let status = unservable.cloned().unwrap_or_else(|| Status::out_of_range("released result trimmed"));
                EventResult::rejected(&stream, sequence, &status)
            }
        };
        self.send(result).await
    }

    /// Executes due timers: PROCESSING tickets and gaps. False if the client is gone.
    async fn on_timers(&mut self) -> bool {
        let now = Instant::now();
        for due in self.streams.due(now) {
            match due {
                Due::Processing { stream, sequence } => {
                    if !self.send(EventResult::processing_of(&stream, sequence)).await {
                        return false;
                    }
                }
                Due::Gap { stream, from, to } => {
                    if (from..to).any(|sequence| self.shared.pool.in_flight(&stream, sequence))
                        || match &self.shared.presence {
                            // Just joined other harmonizers, or not sure who is there: wait.
                            Some(presence) if presence.wary(now.into_std()) => true,
                            Some(_) => crate::claims::claimed(&self.shared.redis, &stream, from, to).await,
                            None => false,
                        }
                    {
                        // Accepted elsewhere (another call, a Submit, another
                        // harmonizer) and still running: not a gap.
                        self.streams.gap_postponed(&stream, from, now);
                        continue;
                    }
                    self.streams.gap_declared(&stream, from, to, now);
                    self.declare_gap(stream, from, to);
                }
            }
        }
        true
    }

    /// Releases GAP in place of `from..to` (first result wins: a real result
    /// stored meanwhile still wins) and records each as a dead letter.
    fn declare_gap(&self, stream: String, from: u64, to: u64) {
        let timeout = self.streams.gap_timeout(&stream).map(ordo_core::duration::format).unwrap_or_default();
        let mode = self.streams.mode(&stream).unwrap_or(OrderingMode::Ordered) as i32;
        tracing::warn!(stream, from, to, timeout, "gap: no event within the gap timeout; releasing GAP in its place");
        let sink = self.shared.sink.clone();
        let error = format!("no event arrived within the gap timeout ({timeout}) while later sequences waited");
        // Off the call's loop: recording waits for the reassembler's ack, and
        // the released GAP results come back through the follower.
        tokio::spawn(async move {
            for sequence in from..to {
                let (result, dead_letter) = gap_result(&stream, sequence, &error);
                let completed = Completed { result: Some(result), mode, dead_letter: Some(dead_letter) };
                if sink.deliver(completed).await.is_err() {
                    // Only at shutdown; the stream's next call declares the gap again.
                    tracing::warn!(stream, sequence, "could not record a GAP result");
                    return;
                }
            }
        });
    }
}

/// The GAP result of (stream, sequence) and its dead letter.
fn gap_result(stream: &str, sequence: u64, error: &str) -> (EventResult, ordo_proto::v1::DeadLetter) {
    let result = EventResult {
        stream_id: stream.to_owned(),
        sequence,
        status: ordo_proto::ResultStatus::Gap as i32,
        error: error.to_owned(),
        completed_unix_nanos: ordo_proto::unix_nanos(),
        ..Default::default()
    };
    let event = Event { stream_id: stream.to_owned(), sequence, ..Default::default() };
    let dead_letter = ordo_proto::v1::DeadLetter::of(event, ordo_proto::ResultStatus::Gap, 0, error);
    (result, dead_letter)
}
