//! The push-gateway's Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once; label values are fixed strings.

use std::sync::LazyLock;

use ::metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use ordo_proto::v1::EventResult;

pub static SUBSCRIBERS_GRPC: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "grpc"));
pub static SUBSCRIBERS_SSE: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "sse"));
pub static SUBSCRIBERS_AMQP: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_subscribers", "channel" => "amqp"));
/// Streams followed by the harmonizers' Follow calls (one per call and stream).
pub static FOLLOWED_STREAMS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_push_followed_streams"));
/// Streams with at least one live subscriber in the hub (Subscribe, Follow, SSE).
pub static HUB_STREAMS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_push_hub_streams"));
/// Slots whose release channel the hub subscribes (SSUBSCRIBE asked and not dropped).
pub static HUB_SLOTS: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_push_hub_slots"));
pub static REORDER_WAIT: LazyLock<Histogram> = LazyLock::new(|| histogram!("ordo_reorder_wait_seconds"));
pub static AMQP_CONFIRMED: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_amqp_confirmed_total"));
pub static AMQP_LAG: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_amqp_outbox_lag_results"));
pub static AMQP_LAG_ERRORS: LazyLock<Counter> =
    LazyLock::new(|| counter!("ordo_redis_errors_total", "operation" => "sample_amqp_lag"));

/// Gives every metric of the push-gateway its `# HELP` line (and unit), and
/// registers its fixed series at 0 (the AMQP ones only when AMQP is on: see
/// [`describe_amqp`]). Called once at start, after `ordo_runtime::app::run`
/// installed the recorder (a description given before that would be lost).
pub fn describe() {
    for gauge in [&SUBSCRIBERS_GRPC, &SUBSCRIBERS_SSE, &SUBSCRIBERS_AMQP] {
        LazyLock::force(gauge);
    }
    describe_gauge!(
        "ordo_subscribers",
        Unit::Count,
        "Open subscribers by channel: Subscribe calls (grpc), SSE streams (sse), and 1 while this replica holds the AMQP publishing lease (amqp)."
    );
    describe_tail();
    describe_counter!(
        "ordo_amqp_confirmed_total",
        Unit::Count,
        "Results the AMQP broker confirmed (the exchange's publish cursor moved past them)."
    );
    describe_gauge!(
        "ordo_amqp_outbox_lag_results",
        Unit::Count,
        "AMQP outbox lag: results released but not yet confirmed by the broker, summed over every stream in Redis (sampled; every replica sees the same Redis: aggregate with max)."
    );
    describe_counter!(
        "ordo_redis_errors_total",
        Unit::Count,
        "Failed Redis calls of the push-gateway's own samplers, by operation (sample_amqp_lag)."
    );
}

/// The live tail's metrics (hub, follows, releases heard): the gateway's,
/// and a harmonizer's that follows Redis itself (`--follow-releases redis`,
/// [`crate::follow::Local`]).
pub fn describe_tail() {
    for gauge in [&FOLLOWED_STREAMS, &HUB_STREAMS, &HUB_SLOTS] {
        LazyLock::force(gauge);
    }
    LazyLock::force(&RELEASED);
    LazyLock::force(&REORDER_WAIT);
    describe_gauge!(
        "ordo_push_followed_streams",
        Unit::Count,
        "Per-stream follow entries of the harmonizers' Follow calls (one per call and stream; an entry goes when the harmonizer stops following the stream). On a harmonizer with --follow-releases redis: its own calls' entries."
    );
    describe_gauge!(
        "ordo_push_hub_streams",
        Unit::Count,
        "Streams with at least one live subscriber in the release-channel hub (Subscribe, Follow, SSE); idle streams have no entry."
    );
    describe_gauge!(
        "ordo_push_hub_slots",
        Unit::Count,
        "Slots whose sharded release channel the hub subscribes: those of the followed streams (all 16384 while this replica publishes to AMQP)."
    );
    describe_histogram!(
        "ordo_reorder_wait_seconds",
        Unit::Seconds,
        "From a result's completion (completed_unix_nanos, the producer's clock) to its release."
    );
    describe_counter!(
        "ordo_results_released_total",
        Unit::Count,
        "Released results heard on the release channels (by each gateway replica, or harmonizer following Redis itself), by status; results a follower reads from the log on catch-up are not counted."
    );
}

/// Registers the AMQP series at 0 when AMQP publishing starts (with AMQP
/// off they would only say "0 lag" about an outbox nobody publishes).
pub fn describe_amqp() {
    LazyLock::force(&AMQP_CONFIRMED);
    LazyLock::force(&AMQP_LAG_ERRORS);
}

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
