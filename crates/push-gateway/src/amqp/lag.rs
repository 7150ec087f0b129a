//! The AMQP outbox lag as a gauge (`ordo_amqp_outbox_lag_results`): results
//! released but not yet confirmed by the broker, read from Redis every
//! `--amqp-lag-interval`. It is sampled apart from the publisher, because the
//! publisher stops reading Redis exactly when the lag matters: while the
//! broker is unreachable it only reconnects, and the lag keeps growing.
//!
//! Every replica with AMQP on samples it, leader or not (it is a property of
//! the Redis outbox, not of a process): aggregate with `max`, not `sum`.

use std::time::Duration;

use ordo_runtime::Shutdown;
use tokio::task::JoinHandle;

use super::outbox::Outbox;
use crate::metrics::{AMQP_LAG, AMQP_LAG_ERRORS};

/// Meta keys scanned per sample at most (as the reassembler bounds its
/// pending sample): the cost of a sample stays bounded with many streams.
const MAX_KEYS: usize = 100_000;

/// Samples until `shutdown`; the sampler also stops when the guard drops.
pub(super) fn spawn(outbox: Outbox, every: Duration, shutdown: Shutdown) -> Guard {
    Guard(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        // A slow Redis must not make samples pile up behind each other.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match outbox.lag(MAX_KEYS).await {
                Ok(lag) => AMQP_LAG.set(lag as f64),
                Err(error) => {
                    // The last value stays: a lag that cannot be read is not 0.
                    AMQP_LAG_ERRORS.increment(1);
                    tracing::debug!(%error, "cannot sample the AMQP outbox lag");
                }
            }
        }
    }))
}

/// Stops the sampler when dropped.
pub(super) struct Guard(JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
