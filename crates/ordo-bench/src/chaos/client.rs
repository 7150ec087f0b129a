//! The chaos workload's client: a user of `Harmonizer.Process` that follows
//! the documented recovery and counts everything that deviates from the
//! contract.
//!
//! Each [`run_group`] owns a few streams and one `Process` call at a time.
//! Events of `"<stream>:<seq>"` become due at a steady pace whether or not a
//! call is open (a producer does not stop producing while its connection is
//! down). When a call breaks (an error status, or the harmonizer ending it
//! while results are owed) the client opens a new call, with the shared
//! jittered backoff, and resends every due event it has no result for, in
//! sequence order per stream: the recovery ARCHITECTURE.md documents. A
//! REJECTED result with a transient code (UNAVAILABLE, OUT_OF_RANGE, …) is
//! resent on the same call after a pause; any other rejection gives the
//! event up (and is reported as lost).
//!
//! What is counted, per group: results per (stream, sequence) beyond the
//! first (duplicated, whichever call they came on), results that are not the
//! next sequence of their stream (reordered), wrong payloads, FAILED and GAP
//! results, rejections by code, call breaks by code, and whether the last
//! call ended (after the half-close) within the deadline; a call still open,
//! or results still owed, at the deadline is hung.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ordo_proto::v1::{Event, EventResult, OrderingMode, ResultStatus, harmonizer_client::HarmonizerClient};
use ordo_runtime::backoff::Backoff;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, sleep_until},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

/// How often one event is resent after transient rejections before the
/// client gives it up.
const MAX_RESENDS: u32 = 40;
/// Pause before resending a rejected event (rejections come back at once).
const RESEND_PAUSE: Duration = Duration::from_millis(250);
/// Largest result message accepted.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The shape of one run's workload.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Streams in all, spread round-robin over `calls` groups.
    pub streams: usize,
    pub events_per_stream: u64,
    /// Concurrent `Process` calls (groups), each owning `streams / calls` streams.
    pub calls: usize,
    /// Time between two events of one call.
    #[serde(with = "crate::chaos::serde_duration")]
    pub pace: Duration,
    /// The `latency` attribute of the stateful events.
    pub latency: String,
    /// Every n-th event (n > 0) runs the stateless `echo` instead of the
    /// stateful `async-echo`, so faults of the stateless service matter too.
    pub stateless_every: u64,
    /// After the last event became due, how long results may take.
    #[serde(with = "crate::chaos::serde_duration")]
    pub settle: Duration,
    /// After the half-close, how long the call may take to end.
    #[serde(with = "crate::chaos::serde_duration")]
    pub call_end: Duration,
}

impl Workload {
    pub fn total_events(&self) -> usize {
        self.streams * self.events_per_stream as usize
    }
}

/// The event `seq` of `stream` as the workload sends it.
pub fn make_event(workload: &Workload, stream: &str, seq: u64) -> Event {
    let stateless = workload.stateless_every > 0 && seq % workload.stateless_every == workload.stateless_every - 1;
    let mut event = Event {
        stream_id: stream.to_owned(),
        sequence: seq,
        operation: if stateless { "echo" } else { "async-echo" }.to_owned(),
        payload: format!("{stream}:{seq}").into_bytes().into(),
        ..Default::default()
    };
    if !stateless {
        event.attributes.insert(ordo_core::latency::ATTRIBUTE.to_owned(), workload.latency.clone());
    }
    event.set_mode(OrderingMode::Ordered);
    event
}

/// Whether a rejection is worth resending (the service may take it later).
fn transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unavailable | ResourceExhausted | Aborted | DeadlineExceeded | OutOfRange | Cancelled)
}

/// What one group saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupOutcome {
    pub streams: usize,
    pub events: usize,
    /// Events with a result (OK, FAILED or GAP).
    pub delivered: usize,
    /// Events without a result at the end (never answered, or given up).
    pub lost: usize,
    /// Results of an event that already had one.
    pub duplicated: usize,
    /// Results that were not their stream's next sequence.
    pub reordered: usize,
    pub wrong_payload: usize,
    /// Results for a stream or sequence this group never sent.
    pub foreign: usize,
    pub failed: usize,
    pub gap: usize,
    pub processing: usize,
    /// REJECTED results by gRPC code name.
    pub rejected: BTreeMap<String, usize>,
    /// Events given up after a permanent rejection or too many resends.
    pub given_up: usize,
    /// `Process` calls opened (1 when nothing broke).
    pub calls_opened: usize,
    /// Calls that failed, by gRPC code name (`ended-early` when the
    /// harmonizer ended a call that still owed results).
    pub breaks: BTreeMap<String, usize>,
    /// Events sent again on a new call after a break.
    pub resent_after_break: usize,
    /// The last call did not end within the deadline (or results were still owed).
    pub hung: bool,
    /// How the last call ended: `ok`, a status, or `hung: …`.
    pub end: String,
    /// Up to 10 examples of what went wrong, for the report.
    pub examples: Vec<String>,
}

