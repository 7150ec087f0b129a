//! JSON log lines with the OpenTelemetry ids of the span they were written
//! in: `trace_id` (32 hex digits) and `span_id` (16), as Jaeger shows them,
//! so a log line leads to its trace and a trace to its log lines.
//!
//! tracing-subscriber's JSON formatter knows nothing of OpenTelemetry. This
//! wraps it: the line it writes gets the two ids appended, read from the
//! [`OtelData`] that tracing-opentelemetry keeps in the nearest span (of the
//! event's scope) it exports. Lines written outside any exported span (and
//! every line when no OTLP endpoint is configured: then no span has ids)
//! are written unchanged, without the two fields.

use std::fmt;

use opentelemetry::trace::{SpanId, TraceId};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Wraps a JSON [`FormatEvent`] (tracing-subscriber's `Format<Json>`) and
/// adds `trace_id` and `span_id` to each line written inside an exported span.
#[derive(Debug, Clone, Default)]
pub struct WithTraceIds<F>(pub F);

/// The ids of the innermost span of the event's scope that has them.
fn ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(TraceId, SpanId)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    // Leaf to root: a span that is logged but not exported (another filter)
    // has no OtelData; its exported parent still names the trace.
    ctx.event_scope()?.find_map(|span| {
        let extensions = span.extensions();
        let data = extensions.get::<OtelData>()?;
        let (trace_id, span_id) = (data.trace_id()?, data.span_id()?);
        (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some((trace_id, span_id))
    })
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let Some((trace_id, span_id)) = ids(ctx) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The inner formatter writes one object and a newline: reopen the
        // object to append the two fields. Anything else is passed on as is.
        let Some(object) = line.trim_end().strip_suffix('}') else {
            return writer.write_str(&line);
        };
        let comma = if object.trim_end().ends_with('{') { "" } else { "," };
        writeln!(writer, "{object}{comma}\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}")
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _, fmt::MakeWriter, layer::SubscriberExt as _};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<serde_json::Value> {
            let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
            String::from_utf8(bytes)
                .expect("utf-8 log output")
                .lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
                .collect()
        }
    }

    /// The subscriber `init` builds for `--log-format json` with OTLP on:
    /// the same log filter and the same formatter, an exporter-less tracer.
    fn with_subscriber(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let provider = SdkTracerProvider::builder().build();
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let filter = EnvFilter::new(super::super::log_directives(None, true));
        let subscriber = tracing_subscriber::registry()
            .with(super::super::json_layer(buffer.clone()).with_filter(filter))
            .with(otel);
        tracing::subscriber::with_default(subscriber, f);
        buffer.lines()
    }

    fn ids_of(span: &tracing::Span) -> (String, String) {
        let cx = span.context();
        let span_context = cx.span().span_context().clone();
        (span_context.trace_id().to_string(), span_context.span_id().to_string())
    }

    #[test]
    fn a_line_inside_a_span_carries_its_trace_and_span_id() {
        let mut expected = None;
        let lines = with_subscriber(|| {
            let call = tracing::info_span!("grpc");
            call.in_scope(|| tracing::info!(answer = 42, "inside"));
            expected = Some(ids_of(&call));
        });
        let (trace_id, span_id) = expected.expect("the closure ran");
        assert_eq!(trace_id.len(), 32);
        assert_eq!(span_id.len(), 16);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
        assert_eq!(line["span_id"], span_id.as_str(), "{line}");
        // Everything the plain JSON formatter writes is still there.
        assert_eq!(line["fields"]["message"], "inside", "{line}");
        assert_eq!(line["fields"]["answer"], 42, "{line}");
        assert_eq!(line["level"], "INFO", "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
    }

    #[test]
    fn a_line_inside_a_per_event_span_carries_the_event_span_ids() {
        // Per-event spans are filtered out of the text log, but the JSON log
        // sees them (with OTLP on) so that lines written inside one name it.
        let mut expected = None;
        let lines = with_subscriber(|| {
            let call = tracing::info_span!("grpc");
            let _call = call.enter();
            let event = super::super::event_span("test.event", "s", 7, &Default::default());
            event.in_scope(|| tracing::debug!("not logged at info"));
            event.in_scope(|| tracing::warn!("inside the event"));
            expected = Some((ids_of(&event), ids_of(&call)));
        });
        let ((trace_id, span_id), (call_trace, call_span)) = expected.expect("the closure ran");
        assert_eq!(trace_id, call_trace, "the event span is the call span's child here");
        assert_ne!(span_id, call_span);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["trace_id"], trace_id.as_str(), "{}", lines[0]);
        assert_eq!(lines[0]["span_id"], span_id.as_str(), "the innermost span: {}", lines[0]);
    }

    #[test]
    fn a_line_outside_any_span_has_no_ids() {
        let lines = with_subscriber(|| tracing::info!("outside"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let object = lines[0].as_object().expect("an object");
        assert!(!object.contains_key("trace_id") && !object.contains_key("span_id"), "{object:?}");
        assert_eq!(lines[0]["fields"]["message"], "outside");
    }

    #[test]
    fn without_an_exporter_lines_have_no_ids() {
        // No OTLP layer at all (no endpoint configured): spans have no OtelData.
        let buffer = Buffer::default();
        let filter = EnvFilter::new(super::super::log_directives(None, false));
        let subscriber =
            tracing_subscriber::registry().with(super::super::json_layer(buffer.clone()).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("grpc").in_scope(|| tracing::info!("inside"));
        });
        let lines = buffer.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[0]["span"]["name"], "grpc", "{}", lines[0]);
    }
}
