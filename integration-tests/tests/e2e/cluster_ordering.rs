//! The whole suite (harmonizer, stateless, workers, reassembler,
//! push-gateway) on a private Redis Cluster (3 masters, 1 replica each;
//! `ClusterBuilder::redis_cluster`):
//!
//! - ORDERED and UNORDERED streams spread over every master, some events
//!   sent twice, while one master is failed over (`CLUSTER FAILOVER`) and
//!   another SIGKILLed (its replica promoted, the node restarted as a
//!   replica) mid-stream: on the Process call and in each stream's release
//!   log, 0 lost, 0 duplicated, 0 reordered;
//! - the registry published and followed on the cluster;
//! - `ordo dlq` listing and showing the dead letters of every slot's log;
//! - two harmonizers: a stream moved between them mid-flight keeps its
//!   order, and the first harmonizer's claims (in the stream's slot) hold
//!   the second's gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall,
    cli::{ordo, stderr, stdout},
    client::{
        LINGER, by_stream, check_all_ok, check_exactly_once, check_in_order_exactly_once, event, with_attr, with_mode,
    },
};
use ordo_core::keys;
use ordo_proto::v1::{Completed, DeadLetter, DeliverBatch, Event, EventResult, OrderingMode, ResultStatus};
use prost::Message as _;

use crate::{DEADLINE, assert_ok, check_numbered_payloads};

/// `n` stream ids `prefix-<i>` whose slots are served by every master of a
/// fresh cluster (slots 0-5460, 5461-10922, 10923-16383), `per_third` of
/// each third.
fn streams_over_every_master(prefix: &str, per_third: usize) -> Vec<String> {
    let mut count = [0usize; 3];
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|s| {
            let third = usize::from(keys::stream_slot(s)) * 3 / usize::from(keys::SLOTS);
            count[third] += 1;
            count[third] <= per_third
        })
        .take(3 * per_third)
        .collect()
}

/// Event `sequence` of `stream` (async-echo, payload `"<stream>:<seq>"`,
/// `latency`) in `mode`.
fn numbered(stream: &str, sequence: u64, latency: &str, mode: OrderingMode) -> Event {
    let e = event(stream, sequence, "async-echo", format!("{stream}:{sequence}").into_bytes());
    with_mode(with_attr(e, "latency", latency), mode)
}

/// Every result in `stream`'s release log, in log order (read from Redis,
/// the cluster's master of the stream's slot).
async fn release_log(cluster: &Cluster, stream: &str) -> Vec<EventResult> {
    let conn = cluster.redis_conn().expect("the cluster's URL");
    let reply: redis::streams::StreamRangeReply = ordo_runtime::redis_conn::call(|| {
        let mut conn = conn.clone();
        async move { redis::cmd("XRANGE").arg(keys::log(stream)).arg("-").arg("+").query_async(&mut conn).await }
    })
    .await
    .expect("XRANGE of the release log");
    reply
        .ids
        .iter()
        .map(|entry| {
            let body: Vec<u8> = entry.get("r").expect("a release log entry holds its result");
            let result = EventResult::decode(body.as_slice()).expect("a decodable result");
            assert_eq!(keys::log_id(result.position), entry.id, "{stream}: entry id is the position");
            result
        })
        .collect()
}

