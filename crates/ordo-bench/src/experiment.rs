//! The paper's experiment (section IV, figures 6 and 7) on the real suite.
//!
//! The first 2048 characters of the Sonnets (whitespace and control
//! characters removed) go one character per event through
//! `Harmonizer.Process`, each running an asynchronous operation after a
//! simulated callback delay: `async-echo` by default, or `callback` (the
//! delay, then a call to the stateless service). Delays are exponential with mean 2, 5 and 10 ms. Events are
//! paced (one every `pace`, 1 ms by default), as the paper's client sent one
//! request after another. The receiver concatenates the payloads in arrival
//! order; the error rate of a run is the share of positions whose character
//! differs from the input.
//!
//! Each (mean delay, mode) cell gets `runs` runs (389 by default: the
//! paper's equation 1), each on a fresh stream; up to `parallel` runs go at
//! once over separate streams and calls. The re-assembled (ORDERED) error
//! must be exactly zero in every run: [`Report::check`] fails otherwise.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, stream};
use integration_tests::{
    Cluster, ProcessCall,
    client::{self, check_exactly_once, check_in_order_exactly_once},
};
use ordo_core::latency::Latency;
use ordo_proto::{EventResult, OrderingMode, ResultStatus};
use serde::Serialize;
use tonic::transport::Channel;

use crate::{
    inprocess,
    stats::{MeanCi, mean_ci},
};

/// The default operation: the simulated callback delay, then the payload back.
pub const OPERATION: &str = "async-echo";

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Runs per (mean delay, mode) cell.
    pub runs: usize,
    /// Mean callback delays.
    pub mean_delays: Vec<Duration>,
    /// Time between two events of a run.
    pub pace: Duration,
    /// Runs in flight at once (each on its own stream and call).
    pub parallel: usize,
    /// Where the CSV files and the chart go.
    pub out_dir: PathBuf,
    /// The input text (the paper's 2048 characters).
    pub text: String,
    /// The stateful operation each event runs.
    pub operation: String,
}

/// The two modes, by the paper's names.
pub fn mode_name(mode: OrderingMode) -> &'static str {
    match mode {
        OrderingMode::Unordered => "naive",
        _ => "re-assembled",
    }
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub mean_delay_ms: f64,
    pub mode: &'static str,
    pub run: usize,
    pub stream: String,
    pub events: usize,
    /// Positions whose character differs from the input.
    pub differ: usize,
    pub error_rate: f64,
    /// Results that did not arrive at their own sequence's position.
    pub out_of_order: usize,
    pub duration_s: f64,
    /// The first wrong position: its result's sequence, status, error and payload.
    pub first_difference: Option<String>,
}

/// One (mean delay, mode) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub mean_delay_ms: f64,
    pub mode: &'static str,
    pub runs: usize,
    pub events: usize,
    /// Error rate over the runs (a share, 0..1).
    pub error: MeanCi,
    pub min_error: f64,
    pub max_error: f64,
    /// Runs with at least one wrong position.
    pub runs_with_errors: usize,
    pub mean_run_s: f64,
    /// Mean of the delays tokio actually slept for this mean (measured in-process).
    pub measured_mean_delay_ms: f64,
}

/// Everything the experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cells: Vec<Cell>,
    pub runs: Vec<Run>,
    pub failures: Vec<String>,
    pub pace_ms: f64,
    pub parallel: usize,
    pub wall_s: f64,
}

#[derive(Debug, Clone)]
struct Job {
    mean: Duration,
    mode: OrderingMode,
    run: usize,
}

/// Starts a cluster (binaries from `ORDO_BIN_DIR` or next to this program) and runs the experiment.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    let cluster = Cluster::builder().try_start().await.context("cannot start the Ordo cluster")?;
    run_against(config, &cluster.harmonizer()).await
}

