//! The harmonizer's Prometheus metrics (served by `ordo_runtime::metrics`).
//! Handles are created once; the per-operation ones are cached by operation
//! name, and only operations of the registry get their own label value
//! (anything else is `unknown`), so cardinality stays bounded.

use std::{
    collections::HashMap,
    sync::{LazyLock, RwLock},
    time::Duration,
};

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Label value of operations not in the registry.
pub const UNKNOWN: &str = "unknown";

pub static ATTEMPTS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_harmonizer_attempts_total"));
pub static RETRIES: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_harmonizer_retries_total"));
pub static TIMEOUTS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_harmonizer_timeouts_total"));
pub static HAND_BACKS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_harmonizer_hand_backs_total"));
pub static GIVEN_UP: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_harmonizer_failed_total"));
pub static LATENCY: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_event_latency_seconds"));
pub static IN_FLIGHT: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_harmonizer_in_flight_events"));
pub static WINDOW_FILL: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_harmonizer_window_occupancy_ratio"));
pub static WINDOW_STREAMS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_harmonizer_streams_in_flight"));

static ACCEPTED: LazyLock<RwLock<HashMap<String, Counter>>> = LazyLock::new(RwLock::default);

/// One event accepted (dispatched to a worker or the stateless service);
/// its operation is one of the registry's (it was checked).
pub fn accepted(operation: &str) {
    if let Some(counter) = ordo_runtime::sync::read(&ACCEPTED).get(operation) {
        counter.increment(1);
        return;
    }
    let counter = counter!("ordo_events_accepted_total", "operation" => operation.to_owned());
    counter.increment(1);
    ordo_runtime::sync::write(&ACCEPTED).insert(operation.to_owned(), counter);
}

/// One event refused with `code`; `operation` is its label value (an
/// operation of the registry, else [`UNKNOWN`]). Not a hot path.
pub fn rejected(code: tonic::Code, operation: &str) {
    let code = ordo_runtime::metrics::code_label(code);
    counter!("ordo_events_rejected_total", "code" => code, "operation" => operation.to_owned()).increment(1);
}

/// From an event's acceptance on a `Process` call to its released result.
pub fn latency(elapsed: Duration) {
    LATENCY.record(elapsed.as_secs_f64());
}
