//! Workload (d): many streams. The same total of zero-delay ORDERED events
//! is spread over each number of streams of a list (64, 4,096, 32,768 and
//! 131,072 by default), in one run. Each point gets a fresh cluster (fresh
//! processes and a fresh private Redis, so that peak RSS and Redis memory
//! belong to that point alone), a warm-up call, then `calls` `Process` calls
//! at once, stream `i` on call `i % calls`, each call sending sequence 0 of
//! all its streams, then sequence 1, … with at most `in_flight` events
//! outstanding.
//!
//! Per point: ordered events/s, service CPU (every service process and
//! Redis) per event and per stream, peak RSS of every process, and Redis
//! memory per stream — `used_memory` of `INFO memory` after the point minus
//! before it (after the warm-up), divided by the streams, and `MEMORY USAGE`
//! of one stream's keys (`meta`, `pend`, `log`, see `ordo_core::keys`). The
//! first point is the baseline; every row carries its ratio to it. The
//! issue's target (≥ 0.8 × the 64-stream throughput at 32,768 streams) is
//! recorded, never asserted; lost, duplicated or reordered results fail the
//! run as in every other workload.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use ordo_proto::{Event, OrderingMode};
use serde::Serialize;

use crate::{
    bench::{self, Config, Target, Variant, Workload, WorkloadId},
    redis_probe::RedisProbe,
};

/// The default list of stream counts.
pub const DEFAULT_STREAMS: [usize; 4] = [64, 4096, 32_768, 131_072];
/// The stream count of the throughput target.
pub const TARGET_STREAMS: usize = 32_768;
/// The target: ordered throughput at [`TARGET_STREAMS`] over the baseline's.
pub const TARGET_RATIO: f64 = 0.8;

/// Bytes of one stream's keys, each `None` if the key does not exist.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StreamKeys {
    pub meta: Option<u64>,
    pub pend: Option<u64>,
    pub log: Option<u64>,
}

impl StreamKeys {
    pub fn total(&self) -> u64 {
        [self.meta, self.pend, self.log].iter().flatten().sum()
    }
}

/// Redis before and after one point.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisMemory {
    pub used_memory_before: Option<u64>,
    pub used_memory_after: Option<u64>,
    pub keys_before: Option<u64>,
    pub keys_after: Option<u64>,
    /// `MEMORY USAGE … SAMPLES 0` of the first stream's keys, after the point.
    pub one_stream: Option<StreamKeys>,
    /// What went wrong reading any of the above (the point still counts).
    pub error: Option<String>,
}

impl RedisMemory {
    /// (after − before) / streams; may be negative (Redis frees buffers).
    pub fn bytes_per_stream(&self, streams: usize) -> Option<f64> {
        let (before, after) = (self.used_memory_before?, self.used_memory_after?);
        (streams > 0).then(|| (after as f64 - before as f64) / streams as f64)
    }

    pub fn keys_added(&self) -> Option<i64> {
        Some(i64::try_from(self.keys_after?).ok()? - i64::try_from(self.keys_before?).ok()?)
    }
}

/// One number of streams, measured. Its [`Variant`] (same index in the
/// workload's variants) holds events/s, CPU and peak RSS per process.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub streams: usize,
    pub calls: usize,
    pub events_per_stream: usize,
    pub events: usize,
    pub events_per_s: f64,
    pub service_cpu_us_per_event: Option<f64>,
    pub service_cpu_us_per_stream: Option<f64>,
    pub client_cpu_us_per_event: Option<f64>,
    pub redis: RedisMemory,
    pub redis_bytes_per_stream: Option<f64>,
    /// events/s over the baseline's (the first point).
    pub throughput_ratio: Option<f64>,
    /// Service CPU per event over the baseline's.
    pub cpu_per_event_ratio: Option<f64>,
}

/// The (d) part of a workload.
#[derive(Debug, Clone, Serialize)]
pub struct ManyStreams {
    /// Streams of the baseline (the first point).
    pub baseline_streams: usize,
    pub total_events: usize,
    pub calls: usize,
    pub in_flight: usize,
    pub points: Vec<Point>,
}

fn ratio(value: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    let (value, baseline) = (value?, baseline?);
    (baseline > 0.0).then(|| value / baseline)
}

/// The events of each call: stream `i` goes to call `i % calls`; each call
/// sends sequence 0 of all its streams, then sequence 1, and so on.
fn plan(prefix: &str, streams: usize, calls: usize, per_stream: usize) -> Vec<Vec<Event>> {
    (0..calls)
        .map(|c| {
            let names: Vec<String> = (c..streams).step_by(calls).map(|s| format!("{prefix}-s{s}")).collect();
            (0..per_stream as u64)
                .flat_map(|seq| names.iter().map(move |name| bench::event(name, seq, None, OrderingMode::Ordered)))
                .collect()
        })
        .collect()
}

