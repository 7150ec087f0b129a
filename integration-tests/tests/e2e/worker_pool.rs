//! Routing by capability: a pool of workers that serve different operations
//! (a stock `stateful-worker --operations async-echo` and the user's
//! `rust-worker` from `examples/rust-worker`, which embeds `ordo-worker`
//! with its own `reverse`). Each event goes only to a worker serving its
//! operation, so one stream mixing both comes back in order; `ListOperations`
//! says who serves what; an operation whose every worker is gone answers
//! UNAVAILABLE (after `--worker-wait`) while the others go on, and an
//! unknown one is still NOT_FOUND. The Rust example alone processes a stream
//! in order too.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall, WorkerSpec,
    client::{LINGER, check_all_ok, check_in_order_exactly_once, event, with_attr},
    example::example_registry,
};
use ordo_proto::v1::{Event, EventResult, ResultStatus};
use tokio::time::Instant;

use crate::{DEADLINE, assert_ok, numbered_events, publish_and_wait};

/// What `async-echo` or `reverse` make of an event's payload.
fn expected(result: &EventResult, operation: &str) -> String {
    let sent = format!("{}:{}", result.stream_id, result.sequence);
    if operation == "reverse" { sent.chars().rev().collect() } else { sent }
}

fn check_payloads(results: &[EventResult], operation_of: impl Fn(u64) -> &'static str) {
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| r.payload.as_ref() != expected(r, operation_of(r.sequence)).as_bytes())
        .take(5)
        .map(|r| format!("#{} {:?}", r.sequence, String::from_utf8_lossy(&r.payload)))
        .collect();
    assert!(wrong.is_empty(), "each result is its own operation's answer: {wrong:?}");
}

async fn submit(cluster: &Cluster, stream: &str, operation: &str) -> Result<EventResult, tonic::Status> {
    let e = event(stream, 0, operation, format!("{stream}:0"));
    cluster.harmonizer().submit(e).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heterogeneous_pool_routes_each_operation_to_the_workers_that_serve_it() {
    const N: u64 = 600;
    let mut cluster = Cluster::builder()
        .workers(0)
        .worker(WorkerSpec::stateful_worker().args(["--operations", "async-echo"]))
        .worker(WorkerSpec::binary("rust-worker"))
        .harmonizer_args(["--worker-wait", "500ms", "--event-timeout", "1s"])
        .start()
        .await;
    let (echo_worker, rust_worker) = (cluster.worker_name(0), cluster.worker_name(1));
    publish_and_wait(&cluster, &example_registry()).await;
    cluster.wait_for_workers("async-echo", &[&echo_worker]).await;
    let listed = cluster.wait_for_workers("reverse", &[&rust_worker]).await;
    let serving: BTreeMap<&str, Vec<String>> =
        listed.operations.iter().map(|op| (op.name.as_str(), op.workers.clone())).collect();
    assert_eq!(serving["async-upper"], Vec::<String>::new(), "filtered out of one, not native to the other");
    assert_eq!(serving["shout"], vec![rust_worker.clone()], "a remote operation: any worker that allows it");
    assert_eq!(serving["echo"], Vec::<String>::new(), "stateless operations need no worker");

    // One stream mixing both operations.
    let stream = "mixed-pool";
    let operation_of = |seq: u64| if seq.is_multiple_of(3) { "reverse" } else { "async-echo" };
    let events: Vec<Event> = (0..N)
        .map(|seq| {
            with_attr(event(stream, seq, operation_of(seq), format!("{stream}:{seq}")), "latency", "uniform:0ms-10ms")
        })
        .collect();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE).await.expect("every result");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, N), "mixed stream");
    assert_ok(check_all_ok(&results), "mixed stream");
    check_payloads(&results, operation_of);

    // The only worker serving `reverse` dies.
    cluster.worker_process(1).kill();
    cluster.wait_for_workers("reverse", &[]).await;
    // Once it has been gone longer than --event-timeout, nobody is restarting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let refused = submit(&cluster, "pool-reverse-gone", "reverse").await.expect_err("no worker serves reverse");
    let waited = started.elapsed();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("no live worker"), "{refused:?}");
    assert!(waited >= Duration::from_millis(450), "refused after --worker-wait, not at once: {waited:?}");
    let echoed = submit(&cluster, "pool-echo-alive", "async-echo").await.expect("async-echo still works");
    assert_eq!((echoed.status(), echoed.payload.as_ref()), (ResultStatus::Ok, &b"pool-echo-alive:0"[..]));
    let unknown = submit(&cluster, "pool-unknown", "no-such-operation").await.expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // It comes back: `reverse` is served again.
    cluster.worker_process(1).restart(DEADLINE).await.expect("the rust-worker restarts on its port");
    cluster.wait_for_workers("reverse", &[&rust_worker]).await;
    let reversed = submit(&cluster, "pool-reverse-back", "reverse").await.expect("reverse works again");
    assert_eq!((reversed.status(), reversed.payload.as_ref()), (ResultStatus::Ok, &b"0:kcab-esrever-loop"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_example_worker_alone_processes_a_stream_in_order() {
    const N: u64 = 1000;
    // No registry: the harmonizer's built-in catalog names the operation.
    let cluster = Cluster::builder()
        .workers(0)
        .worker(WorkerSpec::binary("rust-worker"))
        .harmonizer_args(["--stateful-ops", "reverse"])
        .start()
        .await;
    cluster.wait_for_workers("reverse", &[&cluster.worker_name(0)]).await;
    let stream = "rust-worker-alone";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "reverse", "fixed:0ms"), None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE).await.expect("every result");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, N), "sequences");
    assert_ok(check_all_ok(&results), "statuses");
    check_payloads(&results, |_| "reverse");
}
