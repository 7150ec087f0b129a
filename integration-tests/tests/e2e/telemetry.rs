//! Tracing across the services: one event through `Process` with the
//! stateful `callback` operation touches all five services (harmonizer →
//! worker → stateless callback → reassembler → push-gateway → harmonizer),
//! and their exported spans share one trace id.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, check_all_ok, event, with_attr},
    eventually,
    eventually::try_eventually,
    otlp::OtlpCollector,
};

use crate::{DEADLINE, assert_ok};

const SERVICES: [&str; 5] = ["harmonizer", "stateless", "stateful-worker", "reassembler", "push-gateway"];

/// A trace id whose spans come from every service, or what each trace covers.
fn complete_trace(collector: &OtlpCollector) -> Result<String, BTreeMap<String, BTreeSet<String>>> {
    let wanted: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    let traces = collector.services_by_trace();
    traces.iter().find(|(_, services)| wanted.is_subset(services)).map(|(id, _)| id.clone()).ok_or(traces)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_is_one_trace_across_all_services() {
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = Cluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("ORDO_DRAIN_TIMEOUT", "2s")
        .start()
        .await;

    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.send(with_attr(event("traced", 0, "callback", "ping"), "latency", "fixed:1ms")).await.expect("send");
    call.wait_for_total(1, DEADLINE).await.expect("the callback's result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_all_ok(&results), "callback result");
    assert_eq!(results.len(), 1, "one event, one result: {results:?}");
    assert_eq!(results[0].payload.as_ref(), b"ping", "callback with the default `call=echo` echoes");

    // Spans are batched (every 200 ms here); if they don't show up, SIGTERM
    // makes every service flush on its way out.
    let trace = match try_eventually(Duration::from_secs(10), || async { complete_trace(&collector) }).await {
        Ok(trace) => trace,
        Err(_) => {
            let exits = cluster.terminate_all(Duration::from_secs(20)).await;
            eprintln!("after SIGTERM: {exits:?}");
            eventually(Duration::from_secs(20), || async { complete_trace(&collector) }).await
        }
    };
    let spans: Vec<(String, String)> =
        collector.spans().into_iter().filter(|s| s.trace_id == trace).map(|s| (s.service_name, s.name)).collect();
    eprintln!("trace {trace}: {spans:?}");
    if let Some(traceparent) = results[0].trace_context.get("traceparent") {
        assert!(
            traceparent.contains(&trace),
            "the result's traceparent {traceparent} is not the event's trace {trace}"
        );
    }
}
