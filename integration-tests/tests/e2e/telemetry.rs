//! Tracing across the services: one event through `Process` with the
//! stateful `callback` operation touches all five services (harmonizer →
//! worker → stateless callback → reassembler → push-gateway → harmonizer),
//! and their exported spans share one trace id. A `Process` call of many
//! events is one trace per event (each linked to the call's small trace),
//! its spans carry the stream, sequence, attempt and worker; a `Submit` is
//! one trace across all five; and JSON log lines carry the trace and span
//! id of the span they were written in.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, check_all_ok, check_in_order_exactly_once, event, with_attr},
    eventually,
    eventually::{Outcome, try_eventually},
    otlp::{CollectedSpan, OtlpCollector},
};

use crate::{DEADLINE, assert_ok};

const SERVICES: [&str; 5] = ["harmonizer", "stateless", "stateful-worker", "reassembler", "push-gateway"];

/// A cluster whose services export their spans to `endpoint` (batches every
/// 200 ms) and drain for 2 s, so that the spans are flushed at SIGTERM.
fn traced(endpoint: &str) -> integration_tests::ClusterBuilder {
    Cluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("ORDO_DRAIN_TIMEOUT", "2s")
}

/// A trace id whose spans come from every service, or what each trace covers.
fn complete_trace(collector: &OtlpCollector) -> Result<String, BTreeMap<String, BTreeSet<String>>> {
    let wanted: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    let traces = collector.services_by_trace();
    traces.iter().find(|(_, services)| wanted.is_subset(services)).map(|(id, _)| id.clone()).ok_or(traces)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_is_one_trace_across_all_services() {
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint()).start().await;

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
    let cluster = traced(&collector.endpoint()).start().await;
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

/// Polls `check` over the collected spans; if it does not hold soon, every
/// service is stopped with SIGTERM (each flushes its spans on the way out)
/// and it is polled again.
async fn once_exported<T, O: Outcome<Value = T>>(
    collector: &OtlpCollector,
    cluster: &mut Cluster,
    check: impl Fn(&[CollectedSpan]) -> O,
) -> T {
    if let Ok(value) = try_eventually(Duration::from_secs(10), || async { check(&collector.spans()) }).await {
        return value;
    }
    let exits = cluster.terminate_all(Duration::from_secs(20)).await;
    eprintln!("after SIGTERM: {exits:?}");
    eventually(Duration::from_secs(20), || async { check(&collector.spans()) }).await
}

/// The per-event spans each service exports for every event of a stateful
/// operation, in the order the event meets them.
const EVENT_PATH: [(&str, &str); 5] = [
    ("harmonizer", "harmonizer.dispatch"),
    ("stateful-worker", "worker.process"),
    ("reassembler", "reassembler.store"),
    ("push-gateway", "push.deliver"),
    ("harmonizer", "harmonizer.respond"),
];

/// The same with `--follow-releases redis`: the harmonizer follows the
/// release channels itself, so the delivery span is its own.
const EVENT_PATH_FOLLOWING_REDIS: [(&str, &str); 5] = [
    ("harmonizer", "harmonizer.dispatch"),
    ("stateful-worker", "worker.process"),
    ("reassembler", "reassembler.store"),
    ("harmonizer", "push.deliver"),
    ("harmonizer", "harmonizer.respond"),
];

/// A client-chosen trace for one event: its trace id and parent span id.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// What the spans of one Process call must show; `Err` says what is missing.
struct ProcessTraces {
    /// (stream, sequence) → the event's trace id and its dispatch span id.
    events: BTreeMap<(String, u64), (String, String)>,
}

fn process_traces(
    spans: &[CollectedSpan],
    streams: &[&str],
    per_stream: u64,
    worker: &str,
    path: &[(&str, &str)],
) -> Result<ProcessTraces, String> {
    let call = spans
        .iter()
        .find(|s| s.service_name == "harmonizer" && s.name == "/ordo.v1.Harmonizer/Process")
        .ok_or("the Process call span is not exported yet")?;
    assert_eq!(call.attribute("rpc.system"), Some("grpc"), "{call:?}");
    assert_eq!(call.attribute("rpc.service"), Some("ordo.v1.Harmonizer"), "{call:?}");
    assert_eq!(call.attribute("rpc.method"), Some("Process"), "{call:?}");
    let mut by_trace: BTreeMap<&str, Vec<&CollectedSpan>> = BTreeMap::new();
    for span in spans {
        by_trace.entry(span.trace_id.as_str()).or_default().push(span);
    }
    let call_trace = &by_trace[call.trace_id.as_str()];
    // The call's trace is the call alone: none of its events' spans.
    assert!(
        call_trace.len() <= 2 && call_trace.iter().all(|s| s.attribute("ordo.sequence").is_none()),
        "the Process call's trace holds its events' spans ({} spans): {call_trace:#?}",
        call_trace.len()
    );

    let mut events = BTreeMap::new();
    for stream in streams {
        for sequence in 0..per_stream {
            let key = (stream.to_string(), sequence);
            let of_event = |s: &CollectedSpan| {
                s.attribute("ordo.stream_id") == Some(stream)
                    && s.attribute("ordo.sequence") == Some(&sequence.to_string())
            };
            let dispatch = spans
                .iter()
                .filter(|s| of_event(s))
                .find(|s| s.name == "harmonizer.dispatch")
                .ok_or_else(|| format!("no harmonizer.dispatch span for {key:?} yet"))?;
            let trace = &by_trace[dispatch.trace_id.as_str()];
            for &(service, name) in path {
                if !trace.iter().filter(|s| of_event(s)).any(|s| s.service_name == service && s.name == name) {
                    return Err(format!(
                        "the trace of {key:?} ({}) has no {name} span of {service} with its stream and sequence yet: {:?}",
                        dispatch.trace_id,
                        trace.iter().map(|s| (&s.service_name, &s.name)).collect::<Vec<_>>()
                    ));
                }
            }
            // The event's trace is the event's alone, and the call is a link away.
            assert!(trace.iter().all(|s| of_event(s)), "another event's span in the trace of {key:?}: {trace:#?}");
            assert!(
                dispatch.links.contains(&(call.trace_id.clone(), call.span_id.clone())),
                "the event's root links to the call span: {dispatch:?}"
            );
            assert_eq!(dispatch.attribute("ordo.operation"), Some("async-echo"), "{dispatch:?}");
            let process = trace.iter().find(|s| s.name == "worker.process").ok_or("checked above")?;
            assert_eq!(process.attribute("ordo.attempt"), Some("1"), "{process:?}");
            assert_eq!(process.attribute("ordo.worker"), Some(worker), "{process:?}");
            events.insert(key, (dispatch.trace_id.clone(), dispatch.span_id.clone()));
        }
    }
    Ok(ProcessTraces { events })
}

/// A JSON log line's event fields, trace and span id.
struct LogLine {
    fields: serde_json::Value,
    trace_id: Option<String>,
    span_id: Option<String>,
}

fn json_lines(log: &str) -> Vec<LogLine> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line.is_object())
        .map(|line| LogLine {
            fields: line["fields"].clone(),
            trace_id: line["trace_id"].as_str().map(str::to_owned),
            span_id: line["span_id"].as_str().map(str::to_owned),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn process_call_is_one_trace_per_event_with_stream_sequence_attempt_and_worker() {
    const STREAMS: [&str; 2] = ["per-event-a", "per-event-b"];
    const PER_STREAM: u64 = 10;
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint())
        // The harmonizer logs "dispatching" at debug, inside each event's root span.
        .env("RUST_LOG", "info,harmonizer=debug")
        .harmonizer_args(["--log-format", "json"])
        .start()
        .await;

    let mut call = ProcessCall::open(&cluster.harmonizer());
    for sequence in 0..PER_STREAM {
        for stream in STREAMS {
            let mut event = event(stream, sequence, "async-echo", format!("{stream}/{sequence}"));
            if stream == STREAMS[1] && sequence == 0 {
                // The client's own per-event trace: the event continues it.
                let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
                event.trace_context.insert("traceparent".into(), traceparent);
            }
            call.send(event).await.expect("send");
        }
    }
    let total = STREAMS.len() * PER_STREAM as usize;
    call.wait_for_total(total, DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_all_ok(&results), "results");
    for (stream, results) in integration_tests::client::by_stream(&results) {
        assert_ok(check_in_order_exactly_once(&results, PER_STREAM), &stream);
    }

    let worker = cluster.worker_name(0);
    let traces = once_exported(&collector, &mut cluster, |spans| {
        process_traces(spans, &STREAMS, PER_STREAM, &worker, &EVENT_PATH)
    })
    .await;
    let distinct: BTreeSet<&String> = traces.events.values().map(|(trace, _)| trace).collect();
    eprintln!("{} events, {} traces: {:?}", total, distinct.len(), traces.events);
    assert_eq!(distinct.len(), total, "one trace per event: {:?}", traces.events);
    let (client_trace, _) = &traces.events[&(STREAMS[1].to_owned(), 0)];
    assert_eq!(client_trace, CLIENT_TRACE, "the event continues the trace context the client put in it");
    let client_root =
        collector.spans().into_iter().find(|s| s.name == "harmonizer.dispatch" && &s.trace_id == client_trace);
    assert_eq!(client_root.map(|s| s.parent_span_id), Some(CLIENT_SPAN.to_owned()), "child of the client's span");

    // The harmonizer's JSON log: the line written inside each event's root
    // span names that span and its trace, as exported.
    let log = std::fs::read_to_string(cluster.harmonizer_process().log_path()).expect("the harmonizer's log");
    let lines = json_lines(&log);
    assert!(!lines.is_empty(), "no JSON log lines with --log-format json:\n{log}");
    let mut seen = 0;
    for line in lines.iter().filter(|l| l.fields["message"] == "dispatching") {
        let stream = line.fields["stream"].as_str().expect("stream field");
        let sequence = line.fields["sequence"].as_u64().expect("sequence field");
        let (trace, span) = &traces.events[&(stream.to_owned(), sequence)];
        assert_eq!(line.trace_id.as_ref(), Some(trace), "trace_id of the line for {stream}/{sequence}");
        assert_eq!(line.span_id.as_ref(), Some(span), "span_id of the line for {stream}/{sequence}");
        seen += 1;
    }
    assert_eq!(seen, total, "one 'dispatching' line per event in the harmonizer's JSON log:\n{log}");
}

/// With `--follow-releases redis` an event's trace still runs from its
/// dispatch through the worker and the reassembler to its delivery and
/// response, with the delivery span on the harmonizer.
#[tokio::test(flavor = "multi_thread")]
async fn following_redis_itself_an_events_trace_has_its_delivery_on_the_harmonizer() {
    const STREAMS: [&str; 2] = ["redis-tail-a", "redis-tail-b"];
    const PER_STREAM: u64 = 5;
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint()).harmonizer_args(["--follow-releases", "redis"]).start().await;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    for sequence in 0..PER_STREAM {
        for stream in STREAMS {
            call.send(event(stream, sequence, "async-echo", format!("{stream}/{sequence}"))).await.expect("send");
        }
    }
    call.wait_for_total(STREAMS.len() * PER_STREAM as usize, DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_all_ok(&results), "results");
    let worker = cluster.worker_name(0);
    let traces = once_exported(&collector, &mut cluster, |spans| {
        process_traces(spans, &STREAMS, PER_STREAM, &worker, &EVENT_PATH_FOLLOWING_REDIS)
    })
    .await;
    assert_eq!(traces.events.len(), STREAMS.len() * PER_STREAM as usize, "every event traced");
    assert!(
        !collector.spans().iter().any(|s| s.service_name == "push-gateway" && s.name == "push.deliver"),
        "no delivery passes through the push-gateway"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_is_one_trace_across_all_five_services() {
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint())
        // A long unary threshold: the answer is the released result itself.
        .harmonizer_args(["--unary-threshold", "20s"])
        .start()
        .await;
    let event = with_attr(event("submit-traced", 0, "callback", "ping"), "latency", "fixed:1ms");
    let result = cluster.harmonizer().submit(event).await.expect("submit").into_inner();
    assert_eq!(result.payload.as_ref(), b"ping", "{result:?}");

    let trace = once_exported(&collector, &mut cluster, |spans| {
        let call = spans.iter().find(|s| s.name == "/ordo.v1.Harmonizer/Submit").ok_or("no Submit call span yet")?;
        let services: BTreeSet<&str> =
            spans.iter().filter(|s| s.trace_id == call.trace_id).map(|s| s.service_name.as_str()).collect();
        if SERVICES.iter().all(|s| services.contains(s)) {
            Ok(call.trace_id.clone())
        } else {
            Err(format!("the Submit's trace covers only {services:?}"))
        }
    })
    .await;
    let spans: Vec<CollectedSpan> = collector.spans().into_iter().filter(|s| s.trace_id == trace).collect();
    let submit = spans.iter().find(|s| s.name == "harmonizer.submit").expect("a harmonizer.submit span");
    assert_eq!(submit.attribute("ordo.stream_id"), Some("submit-traced"), "{submit:?}");
    assert_eq!(submit.attribute("ordo.sequence"), Some("0"), "{submit:?}");
    assert_eq!(submit.attribute("ordo.operation"), Some("callback"), "{submit:?}");
    let process = spans.iter().find(|s| s.name == "worker.process").expect("a worker.process span");
    assert_eq!(process.attribute("ordo.attempt"), Some("1"), "{process:?}");
    assert_eq!(process.attribute("ordo.worker"), Some(cluster.worker_name(0).as_str()), "{process:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_attempt_is_a_span_of_the_events_trace_with_its_number_and_worker() {
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint())
        .workers(2)
        .harmonizer_args(["--event-timeout", "300ms", "--max-attempts", "2"])
        .start()
        .await;
    let stream = "traced-attempts";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    // Every attempt outlives the event timeout: two attempts, then FAILED.
    call.send(with_attr(event(stream, 0, "async-echo", "slow"), "latency", "fixed:2s")).await.expect("send");
    call.wait_for_total(1, DEADLINE).await.expect("the FAILED result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_eq!(results[0].status(), ordo_proto::ResultStatus::Failed, "{results:?}");

    let workers = [cluster.worker_name(0), cluster.worker_name(1)];
    let attempts = once_exported(&collector, &mut cluster, |spans| {
        let dispatch = spans
            .iter()
            .find(|s| s.name == "harmonizer.dispatch" && s.attribute("ordo.stream_id") == Some(stream))
            .ok_or("no dispatch span yet")?;
        let trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id == dispatch.trace_id).collect();
        let attempts: BTreeMap<String, String> = trace
            .iter()
            .filter(|s| s.name == "worker.process")
            .filter_map(|s| Some((s.attribute("ordo.attempt")?.to_owned(), s.attribute("ordo.worker")?.to_owned())))
            .collect();
        // The FAILED result the harmonizer released in the event's place is in its trace too.
        let released = ["reassembler.store", "push.deliver", "harmonizer.respond"]
            .iter()
            .all(|name| trace.iter().any(|s| s.name == *name));
        if attempts.len() == 2 && released {
            Ok(attempts)
        } else {
            Err(format!(
                "attempts {attempts:?}, released {released}: {:?}",
                trace.iter().map(|s| &s.name).collect::<Vec<_>>()
            ))
        }
    })
    .await;
    assert_eq!(attempts.keys().map(String::as_str).collect::<Vec<_>>(), ["1", "2"], "{attempts:?}");
    for worker in attempts.values() {
        assert!(workers.contains(worker), "{worker} is one of {workers:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stateless_event_of_a_process_call_is_one_trace_and_makes_no_other() {
    const N: u64 = 5;
    let collector = OtlpCollector::start().await.expect("the collector starts");
    let mut cluster = traced(&collector.endpoint()).start().await;
    let stream = "traced-stateless";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    for sequence in 0..N {
        call.send(event(stream, sequence, "upper", "abc")).await.expect("send");
    }
    call.wait_for_total(N as usize, DEADLINE).await.expect("every result arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, N), stream);

    once_exported(&collector, &mut cluster, |spans| {
        let mut stateless_traces = BTreeSet::new();
        for span in spans.iter().filter(|s| s.service_name == "stateless") {
            stateless_traces.insert(span.trace_id.as_str());
        }
        let event_traces: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.name == "harmonizer.dispatch" && s.attribute("ordo.stream_id") == Some(stream))
            .map(|s| s.trace_id.as_str())
            .collect();
        // The harmonizer runs stateless events in the background, outside any
        // span: a call span of Execute would be a one-span trace of its own.
        if event_traces.len() == N as usize && stateless_traces == event_traces {
            Ok(())
        } else {
            Err(format!("event traces {event_traces:?}, traces with stateless spans {stateless_traces:?}"))
        }
    })
    .await;
}
