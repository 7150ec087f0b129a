//! Process-level failures while a stream is running: a reassembler killed
//! (SIGKILL) and restarted on the same port, one of two reassembler replicas
//! killed, one of two workers killed. Streams must still complete in order,
//! with every result exactly once. Events are fed at a steady pace so the
//! failure happens while events are still being sent and processed.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, by_stream, check_all_ok, check_in_order_exactly_once},
    eventually,
};
use ordo_proto::v1::GetStreamRequest;

use crate::{DEADLINE, check_numbered_payloads, interleave, numbered_events};

/// Waits until at least `n` results arrived in total, then asserts the feed
/// is still going (else the failure would hit an idle system).
async fn wait_mid_stream(call: &mut ProcessCall, n: usize, total: usize) {
    call.wait_for_total(n, DEADLINE).await.expect("the first results arrive");
    assert!(
        !call.fed() && call.received().len() < total,
        "the stream finished before the failure was injected; the test would prove nothing"
    );
}

fn check_streams(results: &[ordo_proto::v1::EventResult], streams: &[String], n: u64) {
    let mut failures = Vec::new();
    if let Err(e) = check_all_ok(results).and_then(|()| check_numbered_payloads(results)) {
        failures.push(e);
    }
    let grouped = by_stream(results);
    for stream in streams {
        let got = grouped.get(stream).map(Vec::as_slice).unwrap_or_default();
        if let Err(e) = check_in_order_exactly_once(got, n) {
            failures.push(format!("{stream}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reassembler_sigkill_restart() {
    const N: u64 = 1500;
    let mut cluster = Cluster::start().await;
    let stream = "reassembler-restart".to_owned();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(&stream, N, "async-echo", "exp:5ms"), Some(Duration::from_millis(1)));

    wait_mid_stream(&mut call, 200, N as usize).await;
    let reassembler = cluster.reassembler_process(0);
    reassembler.kill();
    eprintln!("killed the reassembler after {} results", call.received().len());
    reassembler.restart(Duration::from_secs(30)).await.expect("the reassembler restarts on its port");

    call.wait_for_counts(&BTreeMap::from([(stream.clone(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes after the restart");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&results, std::slice::from_ref(&stream), N);

    let client = cluster.reassembler(0);
    eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        let stream = stream.clone();
        async move {
            let state = client.get_stream(GetStreamRequest { stream_id: stream }).await?.into_inner();
            if state.next_sequence == N && state.released == N && state.pending == 0 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("reorder state {state:?}"))
            }
        }
    })
    .await;
}

/// Starts `streams` × `n` events on one call, paced, and returns the call.
fn start_streams(
    cluster: &Cluster,
    prefix: &str,
    streams: usize,
    n: u64,
    latency: &str,
    pace: Duration,
) -> (ProcessCall, Vec<String>) {
    let names: Vec<String> = (0..streams).map(|i| format!("{prefix}-{i}")).collect();
    let events = interleave(names.iter().map(|s| numbered_events(s, n, "async-echo", latency)).collect());
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, Some(pace));
    (call, names)
}

fn expected(names: &[String], n: u64) -> BTreeMap<String, usize> {
    names.iter().map(|s| (s.clone(), n as usize)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_reassembler_replicas() {
    const N: u64 = 300;
    let cluster = Cluster::builder().reassemblers(2).start().await;
    let (mut call, names) = start_streams(&cluster, "replicas", 6, N, "exp:5ms", Duration::from_micros(200));
    call.wait_for_counts(&expected(&names, N), DEADLINE).await.expect("every stream completes");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&results, &names, N);

    // Both replicas read the same reorder state.
    for replica in 0..2 {
        let mut client = cluster.reassembler(replica);
        for stream in &names {
            let state = client
                .get_stream(GetStreamRequest { stream_id: stream.clone() })
                .await
                .unwrap_or_else(|s| panic!("GetStream on replica {replica}: {s:?}"))
                .into_inner();
            assert_eq!(
                (state.next_sequence, state.released, state.pending),
                (N, N, 0),
                "replica {replica}, {stream}: {state:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_reassembler_replicas_one_killed() {
    const N: u64 = 500;
    let mut cluster = Cluster::builder().reassemblers(2).start().await;
    let (mut call, names) = start_streams(&cluster, "replica-killed", 4, N, "exp:5ms", Duration::from_millis(1));
    wait_mid_stream(&mut call, 300, names.len() * N as usize).await;
    cluster.reassembler_process(1).kill();
    eprintln!("killed reassembler-1 after {} results", call.received().len());
    call.wait_for_counts(&expected(&names, N), DEADLINE)
        .await
        .expect("every stream completes on the surviving replica");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&results, &names, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_sigkill() {
    const N: u64 = 1000;
    let mut cluster = Cluster::builder().workers(2).harmonizer_args(["--event-timeout", "2s"]).start().await;
    // 50–150 ms per event and one event every 2 ms: ~50 events in flight, about
    // half of them on the worker that gets killed.
    let (mut call, names) =
        start_streams(&cluster, "worker-killed", 1, N, "uniform:50ms-150ms", Duration::from_millis(2));
    wait_mid_stream(&mut call, 100, N as usize).await;
    cluster.worker_process(0).kill();
    eprintln!("killed worker-0 after {} results", call.received().len());
    call.wait_for_counts(&expected(&names, N), DEADLINE).await.expect("the stream completes on the surviving worker");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&results, &names, N);
}

/// Redis itself dies (SIGKILL) mid-stream and comes back from its append-only
/// file: every service reconnects, workers redeliver what was not
/// acknowledged, the push gateway catches up from the log, and the stream
/// still completes in order with every result exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn redis_sigkill_restart() {
    redis_sigkill_restart_with(&["--follow-releases", "push-gateway"], &[]).await;
}

/// The same, with the harmonizer following the release channels and logs
/// itself (`--follow-releases redis`): its own tail reconnects and catches up.
#[tokio::test(flavor = "multi_thread")]
async fn redis_sigkill_restart_while_the_harmonizer_follows_redis_itself() {
    redis_sigkill_restart_with(&["--follow-releases", "redis"], &[]).await;
}

/// The same with no reassembler or push gateway in the results' path: the
/// worker and the harmonizer store their results (`--store-results redis`)
/// and the harmonizer follows the releases (`--follow-releases redis`)
/// themselves; a script call that fails while Redis is down is stored again
/// once it is back, and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread")]
async fn redis_sigkill_restart_while_the_services_store_and_follow_redis_themselves() {
    redis_sigkill_restart_with(
        &["--follow-releases", "redis", "--store-results", "redis"],
        &["--store-results", "redis"],
    )
    .await;
}

async fn redis_sigkill_restart_with(harmonizer_args: &[&str], worker_args: &[&str]) {
    const N: u64 = 1500;
    let mut cluster = Cluster::builder()
        .durable_redis()
        .harmonizer_args(harmonizer_args.iter().copied())
        .worker_args(worker_args.iter().copied())
        .start()
        .await;
    let stream = "redis-restart".to_owned();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(&stream, N, "async-echo", "exp:5ms"), Some(Duration::from_millis(1)));

    wait_mid_stream(&mut call, 200, N as usize).await;
    cluster.redis().kill();
    eprintln!("killed redis after {} results", call.received().len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.redis().restart().await.expect("redis restarts on its port");

    call.wait_for_counts(&BTreeMap::from([(stream.clone(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes after redis came back");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_streams(&results, std::slice::from_ref(&stream), N);
}
