//! The worker's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once.

use std::sync::LazyLock;

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

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

/// Gives every metric of the worker its `# HELP` line (and unit), and
/// registers its series at 0 (a dashboard sees 0 timeouts, not no series).
/// Called once when the worker starts, after `ordo_runtime::app::run`
/// installed the recorder (a description given before that would be lost).
pub fn describe() {
    for counter in [&ATTEMPTS, &HAND_BACKS, &TIMEOUTS, &CANCELS, &RESULTS_OK, &RESULTS_FAILED] {
        LazyLock::force(counter);
    }
    LazyLock::force(&IN_FLIGHT);
    LazyLock::force(&DURATION);
    describe_gauge!(
        "ordo_worker_concurrency_limit",
        Unit::Count,
        "Attempts this worker runs at once at most (--concurrency)."
    );
    describe_gauge!(
        "ordo_worker_in_flight",
        Unit::Count,
        "Attempts running now, against ordo_worker_concurrency_limit."
    );
    describe_counter!("ordo_worker_attempts_total", Unit::Count, "Attempts started.");
    describe_counter!(
        "ordo_worker_hand_backs_total",
        Unit::Count,
        "Transient failures handed back to the harmonizer (retried there)."
    );
    describe_counter!(
        "ordo_worker_timeouts_total",
        Unit::Count,
        "Attempts ended by their own deadline (the attempt time from the harmonizer); nothing delivered."
    );
    describe_counter!(
        "ordo_worker_cancels_total",
        Unit::Count,
        "Attempts cancelled by the harmonizer (timed out there, retried elsewhere or given up) or at the drain deadline."
    );
    describe_counter!(
        "ordo_worker_results_total",
        Unit::Count,
        "Results produced and handed to the reassemblers, by status (ok, failed)."
    );
    describe_histogram!(
        "ordo_worker_attempt_duration_seconds",
        Unit::Seconds,
        "Time per attempt, including the operation's simulated latency."
    );
}

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
