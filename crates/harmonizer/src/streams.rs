//! The decisions of one `Process` call about its streams, apart from I/O:
//! windows, duplicates, resends of released sequences, PROCESSING timers and
//! gap timers. [`Streams`] takes inputs (an event arrived, results were
//! released, time passed) and returns what to do; `process.rs` executes the
//! decisions (dispatch, follow, reject, send). Time is an input, so every
//! interleaving can be tested without a clock or a network.
//!
//! Per stream the call knows `next`, the lowest sequence not yet released
//! (from Redis when the stream is opened, then from every released batch),
//! the sequences it accepted, and those still awaiting their result.
//!
//! That state lives only while the stream owes results: once every event the
//! call accepted on a stream is settled, [`Streams::forget_if_settled`]
//! drops it (and the caller stops following the stream), so a long call
//! over ever-new streams holds only the streams still in flight. An event
//! of a forgotten stream opens it again from Redis, like a stream never
//! seen: a sequence it had accepted and answered is then a resend of a
//! released sequence (served from the log again), not a duplicate. Timers
//! of a forgotten stream never fire for the stream opened after it.
//!
//! A *gap* is a sequence at `next` that this call never accepted while a
//! later sequence it accepted waits behind it. When a gap lasts the stream's
//! gap timeout with no release, the call declares it: GAP results are
//! released in place of every missing sequence up to the next accepted one
//! (first result wins at the reassembler, so a real result that got there
//! first still wins), and the waiting successors flow. The call forwards the
//! GAP results it declared, so its client sees every position; an event that
//! arrives for a gap already settled is refused instead.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    time::Duration,
};

use ordo_core::{hash::Map, ranges::RangeSet};
use ordo_proto::v1::{EventResult, OrderingMode, ResultStatus};
use tokio::time::Instant;

/// What a stream looks like in Redis when the call first sees it.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub mode: OrderingMode,
    /// Lowest unreleased sequence.
    pub next: u64,
    /// Next release position (where following starts).
    pub released: u64,
    /// The stream's gap timeout (`None`: gaps wait forever).
    pub gap_timeout: Option<Duration>,
}

/// What to do with an event the registry accepted as valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Already accepted on this call: its one result is (or was) on its way.
    Duplicate,
    /// Released already, in an UNORDERED stream: its position is unknown
    /// (ALREADY_EXISTS; read it from the push-gateway).
    ReleasedUnordered,
    /// Released already: follow the stream from its sequence (= position)
    /// and forward the stored result.
    FromLog { from: u64 },
    /// Accepted: dispatch it.
    Dispatch,
    /// At or beyond `next + window`: hold it (back-pressure), then OUT_OF_RANGE.
    BeyondWindow { next: u64, limit: u64 },
}

/// What a timer decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Send PROCESSING for this stream head.
    Processing { stream: String, sequence: u64 },
    /// Sequences `from..to` are missing and holding successors since the
    /// gap timeout: release GAP in their place (then call [`Streams::gap_declared`]),
    /// unless one of them is actually running somewhere ([`Streams::gap_postponed`]).
    Gap { stream: String, from: u64, to: u64 },
}

/// What to send to the client for released results.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Result(EventResult),
    /// The awaited event's sequence was settled as a gap before it arrived:
    /// refuse it (FAILED_PRECONDITION).
    GapSettled {
        stream: String,
        sequence: u64,
    },
    /// The awaited event's released result can no longer be read (older
    /// than retention): refuse it (OUT_OF_RANGE).
    Unservable {
        stream: String,
        sequence: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Dispatched by this call.
    Dispatched,
    /// Released before it arrived on this call: served from the log.
    Resent,
    /// A gap this call declared: its GAP result is forwarded as is.
    Gap,
}

#[derive(Debug)]
struct Awaited {
    since: Instant,
    why: Why,
    processing_sent: bool,
    /// Its answer, held while a lower sequence of the call still waits:
    /// a call answers each stream in sequence order (a resent event's
    /// result, re-read from the log, may come after a later one's). Boxed:
    /// an `Outgoing` is ~200 bytes, and B-tree nodes hold 11 values each,
    /// allocated whole and shifted on every insert and removal.
    ready: Option<Box<Outgoing>>,
}

// What a stream's `awaiting` node costs per event (the bound documents the box above).
const _: () = assert!(std::mem::size_of::<Awaited>() <= 40);

