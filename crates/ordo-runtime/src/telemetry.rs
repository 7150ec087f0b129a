//! Telemetry: readable logs on stderr, spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace-context propagation
//! across every gRPC hop.
//!
//! Two propagation paths exist because Ordo multiplexes many events on one
//! long-lived gRPC stream: call metadata carries the context of the *call*
//! ([`TraceInterceptor`], [`server_span`]), and each event/result message
//! carries the context of the *event* in its `trace_context` map
//! ([`event_span`], [`inject`]). Per-event spans use the target
//! [`EVENT_TARGET`]; without an OTLP endpoint no layer enables them, so
//! they cost (almost) nothing on the hot path.
//!
//! Trace shape: a unary call (`Submit`, `Execute`, `Subscribe`) is one trace,
//! its event a child of the call's span. A `Process` call carries any number
//! of events, so each of its events gets a trace of its own
//! ([`event_root_span`]: the client's per-event `trace_context` if it sent
//! one, else a new root), linked to the call's span; the call's own trace
//! stays a few spans. Every per-event span carries `ordo.stream_id` and
//! `ordo.sequence`; the worker's also `ordo.attempt` and `ordo.worker`, and
//! where the operation is known, `ordo.operation`.
//!
//! JSON log lines written inside an exported span carry its `trace_id` and
//! `span_id` ([`json_log`]); only with an OTLP endpoint do spans have ids.

use std::{collections::HashMap, str::FromStr};

use anyhow::Context as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing::{Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    fmt::{
        MakeWriter,
        format::{Format, Json, JsonFields},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

pub mod json_log;

/// Target of the per-event spans.
pub const EVENT_TARGET: &str = "ordo::event";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Flushes and shuts the exporter down when dropped.
#[must_use = "spans are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {error}");
        }
    }
}

const DEFAULT_LOG_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn";
const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,tower=off,tonic=off";

/// The log layer's filter: `RUST_LOG` (or the default) plus a directive for
/// the per-event spans. They are off for the log unless `events_visible`
/// (JSON log and OTLP on): then the JSON log sees them, so a line written
/// inside one carries that event's trace and span id. Without OTLP they
/// stay off everywhere, which keeps them free on the hot path.
fn log_directives(rust_log: Option<&str>, events_visible: bool) -> String {
    let level = if events_visible { "info" } else { "off" };
    format!("{},{EVENT_TARGET}={level}", rust_log.unwrap_or(DEFAULT_LOG_FILTER))
}

/// The `--log-format json` layer: tracing-subscriber's JSON lines with
/// `trace_id` and `span_id` added ([`json_log::WithTraceIds`]).
fn json_layer<S, W>(writer: W) -> tracing_subscriber::fmt::Layer<S, JsonFields, json_log::WithTraceIds<Format<Json>>, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer().json().with_writer(writer).map_event_format(json_log::WithTraceIds)
}

/// Installs the global subscriber. Must run inside a tokio runtime (the OTLP
/// exporter's batch processor runs on it).
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty());
    let rust_log = std::env::var("RUST_LOG").ok();
    let events_visible = endpoint.is_some() && format == LogFormat::Json;
    let log_filter = EnvFilter::try_new(log_directives(rust_log.as_deref(), events_visible))
        .context("RUST_LOG is not a valid filter")?;
    let log_layer = log_layer(format, log_filter);

    let (otel_layer, provider) = match endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .with_context(|| format!("cannot build the OTLP exporter for {endpoint}"))?;
            let provider = SdkTracerProvider::builder()
                .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
                .with_resource(Resource::builder().with_service_name(service).build())
                .build();
            let tracer = provider.tracer(service);
            global::set_tracer_provider(provider.clone());
            let filter =
                EnvFilter::try_new(std::env::var("ORDO_TRACE_FILTER").unwrap_or_else(|_| DEFAULT_TRACE_FILTER.into()))
                    .context("ORDO_TRACE_FILTER is not a valid filter")?;
            let layer: BoxedLayer = Box::new(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    subscriber(log_layer, otel_layer).try_init().context("a global tracing subscriber is already installed")?;
    Ok(TelemetryGuard { provider })
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The log layer in `format`, filtered by `filter`, writing to stderr.
fn log_layer(format: LogFormat, filter: EnvFilter) -> BoxedLayer {
    match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_filter(filter),
        ),
        LogFormat::Json => Box::new(json_layer(std::io::stderr).with_filter(filter)),
    }
}

/// The process's subscriber: the log layer, and the OTLP layer when there is
/// an exporter. Without one there is no layer in its place, not a `None`
/// one: tracing-subscriber's `Option` layer answers `Interest::always()` for
/// `None`, so every per-event span was built in the registry for nobody
/// (about 6 % of a worker's CPU on workload (b)).
fn subscriber(log: BoxedLayer, otel: Option<BoxedLayer>) -> impl Subscriber + Send + Sync {
    tracing_subscriber::registry().with(std::iter::once(log).chain(otel).collect::<Vec<_>>())
}

