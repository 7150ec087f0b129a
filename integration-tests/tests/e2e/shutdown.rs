//! SIGTERM: every service stops by itself within its drain timeout plus one
//! second and exits successfully, as an orchestrator stopping the deployment
//! expects (finding 7 of issue 7; per-service tests under load are in
//! `lifecycle`).

use std::time::Duration;

use integration_tests::{
    Cluster,
    client::{check_all_ok, check_in_order_exactly_once},
    stream_text,
};
use ordo_proto::v1::OrderingMode;

use crate::{DEADLINE, assert_ok};

#[tokio::test(flavor = "multi_thread")]
async fn every_service_exits_cleanly_on_sigterm() {
    let drain = Duration::from_secs(2);
    let mut cluster = Cluster::builder().env("ORDO_DRAIN_TIMEOUT", "2s").start().await;
    // Some traffic first, so the long-lived internal streams (Work, Deliver,
    // Follow) are open when the signal arrives.
    let results = stream_text(
        &cluster.harmonizer(),
        "before-sigterm",
        "hello",
        "async-echo",
        "fixed:1ms",
        OrderingMode::Ordered,
        DEADLINE,
    )
    .await
    .expect("results before the shutdown");
    assert_ok(check_in_order_exactly_once(&results, 5).and_then(|()| check_all_ok(&results)), "results");

    let exits = cluster.terminate_all(drain + Duration::from_secs(1)).await;
    let bad: Vec<String> = exits
        .iter()
        .filter(|(_, status)| !status.as_ref().is_ok_and(|s| s.success()))
        .map(|(name, status)| format!("{name}: {status:?}"))
        .collect();
    assert!(bad.is_empty(), "services that did not exit 0 within drain + 1 s after SIGTERM: {bad:?}");
}
