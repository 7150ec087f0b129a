//! Several harmonizers sharing the workers, stateless, reassembler,
//! push-gateway and Redis, as behind a client-side balancer: a stream's
//! events arrive through different harmonizers (moved mid-flight, spread
//! event by event, one harmonizer SIGKILLed and its unacknowledged events
//! resent to the other), and the same `Submit` lands on both at once.
//!
//! What each call must deliver (README "The client's contract under
//! faults", several harmonizers): a call answers the events *it* accepted,
//! each once, in sequence order per stream; a sequence sent on two calls is
//! answered on both, with the one stored result. The release log (read
//! through the push-gateway's Subscribe) holds every sequence exactly once,
//! in order, and never a GAP for an event some harmonizer was working on.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, by_stream, check_all_ok, check_in_order_exactly_once, event, with_attr, with_mode},
    redis_acl::AclUser,
};
use ordo_proto::v1::{Event, EventResult, OrderingMode, ResultStatus};

use crate::{DEADLINE, assert_ok, check_numbered_payloads, push};

/// Event `sequence` of `stream` (async-echo, payload `"<stream>:<seq>"`)
/// with a latency and a gap timeout.
fn numbered(stream: &str, sequence: u64, latency: &str, gap_timeout: &str) -> Event {
    let e = event(stream, sequence, "async-echo", format!("{stream}:{sequence}").into_bytes());
    with_mode(with_attr(with_attr(e, "latency", latency), "gap-timeout", gap_timeout), OrderingMode::Ordered)
}