async fn redis_before(url: &str) -> (Option<RedisProbe>, RedisMemory) {
    let mut memory = RedisMemory::default();
    let probe = async {
        let mut probe = RedisProbe::connect(url).await?;
        memory.used_memory_before = Some(probe.used_memory().await?);
        memory.keys_before = Some(probe.dbsize().await?);
        anyhow::Ok(probe)
    };
    match probe.await {
        Ok(probe) => (Some(probe), memory),
        Err(error) => {
            eprintln!("ordo-bench: (d) warning: no Redis memory before the point: {error:#}");
            memory.error = Some(format!("{error:#}"));
            (None, memory)
        }
    }
}

async fn redis_after(probe: &mut RedisProbe, memory: &mut RedisMemory, stream: &str) {
    let read = async {
        memory.used_memory_after = Some(probe.used_memory().await?);
        memory.keys_after = Some(probe.dbsize().await?);
        memory.one_stream = Some(StreamKeys {
            meta: probe.memory_usage(&ordo_core::keys::meta(stream)).await?,
            pend: probe.memory_usage(&ordo_core::keys::pending(stream)).await?,
            log: probe.memory_usage(&ordo_core::keys::log(stream)).await?,
        });
        anyhow::Ok(())
    };
    if let Err(error) = read.await {
        eprintln!("ordo-bench: (d) warning: no Redis memory after the point: {error:#}");
        memory.error = Some(format!("{error:#}"));
    }
}

/// Workload (d), one fresh cluster per point.
pub async fn run(config: &Config, nonce: u64) -> anyhow::Result<Workload> {
    let list = &config.many_streams;
    let Some(&largest) = list.iter().max() else { bail!("--streams-list is empty") };
    if list.contains(&0) {
        bail!("every --streams-list entry must be at least 1");
    }
    let total = config.many_streams_events;
    if total < largest {
        bail!("--many-streams-events ({total}) must be at least the largest --streams-list entry ({largest})");
    }
    let in_flight = config.many_streams_in_flight.max(1);
    let mut variants = Vec::new();
    let mut points = Vec::new();
    for &streams in list {
        let calls = config.many_streams_calls.clamp(1, streams);
        let per_stream = total / streams;
        let prefix = format!("bench-d-{nonce}-n{streams}");
        let name = format!(
            "Ordo ORDERED, {streams} streams × {per_stream} events, {calls} calls, ≤{in_flight} outstanding per call"
        );
        eprintln!("ordo-bench: (d) {name}");
        let cluster = bench::cluster(config).try_start().await.context("cannot start the Ordo cluster for (d)")?;
        bench::warm_up(&cluster, nonce).await?;
        let (mut probe, mut redis) = redis_before(&cluster.redis_url()).await;
        let calls_events = plan(&prefix, streams, calls, per_stream);
        let variant = bench::ordo_variant(&cluster, &name, calls_events, in_flight, config.deadline, None, "").await?;
        if let Some(probe) = probe.as_mut() {
            redis_after(probe, &mut redis, &format!("{prefix}-s0")).await;
        }
        drop(cluster);
        let events = variant.events;
        let service_cpu_s = variant.service_cpu_s_per_million.map(|s| s * events as f64 / 1e6);
        points.push(Point {
            streams,
            calls,
            events_per_stream: per_stream,
            events: per_stream * streams,
            events_per_s: variant.events_per_s,
            // Seconds per million events are microseconds per event.
            service_cpu_us_per_event: variant.service_cpu_s_per_million,
            service_cpu_us_per_stream: service_cpu_s.map(|s| s * 1e6 / streams as f64),
            client_cpu_us_per_event: variant.client_cpu_s_per_million,
            redis_bytes_per_stream: redis.bytes_per_stream(streams),
            redis,
            throughput_ratio: None,
            cpu_per_event_ratio: None,
        });
        variants.push(variant);
    }
    let baseline = (points[0].events_per_s, points[0].service_cpu_us_per_event);
    for p in &mut points {
        p.throughput_ratio = ratio(Some(p.events_per_s), Some(baseline.0));
        p.cpu_per_event_ratio = ratio(p.service_cpu_us_per_event, baseline.1);
    }
    let listed: Vec<String> = list.iter().map(ToString::to_string).collect();
    let mut workload = Workload::zero_delay(
        WorkloadId::D,
        format!(
            "(d) many streams: {total} ORDERED events over {} streams, {} calls, no delay",
            listed.join(" / "),
            config.many_streams_calls.max(1)
        ),
        total,
        in_flight * config.many_streams_calls.max(1),
        variants,
    );
    workload.many_streams = Some(ManyStreams {
        baseline_streams: list[0],
        total_events: total,
        calls: config.many_streams_calls.max(1),
        in_flight,
        points,
    });
    Ok(workload)
}

