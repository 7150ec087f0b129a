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

/// The same path checked with the `fake-opentelemetry-collector` crate. It
/// does not keep each span's resource, so services are told apart by the
/// names of their per-event spans, which each service owns.
#[tokio::test(flavor = "multi_thread")]
async fn one_event_is_one_trace_in_fake_opentelemetry_collector() {
    const PER_SERVICE_SPANS: [&str; 5] =
        ["harmonizer.dispatch", "worker.process", "stateless.execute", "reassembler.store", "push.deliver"];
    let mut collector =
        fake_opentelemetry_collector::FakeCollectorServer::start().await.expect("the fake collector starts");
    let cluster = Cluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start()
        .await;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.send(with_attr(event("fake-traced", 0, "callback", "ping"), "latency", "fixed:1ms")).await.expect("send");
    call.wait_for_total(1, DEADLINE).await.expect("the callback's result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_all_ok(&results), "callback result");

    let wanted: BTreeSet<&str> = PER_SERVICE_SPANS.into_iter().collect();
    let mut by_trace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let complete = loop {
        for span in collector.exported_spans(1, Duration::from_millis(500)).await {
            by_trace.entry(span.trace_id).or_default().insert(span.name);
        }
        if let Some((trace, _)) = by_trace.iter().find(|(_, names)| wanted.iter().all(|w| names.contains(*w))) {
            break trace.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no trace holds the spans of all five services: {by_trace:?}");
    };
    eprintln!("trace {complete}: {:?}", by_trace[&complete]);
}
