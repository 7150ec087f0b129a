//! Workload (e), scale-out (issue 10, `docs/scaling.md`): workload (b)'s
//! ORDERED saturation (the same events: `--saturation-calls` ×
//! `--saturation-streams`, `--saturation-events`, zero delay) on three
//! fresh clusters, one after the other in one run:
//!
//! 1. one Redis node, one worker, one reassembler (the baseline);
//! 2. a Redis Cluster of 3 masters with 1 replica each (the testkit's
//!    `redis_cluster`), one worker, one reassembler;
//! 3. one Redis node, two workers and two reassemblers.
//!
//! Each point reports events/s, service CPU per event and the ratio to the
//! first, and its processes grouped by role (workers, reassemblers and
//! Redis nodes summed), so the three tables line up. Every process still
//! shares this machine's cores: what the points compare is the cost of the
//! topology (cluster routing, per-slot script calls, replication, more
//! links), not the speed-up more machines would give.

use anyhow::Context as _;
use ordo_proto::v1::{Event, OrderingMode};

use crate::{
    bench::{Config, Workload, WorkloadId, event, ordo_variant, warm_up},
    procstat::ProcessUsage,
};

/// The topologies, in the order they run.
const POINTS: [(&str, Topology); 3] = [
    ("1 Redis node, 1 worker, 1 reassembler", Topology { redis_cluster: false, workers: 1, reassemblers: 1 }),
    (
        "Redis Cluster (3 masters + 3 replicas), 1 worker, 1 reassembler",
        Topology { redis_cluster: true, workers: 1, reassemblers: 1 },
    ),
    ("1 Redis node, 2 workers, 2 reassemblers", Topology { redis_cluster: false, workers: 2, reassemblers: 2 }),
];

#[derive(Debug, Clone, Copy)]
struct Topology {
    redis_cluster: bool,
    workers: usize,
    reassemblers: usize,
}

/// Runs workload (e); a cluster per point.
pub async fn run(config: &Config, nonce: u64) -> anyhow::Result<Workload> {
    let calls = config.saturation_calls.max(1);
    let streams = config.saturation_streams.max(1);
    let per_stream = (config.saturation_events / (calls * streams)).max(1);
    let total = per_stream * calls * streams;
    let mut variants = Vec::new();
    for (index, (label, topology)) in POINTS.iter().enumerate() {
        let mut builder = crate::bench::cluster(config).workers(topology.workers).reassemblers(topology.reassemblers);
        if topology.redis_cluster {
            builder = builder.redis_cluster();
        }
        let cluster = builder.try_start().await.with_context(|| format!("cannot start the cluster for {label:?}"))?;
        warm_up(&cluster, nonce).await?;
        let events: Vec<Vec<Event>> = (0..calls)
            .map(|c| {
                let names: Vec<String> = (0..streams).map(|s| format!("bench-e{index}-{nonce}-c{c}-s{s}")).collect();
                (0..per_stream as u64)
                    .flat_map(|seq| names.iter().map(move |name| event(name, seq, None, OrderingMode::Ordered)))
                    .collect()
            })
            .collect();
        let name = format!("Ordo ORDERED, {label}");
        eprintln!("ordo-bench: (e) {name}");
        let mut variant =
            ordo_variant(&cluster, &name, events, config.saturation_in_flight, config.deadline, None, "").await?;
        variant.processes = by_role(&variant.processes);
        variants.push(variant);
        drop(cluster);
    }
    let base = variants.first().map(|v| v.events_per_s).unwrap_or(0.0);
    for variant in variants.iter_mut().skip(1) {
        if base > 0.0 {
            variant.note = format!("{:.2}× the first point's events/s", variant.events_per_s / base);
        }
    }
    Ok(Workload::zero_delay(
        WorkloadId::E,
        format!(
            "(e) scale-out: (b)'s {total} ORDERED events, {calls} calls × {streams} streams, no delay, on three topologies"
        ),
        total,
        config.saturation_in_flight * calls,
        variants,
    ))
}

/// The role of a process named by the testkit (`worker-1`, `redis-4`, …).
fn role(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((role, index)) if index.chars().all(|c| c.is_ascii_digit()) => role,
        _ => name,
    }
}

/// One entry per role, in first-seen order: CPU and peak RSS summed over
/// its processes (a missing reading makes the sum missing).
fn by_role(processes: &[ProcessUsage]) -> Vec<ProcessUsage> {
    let mut roles: Vec<(String, usize, ProcessUsage)> = Vec::new();
    for p in processes {
        let name = role(&p.name);
        match roles.iter_mut().find(|(r, ..)| r == name) {
            Some((_, count, sum)) => {
                *count += 1;
                sum.cpu_seconds = sum.cpu_seconds.zip(p.cpu_seconds).map(|(a, b)| a + b);
                sum.peak_rss_mib = sum.peak_rss_mib.zip(p.peak_rss_mib).map(|(a, b)| a + b);
                sum.peak_reset &= p.peak_reset;
            }
            None => roles.push((name.to_owned(), 1, ProcessUsage { name: name.to_owned(), ..p.clone() })),
        }
    }
    roles
        .into_iter()
        .map(|(name, count, mut usage)| {
            usage.name = if count > 1 { format!("{name} (×{count}, summed)") } else { name };
            usage
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(name: &str, cpu: f64, rss: f64) -> ProcessUsage {
        ProcessUsage { name: name.into(), cpu_seconds: Some(cpu), peak_rss_mib: Some(rss), peak_reset: true }
    }

    #[test]
    fn processes_are_summed_by_role_in_first_seen_order() {
        let grouped = by_role(&[
            usage("harmonizer", 1.0, 10.0),
            usage("worker-0", 2.0, 20.0),
            usage("worker-1", 3.0, 30.0),
            usage("push-gateway", 0.5, 5.0),
            usage("redis-0", 1.0, 1.0),
            usage("redis-1", 2.0, 2.0),
        ]);
        let names: Vec<&str> = grouped.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["harmonizer", "worker (×2, summed)", "push-gateway", "redis (×2, summed)"]);
        assert_eq!(grouped[1].cpu_seconds, Some(5.0));
        assert_eq!(grouped[1].peak_rss_mib, Some(50.0));
        assert_eq!(grouped[3].cpu_seconds, Some(3.0));
    }

    #[test]
    fn a_missing_reading_makes_the_sum_missing() {
        let mut unread = usage("worker-1", 0.0, 0.0);
        unread.cpu_seconds = None;
        let grouped = by_role(&[usage("worker-0", 2.0, 20.0), unread]);
        assert_eq!(grouped[0].cpu_seconds, None);
        assert_eq!(grouped[0].peak_rss_mib, Some(20.0));
    }

    #[test]
    fn roles_are_the_name_before_a_numeric_suffix() {
        assert_eq!(role("worker-12"), "worker");
        assert_eq!(role("push-gateway"), "push-gateway");
        assert_eq!(role("redis"), "redis");
    }
}