#[derive(Debug)]
struct Stream {
    /// Which opening of the stream this is (timers armed for an earlier one are stale).
    id: u64,
    mode: OrderingMode,
    next: u64,
    accepted: RangeSet,
    awaiting: BTreeMap<u64, Awaited>,
    gap_timeout: Option<Duration>,
    /// The head a PROCESSING timer is armed for.
    processing_armed: Option<u64>,
    /// The `next` a gap timer is armed for.
    gap_armed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Processing,
    Gap,
}

/// (when, kind, stream, sequence, opening of the stream it was armed for).
type Timer = (Instant, TimerKind, String, u64, u64);

/// All streams of one call, and their timers.
#[derive(Debug)]
pub struct Streams {
    window: u64,
    processing_threshold: Option<Duration>,
    streams: Map<String, Stream>,
    /// Min-heap; stale entries are skipped when due.
    timers: BinaryHeap<Reverse<Timer>>,
    /// Streams opened so far (the id of the next opening).
    openings: u64,
}

impl Streams {
    pub fn new(window: u64, processing_threshold: Option<Duration>) -> Self {
        Self { window, processing_threshold, streams: Map::default(), timers: BinaryHeap::new(), openings: 0 }
    }

    pub fn knows(&self, stream: &str) -> bool {
        self.streams.contains_key(stream)
    }

    /// The stream's mode, once opened.
    pub fn mode(&self, stream: &str) -> Option<OrderingMode> {
        self.streams.get(stream).map(|s| s.mode)
    }

    /// Starts tracking `stream` as Redis has it. Follow it from `opened.released`.
    pub fn open(&mut self, stream: &str, opened: Opened) {
        let id = self.openings;
        self.streams.entry(stream.to_owned()).or_insert_with(|| Stream {
            id,
            mode: opened.mode,
            next: opened.next,
            accepted: RangeSet::new(),
            awaiting: BTreeMap::new(),
            gap_timeout: opened.gap_timeout,
            processing_armed: None,
            gap_armed: None,
        });
        self.openings += 1;
    }

    /// Forgets `stream` if nothing accepted on it still awaits its result;
    /// true if it was forgotten (then stop following it). A later event of
    /// the stream opens it again.
    pub fn forget_if_settled(&mut self, stream: &str) -> bool {
        if self.streams.get(stream).is_some_and(|s| s.awaiting.is_empty()) {
            self.streams.remove(stream);
            return true;
        }
        false
    }

    /// Whether `stream` is open and nothing accepted on it awaits its result.
    pub fn is_settled(&self, stream: &str) -> bool {
        self.streams.get(stream).is_some_and(|s| s.awaiting.is_empty())
    }

    /// How many streams the call keeps state for (opened, not forgotten).
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The stream's gap timeout, once opened (`None`: off).
    pub fn gap_timeout(&self, stream: &str) -> Option<Duration> {
        self.streams.get(stream).and_then(|s| s.gap_timeout)
    }

    /// A later event of the stream may change its gap timeout.
    pub fn set_gap_timeout(&mut self, stream: &str, gap_timeout: Option<Duration>, now: Instant) {
        if let Some(s) = self.streams.get_mut(stream) {
            s.gap_timeout = gap_timeout;
        }
        self.arm(stream, now);
    }

    /// What [`Streams::admit`] would decide about an event, changing nothing
    /// (the caller may hold a `Dispatch` back, e.g. until a worker serves it).
    pub fn classify(&self, stream: &str, sequence: u64) -> Admission {
        let Some(s) = self.streams.get(stream) else {
            // Not opened: treated as beyond any window; the caller opens streams first.
            return Admission::BeyondWindow { next: 0, limit: 0 };
        };
        if s.accepted.contains(sequence) {
            Admission::Duplicate
        } else if sequence < s.next {
            if s.mode == OrderingMode::Unordered {
                Admission::ReleasedUnordered
            } else {
                Admission::FromLog { from: sequence }
            }
        } else if sequence >= s.next.saturating_add(self.window) {
            Admission::BeyondWindow { next: s.next, limit: s.next.saturating_add(self.window) }
        } else {
            Admission::Dispatch
        }
    }

    /// Decides about an event of an opened stream. `Dispatch` and `FromLog`
    /// count it as accepted and awaited from `now`.
    pub fn admit(&mut self, stream: &str, sequence: u64, now: Instant) -> Admission {
        let admission = self.classify(stream, sequence);
        let why = match admission {
            Admission::FromLog { .. } => Why::Resent,
            Admission::Dispatch => Why::Dispatched,
            Admission::Duplicate | Admission::ReleasedUnordered | Admission::BeyondWindow { .. } => return admission,
        };
        let Some(s) = self.streams.get_mut(stream) else { return admission };
        s.awaiting.insert(sequence, Awaited { since: now, why, processing_sent: false, ready: None });
        s.accepted.insert(sequence);
        self.arm(stream, now);
        admission
    }

