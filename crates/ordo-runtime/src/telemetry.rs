//! Telemetry: readable logs on stderr, spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace-context propagation
//! across every gRPC hop.
//!
//! Two propagation paths exist because Ordo multiplexes many events on one
//! long-lived gRPC stream: call metadata carries the context of the *call*
//! ([`TraceInterceptor`], [`server_span`]), and each event/result message
//! carries the context of the *event* in its `trace_context` map
//! ([`event_span`], [`inject`]). Per-event spans use the target
//! [`EVENT_TARGET`]; the log layer never enables them, so without an OTLP
//! endpoint they cost (almost) nothing on the hot path.

use std::{collections::HashMap, str::FromStr};

use anyhow::Context as _;
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
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt};

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

const DEFAULT_LOG_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn,ordo::event=off";
const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,tower=off,tonic=off";

/// Installs the global subscriber. Must run inside a tokio runtime (the OTLP
/// exporter's batch processor runs on it).
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter = match std::env::var("RUST_LOG") {
        Ok(directives) => {
            EnvFilter::try_new(format!("{directives},ordo::event=off")).context("RUST_LOG is not a valid filter")?
        }
        Err(_) => EnvFilter::new(DEFAULT_LOG_FILTER),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log_layer: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt.with_target(false).with_filter(log_filter)),
        LogFormat::Json => Box::new(fmt.json().with_filter(log_filter)),
    };

    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty());
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
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter);
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(log_layer)
        .with(otel_layer)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    Ok(TelemetryGuard { provider })
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

/// A per-event span named `name`, child of the context in `carrier` (if any).
pub fn event_span(name: &'static str, stream_id: &str, sequence: u64, carrier: &Carrier) -> Span {
    let span = tracing::info_span!(
        target: EVENT_TARGET,
        "event",
        otel.name = name,
        ordo.stream_id = stream_id,
        ordo.sequence = sequence,
    );
    if !span.is_disabled() && !carrier.is_empty() {
        let parent = global::get_text_map_propagator(|p| p.extract(carrier));
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of an event entering Ordo: a child of the context the client put
/// in the event, or else of `call` (the span of the gRPC call carrying it).
pub fn entry_span(name: &'static str, stream_id: &str, sequence: u64, carrier: &Carrier, call: &Span) -> Span {
    if !carrier.is_empty() {
        return event_span(name, stream_id, sequence, carrier);
    }
    tracing::info_span!(
        target: EVENT_TARGET,
        parent: call,
        "event",
        otel.name = name,
        ordo.stream_id = stream_id,
        ordo.sequence = sequence,
    )
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
/// by orchestrators and tools: a one-span trace each is noise), and the
/// long-lived internal streams, which live as long as the process and carry
/// many events, each with its own trace context in the message.
const UNTRACED_PATHS: [&str; 5] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/ordo.v1.StatefulWorker/Work",
    "/ordo.v1.Reassembler/Deliver",
    "/ordo.v1.PushGateway/Follow",
];

/// The span of one incoming gRPC call, child of the caller's `traceparent`
/// (none for [`UNTRACED_PATHS`]). Used as the server's `trace_fn`.
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    if UNTRACED_PATHS.iter().any(|prefix| path.starts_with(prefix)) {
        return Span::none();
    }
    let span = tracing::info_span!("grpc", otel.name = path, otel.kind = "server", rpc.system = "grpc",);
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
            ] {
                assert!(span_for(path).is_none(), "{path} must not open a span (a one-span trace each)");
            }
            for path in ["/ordo.v1.Harmonizer/Submit", "/ordo.v1.PushGateway/Subscribe", "/ordo.v1.Stateless/Execute"] {
                assert!(!span_for(path).is_none(), "{path} is traced");
            }
        });
    }
}