/// `Ok` when `results` (one call's, any streams) answer exactly `expected`
/// (stream → sequences sent on the call), each once, per stream in
/// increasing sequence order.
fn check_call(results: &[EventResult], expected: &BTreeMap<String, BTreeSet<u64>>) -> Result<(), String> {
    let grouped = by_stream(results);
    let mut problems = Vec::new();
    for (stream, got) in &grouped {
        let sequences: Vec<u64> = got.iter().map(|r| r.sequence).collect();
        if sequences.windows(2).any(|w| w[0] >= w[1]) {
            problems.push(format!("{stream}: not in increasing order or repeated: {sequences:?}"));
        }
        let want = expected.get(stream).cloned().unwrap_or_default();
        let have: BTreeSet<u64> = sequences.iter().copied().collect();
        if have != want {
            let missing: Vec<_> = want.difference(&have).take(10).collect();
            let extra: Vec<_> = have.difference(&want).take(10).collect();
            problems.push(format!("{stream}: missing {missing:?}, not sent on this call {extra:?}"));
        }
    }
    for stream in expected.keys().filter(|s| !grouped.contains_key(*s)) {
        problems.push(format!("{stream}: no result at all"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

/// Reads `n` results of `stream` from the start of its release log (gRPC
/// Subscribe) and checks them: sequences 0..n in order, each once, all OK,
/// each the numbered event's result; then that nothing else is released.
async fn check_release_log(cluster: &Cluster, stream: &str, n: u64) {
    let mut subscribed = push::subscribe(cluster, stream, 0).await.expect("Subscribe opens");
    let released = push::receive(&mut subscribed, n as usize, DEADLINE).await;
    assert_ok(check_in_order_exactly_once(&released, n), &format!("{stream}: the release log"));
    assert_ok(check_all_ok(&released).and_then(|()| check_numbered_payloads(&released)), stream);
    let positions: Vec<u64> = released.iter().map(|r| r.position).collect();
    assert_eq!(positions, (0..n).collect::<Vec<_>>(), "{stream}: positions are the sequences (ORDERED)");
    if let Ok(Ok(Some(more))) = tokio::time::timeout(LINGER, subscribed.message()).await {
        panic!("{stream}: released beyond its {n} events: #{} {:?}", more.sequence, more.status());
    }
    let letters = cluster.dead_letters(stream).await.expect("dead letters are listed");
    assert!(letters.is_empty(), "{stream}: no GAP or FAILED was recorded: {letters:?}");
}

/// The in-flight claims of stream `moved` (harmonizer `claims.rs`).
const CLAIMS: &str = "ordo:{moved}:claims";

/// Moves stream `moved` between harmonizers mid-flight: sequences 0..20 go
/// to H1 (0..10 slow, 10..20 slower), then, while all of them are still
/// running, the client moves to H2 with 20..40 and resends 0..10
/// (unacknowledged). H2's call then has a hole at 10..20 that outlasts the
/// stream's gap timeout (1 s) while H1 works on it. Returns both calls'
/// results once H1's call answered 0..20 and H2's `h2_answers`, each once,
/// in order.
async fn move_stream_mid_flight(cluster: &Cluster, h2_answers: BTreeSet<u64>) -> (Vec<EventResult>, Vec<EventResult>) {
    const N: u64 = 40;
    const GAP: &str = "1s";
    let stream = "moved";
    let first_half = |q: u64| numbered(stream, q, if q < 10 { "fixed:1500ms" } else { "fixed:4s" }, GAP);

    let mut h1 = ProcessCall::open(&cluster.harmonizer_at(0));
    h1.feed((0..N / 2).map(first_half).collect(), None);
    // Long enough for H1 to accept (and claim) them; far from done.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(h1.fed() && h1.received().is_empty(), "H1's events are still in flight when the stream moves");

    let mut h2 = ProcessCall::open(&cluster.harmonizer_at(1));
    let mut moved: Vec<Event> = (N / 2..N).map(|q| numbered(stream, q, "fixed:20ms", GAP)).collect();
    moved.extend((0..10).map(first_half));
    h2.feed(moved, None);

    let answers = |n: usize| BTreeMap::from([(stream.to_owned(), n)]);
    h1.wait_for_counts(&answers(N as usize / 2), DEADLINE).await.expect("H1's call answers what it accepted");
    h2.wait_for_counts(&answers(h2_answers.len()), DEADLINE).await.expect("H2's call answers what it accepted");
    let on_h1 = h1.finish(LINGER).await.expect("H1's call ends cleanly");
    let on_h2 = h2.finish(LINGER).await.expect("H2's call ends cleanly");
    let sent_h1 = BTreeMap::from([(stream.to_owned(), (0..N / 2).collect())]);
    assert_ok(check_call(&on_h1, &sent_h1), "H1's call answers 0..20, once each, in order");
    assert_ok(check_call(&on_h2, &BTreeMap::from([(stream.to_owned(), h2_answers)])), "H2's call, once each, in order");
    (on_h1, on_h2)
}

/// [`move_stream_mid_flight`] with the default in-flight claims: H1's claims
/// hold H2's gap until H1's events are done; no GAP, every result OK on
/// the calls that sent it, the release log 0..40 once each, in order. Run
/// as the documented Redis ACL user: claims stay within its rule.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_moved_between_harmonizers_mid_flight_keeps_order_and_exactly_once() {
    let user = AclUser::ordo();
    let cluster = Cluster::builder().harmonizers(2).workers(2).redis_user(user.clone()).start().await;
    let admin = redis::Client::open(user.admin_url(&cluster.redis_url())).expect("admin URL");
    let mut admin = admin.get_multiplexed_async_connection().await.expect("admin connects");
    // How many of the stream's events were claimed at most, while it ran.
    let watcher = tokio::spawn({
        let mut admin = admin.clone();
        async move {
            let mut most = 0u64;
            for _ in 0..30 {
                let now: u64 = redis::cmd("HLEN").arg(CLAIMS).query_async(&mut admin).await.unwrap_or(0);
                most = most.max(now);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        }
    });
    // H2's call answers what it was sent: the resent 0..10 and 20..40.
    let (on_h1, on_h2) = move_stream_mid_flight(&cluster, (0..10).chain(20..40).collect()).await;
    assert_ok(check_all_ok(&on_h1).and_then(|()| check_numbered_payloads(&on_h1)), "H1's call");
    assert_ok(check_all_ok(&on_h2).and_then(|()| check_numbered_payloads(&on_h2)), "H2's call");
    check_release_log(&cluster, "moved", 40).await;
    let most = watcher.await.expect("the claim watcher");
    assert!(most >= 10, "H1's slow events 10..20 were claimed while they ran (at most {most} claims seen)");
    let denials: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut admin).await.expect("ACL LOG");
    assert!(denials.is_empty(), "Redis denied a harmonizer something: {denials:?}");
    // Settled events' claims are removed (within a claim period).
    hash_fields_become(&admin, CLAIMS, 0, Duration::from_secs(5)).await;
}

/// Waits until hash `key` has `n` fields, for at most `within`.
async fn hash_fields_become<C>(conn: &C, key: &str, n: u64, within: Duration)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync,
{
    integration_tests::eventually(within, || {
        let mut conn = conn.clone();
        async move {
            let got: u64 = redis::cmd("HLEN").arg(key).query_async(&mut conn).await?;
            if got == n { Ok(()) } else { Err(anyhow::anyhow!("{key}: {got} fields, want {n}")) }
        }
    })
    .await;
}

/// The harmonizers present on the cluster's Redis (harmonizer `claims.rs`).
const PRESENCE: &str = "ordo:{harmonizers}:presence";

/// Claims cost nothing while a harmonizer is alone: with H2 stopped
/// (drained, so its presence is gone), H1 holds slow events well past
/// `--claim-after` and writes no claim. H2 comes back: H1 claims what it
/// holds within a claim period, and H2's call, with a hole over H1's
/// events that outlasts its gap timeout, waits for them (no GAP): the
/// release log holds 0..30 once each, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_harmonizer_alone_writes_no_claims_until_another_joins() {
    let stream = "moved";
    let mut cluster = Cluster::builder().harmonizers(2).workers(2).start().await;
    let mut admin = cluster.redis_conn().expect("Redis connection");
    hash_fields_become(&admin, PRESENCE, 2, Duration::from_secs(5)).await;
    cluster.harmonizer_process_at(1).terminate(DEADLINE).await.expect("H2 drains and stops");
    hash_fields_become(&admin, PRESENCE, 1, Duration::from_secs(5)).await;

    let mut h1 = ProcessCall::open(&cluster.harmonizer_at(0));
    h1.feed((0..10).map(|q| numbered(stream, q, "fixed:4s", "1s")).collect(), None);
    // Well past --claim-after (200 ms) and a claim period (100 ms): alone, nothing is claimed.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let claims: u64 = redis::cmd("HLEN").arg(CLAIMS).query_async(&mut admin).await.expect("HLEN");
        assert_eq!(claims, 0, "a harmonizer alone on its Redis writes no claims");
    }
    assert!(h1.fed() && h1.received().is_empty(), "H1's events are still in flight");

    cluster.harmonizer_process_at(1).restart(DEADLINE).await.expect("H2 restarts on its port");
    // H1 sees H2 within a claim period and claims the 10 events it holds.
    hash_fields_become(&admin, CLAIMS, 10, Duration::from_secs(2)).await;
    let mut h2 = ProcessCall::open(&cluster.harmonizer_at(1));
    h2.feed((10..30).map(|q| numbered(stream, q, "fixed:20ms", "1s")).collect(), None);
    let answers = |n: usize| BTreeMap::from([(stream.to_owned(), n)]);
    h1.wait_for_counts(&answers(10), DEADLINE).await.expect("H1's call answers what it accepted");
    h2.wait_for_counts(&answers(20), DEADLINE).await.expect("H2's call answers what it accepted");
    let on_h1 = h1.finish(LINGER).await.expect("H1's call ends cleanly");
    let on_h2 = h2.finish(LINGER).await.expect("H2's call ends cleanly");
    assert_ok(check_call(&on_h1, &BTreeMap::from([(stream.to_owned(), (0..10).collect())])), "H1's call");
    assert_ok(check_call(&on_h2, &BTreeMap::from([(stream.to_owned(), (10..30).collect())])), "H2's call");
    assert_ok(check_all_ok(&on_h1).and_then(|()| check_all_ok(&on_h2)), "no GAP over H1's events");
    check_release_log(&cluster, stream, 30).await;
}

/// The limit `--claim-after off` documents, shown: without claims H2 cannot
/// see H1's events, declares 10..20 a gap after 1 s and releases GAP in
/// their place while H1 still runs them; H1's call then refuses its own
/// accepted events 10..20 (FAILED_PRECONDITION). Still no loss of order or
/// duplicate: the release log holds 0..40 once each, in order, 10..20 as GAP.
#[tokio::test(flavor = "multi_thread")]
async fn without_claims_a_harmonizer_releases_gap_over_events_another_one_runs() {
    let cluster = Cluster::builder().harmonizers(2).workers(2).harmonizer_args(["--claim-after", "off"]).start().await;
    // H2's call also forwards the GAP results it declared (its client sees every position).
    let (on_h1, on_h2) = move_stream_mid_flight(&cluster, (0..40).collect()).await;
    let refused: Vec<u64> = on_h1
        .iter()
        .filter(|r| r.status() == ResultStatus::Rejected && r.code == tonic::Code::FailedPrecondition as i32)
        .map(|r| r.sequence)
        .collect();
    assert_eq!(refused, (10..20).collect::<Vec<_>>(), "H1's call: its own events 10..20 were settled as a gap");
    let not_gap: Vec<EventResult> = on_h2.iter().filter(|r| !(10..20).contains(&r.sequence)).cloned().collect();
    assert_ok(check_all_ok(&not_gap).and_then(|()| check_numbered_payloads(&not_gap)), "H2's call (0..10, 20..40)");
    assert!(
        on_h2.iter().filter(|r| (10..20).contains(&r.sequence)).all(|r| r.status() == ResultStatus::Gap),
        "H2's call forwards the GAP results it declared"
    );
    let mut subscribed = push::subscribe(&cluster, "moved", 0).await.expect("Subscribe opens");
    let released = push::receive(&mut subscribed, 40, DEADLINE).await;
    assert_ok(check_in_order_exactly_once(&released, 40), "the release log");
    let gaps: Vec<u64> = released.iter().filter(|r| r.status() == ResultStatus::Gap).map(|r| r.sequence).collect();
    assert_eq!(gaps, (10..20).collect::<Vec<_>>(), "GAP was released for the events H1 was running");
}

/// What the client sent on each call and what came back: a call's results
/// answer what was sent on it.
#[derive(Default)]
struct Ledger {
    sent: BTreeMap<String, BTreeSet<u64>>,
}

impl Ledger {
    fn record(&mut self, event: &Event) {
        self.sent.entry(event.stream_id.clone()).or_default().insert(event.sequence);
    }

    /// Sent on the call but not answered on it (a REJECTED or GAP answer
    /// counts as unanswered: the test expects none).
    fn unacknowledged(&self, results: &[EventResult]) -> Vec<(String, u64)> {
        let answered: BTreeSet<(&str, u64)> = results
            .iter()
            .filter(|r| r.status() == ResultStatus::Ok)
            .map(|r| (r.stream_id.as_str(), r.sequence))
            .collect();
        self.sent
            .iter()
            .flat_map(|(s, qs)| qs.iter().map(move |&q| (s.clone(), q)))
            .filter(|(s, q)| !answered.contains(&(s.as_str(), *q)))
            .collect()
    }
}

/// A balancer spreading every stream over both harmonizers at once (even
/// sequences to H1's call, odd ones to H2's), many streams concurrently;
/// H1 is SIGKILLed mid-stream; the client resends what H1's call left
/// unanswered to H2 on a new call, and sends the rest to H2; then H1 is
/// restarted and answers a late resend from the log. Every call answers
/// what it was sent, in order; the release logs hold every sequence
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn calls_spread_over_two_harmonizers_survive_one_sigkilled() {
    const STREAMS: usize = 12;
    const N: u64 = 60;
    let mut cluster = Cluster::builder().harmonizers(2).workers(2).start().await;
    let streams: Vec<String> = (0..STREAMS).map(|i| format!("spread-{i}")).collect();
    let all: Vec<Event> = crate::interleave(
        streams.iter().map(|s| (0..N).map(|q| numbered(s, q, "exp:30ms", "10s")).collect()).collect(),
    );

    let a = ProcessCall::open(&cluster.harmonizer_at(0));
    let mut b = ProcessCall::open(&cluster.harmonizer_at(1));
    let (mut sent_a, mut sent_b) = (Ledger::default(), Ledger::default());
    let kill_at = all.len() / 3;
    let mut rest = all.into_iter();
    for e in rest.by_ref().take(kill_at) {
        let (call, ledger) = if e.sequence % 2 == 0 { (&a, &mut sent_a) } else { (&b, &mut sent_b) };
        ledger.record(&e);
        call.send(e).await.expect("both calls take events");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut a = a;
    cluster.harmonizer_process_at(0).kill();
    // H1's call breaks; what it answered before is all it will answer.
    let ended = a.wait_until(DEADLINE, |_| false).await.expect_err("the call to a killed harmonizer ends");
    eprintln!("H1 killed after {kill_at} events sent; its call: {ended:#}");
    let on_a = a.received().to_vec();
    let unacked = sent_a.unacknowledged(&on_a);
    assert!(!unacked.is_empty(), "H1 was killed while it held events; the test would prove nothing");
    eprintln!("{} of H1's events unanswered; resending them to H2", unacked.len());

    // Reconnect: a new call on H2 with H1's unanswered events, in order.
    let mut c = ProcessCall::open(&cluster.harmonizer_at(1));
    let mut sent_c = Ledger::default();
    let by_seq: BTreeMap<(String, u64), ()> = unacked.into_iter().map(|k| (k, ())).collect();
    for (stream, sequence) in by_seq.keys() {
        let e = numbered(stream, *sequence, "exp:30ms", "10s");
        sent_c.record(&e);
        c.send(e).await.expect("the new call takes the resends");
    }
    // The balancer has only H2 left: the rest of every stream goes to H2's first call.
    for e in rest {
        sent_b.record(&e);
        b.send(e).await.expect("H2's call takes the rest");
    }

    let counts = |ledger: &Ledger| ledger.sent.iter().map(|(s, qs)| (s.clone(), qs.len())).collect();
    b.wait_for_counts(&counts(&sent_b), DEADLINE).await.expect("H2's first call answers all it was sent");
    c.wait_for_counts(&counts(&sent_c), DEADLINE).await.expect("the resend call answers all it was sent");
    let on_b = b.finish(LINGER).await.expect("H2's first call ends cleanly");
    let on_c = c.finish(LINGER).await.expect("the resend call ends cleanly");

    for (name, results) in [("H1's call", &on_a), ("H2's first call", &on_b), ("the resend call", &on_c)] {
        assert_ok(check_all_ok(results).and_then(|()| check_numbered_payloads(results)), name);
    }
    // H1's call answered a prefix-free subset of what it was sent, in order, once each.
    let answered_a: BTreeMap<String, BTreeSet<u64>> =
        by_stream(&on_a).into_iter().map(|(s, rs)| (s, rs.iter().map(|r| r.sequence).collect())).collect();
    assert_ok(check_call(&on_a, &answered_a), "H1's call, before the kill");
    assert!(
        answered_a.iter().all(|(s, qs)| sent_a.sent.get(s).is_some_and(|sent| qs.is_subset(sent))),
        "H1's call answered only what it was sent"
    );
    assert_ok(check_call(&on_b, &sent_b.sent), "H2's first call");
    assert_ok(check_call(&on_c, &sent_c.sent), "the resend call");

    // H1 comes back on its port; a late resend of released sequences through
    // it is answered from the release log, once each, and appends nothing.
    cluster.harmonizer_process_at(0).restart(DEADLINE).await.expect("H1 restarts on its port");
    let late: Vec<Event> = (0..5).map(|q| numbered(&streams[0], q, "exp:30ms", "10s")).collect();
    let mut d = ProcessCall::open(&cluster.harmonizer_at(0));
    d.feed(late, None);
    d.wait_for_counts(&BTreeMap::from([(streams[0].clone(), 5)]), DEADLINE).await.expect("the restarted H1 answers");
    let on_d = d.finish(LINGER).await.expect("the late call ends cleanly");
    assert_ok(check_all_ok(&on_d).and_then(|()| check_numbered_payloads(&on_d)), "the late resend call");
    assert_ok(check_call(&on_d, &BTreeMap::from([(streams[0].clone(), (0..5).collect())])), "the late resend call");

    for stream in &streams {
        check_release_log(&cluster, stream, N).await;
    }
}

/// The same (stream, sequence) submitted on both harmonizers at once, with
/// different payloads: both answers are the one stored result (whichever
/// was stored first), stateful and stateless alike, and the release log
/// holds it once.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_submit_on_two_harmonizers_returns_the_one_stored_result() {
    const N: u64 = 8;
    let cluster = Cluster::builder().harmonizers(2).harmonizer_args(["--unary-threshold", "10s"]).start().await;
    for (stream, operation) in [("submitted-stateful", "async-echo"), ("submitted-stateless", "upper")] {
        for q in 0..N {
            let on = |h: &str| {
                let e = event(stream, q, operation, format!("{h}:{q}").into_bytes());
                with_mode(with_attr(e, "latency", "exp:20ms"), OrderingMode::Ordered)
            };
            let (mut h1, mut h2) = (cluster.harmonizer_at(0), cluster.harmonizer_at(1));
            let (first, second) = tokio::join!(h1.submit(on("h1")), h2.submit(on("h2")));
            let first = first.expect("H1 answers the Submit").into_inner();
            let second = second.expect("H2 answers the Submit").into_inner();
            assert_eq!(first.status(), ResultStatus::Ok, "{stream}#{q} on H1: {first:?}");
            assert_eq!(first.payload, second.payload, "{stream}#{q}: both harmonizers answer the stored result");
            let candidates = [format!("h1:{q}"), format!("h2:{q}")].map(|p| match operation {
                "upper" => p.to_uppercase(),
                _ => p,
            });
            assert!(
                candidates.iter().any(|p| p.as_bytes() == first.payload.as_ref()),
                "{stream}#{q}: the answer is one of the two events' results: {:?}",
                String::from_utf8_lossy(&first.payload)
            );
        }
        let mut subscribed = push::subscribe(&cluster, stream, 0).await.expect("Subscribe opens");
        let released = push::receive(&mut subscribed, N as usize, DEADLINE).await;
        assert_ok(check_in_order_exactly_once(&released, N), &format!("{stream}: the release log"));
        if let Ok(Ok(Some(more))) = tokio::time::timeout(LINGER, subscribed.message()).await {
            panic!("{stream}: released twice or more: #{}", more.sequence);
        }
        // The stored result is what both Submits answered: ask once more on each.
        for q in 0..N {
            let again = |h: &str| event(stream, q, operation, format!("{h}-again").into_bytes());
            let one = cluster.harmonizer_at(0).submit(again("x")).await.expect("a repeat is answered").into_inner();
            let two = cluster.harmonizer_at(1).submit(again("y")).await.expect("a repeat is answered").into_inner();
            let logged = released.iter().find(|r| r.sequence == q).map(|r| r.payload.clone());
            assert_eq!(Some(one.payload.clone()), logged, "{stream}#{q}: H1 repeats the released result");
            assert_eq!(one.payload, two.payload, "{stream}#{q}: H2 repeats the released result");
        }
    }
}
