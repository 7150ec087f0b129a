//! The in-process baselines: the same per-event delays slept with tokio's
//! timer in this process, with no transport, no Redis and no other process.
//!
//! - [`Shape::Buffered`]: `stream::iter(..).map(sleep).buffered(n)` — at
//!   most n events pending, yielded in order (a completed event still holds
//!   its slot until its predecessors are out: a sliding window of n).
//! - [`Shape::BufferUnordered`]: `.buffer_unordered(n)` — n sleeping at once,
//!   yielded as they complete.
//! - [`Shape::Reordered`]: `.buffer_unordered(n)` followed by a reorder map
//!   — n sleeping at once, yielded in order; the in-process equivalent of
//!   Ordo with a bounded worker concurrency and a larger reorder window.
//! - [`sequential`]: one event at a time, in order (a Kafka partition's or a
//!   RabbitMQ single active consumer's ordered processing).
//!
//! Each run also measures the sleeps it actually got (tokio's timer has
//! millisecond resolution), which is the latency distribution every variant
//! of a workload really sees.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream};

use crate::stats::Latencies;

/// How the futures are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Buffered,
    BufferUnordered,
    Reordered,
}

/// What one in-process run measured.
#[derive(Debug, Default)]
pub struct InProcess {
    pub events: usize,
    pub elapsed_s: f64,
    /// Start of an event's future → the consumer got its output.
    pub end_to_end: Latencies,
    /// Output time − completion of the event (and, in order, of all its predecessors).
    pub reorder_overhead: Latencies,
    /// How long each sleep really took.
    pub sleeps: Latencies,
    /// Mean of the actual sleeps, ms (exact, not from the histogram).
    pub mean_sleep_ms: f64,
}

fn nanos(from: Instant, to: Instant) -> i128 {
    to.saturating_duration_since(from).as_nanos() as i128
}

/// Sleeps `d` like the stateful worker does: not at all when it is zero.
async fn simulated(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Runs `delays` with concurrency `n` in the given shape.
pub async fn run(delays: &[Duration], n: usize, shape: Shape) -> InProcess {
    let n = n.max(1);
    let base = Instant::now();
    let futures = stream::iter(delays.iter().copied().enumerate()).map(|(i, d)| async move {
        let start = Instant::now();
        simulated(d).await;
        (i, start, Instant::now())
    });
    let mut out = InProcess { events: delays.len(), ..Default::default() };
    let mut slept_total = 0.0;
    let mut record = |out: &mut InProcess, start: Instant, done: Instant, released_after: Instant| {
        let now = Instant::now();
        out.end_to_end.record_nanos(nanos(start, now));
        out.reorder_overhead.record_nanos(nanos(released_after, now));
        out.sleeps.record_nanos(nanos(start, done));
        slept_total += done.saturating_duration_since(start).as_secs_f64();
    };
    match shape {
        Shape::Buffered => {
            let mut results = futures.buffered(n);
            let mut latest = base;
            while let Some((_, start, done)) = results.next().await {
                latest = latest.max(done);
                record(&mut out, start, done, latest);
            }
        }
        Shape::BufferUnordered => {
            let mut results = futures.buffer_unordered(n);
            while let Some((_, start, done)) = results.next().await {
                record(&mut out, start, done, done);
            }
        }
        Shape::Reordered => {
            let mut results = futures.buffer_unordered(n);
            let mut held: BTreeMap<usize, (Instant, Instant)> = BTreeMap::new();
            let mut next = 0;
            let mut latest = base;
            while let Some((i, start, done)) = results.next().await {
                held.insert(i, (start, done));
                while let Some((start, done)) = held.remove(&next) {
                    latest = latest.max(done);
                    record(&mut out, start, done, latest);
                    next += 1;
                }
            }
        }
    }
    out.elapsed_s = base.elapsed().as_secs_f64();
    out.mean_sleep_ms = if delays.is_empty() { 0.0 } else { 1000.0 * slept_total / delays.len() as f64 };
    out
}

/// One event at a time, in order.
pub async fn sequential(delays: &[Duration]) -> InProcess {
    let base = Instant::now();
    let mut out = InProcess { events: delays.len(), ..Default::default() };
    let mut slept_total = 0.0;
    for &d in delays {
        let start = Instant::now();
        simulated(d).await;
        let done = Instant::now();
        out.end_to_end.record_nanos(nanos(base, done));
        out.reorder_overhead.record_nanos(0);
        out.sleeps.record_nanos(nanos(start, done));
        slept_total += done.saturating_duration_since(start).as_secs_f64();
    }
    out.elapsed_s = base.elapsed().as_secs_f64();
    out.mean_sleep_ms = if delays.is_empty() { 0.0 } else { 1000.0 * slept_total / delays.len() as f64 };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shapes_keep_their_concurrency() {
        let delays = vec![Duration::from_millis(10); 40];
        // 40 events of 10 ms, 20 at a time: about 2 rounds of the timer.
        for shape in [Shape::Buffered, Shape::BufferUnordered, Shape::Reordered] {
            let run = run(&delays, 20, shape).await;
            assert_eq!(run.events, 40);
            assert_eq!(run.end_to_end.len(), 40);
            assert!(run.elapsed_s >= 0.019 && run.elapsed_s < 0.5, "{shape:?}: {}", run.elapsed_s);
            assert!(run.mean_sleep_ms >= 10.0, "a sleep is never shorter than asked: {}", run.mean_sleep_ms);
        }
        let seq = sequential(&delays[..5]).await;
        assert!(seq.elapsed_s >= 0.05, "{}", seq.elapsed_s);
    }

    #[tokio::test]
    async fn zero_delays_do_not_sleep() {
        let run = run(&[Duration::ZERO; 1000], 10, Shape::Buffered).await;
        assert!(run.elapsed_s < 0.5);
        assert!(run.mean_sleep_ms < 1.0);
    }
}
