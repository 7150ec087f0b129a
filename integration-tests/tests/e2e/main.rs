//! End-to-end tests of Ordo: every test starts the real binaries (built by
//! `cargo build --workspace --bins`) with a private redis-server on free
//! ports, talks gRPC to them like a user, and asserts what a user would see.
//! One test binary with modules, so there is one link step.
//!
//! Run: `cargo build --workspace --bins && cargo nextest run -p integration-tests`
//! (`TEST_LOG=1` prints every service's log tail). Tests named `*amqp*` need
//! the machine's RabbitMQ and run one at a time (`.config/nextest.toml`).

mod auth;
mod bad_input;
mod bounded_follows;
mod cancel;
mod cluster_ordering;
mod cluster_push;
mod contract;
mod dashboard;
mod dead_letters;
mod discovery;
mod failover;
mod give_up;
mod grpcurl;
mod harmonizers;
mod http_operation;
mod jetstream;
mod lifecycle;
mod metrics;
mod ordering;
mod publish_cli;
mod push;
mod push_amqp;
mod python_operation;
mod registry;
mod shutdown;
mod stream_expiry;
mod telemetry;
mod tls;
mod worker_pool;

use std::time::Duration;

use integration_tests::{
    Cluster,
    client::{event, with_attr, with_mode},
};
use ordo_proto::v1::{Event, OrderingMode};

/// Generous: the machine has 2 cores and runs several clusters at once.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Panics with the checker's explanation.
#[track_caller]
pub fn assert_ok(check: Result<(), String>, what: &str) {
    if let Err(reason) = check {
        panic!("{what}: {reason}");
    }
}

/// `n` events of one stream whose payload is `"<stream>:<seq>"`, so each
/// result can be checked against its event.
pub fn numbered_events(stream_id: &str, n: u64, operation: &str, latency: &str) -> Vec<Event> {
    (0..n)
        .map(|seq| {
            let e = event(stream_id, seq, operation, format!("{stream_id}:{seq}").into_bytes());
            with_mode(with_attr(e, "latency", latency), OrderingMode::Ordered)
        })
        .collect()
}

/// Round-robin interleaving of several streams' events, as a client
/// multiplexing them on one call would send them.
pub fn interleave(streams: Vec<Vec<Event>>) -> Vec<Event> {
    let mut iters: Vec<_> = streams.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        for it in &mut iters {
            out.extend(it.next());
        }
        if out.len() == before {
            return out;
        }
    }
}

/// `Ok` when each result's payload is `"<stream>:<seq>"` (async-echo of
/// [`numbered_events`]).
pub fn check_numbered_payloads(results: &[ordo_proto::v1::EventResult]) -> Result<(), String> {
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| r.payload.as_ref() != format!("{}:{}", r.stream_id, r.sequence).as_bytes())
        .take(5)
        .map(|r| format!("{}#{} -> {:?}", r.stream_id, r.sequence, String::from_utf8_lossy(&r.payload)))
        .collect();
    if wrong.is_empty() { Ok(()) } else { Err(format!("payloads do not match their events: {wrong:?}")) }
}

/// Publishes `registry` (a registry file) on the cluster's Redis and waits
/// until the harmonizer uses the new version; returns it.
pub async fn publish_and_wait(cluster: &Cluster, registry: &str) -> u64 {
    let store = cluster.registry().await.expect("the cluster's redis");
    let version = store.publish(registry).await.expect("the registry file is valid and published");
    cluster.wait_for_registry_version(version).await;
    version
}
