//! The harmonizer's Prometheus metrics (served by `ordo_runtime::metrics`).
//! Handles are created once; the per-operation ones are cached by operation
//! name, and only operations of the registry get their own label value
//! (anything else is `unknown`), so cardinality stays bounded.

use std::{
    collections::HashMap,
    sync::{LazyLock, RwLock},
    time::Duration,
};

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

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
/// Streams the open Process calls follow on the push-gateway (one per call and stream).
pub static FOLLOWED_STREAMS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_followed_streams"));

/// Gives every metric of the harmonizer its `# HELP` line (and unit), and
/// registers the label-less series at 0, so a dashboard or an alert sees 0
/// retries rather than no series at all. Called once at start, after
/// `ordo_runtime::app::run` installed the recorder (a description given
/// before that would be lost); a no-op with metrics off.
pub fn describe() {
    for counter in [&ATTEMPTS, &RETRIES, &TIMEOUTS, &HAND_BACKS, &GIVEN_UP] {
        LazyLock::force(counter);
    }
    for gauge in [&IN_FLIGHT, &WINDOW_FILL, &WINDOW_STREAMS, &FOLLOWED_STREAMS] {
        LazyLock::force(gauge);
    }
    LazyLock::force(&LATENCY);
    describe_counter!(
        "ordo_events_accepted_total",
        Unit::Count,
        "Events accepted (dispatched to a worker or the stateless service) on Process and Submit, by operation."
    );
    describe_counter!(
        "ordo_events_rejected_total",
        Unit::Count,
        "Events refused, by gRPC code and operation (unknown when the registry has no such operation)."
    );
    describe_counter!(
        "ordo_harmonizer_attempts_total",
        Unit::Count,
        "Stateful attempts dispatched to workers (first attempts and retries)."
    );
    describe_counter!(
        "ordo_harmonizer_retries_total",
        Unit::Count,
        "Re-dispatches of an event after a timeout, a hand-back or a lost worker."
    );
    describe_counter!(
        "ordo_harmonizer_timeouts_total",
        Unit::Count,
        "Attempts abandoned past their attempt time (--event-timeout); each is cancelled on its worker."
    );
    describe_counter!(
        "ordo_harmonizer_hand_backs_total",
        Unit::Count,
        "Attempts a worker handed back after a transient failure."
    );
    describe_counter!(
        "ordo_harmonizer_failed_total",
        Unit::Count,
        "Events given up after their last attempt; a FAILED result is released in their place."
    );
    describe_histogram!(
        "ordo_event_latency_seconds",
        Unit::Seconds,
        "End to end: an event accepted until its released result reached the harmonizer (Process), or until Submit answered it with its result."
    );
    describe_gauge!(
        "ordo_harmonizer_in_flight_events",
        Unit::Count,
        "Stateful events dispatched and not yet settled (sampled every second)."
    );
    describe_gauge!(
        "ordo_harmonizer_streams_in_flight",
        Unit::Count,
        "Streams with stateful events dispatched and not yet settled (sampled every second)."
    );
    describe_gauge!(
        "ordo_followed_streams",
        Unit::Count,
        "Streams the open Process calls follow on the push-gateway, one per call and stream: a call stops following a stream once every event it accepted there is settled."
    );
    describe_gauge!(
        "ordo_harmonizer_window_occupancy_ratio",
        // A ratio: `metrics` has no unit for it.
        "The fullest window: the widest span of one stream's unsettled sequences over --window (0 to 1, sampled)."
    );
}

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
