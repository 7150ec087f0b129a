//! The reassembler's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once; label values are fixed strings.

use std::sync::LazyLock;

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
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
