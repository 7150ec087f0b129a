//! The stateless service's Prometheus metrics (served by
//! `ordo_runtime::metrics`): executions by operation and status, and their
//! duration. Operation label values are the built-in operations' names.

use ::metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// Gives every metric of the stateless service its `# HELP` line (and
/// unit). Called once at start, after `ordo_runtime::app::run` installed the
/// recorder (a description given before that would be lost).
pub fn describe() {
    describe_counter!(
        "ordo_stateless_executions_total",
        Unit::Count,
        "Stateless executions, by operation and status (ok, failed)."
    );
    describe_histogram!(
        "ordo_stateless_execution_duration_seconds",
        Unit::Seconds,
        "Time per stateless execution, by operation."
    );
}

/// One execution of `operation` (a built-in name, so no allocation) that
/// took `seconds` and ended `status` (`ok` or `failed`).
pub fn executed(operation: &'static str, status: &'static str, seconds: f64) {
    counter!("ordo_stateless_executions_total", "operation" => operation, "status" => status).increment(1);
    histogram!("ordo_stateless_execution_duration_seconds", "operation" => operation).record(seconds);
}