impl GroupOutcome {
    fn example(&mut self, text: String) {
        if self.examples.len() < 10 {
            self.examples.push(text);
        }
    }
}

struct StreamState {
    id: String,
    /// Per sequence: the status of its first result.
    delivered: Vec<Option<ResultStatus>>,
    sent_on_call: Vec<bool>,
    resends: Vec<u32>,
    given_up: Vec<bool>,
    next_expected: u64,
}

impl StreamState {
    fn settled(&self, seq: usize) -> bool {
        self.delivered[seq].is_some() || self.given_up[seq]
    }
}

/// One open call: events go in through `tx`, results come out of `rx`.
struct Call {
    tx: Option<mpsc::UnboundedSender<Event>>,
    rx: mpsc::UnboundedReceiver<Result<EventResult, tonic::Status>>,
    task: JoinHandle<()>,
}

impl Call {
    /// Opens the call on its own task, so a harmonizer that does not answer
    /// (frozen) never blocks the client loop.
    fn open(client: &HarmonizerClient<Channel>) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let client = client.clone().max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (rx, task) = integration_tests::client::spawn_process(client, UnboundedReceiverStream::new(events));
        Self { tx: Some(tx), rx, task }
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            // A closed channel means the call task ended; its end arrives on `rx`.
            let _ = tx.send(event);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Shared between the runner and the groups of one run.
#[derive(Debug, Clone)]
pub struct RunSignals {
    /// Results delivered so far, all groups (the runner injects the fault
    /// once enough arrived).
    pub delivered: Arc<AtomicUsize>,
    /// Bumped to make every group drop its call and reconnect (the
    /// client-side fault).
    pub drop_calls: watch::Receiver<u64>,
}

/// Drives `streams` through `Process` calls until every event has its
/// result and the last call ended, or until the deadline.
pub async fn run_group(
    client: HarmonizerClient<Channel>,
    streams: Vec<String>,
    workload: Arc<Workload>,
    signals: RunSignals,
) -> GroupOutcome {
    let n = workload.events_per_stream as usize;
    let mut state: Vec<StreamState> = streams
        .iter()
        .map(|id| StreamState {
            id: id.clone(),
            delivered: vec![None; n],
            sent_on_call: vec![false; n],
            resends: vec![0; n],
            given_up: vec![false; n],
            next_expected: 0,
        })
        .collect();
    let index: HashMap<String, usize> = streams.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect();
    let total = streams.len() * n;
    let mut out = GroupOutcome { streams: streams.len(), events: total, ..GroupOutcome::default() };
    let start = Instant::now();
    let feed_time = workload.pace * u32::try_from(total).unwrap_or(u32::MAX);
    let deadline = start + feed_time + workload.settle;
    let mut drop_calls = signals.drop_calls.clone();
    drop_calls.mark_unchanged();

    // Events become due in round-robin order over the streams: index k is
    // stream k % s, sequence k / s.
    let due_event = |k: usize| (k % streams.len(), (k / streams.len()) as u64);
    let mut fed = 0usize;
    let mut ticker = tokio::time::interval(workload.pace);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut retry: VecDeque<(Instant, usize, u64)> = VecDeque::new();
    let mut call: Option<Call> = None;
    let mut half_closed_at: Option<Instant> = None;
    let mut opened_once = false;
    let mut settled = 0usize;

    loop {
        let now = Instant::now();
        if now >= deadline {
            out.hung = true;
            out.end = format!(
                "hung: {} of {total} events settled after {:.1}s, call {}",
                settled,
                (now - start).as_secs_f64(),
                if call.is_some() { "still open" } else { "not open" }
            );
            break;
        }
        if let Some(at) = half_closed_at
            && now >= at + workload.call_end
        {
            out.hung = true;
            out.end = format!("hung: the call did not end within {:?} after the half-close", workload.call_end);
            break;
        }
        if call.is_none() {
            let fresh = Call::open(&client);
            out.calls_opened += 1;
            // Resend everything due without a result, per stream in order.
            let mut resent = 0;
            for k in 0..fed {
                let (s, seq) = due_event(k);
                let st = &mut state[s];
                st.sent_on_call[seq as usize] = false;
                if !st.settled(seq as usize) {
                    fresh.send(make_event(&workload, &st.id, seq));
                    st.sent_on_call[seq as usize] = true;
                    resent += 1;
                }
            }
            if opened_once {
                out.resent_after_break += resent;
            }
            opened_once = true;
            retry.clear();
            call = Some(fresh);
        }
        let Some(current) = call.as_mut() else { continue };
        let next_retry = retry.front().map(|(at, _, _)| *at);
        tokio::select! {
            _ = ticker.tick(), if fed < total => {
                let (s, seq) = due_event(fed);
                fed += 1;
                if half_closed_at.is_none() {
                    current.send(make_event(&workload, &state[s].id, seq));
                    state[s].sent_on_call[seq as usize] = true;
                }
            }
            _ = sleep_until(next_retry.unwrap_or(deadline)), if next_retry.is_some() => {
                if let Some((_, s, seq)) = retry.pop_front() {
                    let st = &mut state[s];
                    if !st.settled(seq as usize) {
                        current.send(make_event(&workload, &st.id, seq));
                        st.sent_on_call[seq as usize] = true;
                    }
                }
            }
            changed = drop_calls.changed() => {
                if changed.is_ok() {
                    *out.breaks.entry("dropped-by-client".into()).or_default() += 1;
                    call = None;
                    half_closed_at = None;
                }
            }
            _ = sleep_until(deadline) => {}
            message = current.rx.recv() => match message {
                Some(Ok(result)) => {
                    backoff.reset();
                    let newly = handle_result(&mut state, &index, &mut retry, &mut out, result);
                    settled += newly;
                    signals.delivered.fetch_add(newly, Ordering::Relaxed);
                }
                Some(Err(status)) => {
                    if half_closed_at.is_some() {
                        out.end = format!("{:?} after every result", status.code());
                        break;
                    }
                    *out.breaks.entry(format!("{:?}", status.code())).or_default() += 1;
                    out.example(format!("call broke: {:?} {}", status.code(), status.message()));
                    call = None;
                    half_closed_at = None;
                    backoff.wait().await;
                }
                None => {
                    if half_closed_at.is_some() {
                        out.end = "ok".into();
                        break;
                    }
                    *out.breaks.entry("ended-early".into()).or_default() += 1;
                    out.example(format!("the harmonizer ended the call with {} of {total} settled", settled));
                    call = None;
                    half_closed_at = None;
                    backoff.wait().await;
                }
            },
        }
        // Given-up events count as settled for the half-close (the call is
        // only half-closed once everything is, so its end is never early).
        if fed == total
            && half_closed_at.is_none()
            && state.iter().all(|s| (0..n).all(|q| s.settled(q)))
            && let Some(current) = call.as_mut()
        {
            current.tx = None;
            half_closed_at = Some(Instant::now());
        }
    }
    out.given_up = state.iter().map(|s| s.given_up.iter().filter(|g| **g).count()).sum();

    for st in &state {
        for seq in 0..n {
            match st.delivered[seq] {
                Some(_) => out.delivered += 1,
                None => {
                    out.lost += 1;
                    if out.lost <= 3 {
                        let why = if st.given_up[seq] { "given up after rejections" } else { "no result" };
                        out.example(format!("lost {}#{seq}: {why}", st.id));
                    }
                }
            }
        }
    }
    out
}

/// Books one received result; returns how many events it settled (0 or 1).
fn handle_result(
    state: &mut [StreamState],
    index: &HashMap<String, usize>,
    retry: &mut VecDeque<(Instant, usize, u64)>,
    out: &mut GroupOutcome,
    result: EventResult,
) -> usize {
    let Some(&s) = index.get(&result.stream_id) else {
        out.foreign += 1;
        out.example(format!("result for unknown stream {:?}", result.stream_id));
        return 0;
    };
    let st = &mut state[s];
    let seq = result.sequence;
    let Some(slot) = usize::try_from(seq).ok().filter(|&q| q < st.delivered.len()) else {
        out.foreign += 1;
        out.example(format!("result for unsent sequence {}#{seq}", st.id));
        return 0;
    };
    let status = result.status();
    match status {
        ResultStatus::Processing => {
            out.processing += 1;
            0
        }
        ResultStatus::Rejected => {
            let code = tonic::Code::from_i32(result.code);
            *out.rejected.entry(format!("{code:?}")).or_default() += 1;
            st.sent_on_call[slot] = false;
            if st.settled(slot) {
                return 0;
            }
            if transient(code) && st.resends[slot] < MAX_RESENDS {
                st.resends[slot] += 1;
                retry.push_back((Instant::now() + RESEND_PAUSE, s, seq));
                0
            } else {
                st.given_up[slot] = true;
                out.example(format!("gave up {}#{seq}: REJECTED {code:?} {}", st.id, result.error));
                0
            }
        }
        _ => {
            if st.delivered[slot].is_some() {
                out.duplicated += 1;
                out.example(format!(
                    "duplicate {}#{seq} ({:?}, first {:?})",
                    st.id,
                    status,
                    st.delivered[slot].unwrap_or(ResultStatus::Unspecified)
                ));
                return 0;
            }
            if seq != st.next_expected {
                out.reordered += 1;
                let call = out.calls_opened;
                out.example(format!(
                    "reordered: {}#{seq} arrived when #{} was next (call {call})",
                    st.id, st.next_expected
                ));
            }
            st.next_expected = st.next_expected.max(seq + 1);
            st.delivered[slot] = Some(status);
            match status {
                ResultStatus::Ok if result.payload.as_ref() != format!("{}:{seq}", st.id).as_bytes() => {
                    out.wrong_payload += 1;
                    out.example(format!(
                        "wrong payload {}#{seq}: {:?}",
                        st.id,
                        String::from_utf8_lossy(&result.payload)
                    ));
                }
                ResultStatus::Failed => out.failed += 1,
                ResultStatus::Gap => out.gap += 1,
                _ => {}
            }
            // A given-up event that got a result after all is no longer given up.
            st.given_up[slot] = false;
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(n: usize) -> (Vec<StreamState>, HashMap<String, usize>) {
        let st = StreamState {
            id: "s".into(),
            delivered: vec![None; n],
            sent_on_call: vec![true; n],
            resends: vec![0; n],
            given_up: vec![false; n],
            next_expected: 0,
        };
        (vec![st], HashMap::from([("s".to_owned(), 0)]))
    }

    fn result(seq: u64, status: ResultStatus, code: tonic::Code) -> EventResult {
        EventResult {
            stream_id: "s".into(),
            sequence: seq,
            status: status as i32,
            payload: format!("s:{seq}").into_bytes().into(),
            code: code as i32,
            ..Default::default()
        }
    }

    #[test]
    fn counts_duplicates_reorders_and_wrong_payloads() {
        let (mut state, index) = states(4);
        let mut retry = VecDeque::new();
        let mut out = GroupOutcome::default();
        let ok = |seq| result(seq, ResultStatus::Ok, tonic::Code::Ok);
        for r in [ok(0), ok(2), ok(1), ok(2)] {
            handle_result(&mut state, &index, &mut retry, &mut out, r);
        }
        let mut wrong = ok(3);
        wrong.payload = b"other".to_vec().into();
        handle_result(&mut state, &index, &mut retry, &mut out, wrong);
        assert_eq!((out.duplicated, out.reordered, out.wrong_payload), (1, 2, 1), "{out:?}");
        let mut foreign = ok(0);
        foreign.stream_id = "t".into();
        handle_result(&mut state, &index, &mut retry, &mut out, foreign);
        handle_result(&mut state, &index, &mut retry, &mut out, ok(9));
        assert_eq!(out.foreign, 2);
    }

    #[test]
    fn transient_rejections_are_resent_and_permanent_ones_given_up() {
        let (mut state, index) = states(2);
        let mut retry = VecDeque::new();
        let mut out = GroupOutcome::default();
        let settled = handle_result(
            &mut state,
            &index,
            &mut retry,
            &mut out,
            result(0, ResultStatus::Rejected, tonic::Code::Unavailable),
        );
        assert_eq!((settled, retry.len()), (0, 1));
        assert!(!state[0].settled(0));
        handle_result(
            &mut state,
            &index,
            &mut retry,
            &mut out,
            result(1, ResultStatus::Rejected, tonic::Code::InvalidArgument),
        );
        assert!(state[0].given_up[1] && state[0].settled(1));
        assert_eq!(out.rejected.values().sum::<usize>(), 2);
        assert_eq!(
            handle_result(&mut state, &index, &mut retry, &mut out, result(0, ResultStatus::Ok, tonic::Code::Ok)),
            1
        );
    }
}
