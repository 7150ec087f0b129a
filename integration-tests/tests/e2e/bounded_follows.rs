//! Bounded follows (issue 12, item 3): a `Process` call follows a stream
//! only while it owes results there. One call over many distinct short
//! streams leaves nothing followed once they are answered, while the call
//! is still open, on the harmonizer (`ordo_followed_streams`) and in the
//! release tail that serves its follows (`ordo_push_followed_streams`,
//! `ordo_push_hub_streams`: the push-gateway's by default, the harmonizer's
//! own with `--follow-releases redis`); a
//! stream used again on the same call is followed again and answered.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, by_stream, check_all_ok, check_in_order_exactly_once, event},
    eventually,
};
use ordo_proto::v1::EventResult;

use crate::assert_ok;

/// Distinct streams on the one call, two events each.
const STREAMS: u64 = 20_000;
/// Generous: 40,000 events through debug binaries on 2 shared cores.
const BULK_DEADLINE: Duration = Duration::from_secs(600);
const DEADLINE: Duration = crate::DEADLINE;

fn stream(i: u64) -> String {
    format!("short-{i}")
}

/// (harmonizer followed, release-tail followed, release-tail hub streams):
/// the tail's gauges summed over the harmonizer and the push-gateway,
/// whichever of them serves the follows.
async fn followed(cluster: &Cluster) -> anyhow::Result<(f64, f64, f64)> {
    let harmonizer = cluster.scrape("harmonizer").await?;
    let gateway = cluster.scrape("push-gateway").await?;
    let tail = |name: &str| harmonizer.sum(name, &[]) + gateway.sum(name, &[]);
    Ok((
        harmonizer.sum("ordo_followed_streams", &[]),
        tail("ordo_push_followed_streams"),
        tail("ordo_push_hub_streams"),
    ))
}

async fn nothing_followed(cluster: &Cluster, when: &str) {
    eventually(DEADLINE, || async {
        let got = followed(cluster).await?;
        anyhow::ensure!(got == (0.0, 0.0, 0.0), "{when}: (harmonizer, gateway, hub) followed = {got:?}");
        Ok(())
    })
    .await;
}

async fn exactly_followed(cluster: &Cluster, n: f64, when: &str) {
    eventually(DEADLINE, || async {
        let got = followed(cluster).await?;
        anyhow::ensure!(got == (n, n, n), "{when}: (harmonizer, gateway, hub) followed = {got:?}, want {n} each");
        Ok(())
    })
    .await;
}

