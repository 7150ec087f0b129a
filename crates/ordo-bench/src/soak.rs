//! `ordo-soak`: Ordo at a steady rate for a long time, watching for leaks.
//!
//! A cluster as in benchmark (b) (one worker, one reassembler) gets ORDERED
//! zero-delay `async-echo` events at a fixed rate — by default half the
//! saturation rate measured by `ordo-bench` (b) (56,013 ORDERED events/s on
//! the 2-core machine of `docs/benchmarks.md`) — over a few long-lived
//! `Process` calls with many streams each. The rate is open-loop (tokens
//! every 10 ms) but bounded by a cap on outstanding events per call, so a
//! suite that cannot keep up shows as a lower achieved rate, not as a client
//! that eats all memory.
//!
//! Every `sample_every` the resident memory (`VmRSS`) and open descriptors
//! of every service, Redis and this client are sampled. The report gives,
//! per process, start / end / max and the least-squares slope (per minute)
//! over the whole run and over its second half (after warm-up), and checks
//! that every result came back once and in order. Slopes are recorded, not
//! asserted: the numbers live in `docs/reliability.md`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use integration_tests::Cluster;
use ordo_proto::v1::{Event, OrderingMode, ResultStatus, harmonizer_client::HarmonizerClient};
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc},
    time::{Instant, MissedTickBehavior, timeout_at},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{bench::Machine, procstat};

/// Half of the ORDERED saturation rate of `ordo-bench` (b) in `docs/benchmarks.md`.
pub const DEFAULT_RATE: f64 = 28_000.0;
/// Token interval of the open-loop sender.
const TICK: Duration = Duration::from_millis(10);

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    #[serde(with = "crate::chaos::serde_duration")]
    pub duration: Duration,
    /// Events per second asked for, all calls together.
    pub rate: f64,
    pub calls: usize,
    pub streams_per_call: usize,
    /// Outstanding events per call at most (sent, result not received).
    pub max_in_flight: usize,
    #[serde(with = "crate::chaos::serde_duration")]
    pub sample_every: Duration,
    /// After the sending stopped, how long the last results may take.
    #[serde(with = "crate::chaos::serde_duration")]
    pub drain: Duration,
    /// The reassembler's `--retention` (released results kept per stream);
    /// `None` keeps its default (100,000).
    pub retention: Option<u64>,
    #[serde(skip)]
    pub out_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            rate: DEFAULT_RATE,
            calls: 4,
            streams_per_call: 16,
            max_in_flight: 4096,
            sample_every: Duration::from_secs(5),
            drain: Duration::from_secs(60),
            retention: None,
            out_dir: PathBuf::from("results/soak"),
        }
    }
}

/// One sample of one process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessSample {
    pub rss_mib: Option<f64>,
    pub fds: Option<usize>,
}

/// All processes at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub sent: u64,
    pub received: u64,
    pub processes: BTreeMap<String, ProcessSample>,
}

/// Start, end, max and slopes of one series.
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    pub start: f64,
    pub end: f64,
    pub max: f64,
    /// Least squares, per minute, all samples.
    pub slope_per_min: f64,
    /// Least squares, per minute, second half of the samples.
    pub slope_second_half_per_min: f64,
}

impl Trend {
    fn of(points: &[(f64, f64)]) -> Option<Self> {
        let first = points.first()?;
        let last = points.last()?;
        let half = &points[points.len() / 2..];
        Some(Self {
            start: first.1,
            end: last.1,
            max: points.iter().map(|p| p.1).fold(f64::MIN, f64::max),
            slope_per_min: slope(points) * 60.0,
            slope_second_half_per_min: slope(half) * 60.0,
        })
    }
}

/// Least-squares slope of y over x (0 with fewer than two points).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessTrend {
    pub name: String,
    pub rss_mib: Option<Trend>,
    pub fds: Option<Trend>,
}

/// What one call saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallOutcome {
    pub sent: u64,
    pub received: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub not_ok: u64,
    pub lost: u64,
    pub end: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub config: Config,
    pub seconds: f64,
    pub achieved_rate: f64,
    pub calls: Vec<CallOutcome>,
    pub trends: Vec<ProcessTrend>,
    pub samples: Vec<Sample>,
}