    /// The window of `stream` as of now: (lowest unreleased, first sequence beyond).
    pub fn window_of(&self, stream: &str) -> (u64, u64) {
        let next = self.streams.get(stream).map_or(0, |s| s.next);
        (next, next.saturating_add(self.window))
    }

    /// Released results of `stream` (in release order) and its new lowest
    /// unreleased sequence: what to forward, in order.
    pub fn released(&mut self, stream: &str, next: u64, results: Vec<EventResult>, now: Instant) -> Vec<Outgoing> {
        let Some(s) = self.streams.get_mut(stream) else { return Vec::new() };
        s.next = s.next.max(next);
        for result in results {
            let Some(awaited) = s.awaiting.get_mut(&result.sequence) else { continue };
            if awaited.ready.is_some() {
                continue; // a repeat (re-served from the log): the first one counts
            }
            crate::metrics::latency(now.saturating_duration_since(awaited.since));
            awaited.ready = Some(Box::new(if result.status() == ResultStatus::Gap && awaited.why != Why::Gap {
                Outgoing::GapSettled { stream: stream.to_owned(), sequence: result.sequence }
            } else {
                Outgoing::Result(result)
            }));
        }
        let out = if s.mode == OrderingMode::Unordered {
            // Completion order is the point of UNORDERED: answer as released.
            take_all_ready(s)
        } else {
            take_ready(s)
        };
        self.arm(stream, now);
        out
    }

    /// The stream's released results cannot be served (e.g. older than
    /// retention): what is ready goes out, every other sequence it awaits
    /// is to be refused ([`Outgoing::Unservable`]), in sequence order.
    pub fn unservable(&mut self, stream: &str) -> Vec<Outgoing> {
        let Some(s) = self.streams.get_mut(stream) else { return Vec::new() };
        std::mem::take(&mut s.awaiting)
            .into_iter()
            .map(|(sequence, awaited)| {
                awaited
                    .ready
                    .map_or_else(|| Outgoing::Unservable { stream: stream.to_owned(), sequence }, |ready| *ready)
            })
            .collect()
    }

    /// True when nothing accepted on this call still awaits its result.
    pub fn settled(&self) -> bool {
        self.streams.values().all(|s| s.awaiting.is_empty())
    }

    /// Results this call still owes.
    pub fn owed(&self) -> usize {
        self.streams.values().map(|s| s.awaiting.len()).sum()
    }

    /// When the next timer is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, ..))| *at)
    }

    /// Every timer due at `now` that still applies.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        while self.timers.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
            let Some(Reverse((_, kind, stream_id, sequence, id))) = self.timers.pop() else { break };
            let Some(s) = self.streams.get_mut(&stream_id).filter(|s| s.id == id) else { continue };
            match kind {
                TimerKind::Processing => {
                    if s.processing_armed == Some(sequence) {
                        s.processing_armed = None;
                    }
                    let Some((&head, awaited)) = s.awaiting.first_key_value() else { continue };
                    if head != sequence || awaited.processing_sent {
                        continue;
                    }
                    if let Some(awaited) = s.awaiting.get_mut(&head) {
                        awaited.processing_sent = true;
                    }
                    due.push(Due::Processing { stream: stream_id, sequence });
                }
                TimerKind::Gap => {
                    if s.gap_armed == Some(sequence) {
                        s.gap_armed = None;
                    }
                    if let Some(to) = hole(s)
                        && s.next == sequence
                    {
                        due.push(Due::Gap { stream: stream_id, from: sequence, to });
                    }
                }
            }
        }
        due
    }

    /// GAP results for `from..to` are on their way: await them (they are
    /// forwarded as GAP) and count them as accepted.
    pub fn gap_declared(&mut self, stream: &str, from: u64, to: u64, now: Instant) {
        let Some(s) = self.streams.get_mut(stream) else { return };
        for sequence in from..to {
            if s.accepted.insert(sequence) {
                s.awaiting.insert(sequence, Awaited { since: now, why: Why::Gap, processing_sent: true, ready: None });
            }
        }
    }

    /// The hole at `from` turned out to be running somewhere: wait another timeout.
    pub fn gap_postponed(&mut self, stream: &str, from: u64, now: Instant) {
        let Some(s) = self.streams.get_mut(stream) else { return };
        if let Some(timeout) = s.gap_timeout
            && s.gap_armed.is_none()
        {
            s.gap_armed = Some(from);
            self.timers.push(Reverse((now + timeout, TimerKind::Gap, stream.to_owned(), from, s.id)));
        }
    }

    /// Arms the PROCESSING timer of the stream's head and the gap timer of
    /// its hole, if they apply and are not armed yet.
    fn arm(&mut self, stream: &str, now: Instant) {
        let Some(s) = self.streams.get_mut(stream) else { return };
        if let Some(threshold) = self.processing_threshold
            && let Some((&head, awaited)) = s.awaiting.first_key_value()
            && !awaited.processing_sent
            && s.processing_armed != Some(head)
        {
            s.processing_armed = Some(head);
            self.timers.push(Reverse((
                awaited.since + threshold,
                TimerKind::Processing,
                stream.to_owned(),
                head,
                s.id,
            )));
        }
        if let Some(timeout) = s.gap_timeout
            && hole(s).is_some()
            && s.gap_armed != Some(s.next)
        {
            s.gap_armed = Some(s.next);
            self.timers.push(Reverse((now + timeout, TimerKind::Gap, stream.to_owned(), s.next, s.id)));
        }
    }
}