/// Per stream of `modes`: the call's results and the release log hold each
/// of 0..n once, OK, its own payload; ORDERED in sequence order (positions
/// = sequences), UNORDERED at positions 0..n.
async fn check_streams(cluster: &Cluster, results: &[EventResult], modes: &BTreeMap<String, OrderingMode>, n: u64) {
    let grouped = by_stream(results);
    let mut problems = Vec::new();
    for (stream, mode) in modes {
        let on_call = grouped.get(stream).cloned().unwrap_or_default();
        let logged = release_log(cluster, stream).await;
        for (what, got) in [("call", &on_call), ("release log", &logged)] {
            let check = match mode {
                OrderingMode::Unordered => check_exactly_once(got, n),
                _ => check_in_order_exactly_once(got, n),
            };
            if let Err(e) = check.and_then(|()| check_all_ok(got)).and_then(|()| check_numbered_payloads(got)) {
                problems.push(format!("{stream} ({mode:?}) {what}: {e}"));
            }
        }
        let positions: Vec<u64> = logged.iter().map(|r| r.position).collect();
        if positions != (0..n).collect::<Vec<_>>() {
            problems.push(format!("{stream}: release positions are not 0..{n}: {positions:?}"));
        }
        if *mode == OrderingMode::Ordered && logged.iter().any(|r| r.position != r.sequence) {
            problems.push(format!("{stream}: an ORDERED position differs from its sequence"));
        }
    }
    if grouped.keys().any(|s| !modes.contains_key(s)) {
        problems.push(format!("results of streams not sent: {:?}", grouped.keys().collect::<Vec<_>>()));
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// Waits until node `replica` replicates node `master` (a restarted old
/// master rejoins as its successor's replica), so WAIT 1 on those slots can
/// succeed again; a cluster that does not get there fails here, not as a
/// hang of the results.
async fn wait_replica_of(cluster: &mut Cluster, replica: usize, master: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = cluster.redis_cluster().nodes().await.unwrap_or_default();
        let master_id = nodes.iter().find(|n| n.index == master).map(|n| n.id.clone());
        if master_id.is_some() && nodes.iter().any(|n| n.index == replica && n.master_id == master_id) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {replica} did not become a replica of node {master}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node index of the master of `stream`'s slot now.
async fn master_of(cluster: &mut Cluster, stream: &str) -> usize {
    cluster.redis_cluster().master_of(keys::stream_slot(stream)).await.expect("a master serves the slot")
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_ordered_and_unordered_streams_survive_a_failover_and_a_killed_master_with_duplicates() {
    failover_and_killed_master(&["--follow-releases", "push-gateway"], &[]).await;
}

/// The same faults with the harmonizer tailing the cluster's release
/// channels itself (`--follow-releases redis`): its own hub re-subscribes
/// the moved slots and catches up from the logs.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_and_a_killed_master_while_the_harmonizer_follows_redis_itself() {
    failover_and_killed_master(&["--follow-releases", "redis"], &[]).await;
}

/// The same faults with the workers and the harmonizer storing their
/// results themselves (`--store-results redis`, each script call waiting for
/// a replica as the reassembler's does) and the harmonizer following the
/// releases itself: no reassembler or push gateway in the results' path.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_and_a_killed_master_while_the_services_store_and_follow_redis_themselves() {
    failover_and_killed_master(
        &["--follow-releases", "redis", "--store-results", "redis"],
        &["--store-results", "redis"],
    )
    .await;
}

async fn failover_and_killed_master(harmonizer_args: &[&str], worker_args: &[&str]) {
    const N: u64 = 240;
    // Every script call waits for one replica: a killed master loses nothing acknowledged.
    let mut cluster = Cluster::builder()
        .redis_cluster_waiting_for_a_replica()
        .workers(2)
        .harmonizer_args(harmonizer_args.iter().copied())
        .worker_args(worker_args.iter().copied())
        .start()
        .await;
    let streams = streams_over_every_master("chaos", 2);
    let modes: BTreeMap<String, OrderingMode> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), if i % 3 == 2 { OrderingMode::Unordered } else { OrderingMode::Ordered }))
        .collect();
    // Interleaved; every 7th event sent again a little later (a client's resend).
    let mut events = Vec::new();
    for q in 0..N {
        for (stream, mode) in &modes {
            events.push(numbered(stream, q, "uniform:0ms-20ms", *mode));
            if q >= 3 && q % 7 == 0 {
                events.push(numbered(stream, q - 3, "uniform:0ms-20ms", *mode));
            }
        }
    }
    let total = streams.len() * N as usize;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    // About 5 s of sending: both faults land while events still arrive.
    call.feed(events, Some(Duration::from_millis(3)));

    // Each fault begins as soon as a share of the results arrived, so the
    // rest (of streams on every master) are in flight or still to be sent.
    // A third in: the master of the first stream's slot fails over (forced).
    call.wait_for_total(total / 3, DEADLINE).await.expect("a third of the results");
    let forced = master_of(&mut cluster, &streams[0]).await;
    let replica = cluster.redis_cluster().replica_of(forced).await.expect("a replica");
    cluster.redis_cluster().failover(replica).await.expect("CLUSTER FAILOVER");
    // Two thirds in: the master of a stream on another master is SIGKILLed.
    call.wait_for_total(2 * total / 3, DEADLINE).await.expect("two thirds of the results");
    let mut killed = None;
    for stream in &streams {
        let master = master_of(&mut cluster, stream).await;
        if master != replica {
            killed = Some(master);
            break;
        }
    }
    let killed = killed.expect("a master other than the promoted replica");
    let successor = cluster.redis_cluster().replica_of(killed).await.expect("a replica of the killed master");
    cluster.redis_cluster().kill(killed);
    cluster.redis_cluster().wait_master(successor).await.expect("the replica takes over");
    // Back as a replica of its successor, so WAIT 1 succeeds on its slots again.
    cluster.redis_cluster().restart(killed).await.expect("the killed node restarts");
    wait_replica_of(&mut cluster, killed, successor).await;

    let expected: BTreeMap<String, usize> = streams.iter().map(|s| (s.clone(), N as usize)).collect();
    call.wait_for_counts(&expected, DEADLINE).await.expect("every stream's results arrive");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&cluster, &results, &modes, N).await;
    for stream in &streams {
        let letters = cluster.dead_letters(stream).await.expect("dead letters are listed");
        assert!(letters.is_empty(), "{stream}: no GAP or FAILED was recorded: {letters:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_many_streams_in_order_and_the_registry_followed() {
    const N: u64 = 150;
    let cluster = Cluster::builder().redis_cluster().workers(2).start().await;
    // The registry lives in one slot ({registry}): `ordo registry` publishes
    // and lists it on the cluster, the harmonizer follows it.
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("registry.toml");
    std::fs::write(&file, integration_tests::example::example_registry()).expect("the registry file");
    let url = cluster.redis_url();
    let file = file.to_string_lossy().into_owned();
    let published = ordo(&["registry", "publish", &file, "--redis-url", &url], &[]).await;
    assert!(published.status.success(), "{}", stderr(&published));
    assert!(stdout(&published).starts_with("published version 1 "), "{}", stdout(&published));
    let listed = cluster.wait_for_registry_version(1).await;
    assert!(listed.operations.iter().any(|o| o.name == "async-echo"), "{listed:?}");
    let versions = ordo(&["registry", "list", "--redis-url", &url], &[]).await;
    assert!(versions.status.success(), "{}", stderr(&versions));
    let text = stdout(&versions);
    assert!(text.trim_start().starts_with("1 ") && text.contains("active"), "{text}");
    let state = cluster.registry().await.expect("the registry on the cluster").state().await.expect("its state");
    assert_eq!((state.latest, state.active), (1, 1));

    let streams = streams_over_every_master("many", 4);
    let modes: BTreeMap<String, OrderingMode> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), if i % 2 == 0 { OrderingMode::Ordered } else { OrderingMode::Unordered }))
        .collect();
    let mut events = Vec::new();
    for q in 0..N {
        events.extend(modes.iter().map(|(stream, mode)| numbered(stream, q, "uniform:0ms-5ms", *mode)));
    }
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    let expected: BTreeMap<String, usize> = streams.iter().map(|s| (s.clone(), N as usize)).collect();
    call.wait_for_counts(&expected, DEADLINE).await.expect("every stream's results arrive");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&cluster, &results, &modes, N).await;
}