/// The target for the point at [`TARGET_STREAMS`], if measured.
pub fn targets(workloads: &[Workload]) -> Vec<Target> {
    let Some(d) = workloads.iter().find_map(|w| w.many_streams.as_ref()) else { return Vec::new() };
    let Some(base) = d.points.first() else { return Vec::new() };
    d.points
        .iter()
        .skip(1)
        .filter(|p| p.streams == TARGET_STREAMS)
        .map(|p| {
            let r = p.throughput_ratio.unwrap_or(0.0);
            Target {
                target: format!(
                    "(d) at {} streams ≥ {TARGET_RATIO} × the ordered throughput at {} streams (same run)",
                    p.streams, base.streams
                ),
                measured: format!("{r:.2} ({:.0} vs {:.0} events/s)", p.events_per_s, base.events_per_s),
                met: r >= TARGET_RATIO,
            }
        })
        .collect()
}

fn num(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.2}×"))
}

fn bytes(value: Option<u64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| v.to_string())
}

/// The (d) tables: one row per point with its ratios to the baseline, then
/// CPU and peak RSS per process.
pub fn tables(out: &mut String, d: &ManyStreams, variants: &[Variant]) {
    let _ = writeln!(
        out,
        "Baseline: the {}-stream row; × is each row over it. Each point on a fresh cluster; ≤{} outstanding per call.\n",
        d.baseline_streams, d.in_flight
    );
    let _ = writeln!(
        out,
        "| streams | events/stream | events | time (s) | ordered events/s | × | service CPU µs/event | × | service CPU µs/stream | client CPU µs/event | Redis Δused_memory B/stream | Redis keys added | MEMORY USAGE one stream B (meta / pend / log) |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (p, v) in d.points.iter().zip(variants) {
        let one = p.redis.one_stream.map_or_else(
            || "n/a".into(),
            |k| format!("{} ({} / {} / {})", k.total(), bytes(k.meta), bytes(k.pend), bytes(k.log)),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.streams,
            p.events_per_stream,
            p.events,
            v.elapsed_s,
            p.events_per_s,
            times(p.throughput_ratio),
            num(p.service_cpu_us_per_event, 1),
            times(p.cpu_per_event_ratio),
            num(p.service_cpu_us_per_stream, 0),
            num(p.client_cpu_us_per_event, 1),
            num(p.redis_bytes_per_stream, 0),
            p.redis.keys_added().map_or_else(|| "n/a".into(), |k| k.to_string()),
            one,
        );
    }
    out.push('\n');
    let Some(first) = variants.first() else { return };
    let names: Vec<&str> = first.processes.iter().map(|p| p.name.as_str()).collect();
    let _ = writeln!(out, "CPU µs per event / peak RSS MiB (× the baseline's peak) per process:\n");
    let _ = writeln!(out, "| streams | {} |", names.join(" | "));
    let _ = writeln!(out, "|---:|{}", "---:|".repeat(names.len()));
    for (p, v) in d.points.iter().zip(variants) {
        let cells: Vec<String> = v
            .processes
            .iter()
            .map(|u| {
                let cpu = u.cpu_seconds.filter(|_| v.events > 0).map(|s| s * 1e6 / v.events as f64);
                let base = first.processes.iter().find(|b| b.name == u.name).and_then(|b| b.peak_rss_mib);
                format!("{} / {} MiB ({})", num(cpu, 1), num(u.peak_rss_mib, 0), times(ratio(u.peak_rss_mib, base)))
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", p.streams, cells.join(" | "));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_spreads_streams_over_calls_in_sequence_rounds() {
        let calls = plan("p", 5, 2, 3);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 15);
        let first: Vec<(String, u64)> = calls[0].iter().map(|e| (e.stream_id.clone(), e.sequence)).collect();
        assert_eq!(&first[..4], [("p-s0".into(), 0), ("p-s2".into(), 0), ("p-s4".into(), 0), ("p-s0".into(), 1)]);
        assert!(calls[1].iter().all(|e| e.stream_id == "p-s1" || e.stream_id == "p-s3"));
        assert!(calls.iter().flatten().all(|e| e.mode() == OrderingMode::Ordered));
    }

    #[test]
    fn redis_memory_per_stream_and_keys() {
        let m = RedisMemory {
            used_memory_before: Some(1000),
            used_memory_after: Some(5000),
            keys_before: Some(2),
            keys_after: Some(10),
            ..RedisMemory::default()
        };
        assert_eq!(m.bytes_per_stream(4), Some(1000.0));
        assert_eq!(m.keys_added(), Some(8));
        assert_eq!(RedisMemory::default().bytes_per_stream(4), None);
        let k = StreamKeys { meta: Some(100), pend: None, log: Some(900) };
        assert_eq!(k.total(), 1000);
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
    }
}