/// A W3C trace-context carrier as carried in Ordo messages.
pub type Carrier = HashMap<String, String>;

/// The context of `span` as a carrier for a message. When the span is not
/// recorded (no OTLP exporter in this process) the incoming carrier is passed
/// on unchanged, so a trace stays whole through services that don't export.
pub fn inject(span: &Span, incoming: &Carrier) -> Carrier {
    // The hot path without an exporter: no context to read, no map to build.
    if span.is_disabled() {
        return incoming.clone();
    }
    let cx = span.context();
    let mut carrier = Carrier::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    if carrier.is_empty() { incoming.clone() } else { carrier }
}

/// Attribute names of the per-event spans. OpenTelemetry's semantic
/// conventions have no stream or sequence, hence Ordo's own prefix.
pub mod attr {
    pub const STREAM_ID: &str = "ordo.stream_id";
    pub const SEQUENCE: &str = "ordo.sequence";
    /// The attempt a worker makes (1 for the first).
    pub const ATTEMPT: &str = "ordo.attempt";
    /// The worker's name (`--name`).
    pub const WORKER: &str = "ordo.worker";
    pub const OPERATION: &str = "ordo.operation";
}

/// One per-event span; `ordo.attempt`, `ordo.worker` and `ordo.operation`
/// are declared empty so that the services that know them can `record` them.
macro_rules! per_event_span {
    ($name:expr, $stream_id:expr, $sequence:expr $(, parent: $parent:expr)?) => {
        tracing::info_span!(
            target: EVENT_TARGET,
            $(parent: $parent,)?
            "event",
            otel.name = $name,
            ordo.stream_id = $stream_id,
            ordo.sequence = $sequence,
            ordo.attempt = tracing::field::Empty,
            ordo.worker = tracing::field::Empty,
            ordo.operation = tracing::field::Empty,
        )
    };
}