/// A FAILED result of `stream`#`sequence` with its dead letter.
fn failed(stream: &str, sequence: u64) -> Completed {
    let error = format!("{stream}#{sequence} failed");
    Completed {
        result: Some(EventResult {
            stream_id: stream.into(),
            sequence,
            status: ResultStatus::Failed as i32,
            error: error.clone(),
            ..Default::default()
        }),
        mode: OrderingMode::Ordered as i32,
        dead_letter: Some(DeadLetter {
            event: Some(event(stream, sequence, "async-echo", format!("payload {sequence}").into_bytes())),
            status: ResultStatus::Failed as i32,
            attempts: 2,
            error,
            ..Default::default()
        }),
    }
}

/// `ordo dlq list` on a cluster: the dead letters of streams on every
/// master (one log per slot), oldest first, each once, ids naming their
/// slot; paged with `--limit`/`--after`; `--stream` reads one slot's log;
/// `ordo dlq show` finds each by id and refuses an id without its slot.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_ordo_dlq_lists_and_shows_the_dead_letters_of_every_slot() {
    let mut cluster = Cluster::builder().redis_cluster().start().await;
    let streams = streams_over_every_master("dlq", 2);
    // Two FAILED results per stream, delivered as a worker would.
    let results: Vec<Completed> = streams.iter().flat_map(|s| [failed(s, 0), failed(s, 1)]).collect();
    let batch = DeliverBatch { batch_id: 1, results };
    let mut acks =
        cluster.reassembler(0).deliver(futures::stream::iter([batch])).await.expect("Deliver opens").into_inner();
    let ack = acks.message().await.expect("Deliver acks").expect("an ack");
    assert_eq!(ack.accepted as usize, 2 * streams.len());

    let reassembler = cluster.reassembler_process(0).addr();
    let listed = ordo(&["dlq", "list", "--reassembler", &reassembler, "--json", "--limit", "1000"], &[]).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("--json prints JSON");
    let letters = json["dead_letters"].as_array().expect("a list");
    let got: Vec<(String, String, u64)> = letters
        .iter()
        .map(|l| {
            let id = l["id"].as_str().expect("an id").to_owned();
            let stream = l["event"]["stream_id"].as_str().expect("a stream").to_owned();
            let sequence = l["event"]["sequence"].as_u64().unwrap_or(0);
            (id, stream, sequence)
        })
        .collect();
    let want: BTreeSet<(String, u64)> = streams.iter().flat_map(|s| [(s.clone(), 0), (s.clone(), 1)]).collect();
    assert_eq!(got.iter().map(|(_, s, q)| (s.clone(), *q)).collect::<BTreeSet<_>>(), want, "{json}");
    assert_eq!(got.len(), want.len(), "each dead letter once: {json}");
    for (id, stream, _) in &got {
        assert_eq!(
            id.split_once('@').map(|(_, slot)| slot.to_owned()),
            Some(keys::stream_slot(stream).to_string()),
            "{id}"
        );
    }
    let ids: BTreeSet<&String> = got.iter().map(|(id, _, _)| id).collect();
    assert_eq!(ids.len(), got.len(), "ids are unambiguous");

    // Paged by 5 (the CLI's text lines, `--after` from the last id): the same, in the same order.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["dlq", "list", "--reassembler", &reassembler, "--limit", "5"];
        if let Some(after) = &after {
            args.extend(["--after", after.as_str()]);
        }
        let page = ordo(&args, &[]).await;
        assert!(page.status.success(), "{}", stderr(&page));
        let ids: Vec<String> =
            stdout(&page).lines().map(|l| l.split_whitespace().next().unwrap_or_default().to_owned()).collect();
        if ids.is_empty() {
            break;
        }
        after = ids.last().cloned();
        paged.extend(ids);
        assert!(paged.len() <= got.len(), "paging never repeats: {paged:?}");
    }
    assert_eq!(paged, got.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>());

    // One stream's, and each shown by its id.
    let one = ordo(&["dlq", "list", "--stream", &streams[4], "--reassembler", &reassembler], &[]).await;
    let lines: Vec<String> = stdout(&one).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains(&format!("{}#0 FAILED", streams[4])), "{lines:?}");
    let (id, stream, sequence) = &got[got.len() / 2];
    let shown = ordo(&["dlq", "show", id, "--reassembler", &reassembler], &[]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(stdout(&shown).contains(&format!("payload:    payload {sequence}")), "{}", stdout(&shown));
    assert!(stdout(&shown).contains(stream.as_str()), "{}", stdout(&shown));
    let bare = id.split_once('@').map(|(entry, _)| entry.to_owned()).expect("a slot");
    let refused = ordo(&["dlq", "show", &bare, "--reassembler", &reassembler], &[]).await;
    assert!(!refused.status.success(), "an id without its slot is refused on a cluster");
    assert!(stderr(&refused).contains("@<slot>"), "{}", stderr(&refused));
}

