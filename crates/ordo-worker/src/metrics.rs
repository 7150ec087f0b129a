//! The worker's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once.

use std::sync::LazyLock;

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

pub static CONCURRENCY_LIMIT: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_worker_concurrency_limit"));
pub static IN_FLIGHT: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_worker_in_flight"));
pub static ATTEMPTS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_worker_attempts_total"));
pub static HAND_BACKS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_worker_hand_backs_total"));
pub static TIMEOUTS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_worker_timeouts_total"));
pub static CANCELS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_worker_cancels_total"));
pub static RESULTS_OK: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_worker_results_total", "status" => "ok"));
pub static RESULTS_FAILED: LazyLock<Counter> =
    LazyLock::new(|| counter!("ordo_worker_results_total", "status" => "failed"));
pub static DURATION: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_worker_attempt_duration_seconds"));

/// Counts an attempt in flight while it lives.
pub struct Running;

impl Running {
    pub fn start() -> Self {
        ATTEMPTS.increment(1);
        IN_FLIGHT.increment(1.0);
        Self
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        IN_FLIGHT.decrement(1.0);
    }
}