/// Takes the answers at the front of the stream's awaited sequences, in
/// order, up to the first one still without its answer.
fn take_ready(s: &mut Stream) -> Vec<Outgoing> {
    let mut out = Vec::new();
    while let Some(mut entry) = s.awaiting.first_entry() {
        let Some(ready) = entry.get_mut().ready.take() else { break };
        entry.remove();
        out.push(*ready);
    }
    out
}

/// Takes every answer there is, in release order (UNORDERED streams).
fn take_all_ready(s: &mut Stream) -> Vec<Outgoing> {
    let ready: Vec<u64> = s.awaiting.iter().filter(|(_, a)| a.ready.is_some()).map(|(&q, _)| q).collect();
    let mut out: Vec<Outgoing> =
        ready.iter().filter_map(|q| s.awaiting.remove(q)).filter_map(|a| a.ready.map(|r| *r)).collect();
    out.sort_by_key(|o| match o {
        Outgoing::Result(r) => r.position,
        Outgoing::GapSettled { .. } | Outgoing::Unservable { .. } => 0,
    });
    out
}

/// The end (exclusive) of the hole at `next`: `next` is not accepted on this
/// call and a later accepted sequence awaits its result. Only ORDERED streams
/// have holes (UNORDERED ones release in completion order).
fn hole(s: &Stream) -> Option<u64> {
    if s.mode == OrderingMode::Unordered || s.accepted.contains(s.next) {
        return None;
    }
    s.awaiting.range(s.next..).next().map(|(&sequence, _)| sequence)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const GAP: Duration = Duration::from_secs(2);

    fn opened(next: u64) -> Opened {
        Opened { mode: OrderingMode::Ordered, next, released: next, gap_timeout: Some(GAP) }
    }

    fn result(stream: &str, sequence: u64, status: ResultStatus) -> EventResult {
        EventResult {
            stream_id: stream.into(),
            sequence,
            position: sequence,
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn window_duplicates_and_resends() {
        let t0 = Instant::now();
        let mut streams = Streams::new(4, None);
        streams.open("s", opened(2));
        assert_eq!(streams.admit("s", 2, t0), Admission::Dispatch);
        assert_eq!(streams.admit("s", 2, t0), Admission::Duplicate);
        assert_eq!(streams.admit("s", 0, t0), Admission::FromLog { from: 0 });
        assert_eq!(streams.admit("s", 0, t0), Admission::Duplicate);
        assert_eq!(streams.admit("s", 6, t0), Admission::BeyondWindow { next: 2, limit: 6 });
        assert_eq!(streams.owed(), 2);
        let out =
            streams.released("s", 3, vec![result("s", 0, ResultStatus::Ok), result("s", 2, ResultStatus::Ok)], t0);
        assert_eq!(out.len(), 2);
        assert!(streams.settled());
        assert_eq!(streams.window_of("s"), (3, 7));
        assert_eq!(streams.admit("s", 6, t0), Admission::Dispatch, "the window moved");
    }

    #[test]
    fn a_settled_stream_is_forgotten_then_opened_again_from_redis() {
        let t0 = Instant::now();
        let mut streams = Streams::new(8, None);
        streams.open("s", opened(0));
        assert_eq!(streams.admit("s", 0, t0), Admission::Dispatch);
        assert_eq!(streams.admit("s", 1, t0), Admission::Dispatch);
        let out = streams.released("s", 1, vec![result("s", 0, ResultStatus::Ok)], t0);
        assert_eq!(out.len(), 1);
        assert!(!streams.forget_if_settled("s"), "1 still owes its result");
        assert!(streams.knows("s"));
        let out = streams.released("s", 2, vec![result("s", 1, ResultStatus::Ok)], t0);
        assert_eq!(out.len(), 1);
        assert!(streams.forget_if_settled("s"), "settled: forgotten");
        assert!(!streams.knows("s") && streams.open_streams() == 0);
        assert!(!streams.forget_if_settled("s"), "forgotten once");
        assert!(streams.released("s", 2, vec![result("s", 1, ResultStatus::Ok)], t0).is_empty(), "late batch: ignored");

        // Used again: opened from what Redis has now (two released).
        streams.open("s", opened(2));
        assert_eq!(streams.admit("s", 2, t0), Admission::Dispatch, "a new sequence is dispatched");
        assert_eq!(streams.admit("s", 1, t0), Admission::FromLog { from: 1 }, "an answered one is a resend now");
        assert_eq!(streams.window_of("s"), (2, 10));
        let out =
            streams.released("s", 3, vec![result("s", 1, ResultStatus::Ok), result("s", 2, ResultStatus::Ok)], t0);
        let answered: Vec<u64> = out
            .iter()
            .map(|o| match o {
                Outgoing::Result(r) => r.sequence,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(answered, vec![1, 2], "answered once each, in order");
        assert!(streams.forget_if_settled("s"));
    }

    #[test]
    fn timers_of_a_forgotten_stream_do_not_fire_for_its_reuse() {
        let t0 = Instant::now();
        let threshold = Duration::from_millis(100);
        let mut streams = Streams::new(8, Some(threshold));
        streams.open("s", Opened { gap_timeout: None, ..opened(0) });
        streams.admit("s", 0, t0);
        assert_eq!(streams.next_due(), Some(t0 + threshold));
        streams.released("s", 1, vec![result("s", 0, ResultStatus::Ok)], t0);
        assert!(streams.forget_if_settled("s"));
        // Reused half a threshold later: its resent 0 waits from then.
        let t1 = t0 + threshold / 2;
        streams.open("s", Opened { gap_timeout: None, ..opened(1) });
        assert_eq!(streams.admit("s", 0, t1), Admission::FromLog { from: 0 });
        assert!(streams.due(t0 + threshold).is_empty(), "the first opening's timer is stale");
        assert_eq!(streams.due(t1 + threshold), vec![Due::Processing { stream: "s".into(), sequence: 0 }]);
    }

    #[test]
    fn an_unservable_stream_settles_and_is_forgotten() {
        let t0 = Instant::now();
        let mut streams = Streams::new(8, None);
        streams.open("s", opened(5));
        assert_eq!(streams.admit("s", 1, t0), Admission::FromLog { from: 1 });
        assert!(!streams.forget_if_settled("s"));
        assert_eq!(streams.unservable("s"), vec![Outgoing::Unservable { stream: "s".into(), sequence: 1 }]);
        assert!(streams.forget_if_settled("s"));
    }

    #[test]
    fn classify_decides_like_admit_and_changes_nothing() {
        let t0 = Instant::now();
        let mut streams = Streams::new(4, None);
        streams.open("s", opened(2));
        assert_eq!(streams.classify("s", 3), Admission::Dispatch);
        assert_eq!(streams.classify("s", 3), Admission::Dispatch, "still not accepted");
        assert_eq!(streams.classify("s", 1), Admission::FromLog { from: 1 });
        assert_eq!(streams.classify("s", 6), Admission::BeyondWindow { next: 2, limit: 6 });
        assert_eq!(streams.classify("t", 0), Admission::BeyondWindow { next: 0, limit: 0 }, "not opened");
        assert!(streams.settled() && streams.next_due().is_none());
        assert_eq!(streams.admit("s", 3, t0), Admission::Dispatch);
        assert_eq!(streams.classify("s", 3), Admission::Duplicate);
    }

    #[test]
    fn unordered_streams_answer_in_release_order() {
        let t0 = Instant::now();
        let mut streams = Streams::new(8, None);
        streams.open("u", Opened { mode: OrderingMode::Unordered, gap_timeout: None, ..opened(0) });
        for q in 0..3 {
            assert_eq!(streams.admit("u", q, t0), Admission::Dispatch);
        }
        let mut late = result("u", 2, ResultStatus::Ok);
        late.position = 0;
        let out = streams.released("u", 0, vec![late], t0);
        assert_eq!(out.len(), 1, "sequence 2 completed first and is answered at once: {out:?}");
    }

    #[test]
    fn unordered_streams_refuse_released_sequences() {
        let t0 = Instant::now();
        let mut streams = Streams::new(8, None);
        streams.open("u", Opened { mode: OrderingMode::Unordered, ..opened(3) });
        assert_eq!(streams.admit("u", 1, t0), Admission::ReleasedUnordered);
        assert_eq!(streams.admit("u", 5, t0), Admission::Dispatch);
    }

    #[test]
    fn a_gap_is_declared_after_its_timeout_and_only_then() {
        let t0 = Instant::now();
        let mut streams = Streams::new(100, None);
        streams.open("s", opened(0));
        assert_eq!(streams.admit("s", 0, t0), Admission::Dispatch);
        assert_eq!(streams.admit("s", 3, t0), Admission::Dispatch);
        assert_eq!(streams.next_due(), None, "0 is accepted: no hole yet");
        let t1 = t0 + Duration::from_millis(10);
        streams.released("s", 1, vec![result("s", 0, ResultStatus::Ok)], t1);
        assert_eq!(streams.next_due(), Some(t1 + GAP), "1 and 2 are missing while 3 waits");
        assert!(streams.due(t1 + GAP / 2).is_empty());
        let due = streams.due(t1 + GAP);
        assert_eq!(due, vec![Due::Gap { stream: "s".into(), from: 1, to: 3 }]);
        streams.gap_declared("s", 1, 3, t1 + GAP);
        let out = streams.released(
            "s",
            4,
            vec![
                result("s", 1, ResultStatus::Gap),
                result("s", 2, ResultStatus::Gap),
                result("s", 3, ResultStatus::Ok),
            ],
            t1 + GAP,
        );
        assert!(out.iter().all(|o| matches!(o, Outgoing::Result(_))), "declared gaps are forwarded as GAP: {out:?}");
        assert_eq!(out.len(), 3);
        assert!(streams.settled());
    }

    #[test]
    fn a_gap_filled_in_time_is_not_declared() {
        let t0 = Instant::now();
        let mut streams = Streams::new(100, None);
        streams.open("s", opened(0));
        streams.admit("s", 1, t0);
        assert!(streams.next_due().is_some());
        assert_eq!(streams.admit("s", 0, t0 + GAP / 2), Admission::Dispatch);
        assert!(streams.due(t0 + GAP).is_empty(), "the hole was filled");
    }

    #[test]
    fn an_event_for_a_settled_gap_is_refused() {
        let t0 = Instant::now();
        let mut streams = Streams::new(100, None);
        streams.open("s", opened(5));
        assert_eq!(streams.admit("s", 1, t0), Admission::FromLog { from: 1 });
        let out = streams.released("s", 5, vec![result("s", 1, ResultStatus::Gap)], t0);
        assert_eq!(out, vec![Outgoing::GapSettled { stream: "s".into(), sequence: 1 }]);
    }

    #[test]
    fn gaps_off_wait_forever() {
        let t0 = Instant::now();
        let mut streams = Streams::new(100, None);
        streams.open("s", Opened { gap_timeout: None, ..opened(0) });
        streams.admit("s", 1, t0);
        assert_eq!(streams.next_due(), None);
    }

    #[test]
    fn processing_once_per_head() {
        let t0 = Instant::now();
        let threshold = Duration::from_millis(100);
        let mut streams = Streams::new(100, Some(threshold));
        streams.open("s", Opened { gap_timeout: None, ..opened(0) });
        streams.admit("s", 0, t0);
        streams.admit("s", 1, t0);
        assert_eq!(streams.due(t0 + threshold), vec![Due::Processing { stream: "s".into(), sequence: 0 }]);
        assert!(streams.due(t0 + threshold * 5).is_empty(), "once per sequence");
        let t1 = t0 + threshold * 5;
        streams.released("s", 1, vec![result("s", 0, ResultStatus::Ok)], t1);
        // The new head waited since t0: due at once.
        assert_eq!(streams.due(t1), vec![Due::Processing { stream: "s".into(), sequence: 1 }]);
    }

    /// One step of a random run of a call against a model of the reassembler.
    #[derive(Debug, Clone)]
    enum Step {
        /// The client sends (stream, sequence).
        Send(u8, u8),
        /// The store completes one dispatched-but-unstored event (index into them).
        Complete(u8),
        /// Time passes.
        Tick(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..3, 0u8..24).prop_map(|(s, q)| Step::Send(s, q)),
            4 => any::<u8>().prop_map(Step::Complete),
            1 => (1u16..3000).prop_map(Step::Tick),
        ]
    }

    /// The reassembler of one stream: first result wins, released in order.
    #[derive(Default)]
    struct Store {
        stored: BTreeMap<u64, ResultStatus>,
        released: BTreeMap<u64, ResultStatus>,
        next: u64,
    }

    impl Store {
        fn put(&mut self, sequence: u64, status: ResultStatus) {
            if sequence >= self.next {
                self.stored.entry(sequence).or_insert(status);
            }
        }
        /// Releases what is contiguous from `next`.
        fn release(&mut self, stream: &str) -> Vec<EventResult> {
            let mut out = Vec::new();
            while let Some(status) = self.stored.remove(&self.next) {
                self.released.insert(self.next, status);
                out.push(result(stream, self.next, status));
                self.next += 1;
            }
            out
        }
    }

    const NAMES: [&str; 3] = ["a", "b", "c"];

    /// A run of one call against the model.
    struct Run {
        now: Instant,
        streams: Streams,
        stores: Vec<Store>,
        running: Vec<(usize, u64)>,
        /// Resent events whose stored result is being re-read from the log.
        log_reads: Vec<(usize, u64)>,
        accepted: BTreeSet<(usize, u64)>,
        answered: BTreeMap<(usize, u64), usize>,
        last_released: Vec<Option<u64>>,
        /// Results checked and archived when their stream was forgotten.
        archived: usize,
    }

    impl Run {
        fn count(&mut self, i: usize, out: Vec<Outgoing>) -> Result<(), TestCaseError> {
            for o in out {
                let sequence = match o {
                    Outgoing::Result(r) => r.sequence,
                    Outgoing::GapSettled { sequence, .. } | Outgoing::Unservable { sequence, .. } => sequence,
                };
                // In order: nothing lower that this call accepted still waits.
                let waiting: Vec<u64> = self
                    .accepted
                    .range((i, 0)..(i, sequence))
                    .filter(|key| !self.answered.contains_key(key))
                    .map(|(_, q)| *q)
                    .collect();
                prop_assert!(waiting.is_empty(), "{} answered while {:?} still wait", sequence, waiting);
                *self.answered.entry((i, sequence)).or_default() += 1;
            }
            Ok(())
        }

        /// What the call does after each step on a stream: forget it once
        /// settled. Its accepted events must each have had exactly one
        /// answer by then; they are archived, so that the stream's reuse
        /// (a fresh opening) is checked on its own.
        fn forget(&mut self, i: usize) -> Result<(), TestCaseError> {
            if !self.streams.forget_if_settled(NAMES[i]) {
                return Ok(());
            }
            prop_assert!(!self.streams.knows(NAMES[i]));
            let keys: Vec<(usize, u64)> = self.accepted.range((i, 0)..(i + 1, 0)).copied().collect();
            for key in keys {
                prop_assert_eq!(self.answered.remove(&key), Some(1), "one result for {:?} before forgetting", key);
                self.accepted.remove(&key);
                self.archived += 1;
            }
            prop_assert!(self.answered.range((i, 0)..(i + 1, 0)).next().is_none(), "answered, never accepted");
            Ok(())
        }

        /// Releases what the store can and forwards it; checks release order.
        fn deliver(&mut self, i: usize) -> Result<(), TestCaseError> {
            let results = self.stores[i].release(NAMES[i]);
            for r in &results {
                if let Some(prev) = self.last_released[i] {
                    prop_assert!(r.sequence > prev, "released out of order");
                }
                self.last_released[i] = Some(r.sequence);
            }
            let next = self.stores[i].next;
            let out = self.streams.released(NAMES[i], next, results, self.now);
            self.count(i, out)?;
            self.forget(i)
        }

        /// The stored result of a resent event comes back from the log.
        fn read_log(&mut self, k: usize) -> Result<(), TestCaseError> {
            if self.log_reads.is_empty() {
                return Ok(());
            }
            let (i, sequence) = self.log_reads.remove(k % self.log_reads.len());
            let status = self.stores[i].released.get(&sequence).copied().unwrap_or(ResultStatus::Ok);
            let again = result(NAMES[i], sequence, status);
            let out = self.streams.released(NAMES[i], self.stores[i].next, vec![again], self.now);
            self.count(i, out)?;
            self.forget(i)
        }

        fn complete(&mut self, k: usize) -> Result<(), TestCaseError> {
            if k.is_multiple_of(3) {
                return self.read_log(k / 3);
            }
            if self.running.is_empty() {
                return Ok(());
            }
            let (i, sequence) = self.running.remove(k % self.running.len());
            self.stores[i].put(sequence, ResultStatus::Ok);
            self.deliver(i)
        }

        fn send(&mut self, i: usize, sequence: u64) -> Result<(), TestCaseError> {
            if !self.streams.knows(NAMES[i]) {
                let next = self.stores[i].next;
                let opened = Opened { mode: OrderingMode::Ordered, next, released: next, gap_timeout: Some(GAP) };
                self.streams.open(NAMES[i], opened);
            }
            match self.streams.admit(NAMES[i], sequence, self.now) {
                Admission::Dispatch => {
                    prop_assert!(self.accepted.insert((i, sequence)));
                    self.running.push((i, sequence));
                }
                Admission::FromLog { from } => {
                    prop_assert_eq!(from, sequence);
                    prop_assert!(self.accepted.insert((i, sequence)));
                    prop_assert!(
                        self.stores[i].released.contains_key(&sequence),
                        "only released sequences are served from the log"
                    );
                    // Served from the log, later: a restarted catch-up may
                    // come after live results of later sequences.
                    self.log_reads.push((i, sequence));
                }
                Admission::Duplicate => prop_assert!(self.accepted.contains(&(i, sequence))),
                Admission::BeyondWindow { .. } | Admission::ReleasedUnordered => {}
            }
            // Refused (beyond the window): the call does not hold it here.
            self.forget(i)
        }

        fn tick(&mut self, ms: u64) -> Result<(), TestCaseError> {
            self.read_log(0)?;
            // Completions keep coming while time passes (a real worker finishes).
            if let Some((i, sequence)) = self.running.pop() {
                self.stores[i].put(sequence, ResultStatus::Ok);
                self.deliver(i)?;
            }
            self.now += Duration::from_millis(ms);
            for due in self.streams.due(self.now) {
                if let Due::Gap { stream, from, to } = due {
                    let i = NAMES.iter().position(|n| *n == stream).unwrap_or(0);
                    prop_assert!(from < to);
                    self.streams.gap_declared(&stream, from, to, self.now);
                    for sequence in from..to {
                        prop_assert!(!self.accepted.contains(&(i, sequence)), "a gap never covers an accepted event");
                        self.accepted.insert((i, sequence));
                        self.stores[i].put(sequence, ResultStatus::Gap);
                    }
                    self.deliver(i)?;
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Any interleaving of events (with duplicates, resends and holes),
        /// completions and time: every accepted event gets exactly one
        /// result, results of dispatched events come in sequence order per
        /// stream, and with a gap timeout every stream drains.
        #[test]
        fn every_accepted_event_gets_one_result_in_order(
            steps in prop::collection::vec(step(), 1..200),
            before in prop::collection::vec(0u64..12, 3),
        ) {
            // Each stream starts with `before` results released by an earlier
            // call (a crashed harmonizer's): the client may resend them.
            let stores = before
                .iter()
                .map(|&n| {
                    let mut store = Store::default();
                    (0..n).for_each(|q| store.put(q, ResultStatus::Ok));
                    store.release("earlier");
                    store
                })
                .collect();
            let mut run = Run {
                now: Instant::now(),
                streams: Streams::new(16, Some(Duration::from_millis(500))),
                stores,
                running: Vec::new(),
                log_reads: Vec::new(),
                accepted: BTreeSet::new(),
                answered: BTreeMap::new(),
                last_released: vec![None; 3],
                archived: 0,
            };
            // Then quiet time: everything running completes, holes become gaps.
            for step in steps.into_iter().chain((0..60).map(|_| Step::Tick(3000))) {
                match step {
                    Step::Send(s, q) => run.send(usize::from(s), u64::from(q))?,
                    Step::Complete(k) => run.complete(usize::from(k))?,
                    Step::Tick(ms) => run.tick(u64::from(ms))?,
                }
            }
            prop_assert!(run.streams.settled(), "every accepted event settled: {} owed", run.streams.owed());
            prop_assert_eq!(run.streams.open_streams(), 0, "settled streams are all forgotten");
            for (key, count) in &run.answered {
                prop_assert!(run.accepted.contains(key), "answered {:?} never accepted", key);
                prop_assert_eq!(*count, 1, "one result for {:?}", key);
            }
            for key in &run.accepted {
                prop_assert!(run.answered.contains_key(key), "no result for {:?}", key);
            }
        }
    }
}
