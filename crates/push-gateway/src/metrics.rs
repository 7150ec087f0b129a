//! The push-gateway's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once; label values are fixed strings.

use std::sync::LazyLock;

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use ordo_proto::v1::EventResult;

pub static SUBSCRIBERS_GRPC: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "grpc"));
pub static SUBSCRIBERS_SSE: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "sse"));
pub static SUBSCRIBERS_AMQP: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "amqp"));
pub static REORDER_WAIT: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_reorder_wait_seconds"));
pub static AMQP_CONFIRMED: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_amqp_confirmed_total"));

/// Label values by `ResultStatus` number.
const STATUSES: [&str; 6] = ["unspecified", "ok", "failed", "processing", "rejected", "gap"];
static RELEASED: LazyLock<[Counter; 6]> =
    LazyLock::new(|| STATUSES.map(|status| counter!("ordo_results_released_total", "status" => status)));

/// A released result heard on the release channel: counted by status, and
/// its wait from completion (`completed_unix_nanos`) to release observed.
pub fn released(result: &EventResult) {
    let index = usize::try_from(result.status).unwrap_or(0).min(STATUSES.len() - 1);
    RELEASED[index].increment(1);
    if let Some(wait) = ordo_runtime::metrics::seconds_since_unix_nanos(result.completed_unix_nanos) {
        REORDER_WAIT.record(wait);
    }
}

/// Counts one subscriber of a channel while it lives.
pub struct Subscriber(&'static LazyLock<Gauge>);

impl Subscriber {
    pub fn new(gauge: &'static LazyLock<Gauge>) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
