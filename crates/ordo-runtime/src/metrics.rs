//! Prometheus metrics, designed once: every service records through the
//! `metrics` facade and [`crate::app::run`] serves the Prometheus text format
//! (`GET /metrics`) on the service's `--metrics-listen` address, rendered by
//! `metrics-exporter-prometheus` and served with axum. `off` installs no
//! recorder, so every metric is a no-op.
//!
//! Histograms named `*_seconds` get [`SECONDS_BUCKETS`]; batch sizes get
//! [`SIZE_BUCKETS`]. Hot paths keep their handles in statics (see
//! [`LazyLock`](std::sync::LazyLock) uses in the services): they are created
//! after the recorder is installed, since `run` starts after it.

use std::{net::SocketAddr, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Buckets of every `*_seconds` histogram: 100 µs to 60 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of every `*_size` histogram (results per batch).
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

/// How often histogram buffers are folded in (besides at every scrape).
const UPKEEP: Duration = Duration::from_secs(5);

/// Parses a `--metrics-listen` value: an address, or `off` (no endpoint).
pub fn parse_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|e| format!("{e} (an address such as 0.0.0.0:9091, or `off`)"))
}

/// Installs the process-wide Prometheus recorder.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)?
        .install_recorder()?;
    Ok(handle)
}

/// Serves `GET /metrics` (and `/`) on `listener` until the runtime stops,
/// and runs the recorder's upkeep.
pub fn spawn_server(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    let render = move || {
        let handle = handle.clone();
        async move {
            handle.run_upkeep();
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render.clone()))
        .route("/", axum::routing::get(render));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
}

/// A bounded label value: `name` when it is one of `known`, else `"unknown"`
/// (label values come from a fixed set, never from what a client sent).
pub fn bounded_label(name: &str, known: &[&'static str]) -> &'static str {
    known.iter().copied().find(|k| *k == name).unwrap_or("unknown")
}

/// A gRPC status code as a label value (`OUT_OF_RANGE`, ...).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Seconds from `unix_nanos` (a wall-clock stamp) to now; `None` for an
/// unset stamp or one in the future (clock skew).
pub fn seconds_since_unix_nanos(unix_nanos: u64) -> Option<f64> {
    if unix_nanos == 0 {
        return None;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    let now = u64::try_from(now.as_nanos()).ok()?;
    now.checked_sub(unix_nanos).map(|nanos| nanos as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_addresses_and_off() {
        assert_eq!(parse_listen("off"), Ok(None));
        assert_eq!(parse_listen("127.0.0.1:9091"), Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9091)))));
        assert!(parse_listen("nine").is_err());
    }
}
