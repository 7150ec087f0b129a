//! An in-process OTLP/gRPC trace collector for tests: services started with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` = [`OtlpCollector::endpoint`] export their
//! spans here, and tests read them back with the exporting service's name.
//!
//! Why not `fake-opentelemetry-collector`: its `ExportedSpan` drops the
//! resource, so the `service.name` of a span cannot be read, and its bounded
//! channel stalls exporters when a test reads late. This keeps every span in
//! memory with `service.name` taken from the resource it was exported under.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;

/// One exported span, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedSpan {
    /// Resource attribute `service.name` of the exporter (empty if unset).
    pub service_name: String,
    /// Lower-case hex, 32 digits.
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// The span's attributes, values as text (`42`, `true`, `"s"` → `s`).
    pub attributes: BTreeMap<String, String>,
    /// The spans this one links to: (trace id, span id), hex.
    pub links: Vec<(String, String)>,
}

impl CollectedSpan {
    /// An attribute's value as text, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Store = Arc<Mutex<Vec<CollectedSpan>>>;

/// The collector; it stops when dropped.
#[derive(Debug)]
pub struct OtlpCollector {
    addr: SocketAddr,
    spans: Store,
    server: JoinHandle<()>,
}

impl OtlpCollector {
    /// Listens on a free 127.0.0.1 port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("cannot bind the collector")?;
        let addr = listener.local_addr().context("collector address")?;
        let spans = Store::default();
        let service = TraceServiceServer::new(Sink { spans: spans.clone() });
        let server = tokio::spawn(async move {
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("ordo testkit: OTLP collector stopped: {error}");
            }
        });
        Ok(Self { addr, spans, server })
    }

    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every span received so far, by trace id.
    pub fn traces(&self) -> BTreeMap<String, Vec<CollectedSpan>> {
        let mut traces: BTreeMap<String, Vec<CollectedSpan>> = BTreeMap::new();
        for span in self.spans() {
            traces.entry(span.trace_id.clone()).or_default().push(span);
        }
        traces
    }

    /// For each trace id, the services that exported spans of it.
    pub fn services_by_trace(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut traces: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for span in self.spans() {
            traces.entry(span.trace_id).or_default().insert(span.service_name);
        }
        traces
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Sink {
    spans: Store,
}

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut collected = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                collected.push(CollectedSpan {
                    service_name: service_name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    attributes: span
                        .attributes
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?))))
                        .collect(),
                    links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
                });
            }
        }
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).extend(collected);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}