/// A per-event span named `name`, child of the context in `carrier` (if
/// any): how every hop after the entry continues the event's trace.
pub fn event_span(name: &'static str, stream_id: &str, sequence: u64, carrier: &Carrier) -> Span {
    let span = per_event_span!(name, stream_id, sequence);
    if !span.is_disabled() && !carrier.is_empty() {
        let parent = global::get_text_map_propagator(|p| p.extract(carrier));
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of an event entering Ordo by a unary call (`Submit`): a child of
/// the context the client put in the event, or else of `call` (the span of
/// the gRPC call carrying it), so that the call and its event are one trace.
pub fn entry_span(name: &'static str, stream_id: &str, sequence: u64, carrier: &Carrier, call: &Span) -> Span {
    if !carrier.is_empty() {
        return event_span(name, stream_id, sequence, carrier);
    }
    per_event_span!(name, stream_id, sequence, parent: call)
}

/// The span of an event entering Ordo on a `Process` call, the root of the
/// event's own trace: a child of the context the client put in the event
/// (the client's per-event trace) if there is one, else a new trace. It is
/// linked to `call`, whose trace thus stays small however many events the
/// call carries (a call of 2048 events used to be one trace of ~10,000 spans).
pub fn event_root_span(name: &'static str, stream_id: &str, sequence: u64, carrier: &Carrier, call: &Span) -> Span {
    let span = per_event_span!(name, stream_id, sequence, parent: None);
    if span.is_disabled() {
        return span;
    }
    if !carrier.is_empty() {
        let parent = global::get_text_map_propagator(|p| p.extract(carrier));
        let _ = span.set_parent(parent);
    }
    // Invalid (not exported) call spans are skipped by add_link.
    span.add_link(call.context().span().span_context().clone());
    span
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Calls that get no span of their own: health checks and reflection (polled
/// by orchestrators and tools: a one-span trace each is noise), the
/// long-lived internal streams, which live as long as the process and carry
/// many events, each with its own trace context in the message, and the
/// internal per-event `Stateless/Execute`, whose event carries its trace
/// context too (its `stateless.execute` span is in the event's trace; a call
/// span would be a trace of its own whenever the caller runs outside a span,
/// as the harmonizer's background stateless runs do).
const UNTRACED_PATHS: [&str; 6] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/ordo.v1.StatefulWorker/Work",
    "/ordo.v1.Reassembler/Deliver",
    "/ordo.v1.PushGateway/Follow",
    "/ordo.v1.Stateless/Execute",
];

/// The span of one incoming gRPC call, child of the caller's `traceparent`
/// (none for [`UNTRACED_PATHS`]). Used as the server's `trace_fn`.
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    if UNTRACED_PATHS.iter().any(|prefix| path.starts_with(prefix)) {
        return Span::none();
    }
    // `/ordo.v1.Harmonizer/Process` → service `ordo.v1.Harmonizer`, method `Process`.
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    if !span.is_disabled() {
        let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
        let _ = span.set_parent(parent);
    }
    span
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Client interceptor: puts the current span's context into the call's
/// metadata (`traceparent`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = Span::current().context();
        global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut())));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span_for(path: &str) -> Span {
        let request = http::Request::builder().uri(path).body(()).expect("a request");
        server_span(&request)
    }

    /// Runs `f` under a subscriber that exports (to nowhere) every span,
    /// per-event ones included, as `init` does with an OTLP endpoint.
    fn with_tracer(f: impl FnOnce()) {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
    }

    fn trace_of(span: &Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn a_process_event_is_a_trace_of_its_own_and_later_hops_continue_it() {
        with_tracer(|| {
            let call = span_for("/ordo.v1.Harmonizer/Process");
            let _inside = call.enter();
            let first = event_root_span("harmonizer.dispatch", "s", 0, &Carrier::new(), &call);
            let second = event_root_span("harmonizer.dispatch", "s", 1, &Carrier::new(), &call);
            assert_ne!(trace_of(&first), trace_of(&call), "an event of a Process call is not in the call's trace");
            assert_ne!(trace_of(&first), trace_of(&second), "each event is its own trace");
            // What is injected downstream is the event's context, so the worker continues the event's trace.
            let carrier = inject(&first, &Carrier::new());
            let worker = event_span("worker.process", "s", 0, &carrier);
            assert_eq!(trace_of(&worker), trace_of(&first));
            assert!(inject(&worker, &carrier).contains_key("traceparent"), "{carrier:?}");
        });
    }

    #[test]
    fn a_process_event_with_its_own_trace_context_continues_it() {
        with_tracer(|| {
            let client = tracing::info_span!("client");
            let carrier = inject(&client, &Carrier::new());
            let call = span_for("/ordo.v1.Harmonizer/Process");
            let event = event_root_span("harmonizer.dispatch", "s", 0, &carrier, &call);
            assert_eq!(trace_of(&event), trace_of(&client), "the client's per-event trace is continued");
            assert_ne!(trace_of(&event), trace_of(&call));
        });
    }

    #[test]
    fn a_submitted_event_is_in_its_call_trace() {
        with_tracer(|| {
            let call = span_for("/ordo.v1.Harmonizer/Submit");
            let event = entry_span("harmonizer.submit", "s", 0, &Carrier::new(), &call);
            assert_eq!(trace_of(&event), trace_of(&call), "Submit stays one trace");
        });
    }

    #[test]
    fn without_an_exporter_per_event_spans_are_disabled_and_carriers_pass_through() {
        // The default log filter of every service without an OTLP endpoint.
        // (Callsite interest is process-wide: run under nextest, one process
        // per test, as `just test` does, so no other test's tracer enables them.)
        // The subscriber `init` installs then, in either log format.
        for format in [LogFormat::Text, LogFormat::Json] {
            let filter = EnvFilter::new(log_directives(None, false));
            tracing::subscriber::with_default(subscriber(log_layer(format, filter), None), || {
                assert_per_event_spans_are_disabled();
            });
        }
    }

    fn assert_per_event_spans_are_disabled() {
        let call = span_for("/ordo.v1.Harmonizer/Process");
        let incoming = Carrier::from([("traceparent".to_owned(), "from-the-client".to_owned())]);
        for span in [
            event_root_span("harmonizer.dispatch", "s", 0, &incoming, &call),
            entry_span("harmonizer.submit", "s", 0, &Carrier::new(), &call),
            event_span("worker.process", "s", 0, &incoming),
        ] {
            assert!(span.is_disabled(), "per-event spans cost nothing without OTLP: {span:?}");
            assert_eq!(inject(&span, &incoming), incoming);
        }
    }

    #[test]
    fn health_reflection_and_internal_streams_get_no_call_span() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            for path in [
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Watch",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/ordo.v1.StatefulWorker/Work",
                "/ordo.v1.Reassembler/Deliver",
                "/ordo.v1.PushGateway/Follow",
                "/ordo.v1.Stateless/Execute",
            ] {
                assert!(span_for(path).is_none(), "{path} must not open a span (a one-span trace each)");
            }
            for path in ["/ordo.v1.Harmonizer/Submit", "/ordo.v1.Harmonizer/Process", "/ordo.v1.PushGateway/Subscribe"]
            {
                assert!(!span_for(path).is_none(), "{path} is traced");
            }
        });
    }
}
