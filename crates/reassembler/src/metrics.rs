//! The reassembler's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once; label values are fixed strings.

use std::sync::LazyLock;

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use ordo_proto::ResultStatus;

pub static SCRIPT_DURATION: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_release_script_duration_seconds"));
pub static BATCH_SIZE: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_release_batch_size"));
pub static REDIS_ERRORS: LazyLock<Counter> =
    LazyLock::new(|| counter!("ordo_redis_errors_total", "operation" => "release_script"));
pub static SAMPLE_ERRORS: LazyLock<Counter> =
    LazyLock::new(|| counter!("ordo_redis_errors_total", "operation" => "sample_pending"));
pub static PENDING_RESULTS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_results_pending"));
pub static PENDING_STREAMS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_streams_pending"));
pub static DUPLICATES: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_duplicate_results_total"));

/// Gives every metric of the reassembler its `# HELP` line (and unit), and
/// registers its fixed series at 0 (a dashboard sees 0 Redis errors, not no
/// series). Called once at start, after `ordo_runtime::app::run` installed
/// the recorder (a description given before that would be lost).
pub fn describe() {
    for counter in [&REDIS_ERRORS, &SAMPLE_ERRORS, &DUPLICATES] {
        LazyLock::force(counter);
    }
    LazyLock::force(&BY_STATUS);
    LazyLock::force(&SCRIPT_DURATION);
    LazyLock::force(&BATCH_SIZE);
    describe_histogram!(
        "ordo_release_script_duration_seconds",
        Unit::Seconds,
        "Time of one successful release script call (one batch of results)."
    );
    describe_histogram!("ordo_release_batch_size", Unit::Count, "Results per release script call.");
    describe_counter!(
        "ordo_redis_errors_total",
        Unit::Count,
        "Failed Redis calls, each try counted, by operation (release_script, sample_pending)."
    );
    describe_gauge!(
        "ordo_results_pending",
        Unit::Count,
        "Results stored in Redis waiting for a predecessor (sampled every 10 s; every replica sees the same Redis: aggregate with max)."
    );
    describe_gauge!(
        "ordo_streams_pending",
        Unit::Count,
        "Streams with results waiting for a predecessor (sampled every 10 s)."
    );
    describe_counter!(
        "ordo_duplicate_results_total",
        Unit::Count,
        "Results dropped as duplicates (same stream and sequence already stored)."
    );
    describe_counter!("ordo_results_stored_total", Unit::Count, "Results stored for the first time, by status.");
    describe_counter!(
        "ordo_dead_letters_total",
        Unit::Count,
        "Dead letters recorded (FAILED and GAP results, listed by ordo dlq), by status."
    );
}

/// Per result status: (stored, dead letters).
static BY_STATUS: LazyLock<[(Counter, Counter); 6]> = LazyLock::new(|| {
    STATUSES.map(|status| {
        (
            counter!("ordo_results_stored_total", "status" => status),
            counter!("ordo_dead_letters_total", "status" => status),
        )
    })
});

/// Label values by `ResultStatus` number.
const STATUSES: [&str; 6] = ["unspecified", "ok", "failed", "processing", "rejected", "gap"];

fn index(status: ResultStatus) -> usize {
    usize::try_from(status as i32).unwrap_or(0).min(STATUSES.len() - 1)
}

/// A result stored for the first time (its dead letter too, if it has one).
pub fn stored(status: ResultStatus, dead_letter: bool) {
    let (stored, letters) = &BY_STATUS[index(status)];
    stored.increment(1);
    if dead_letter {
        letters.increment(1);
    }
}