/// The results of `stream` received on the call, in arrival order.
fn of<'a>(results: &'a [EventResult], stream: &str) -> Vec<&'a EventResult> {
    results.iter().filter(|r| r.stream_id == stream).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_call_over_many_short_streams_follows_only_what_is_in_flight() {
    // No gap timeout: the hole made below waits until it is filled.
    let mut cluster = Cluster::builder().workers(1).harmonizer_args(["--gap-timeout", "off"]).start().await;
    let url = |cluster: &mut Cluster, name: &str| {
        cluster.processes_mut().find(|p| p.name() == name).and_then(|p| p.metrics_url()).expect("metrics served")
    };
    let (harmonizer, gateway) = (url(&mut cluster, "harmonizer"), url(&mut cluster, "push-gateway"));
    let mut call = ProcessCall::open(&cluster.harmonizer());
    nothing_followed(&cluster, "before the call sent anything").await;

    let events: Vec<_> = (0..STREAMS)
        .flat_map(|i| (0..2).map(move |q| event(&stream(i), q, "async-echo", format!("{i}.{q}").into_bytes())))
        .collect();
    call.feed(events, None);

    // The gauges while the bulk runs: the highest seen shows the streams
    // were followed (and how many at once).
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let (Ok(h), Ok(g)) = (
                    integration_tests::metrics::scrape(&harmonizer).await,
                    integration_tests::metrics::scrape(&gateway).await,
                ) {
                    let tail = h.sum("ordo_push_followed_streams", &[]) + g.sum("ordo_push_followed_streams", &[]);
                    let seen = h.sum("ordo_followed_streams", &[]).max(tail);
                    peak.fetch_max(seen as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    call.wait_for_total((STREAMS * 2) as usize, BULK_DEADLINE).await.expect("every short stream is answered");
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    println!("bounded follows: peak followed streams while {STREAMS} short streams ran on one call: {peak}");
    assert!(peak >= 1, "the streams were followed while they ran (peak gauge {peak})");

    // Answered: nothing is followed any more, and the call is still open.
    nothing_followed(&cluster, "every short stream answered").await;
    let bulk = call.received().to_vec();
    assert_ok(check_all_ok(&bulk), "statuses");
    let grouped = by_stream(&bulk);
    assert_eq!(grouped.len() as u64, STREAMS, "every stream answered");
    for (id, results) in &grouped {
        assert_ok(check_in_order_exactly_once(results, 2), id);
    }

    // Reused on the same call: a hole keeps one stream followed ...
    let held = stream(3);
    call.send(event(&held, 3, "async-echo", b"held.3".to_vec())).await.expect("sent");
    exactly_followed(&cluster, 1.0, "a reused stream waits for sequence 2").await;
    // ... until it is filled; and more old streams get new sequences, and a
    // resend of one they answered before (served from the release log).
    let reused = [0, 7, 4_242, STREAMS - 1];
    call.send(event(&held, 2, "async-echo", b"held.2".to_vec())).await.expect("sent");
    for &i in &reused {
        let id = stream(i);
        call.send(event(&id, 2, "async-echo", format!("{i}.2").into_bytes())).await.expect("sent");
        call.send(event(&id, 1, "async-echo", b"resent".to_vec())).await.expect("sent");
        call.send(event(&id, 3, "async-echo", format!("{i}.3").into_bytes())).await.expect("sent");
    }
    let want = bulk.len() + 2 + 3 * reused.len();
    call.wait_for_total(want, DEADLINE).await.expect("the reused streams are answered");
    nothing_followed(&cluster, "the reused streams answered").await;
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_eq!(results.len(), want, "nothing doubled after the reuse");
    let again = &results[bulk.len()..];
    assert_ok(check_all_ok(again), "statuses of the reuse");
    let held_got: Vec<(u64, &[u8])> = of(again, &held).iter().map(|r| (r.sequence, r.payload.as_ref())).collect();
    assert_eq!(held_got, vec![(2, b"held.2".as_slice()), (3, b"held.3".as_slice())], "the held stream, in order");
    for &i in &reused {
        let id = stream(i);
        let got: Vec<(u64, u64, Vec<u8>)> =
            of(again, &id).iter().map(|r| (r.sequence, r.position, r.payload.to_vec())).collect();
        let want = vec![
            (1, 1, format!("{i}.1").into_bytes()),
            (2, 2, format!("{i}.2").into_bytes()),
            (3, 3, format!("{i}.3").into_bytes()),
        ];
        assert_eq!(got, want, "{id}: the resent 1 gets its stored result, then 2 and 3, once each, in order");
    }
}

/// The Follow protocol's `remove`: the gateway drops the stream's session
/// and its hub entry, and the stream can be followed again from a new cursor.
#[tokio::test(flavor = "multi_thread")]
async fn follow_remove_drops_the_stream_and_a_new_add_follows_it_again() {
    use ordo_proto::v1::{FollowRequest, StreamCursor};

    let cluster = Cluster::builder().workers(1).start().await;
    let id = "followed-then-removed";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    for q in 0..2 {
        call.send(event(id, q, "async-echo", format!("r{q}").into_bytes())).await.expect("sent");
    }
    call.wait_for_total(2, DEADLINE).await.expect("both answered");
    drop(call.finish(LINGER).await.expect("the call ends cleanly"));
    nothing_followed(&cluster, "the Process call ended").await;

    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let add = |from| FollowRequest {
        add: vec![StreamCursor { stream_id: id.to_owned(), from_sequence: from }],
        remove: Vec::new(),
    };
    requests.send(add(0)).await.expect("queued");
    let mut batches = cluster
        .push_gateway()
        .follow(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Follow opens")
        .into_inner();
    let mut positions = Vec::new();
    while positions.len() < 2 {
        let batch = tokio::time::timeout(DEADLINE, batches.message()).await.expect("in time").expect("a batch");
        let batch = batch.expect("the call goes on");
        positions.extend(batch.results.iter().map(|r| r.position));
    }
    assert_eq!(positions, vec![0, 1], "caught up from 0");
    eventually(DEADLINE, || async {
        let m = cluster.scrape("push-gateway").await?;
        let got = (m.sum("ordo_push_followed_streams", &[]), m.sum("ordo_push_hub_streams", &[]));
        anyhow::ensure!(got == (1.0, 1.0), "followed: (entries, hub) = {got:?}");
        Ok(())
    })
    .await;

    requests.send(FollowRequest { add: Vec::new(), remove: vec![id.to_owned()] }).await.expect("queued");
    eventually(DEADLINE, || async {
        let m = cluster.scrape("push-gateway").await?;
        let got = (m.sum("ordo_push_followed_streams", &[]), m.sum("ordo_push_hub_streams", &[]));
        anyhow::ensure!(got == (0.0, 0.0), "removed: (entries, hub) = {got:?}");
        Ok(())
    })
    .await;

    requests.send(add(1)).await.expect("queued");
    let batch = tokio::time::timeout(DEADLINE, batches.message()).await.expect("in time").expect("a batch");
    let batch = batch.expect("the call goes on");
    let again: Vec<u64> = batch.results.iter().map(|r| r.position).collect();
    assert_eq!(again, vec![1], "followed again from the new cursor");
}

/// VmRSS of `pid` in KiB (from `/proc/<pid>/status`), if it can be read.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The benchmark figure of issue 12, item 3 (not a timed test): one
/// `Process` call over `ORDO_RSS_STREAMS` (default 1,000,000) distinct
/// streams of two events each, at most `ORDO_RSS_IN_FLIGHT` (default 2,000)
/// streams unanswered at once, sampling the harmonizer's and push-gateway's
/// VmRSS at every tenth of the run. Prints a table; fails only if a result
/// is missing, doubled or out of order, or if the followed-stream gauges do
/// not return to 0 while the call is open. Run against release binaries:
///
/// ```text
/// cargo build --release --workspace --bins
/// ORDO_BIN_DIR=target/release cargo nextest run -p integration-tests \
///   --run-ignored only -E 'test(million_short_streams_rss)' --no-capture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark figure (minutes): run it by hand, see docs/benchmarks.md"]
async fn million_short_streams_rss() {
    use futures::StreamExt as _;
    use tokio::sync::Semaphore;

    let streams = env_u64("ORDO_RSS_STREAMS", 1_000_000);
    let in_flight = env_u64("ORDO_RSS_IN_FLIGHT", 2_000) as usize;
    let operation = std::env::var("ORDO_RSS_OP").unwrap_or_else(|_| "upper".to_owned());
    let cluster = Cluster::builder().workers(1).harmonizer_args(["--gap-timeout", "off"]).start().await;
    let pid = |name: &str| cluster.pids().into_iter().find(|(n, _)| n == name).and_then(|(_, pid)| pid);
    let (harmonizer, gateway) = (pid("harmonizer"), pid("push-gateway"));

    // The sender opens a stream only when one of the `in_flight` slots is free.
    let slots = Arc::new(Semaphore::new(in_flight));
    let events = {
        let slots = slots.clone();
        let operation = operation.clone();
        futures::stream::iter(0..streams)
            .then(move |i| {
                let slots = slots.clone();
                async move {
                    if let Ok(permit) = slots.acquire().await {
                        permit.forget();
                    }
                    i
                }
            })
            .flat_map(move |i| {
                let (id, operation) = (stream(i), operation.clone());
                futures::stream::iter((0..2).map(move |q| event(&id, q, &operation, b"x".to_vec())))
            })
    };
    let (mut results, _call) = integration_tests::client::spawn_process(cluster.harmonizer(), events);

    // Per stream: how many of its two results came (each must be in order).
    let mut got = vec![0u8; streams as usize];
    let mut done = 0u64;
    let started = std::time::Instant::now();
    let mut peak = (0u64, 0u64);
    let mut table = vec![
        "| streams answered | s | harmonizer VmRSS MiB | push-gateway VmRSS MiB | followed (harmonizer / gateway) |"
            .to_owned(),
    ];
    table.push("|---:|---:|---:|---:|---:|".to_owned());
    let mut sample = |done: u64, table: &mut Vec<String>, followed: String| {
        let (h, g) = (rss_kib(harmonizer).unwrap_or(0), rss_kib(gateway).unwrap_or(0));
        peak = (peak.0.max(h), peak.1.max(g));
        table.push(format!(
            "| {done} | {:.0} | {:.1} | {:.1} | {followed} |",
            started.elapsed().as_secs_f64(),
            h as f64 / 1024.0,
            g as f64 / 1024.0
        ));
        println!("{}", table.last().map_or("", String::as_str));
    };
    let step = (streams / 10).max(1);
    while done < streams {
        let result = tokio::time::timeout(Duration::from_secs(120), results.recv())
            .await
            .expect("a result within 2 minutes")
            .expect("the call is open")
            .expect("the call does not fail");
        assert_eq!(result.status(), ordo_proto::ResultStatus::Ok, "{result:?}");
        let i: usize = result
            .stream_id
            .strip_prefix("short-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a stream of this run: {:?}", result.stream_id));
        assert_eq!(u64::from(got[i]), result.sequence, "stream {i}: in order, exactly once");
        got[i] += 1;
        if got[i] == 2 {
            done += 1;
            slots.add_permits(1);
            if done.is_multiple_of(step) {
                let (h, g, _) = followed(&cluster).await.unwrap_or_default();
                sample(done, &mut table, format!("{h} / {g}"));
            }
        }
    }
    nothing_followed(&cluster, "every stream answered, the call still open").await;
    sample(done, &mut table, "0 / 0".to_owned());
    println!("\n{}", table.join("\n"));
    println!(
        "peak VmRSS: harmonizer {:.1} MiB, push-gateway {:.1} MiB; {streams} streams, {in_flight} in flight at most, operation {operation}, {:.0} s",
        peak.0 as f64 / 1024.0,
        peak.1 as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
    assert!(got.iter().all(|&n| n == 2), "every stream answered twice");
}