/// Runs the experiment against a running harmonizer.
pub async fn run_against(
    config: &Config,
    client: &ordo_proto::v1::harmonizer_client::HarmonizerClient<Channel>,
) -> anyhow::Result<Report> {
    if config.text.is_empty() || config.runs == 0 || config.mean_delays.is_empty() {
        bail!("nothing to run: give a text, at least one run and one mean delay");
    }
    let started = std::time::Instant::now();
    let nonce = crate::driver::unix_nanos();
    // Run-major order: every cell sees the same load over time.
    let mut jobs = Vec::new();
    for run in 0..config.runs {
        for &mean in &config.mean_delays {
            for mode in [OrderingMode::Unordered, OrderingMode::Ordered] {
                jobs.push(Job { mean, mode, run });
            }
        }
    }
    let total = jobs.len();
    let outcomes: Vec<Result<Run, String>> = stream::iter(jobs)
        .map(|job| {
            let stream_id = format!("exp-{nonce}-{}-{}ms-{}", mode_name(job.mode), job.mean.as_millis(), job.run);
            async move { one_run(client, config, &job, stream_id).await }
        })
        .buffer_unordered(config.parallel.max(1))
        .enumerate()
        .map(|(done, outcome)| {
            if (done + 1) % 100 == 0 || done + 1 == total {
                eprintln!("ordo-experiment: {}/{total} runs done", done + 1);
            }
            outcome
        })
        .collect()
        .await;

    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(run) => runs.push(run),
            Err(failure) => failures.push(failure),
        }
    }
    runs.sort_by(|a, b| {
        (a.mean_delay_ms, a.mode, a.run)
            .partial_cmp(&(b.mean_delay_ms, b.mode, b.run))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut cells = Vec::new();
    for &mean in &config.mean_delays {
        let measured = measured_mean_delay(mean, config.text.len()).await;
        for mode in [OrderingMode::Unordered, OrderingMode::Ordered] {
            let mean_ms = mean.as_secs_f64() * 1000.0;
            let of_cell: Vec<&Run> =
                runs.iter().filter(|r| r.mean_delay_ms == mean_ms && r.mode == mode_name(mode)).collect();
            let rates: Vec<f64> = of_cell.iter().map(|r| r.error_rate).collect();
            cells.push(Cell {
                mean_delay_ms: mean_ms,
                mode: mode_name(mode),
                runs: of_cell.len(),
                events: of_cell.iter().map(|r| r.events).sum(),
                error: mean_ci(&rates),
                min_error: rates.iter().copied().fold(f64::INFINITY, f64::min).min(1.0),
                max_error: rates.iter().copied().fold(0.0, f64::max),
                runs_with_errors: of_cell.iter().filter(|r| r.differ > 0).count(),
                mean_run_s: if of_cell.is_empty() {
                    0.0
                } else {
                    of_cell.iter().map(|r| r.duration_s).sum::<f64>() / of_cell.len() as f64
                },
                measured_mean_delay_ms: measured,
            });
        }
    }
    Ok(Report {
        cells,
        runs,
        failures,
        pace_ms: config.pace.as_secs_f64() * 1000.0,
        parallel: config.parallel,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The mean of what tokio really sleeps for `exp:mean` (2048 sleeps at once, in-process).
async fn measured_mean_delay(mean: Duration, n: usize) -> f64 {
    let model = Latency::Exponential { mean };
    let mut rng = rand::rng();
    let delays: Vec<Duration> = (0..n.max(1)).map(|_| model.sample(&mut rng)).collect();
    inprocess::run(&delays, delays.len(), inprocess::Shape::BufferUnordered).await.mean_sleep_ms
}

async fn one_run(
    client: &ordo_proto::v1::harmonizer_client::HarmonizerClient<Channel>,
    config: &Config,
    job: &Job,
    stream_id: String,
) -> Result<Run, String> {
    let what = format!("{} run {} at {} ms ({stream_id})", mode_name(job.mode), job.run, job.mean.as_millis());
    let latency = Latency::Exponential { mean: job.mean }.to_string();
    let events = client::text_events(&stream_id, &config.text, &config.operation, &latency, job.mode);
    let n = events.len();
    let deadline = config.pace * n as u32 + Duration::from_secs(60);
    let started = std::time::Instant::now();
    let mut call = ProcessCall::open(client);
    call.feed(events, Some(config.pace));
    call.wait_for_total(n, deadline).await.map_err(|e| format!("{what}: {e:#}"))?;
    let duration_s = started.elapsed().as_secs_f64();
    let results = call.finish(Duration::from_millis(300)).await.map_err(|e| format!("{what}: {e:#}"))?;
    let results: Vec<EventResult> = results.into_iter().filter(|r| r.stream_id == stream_id).collect();
    if let Some(rejected) = results.iter().find(|r| r.status() == ResultStatus::Rejected) {
        return Err(format!("{what}: event {} was rejected: {}", rejected.sequence, rejected.error));
    }
    check_exactly_once(&results, n as u64).map_err(|e| format!("{what}: {e}"))?;
    let expected: Vec<u8> = config.text.bytes().collect();
    let differ = results
        .iter()
        .enumerate()
        .filter(|(p, r)| r.status() != ResultStatus::Ok || Some(r.payload.as_ref()) != expected.get(*p..*p + 1))
        .count();
    let first_difference = results
        .iter()
        .enumerate()
        .find(|(p, r)| r.status() != ResultStatus::Ok || Some(r.payload.as_ref()) != expected.get(*p..*p + 1))
        .map(|(p, r)| {
            format!(
                "position {p}: sequence {} {:?} payload {:?} error {:?}",
                r.sequence,
                r.status(),
                String::from_utf8_lossy(&r.payload),
                r.error
            )
        });
    let out_of_order = results.iter().enumerate().filter(|(position, r)| r.sequence != *position as u64).count();
    if job.mode == OrderingMode::Ordered
        && let Err(e) = check_in_order_exactly_once(&results, n as u64)
    {
        return Err(format!("{what}: re-assembled run out of order: {e}"));
    }
    Ok(Run {
        mean_delay_ms: job.mean.as_secs_f64() * 1000.0,
        mode: mode_name(job.mode),
        run: job.run,
        stream: stream_id,
        events: n,
        differ,
        error_rate: differ as f64 / n as f64,
        out_of_order,
        duration_s,
        first_difference,
    })
}

impl Report {
    /// Fails unless every run finished and every re-assembled run was error-free.
    pub fn check(&self) -> anyhow::Result<()> {
        let bad: Vec<String> = self
            .runs
            .iter()
            .filter(|r| r.mode == mode_name(OrderingMode::Ordered) && (r.differ > 0 || r.out_of_order > 0))
            .take(10)
            .map(|r| {
                format!(
                    "{} run {} at {} ms: {} wrong positions, first {}",
                    r.mode,
                    r.run,
                    r.mean_delay_ms,
                    r.differ,
                    r.first_difference.as_deref().unwrap_or("-")
                )
            })
            .collect();
        if !self.failures.is_empty() {
            bail!(
                "{} runs failed, e.g.:\n  {}",
                self.failures.len(),
                self.failures[..self.failures.len().min(5)].join("\n  ")
            );
        }
        if !bad.is_empty() {
            bail!("re-assembled runs with errors (must be none):\n  {}", bad.join("\n  "));
        }
        Ok(())
    }

    /// The summary table (Markdown).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| mean delay | measured mean | mode | runs | events | mean error rate | 95% CI | min | max | runs with errors | mean run |"
        );
        let _ = writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in &self.cells {
            let _ = writeln!(
                out,
                "| {:.0} ms | {:.2} ms | {} | {} | {} | {:.3}% | ±{:.3}% | {:.2}% | {:.2}% | {} | {:.2} s |",
                c.mean_delay_ms,
                c.measured_mean_delay_ms,
                c.mode,
                c.runs,
                c.events,
                100.0 * c.error.mean,
                100.0 * c.error.ci95_half_width,
                100.0 * if c.runs == 0 { 0.0 } else { c.min_error },
                100.0 * c.max_error,
                c.runs_with_errors,
                c.mean_run_s,
            );
        }
        out
    }

    /// One line per run.
    pub fn runs_csv(&self) -> String {
        let mut out = String::from("mean_delay_ms,mode,run,stream,events,differ,error_rate,out_of_order,duration_s\n");
        for r in &self.runs {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{:.6},{},{:.4}",
                r.mean_delay_ms,
                r.mode,
                r.run,
                r.stream,
                r.events,
                r.differ,
                r.error_rate,
                r.out_of_order,
                r.duration_s
            );
        }
        out
    }

    /// One line per cell.
    pub fn summary_csv(&self) -> String {
        let mut out = String::from(
            "mean_delay_ms,measured_mean_delay_ms,mode,runs,events,mean_error_rate,std_dev,ci95_low,ci95_high,min_error_rate,max_error_rate,runs_with_errors,mean_run_s\n",
        );
        for c in &self.cells {
            let _ = writeln!(
                out,
                "{},{:.3},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.4}",
                c.mean_delay_ms,
                c.measured_mean_delay_ms,
                c.mode,
                c.runs,
                c.events,
                c.error.mean,
                c.error.std_dev,
                (c.error.mean - c.error.ci95_half_width).max(0.0),
                c.error.mean + c.error.ci95_half_width,
                if c.runs == 0 { 0.0 } else { c.min_error },
                c.max_error,
                c.runs_with_errors,
                c.mean_run_s,
            );
        }
        out
    }

    /// Writes `runs.csv`, `summary.csv`, `summary.json`, `table.md` and
    /// `error_rate.png` into `dir`; returns the chart's path, or a warning
    /// why there is none.
    pub fn write(&self, dir: &std::path::Path) -> anyhow::Result<Result<PathBuf, String>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
        };
        write("runs.csv", self.runs_csv())?;
        write("summary.csv", self.summary_csv())?;
        write("table.md", self.table())?;
        let summary = serde_json::json!({ "cells": self.cells, "failures": self.failures, "pace_ms": self.pace_ms,
            "parallel": self.parallel, "wall_s": self.wall_s });
        write("summary.json", serde_json::to_string_pretty(&summary)?)?;
        let chart = dir.join("error_rate.png");
        Ok(crate::chart::error_rate_chart(&self.cells, &chart).map(|()| chart))
    }
}