/// A stream moved between two harmonizers mid-flight on a cluster (as
/// `harmonizers.rs` on one node): H1's slow events are claimed in the
/// stream's slot, so H2's gap over them waits; both calls answer what they
/// accepted once, in order; the release log holds 0..40 once each, in order,
/// no GAP; the claims are gone once settled.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_two_harmonizers_claims_hold_a_gap_of_a_moved_stream() {
    const N: u64 = 40;
    let cluster = Cluster::builder().redis_cluster().harmonizers(2).workers(2).start().await;
    let stream = "moved-on-cluster";
    let gap = |e: Event| with_attr(e, "gap-timeout", "1s");
    let first_half =
        |q: u64| gap(numbered(stream, q, if q < 10 { "fixed:1500ms" } else { "fixed:4s" }, OrderingMode::Ordered));
    let mut h1 = ProcessCall::open(&cluster.harmonizer_at(0));
    h1.feed((0..N / 2).map(first_half).collect(), None);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(h1.fed() && h1.received().is_empty(), "H1's events are still in flight when the stream moves");

    let conn = cluster.redis_conn().expect("the cluster's URL");
    let claims = keys::claims(stream);
    let watcher = tokio::spawn({
        let (conn, claims) = (conn.clone(), claims.clone());
        async move {
            let mut most = 0u64;
            for _ in 0..30 {
                let mut conn = conn.clone();
                let now: u64 = redis::cmd("HLEN").arg(&claims).query_async(&mut conn).await.unwrap_or(0);
                most = most.max(now);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        }
    });
    let mut h2 = ProcessCall::open(&cluster.harmonizer_at(1));
    let mut moved: Vec<Event> =
        (N / 2..N).map(|q| gap(numbered(stream, q, "fixed:20ms", OrderingMode::Ordered))).collect();
    moved.extend((0..10).map(first_half));
    h2.feed(moved, None);

    let answers = |n: usize| BTreeMap::from([(stream.to_owned(), n)]);
    h1.wait_for_counts(&answers(20), DEADLINE).await.expect("H1's call answers what it accepted");
    h2.wait_for_counts(&answers(30), DEADLINE).await.expect("H2's call answers what it accepted");
    let on_h1 = h1.finish(LINGER).await.expect("H1's call ends cleanly");
    let on_h2 = h2.finish(LINGER).await.expect("H2's call ends cleanly");
    let sequences = |r: &[EventResult]| r.iter().map(|r| r.sequence).collect::<Vec<_>>();
    assert_eq!(sequences(&on_h1), (0..20).collect::<Vec<_>>(), "H1: 0..20 once each, in order");
    assert_eq!(sequences(&on_h2), (0..10).chain(20..40).collect::<Vec<_>>(), "H2: what it was sent, in order");
    assert_ok(check_all_ok(&on_h1).and_then(|()| check_all_ok(&on_h2)), "no GAP on either call");
    let logged = release_log(&cluster, stream).await;
    assert_ok(check_in_order_exactly_once(&logged, N), "the release log");
    assert_ok(check_all_ok(&logged).and_then(|()| check_numbered_payloads(&logged)), "the release log");
    let most = watcher.await.expect("the claim watcher");
    assert!(most >= 10, "H1's slow events 10..20 were claimed while they ran (at most {most} claims seen)");
    integration_tests::eventually(Duration::from_secs(5), || {
        let (mut conn, claims) = (conn.clone(), claims.clone());
        async move {
            let left: u64 = redis::cmd("HLEN").arg(&claims).query_async(&mut conn).await?;
            if left == 0 { Ok(()) } else { Err(anyhow::anyhow!("{left} claims left")) }
        }
    })
    .await;
}
