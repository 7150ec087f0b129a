//! `ordo-source`'s Prometheus metrics (served by `ordo_runtime::metrics`),
//! registered once at start.

use std::sync::LazyLock;

use ::metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, gauge};

pub static CONSUMED: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_messages_consumed_total"));
pub static ACKED: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_messages_acked_total"));
pub static IN_FLIGHT: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_source_in_flight_messages"));
pub static DEAD_LETTERS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_dead_letters_total"));
pub static RESETS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_consumer_resets_total"));
pub static RESENT: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_events_resent_total"));
pub static SINK_PUBLISHED: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_sink_published_total"));
pub static SINK_LAG: LazyLock<Gauge> = LazyLock::new(|| gauge!("ordo_source_sink_lag_results"));
pub static REDIS_ERRORS: LazyLock<Counter> = LazyLock::new(|| counter!("ordo_source_redis_errors_total"));

/// Gives every metric its `# HELP` line and registers it at 0. Called once,
/// after `ordo_runtime::app::run` installed the recorder.
pub fn describe() {
    for counter in [&CONSUMED, &ACKED, &DEAD_LETTERS, &RESETS, &RESENT, &SINK_PUBLISHED, &REDIS_ERRORS] {
        LazyLock::force(counter);
    }
    for gauge in [&IN_FLIGHT, &SINK_LAG] {
        LazyLock::force(gauge);
    }
    describe_counter!(
        "ordo_source_messages_consumed_total",
        Unit::Count,
        "JetStream messages delivered to the source (redeliveries included)."
    );
    describe_counter!(
        "ordo_source_messages_acked_total",
        Unit::Count,
        "JetStream messages acked after their result was released (or found done before)."
    );
    describe_gauge!(
        "ordo_source_in_flight_messages",
        Unit::Count,
        "Events sent to the harmonizer whose result has not come back (at most --max-in-flight)."
    );
    describe_counter!(
        "ordo_source_dead_letters_total",
        Unit::Count,
        "Messages that could not become events (no or bad key, refused by the harmonizer), published to the dead-letter subject and terminated."
    );
    describe_counter!(
        "ordo_source_consumer_resets_total",
        Unit::Count,
        "Times the durable consumer was recreated at its ack floor + 1 (start, NATS reconnect, a skipped delivery)."
    );
    describe_counter!(
        "ordo_source_events_resent_total",
        Unit::Count,
        "Events sent again: on a new Process call, or after a transient refusal."
    );
    describe_counter!(
        "ordo_source_sink_published_total",
        Unit::Count,
        "Released results the sink published and JetStream acknowledged (duplicates it dropped included)."
    );
    describe_gauge!(
        "ordo_source_sink_lag_results",
        Unit::Count,
        "Results released but not yet published by the sink, over every key (sampled each sweep)."
    );
    describe_counter!(
        "ordo_source_redis_errors_total",
        Unit::Count,
        "Failed Redis calls of the source and the sink (each is retried)."
    );
}