/// Runs the soak on a fresh cluster.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    anyhow::ensure!(config.rate > 0.0 && config.calls > 0 && config.streams_per_call > 0, "nothing to send");
    let mut builder = Cluster::builder();
    if let Some(retention) = config.retention {
        builder = builder.reassembler_args(["--retention".to_owned(), retention.to_string()]);
    }
    let cluster = builder.try_start().await.context("cannot start the Ordo cluster")?;
    let mut watched: Vec<(String, Option<u32>)> = cluster.pids();
    watched.push(("client".into(), Some(std::process::id())));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + config.duration;

    let calls: Vec<_> = (0..config.calls)
        .map(|c| {
            let client = cluster.harmonizer().max_decoding_message_size(16 * 1024 * 1024);
            let streams: Vec<String> = (0..config.streams_per_call).map(|s| format!("soak-{c}-{s}")).collect();
            tokio::spawn(run_call(
                client,
                streams,
                config.rate / config.calls as f64,
                config.max_in_flight,
                until,
                config.drain,
                sent.clone(),
                received.clone(),
            ))
        })
        .collect();

    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(config.sample_every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_print = Instant::now();
    while Instant::now() < until {
        ticker.tick().await;
        let sample = Sample {
            t_s: started.elapsed().as_secs_f64(),
            sent: sent.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
            processes: watched
                .iter()
                .map(|(name, pid)| {
                    let s = ProcessSample {
                        rss_mib: procstat::rss_bytes(*pid).map(|b| b as f64 / (1024.0 * 1024.0)),
                        fds: procstat::open_fds(*pid),
                    };
                    (name.clone(), s)
                })
                .collect(),
        };
        if last_print.elapsed() >= Duration::from_secs(30) || samples.is_empty() {
            last_print = Instant::now();
            let rss: Vec<String> = sample
                .processes
                .iter()
                .map(|(n, p)| format!("{n} {:.0}M/{}fd", p.rss_mib.unwrap_or(0.0), p.fds.unwrap_or(0)))
                .collect();
            println!(
                "soak {:5.0}s: {} sent, {} received ({:.0}/s); {}",
                sample.t_s,
                sample.sent,
                sample.received,
                sample.received as f64 / sample.t_s.max(0.001),
                rss.join(", ")
            );
        }
        samples.push(sample);
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(
            call.await.unwrap_or_else(|e| CallOutcome { end: format!("task failed: {e}"), ..Default::default() }),
        );
    }
    let seconds = config.duration.as_secs_f64();
    let total_received: u64 = outcomes.iter().map(|c| c.received).sum();

    let trends = watched
        .iter()
        .map(|(name, _)| {
            let series = |f: &dyn Fn(&ProcessSample) -> Option<f64>| -> Vec<(f64, f64)> {
                samples.iter().filter_map(|s| Some((s.t_s, f(s.processes.get(name)?)?))).collect()
            };
            ProcessTrend {
                name: name.clone(),
                rss_mib: Trend::of(&series(&|p| p.rss_mib)),
                fds: Trend::of(&series(&|p| p.fds.map(|n| n as f64))),
            }
        })
        .collect();
    drop(cluster);
    Ok(Report {
        machine: Machine::detect(),
        config: config.clone(),
        seconds,
        achieved_rate: total_received as f64 / seconds,
        calls: outcomes,
        trends,
        samples,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_call(
    client: HarmonizerClient<Channel>,
    streams: Vec<String>,
    rate: f64,
    max_in_flight: usize,
    until: Instant,
    drain: Duration,
    sent_total: Arc<AtomicU64>,
    received_total: Arc<AtomicU64>,
) -> CallOutcome {
    let mut out = CallOutcome::default();
    let (tx, rx) = mpsc::channel::<Event>(1024);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut client = client;
    let call_deadline = until + drain;
    let response = match timeout_at(call_deadline, client.process(ReceiverStream::new(rx))).await {
        Ok(Ok(response)) => response,
        Ok(Err(status)) => {
            out.end = format!("could not open: {status}");
            return out;
        }
        Err(_) => {
            out.end = "could not open in time".into();
            return out;
        }
    };
    let mut inbound = response.into_inner();

    // The sender: tokens every tick, at most one second's worth banked.
    let sender_permits = permits.clone();
    let sender_streams = streams.clone();
    let sender_total = sent_total.clone();
    let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let sending = Arc::new(AtomicBool::new(true));
    let sender_sending = sending.clone();
    let sender = tokio::spawn(async move {
        let mut next_seq = vec![0u64; sender_streams.len()];
        let mut tokens = 0.0f64;
        let mut k = 0usize;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = Instant::now();
        while Instant::now() < until {
            ticker.tick().await;
            // Tokens by elapsed time, not by tick count: a busy machine
            // delays ticks, and the rate must not drop with them.
            let now = Instant::now();
            tokens = (tokens + rate * (now - last).as_secs_f64()).min(rate);
            last = now;
            while tokens >= 1.0 {
                let Ok(permit) = sender_permits.clone().try_acquire_owned() else { break };
                permit.forget();
                let s = k % sender_streams.len();
                k += 1;
                let mut event = Event {
                    stream_id: sender_streams[s].clone(),
                    sequence: next_seq[s],
                    operation: "async-echo".into(),
                    payload: next_seq[s].to_string().into_bytes().into(),
                    ..Default::default()
                };
                event.set_mode(OrderingMode::Ordered);
                next_seq[s] += 1;
                if tx.send(event).await.is_err() {
                    sender_sending.store(false, Ordering::Release);
                    return next_seq;
                }
                sender_total.fetch_add(1, Ordering::Relaxed);
                tokens -= 1.0;
            }
        }
        sender_sending.store(false, Ordering::Release);
        // The request side stays open until the results are in, then the
        // half-close lets the harmonizer end the call.
        let _ = finished_rx.await;
        drop(tx);
        next_seq
    });

    let index: BTreeMap<&str, usize> = streams.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
    let mut next_expected = vec![0u64; streams.len()];
    let mut received = 0u64;
    loop {
        // Done sending and nothing outstanding: every permit is back.
        if !sending.load(Ordering::Acquire) && permits.available_permits() == max_in_flight {
            break;
        }
        let message = match timeout_at(call_deadline, inbound.message()).await {
            Ok(Ok(Some(result))) => result,
            Ok(Ok(None)) => {
                out.end = "ended by the harmonizer before every result arrived".into();
                break;
            }
            Ok(Err(status)) => {
                out.end = format!("failed: {status}");
                break;
            }
            Err(_) => {
                out.end = format!("results still owed {drain:?} after the sending stopped");
                break;
            }
        };
        let Some(&s) = index.get(message.stream_id.as_str()) else { continue };
        if message.status() == ResultStatus::Processing {
            continue;
        }
        if message.sequence < next_expected[s] {
            out.duplicated += 1;
            continue;
        }
        if message.sequence != next_expected[s] {
            out.reordered += 1;
        }
        if message.status() != ResultStatus::Ok {
            out.not_ok += 1;
        }
        next_expected[s] = message.sequence + 1;
        received += 1;
        received_total.fetch_add(1, Ordering::Relaxed);
        permits.add_permits(1);
    }
    let _ = finished.send(());
    let sent: u64 = match sender.await {
        Ok(next_seq) => next_seq.iter().sum(),
        Err(_) => received + (max_in_flight - permits.available_permits()) as u64,
    };
    out.sent = sent;
    out.received = received;
    out.lost = sent.saturating_sub(received);
    if out.end.is_empty() {
        // Half-close and let the harmonizer end the call.
        out.end = match timeout_at(Instant::now() + Duration::from_secs(15), async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await
        {
            Ok(()) => "ok".into(),
            Err(_) => "did not end within 15 s of the half-close".into(),
        };
    }
    out
}

impl crate::results::Report for Report {
    fn table(&self) -> String {
        let mut t = String::new();
        let c = &self.config;
        let _ = writeln!(
            t,
            "ordo-soak: {:.0} s at {:.0} events/s asked ({:.0} achieved), {} calls × {} streams, ≤{} outstanding per call, a sample every {:?}, reassembler retention {}\n",
            self.seconds,
            c.rate,
            self.achieved_rate,
            c.calls,
            c.streams_per_call,
            c.max_in_flight,
            c.sample_every,
            c.retention.map_or_else(|| "100000 (default)".to_owned(), |r| r.to_string())
        );
        let sum = |f: fn(&CallOutcome) -> u64| self.calls.iter().map(f).sum::<u64>();
        let _ = writeln!(
            t,
            "results: {} sent, {} received, lost {}, duplicated {}, reordered {}, not OK {}; call ends: {:?}\n",
            sum(|c| c.sent),
            sum(|c| c.received),
            sum(|c| c.lost),
            sum(|c| c.duplicated),
            sum(|c| c.reordered),
            sum(|c| c.not_ok),
            self.calls.iter().map(|c| c.end.as_str()).collect::<Vec<_>>()
        );
        t.push_str("| process | RSS start (MiB) | end | max | slope (MiB/min) | slope 2nd half | fds start | end | max | slope (fds/min) | slope 2nd half |\n");
        t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.trends {
            let fmt = |trend: &Option<Trend>, digits: usize| match trend {
                Some(tr) => format!(
                    "{:.d$} | {:.d$} | {:.d$} | {:+.3} | {:+.3}",
                    tr.start,
                    tr.end,
                    tr.max,
                    tr.slope_per_min,
                    tr.slope_second_half_per_min,
                    d = digits
                ),
                None => "n/a | n/a | n/a | n/a | n/a".into(),
            };
            let _ = writeln!(t, "| {} | {} | {} |", p.name, fmt(&p.rss_mib, 1), fmt(&p.fds, 0));
        }
        t
    }

    fn write(&self, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
        crate::results::write(dir, "soak", self.machine.unix_time, self, &self.table())
    }

    /// Fails when a result was lost, duplicated, reordered or not OK, or a
    /// call did not end cleanly. Memory and descriptors are only reported.
    fn check(&self) -> anyhow::Result<()> {
        let bad: Vec<String> = self
            .calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.lost + c.duplicated + c.reordered + c.not_ok > 0 || c.end != "ok")
            .map(|(i, c)| format!("call {i}: {c:?}"))
            .collect();
        if bad.is_empty() { Ok(()) } else { bail!("{}", bad.join("; ")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&line) - 2.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0)).collect();
        assert_eq!(slope(&flat), 0.0);
        let trend = Trend::of(&line).expect("points");
        assert_eq!((trend.start, trend.end, trend.max), (3.0, 21.0, 21.0));
        assert!((trend.slope_per_min - 120.0).abs() < 1e-9);
    }
}

/// The `ordo-soak` command line.
pub mod cli {
    use std::{path::PathBuf, process::ExitCode, time::Duration};

    use ordo_core::duration;

    use super::{Config, DEFAULT_RATE};

    /// Ordo at a steady rate for minutes: ORDERED zero-delay events over a
    /// few long-lived Process calls, sampling RSS and open descriptors of
    /// every process. Prints start/end/max and slopes; exits 1 if a result
    /// was lost, duplicated or reordered.
    #[derive(Debug, clap::Parser)]
    #[command(name = "ordo-soak", version)]
    pub struct SoakArgs {
        /// How long to run, in minutes (fractions allowed).
        #[arg(long, default_value_t = 10.0)]
        pub minutes: f64,
        /// Events per second, all calls together. Default: half the ORDERED
        /// saturation rate of `ordo-bench` (b) in docs/benchmarks.md.
        #[arg(long, default_value_t = DEFAULT_RATE)]
        pub rate: f64,
        /// Concurrent Process calls.
        #[arg(long, default_value_t = 4)]
        pub calls: usize,
        /// Streams per call.
        #[arg(long, default_value_t = 16)]
        pub streams: usize,
        /// Outstanding events per call at most.
        #[arg(long, default_value_t = 4096)]
        pub max_in_flight: usize,
        /// Time between two samples of RSS and descriptors.
        #[arg(long, default_value = "5s", value_parser = duration::parse)]
        pub sample_every: Duration,
        /// The reassembler's `--retention` (released results kept per
        /// stream, default 100,000): Redis grows until every stream's log
        /// reaches it, so a short soak needs a small value to show the plateau.
        #[arg(long)]
        pub retention: Option<u64>,
        /// Where the JSON and the table go.
        #[arg(long, default_value = "results/soak")]
        pub out: PathBuf,
    }

    pub async fn soak_main(args: SoakArgs) -> ExitCode {
        if args.minutes.is_nan() || args.minutes <= 0.0 {
            eprintln!("ordo-soak: --minutes must be positive");
            return ExitCode::from(2);
        }
        let config = Config {
            duration: Duration::from_secs_f64(args.minutes * 60.0),
            rate: args.rate,
            calls: args.calls,
            streams_per_call: args.streams,
            max_in_flight: args.max_in_flight,
            sample_every: args.sample_every,
            retention: args.retention,
            out_dir: args.out,
            ..Config::default()
        };
        crate::results::finish("ordo-soak", &config.out_dir.clone(), super::run(&config)).await
    }
}
