//! The chaos suite's results: one [`RunOutcome`] per run, a Markdown table
//! per fault kind with totals, JSON files, and the verdict (any lost,
//! duplicated, reordered or hung result fails the suite).

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::bail;
use serde::Serialize;

use super::{Config, Fault, FaultRecord, client::GroupOutcome, client::Workload, log_check::LogOutcome};
use crate::bench::Machine;

/// One run, reduced to its counts (the group and log details are kept too).
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub run: usize,
    pub fault: String,
    pub skipped: Option<String>,
    pub events: usize,
    pub seconds: f64,
    /// What the client received.
    pub client_lost: usize,
    pub client_duplicated: usize,
    pub client_reordered: usize,
    pub client_wrong_payload: usize,
    /// What the release logs hold.
    pub log_lost: usize,
    pub log_duplicated: usize,
    pub log_reordered: usize,
    pub log_wrong_payload: usize,
    pub failed: usize,
    pub gap: usize,
    /// Calls that did not end, or still owed results, at the deadline.
    pub hung_calls: usize,
    pub rejected: BTreeMap<String, usize>,
    pub call_breaks: BTreeMap<String, usize>,
    pub calls_opened: usize,
    pub resent: usize,
    /// Results never published to AMQP (only with RabbitMQ on).
    pub amqp_lost: Option<usize>,
    pub fault_record: FaultRecord,
    pub groups: Vec<GroupOutcome>,
    pub log: LogOutcome,
}

impl RunOutcome {
    pub fn skipped(run: usize, fault: Fault, why: &str) -> Self {
        Self::new(
            run,
            fault,
            &Workload {
                streams: 0,
                events_per_stream: 0,
                calls: 0,
                pace: Duration::ZERO,
                latency: String::new(),
                stateless_every: 0,
                settle: Duration::ZERO,
                call_end: Duration::ZERO,
            },
            Vec::new(),
            LogOutcome::default(),
            FaultRecord::default(),
            None,
            Duration::ZERO,
        )
        .with_skip(why)
    }

    fn with_skip(mut self, why: &str) -> Self {
        self.skipped = Some(why.to_owned());
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run: usize,
        fault: Fault,
        workload: &Workload,
        groups: Vec<GroupOutcome>,
        log: LogOutcome,
        fault_record: FaultRecord,
        amqp_lost: Option<usize>,
        elapsed: Duration,
    ) -> Self {
        let sum = |f: fn(&GroupOutcome) -> usize| groups.iter().map(f).sum::<usize>();
        let mut rejected = BTreeMap::new();
        let mut call_breaks = BTreeMap::new();
        for g in &groups {
            for (code, n) in &g.rejected {
                *rejected.entry(code.clone()).or_default() += n;
            }
            for (code, n) in &g.breaks {
                *call_breaks.entry(code.clone()).or_default() += n;
            }
        }
        Self {
            run,
            fault: fault.name(),
            skipped: None,
            events: workload.total_events(),
            seconds: elapsed.as_secs_f64(),
            client_lost: sum(|g| g.lost),
            client_duplicated: sum(|g| g.duplicated + g.foreign),
            client_reordered: sum(|g| g.reordered),
            client_wrong_payload: sum(|g| g.wrong_payload),
            log_lost: log.lost,
            log_duplicated: log.duplicated,
            log_reordered: log.reordered,
            log_wrong_payload: log.wrong_payload,
            failed: sum(|g| g.failed),
            gap: sum(|g| g.gap),
            hung_calls: groups.iter().filter(|g| g.hung).count(),
            rejected,
            call_breaks,
            calls_opened: sum(|g| g.calls_opened),
            resent: sum(|g| g.resent_after_break),
            amqp_lost,
            fault_record,
            groups,
            log,
        }
    }

    /// Nothing lost, duplicated, reordered, corrupted or hung, and the fault
    /// itself went as planned.
    pub fn clean(&self) -> bool {
        self.skipped.is_some() || (self.violations() == 0 && self.fault_record.error.is_none())
    }

    /// Lost + duplicated + reordered + wrong payloads (client and log) + hung calls.
    pub fn violations(&self) -> usize {
        self.client_lost
            + self.client_duplicated
            + self.client_reordered
            + self.client_wrong_payload
            + self.log_lost
            + self.log_duplicated
            + self.log_reordered
            + self.log_wrong_payload
            + self.hung_calls
            + self.amqp_lost.unwrap_or(0)
    }

    /// One line for the progress output.
    pub fn line(&self) -> String {
        if let Some(why) = &self.skipped {
            return format!("run {:3} {:24} skipped: {why}", self.run, self.fault);
        }
        let mut line = format!(
            "run {:3} {:24} {:6.1}s  lost {}/{} dup {}/{} reord {}/{} hung {} failed {} gap {} breaks {} resent {}",
            self.run,
            self.fault,
            self.seconds,
            self.client_lost,
            self.log_lost,
            self.client_duplicated,
            self.log_duplicated,
            self.client_reordered,
            self.log_reordered,
            self.hung_calls,
            self.failed,
            self.gap,
            self.call_breaks.values().sum::<usize>(),
            self.resent,
        );
        if let Some(stop) = &self.fault_record.stop {
            let _ = write!(line, "  stop: {} in {:.1}s", stop.exit, stop.seconds);
        }
        if let Some(error) = &self.fault_record.error {
            let _ = write!(line, "  FAULT ERROR: {error}");
        }
        if !self.clean() {
            let examples: Vec<&String> =
                self.groups.iter().flat_map(|g| g.examples.iter()).chain(self.log.examples.iter()).take(6).collect();
            let ends: Vec<&String> = self.groups.iter().map(|g| &g.end).filter(|e| e.as_str() != "ok").collect();
            let _ = write!(line, "\n      examples: {examples:?}\n      call ends: {ends:?}");
        }
        line
    }
}

/// Totals over some runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub fault: String,
    pub runs: usize,
    pub skipped: usize,
    pub events: usize,
    pub client_lost: usize,
    pub log_lost: usize,
    pub client_duplicated: usize,
    pub log_duplicated: usize,
    pub client_reordered: usize,
    pub log_reordered: usize,
    pub wrong_payload: usize,
    pub failed: usize,
    pub gap: usize,
    pub hung_calls: usize,
    pub rejected: usize,
    pub call_breaks: usize,
    pub resent: usize,
    pub amqp_lost: usize,
    /// SIGTERM runs whose service did not exit 0 within drain + 1 s.
    pub unclean_stops: usize,
    pub fault_errors: usize,
    /// Runs with any violation.
    pub bad_runs: usize,
    pub seconds: f64,
}

impl Totals {
    fn add(&mut self, r: &RunOutcome) {
        if r.skipped.is_some() {
            self.skipped += 1;
            return;
        }
        self.runs += 1;
        self.events += r.events;
        self.client_lost += r.client_lost;
        self.log_lost += r.log_lost;
        self.client_duplicated += r.client_duplicated;
        self.log_duplicated += r.log_duplicated;
        self.client_reordered += r.client_reordered;
        self.log_reordered += r.log_reordered;
        self.wrong_payload += r.client_wrong_payload + r.log_wrong_payload;
        self.failed += r.failed;
        self.gap += r.gap;
        self.hung_calls += r.hung_calls;
        self.rejected += r.rejected.values().sum::<usize>();
        self.call_breaks += r.call_breaks.values().sum::<usize>();
        self.resent += r.resent;
        self.amqp_lost += r.amqp_lost.unwrap_or(0);
        self.unclean_stops += usize::from(r.fault_record.stop.as_ref().is_some_and(|s| !s.clean));
        self.fault_errors += usize::from(r.fault_record.error.is_some());
        self.bad_runs += usize::from(!r.clean());
        self.seconds += r.seconds;
    }
}

/// Everything one suite run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub config: Config,
    pub wall_seconds: f64,
    pub by_fault: Vec<Totals>,
    pub totals: Totals,
    pub runs: Vec<RunOutcome>,
}

impl Report {
    pub fn new(config: &Config, runs: Vec<RunOutcome>, wall: Duration) -> Self {
        let mut by_fault: Vec<Totals> = Vec::new();
        let mut totals = Totals { fault: "total".into(), ..Totals::default() };
        for run in &runs {
            let slot = match by_fault.iter().position(|t| t.fault == run.fault) {
                Some(i) => i,
                None => {
                    by_fault.push(Totals { fault: run.fault.clone(), ..Totals::default() });
                    by_fault.len() - 1
                }
            };
            by_fault[slot].add(run);
            totals.add(run);
        }
        Self {
            machine: Machine::detect(),
            config: config.clone(),
            wall_seconds: wall.as_secs_f64(),
            by_fault,
            totals,
            runs,
        }
    }
}

impl crate::results::Report for Report {
    /// The table per fault kind, with totals; lost/duplicated/reordered are
    /// `client/log`.
    fn table(&self) -> String {
        let mut t = String::new();
        let w = &self.config.workload;
        let _ = writeln!(
            t,
            "ordo-chaos: {} runs ({} skipped), {} streams × {} events over {} calls per run, latency {}, every {}th event stateless; wall {:.0} s\n",
            self.totals.runs,
            self.totals.skipped,
            w.streams,
            w.events_per_stream,
            w.calls,
            w.latency,
            w.stateless_every,
            self.wall_seconds
        );
        t.push_str(
            "| fault | runs | events | lost (client/log) | duplicated (client/log) | reordered (client/log) | wrong payload | hung calls | FAILED | GAP | rejected (resent) | call breaks | events resent | AMQP lost | unclean stops | fault errors | bad runs |\n",
        );
        t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let amqp_on = self.runs.iter().any(|r| r.amqp_lost.is_some());
        for row in self.by_fault.iter().chain(std::iter::once(&self.totals)) {
            let bold = row.fault == "total";
            let name = if bold { "**total**".to_owned() } else { format!("`{}`", row.fault) };
            let runs =
                if row.skipped > 0 { format!("{} (+{} skipped)", row.runs, row.skipped) } else { row.runs.to_string() };
            let _ = writeln!(
                t,
                "| {name} | {runs} | {} | {}/{} | {}/{} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.events,
                row.client_lost,
                row.log_lost,
                row.client_duplicated,
                row.log_duplicated,
                row.client_reordered,
                row.log_reordered,
                row.wrong_payload,
                row.hung_calls,
                row.failed,
                row.gap,
                row.rejected,
                row.call_breaks,
                row.resent,
                if amqp_on { row.amqp_lost.to_string() } else { "n/a".into() },
                row.unclean_stops,
                row.fault_errors,
                row.bad_runs,
            );
        }
        let stops: Vec<String> = self
            .runs
            .iter()
            .filter_map(|r| r.fault_record.stop.as_ref().map(|s| (r, s)))
            .filter(|(_, s)| !s.clean)
            .map(|(r, s)| format!("- run {} `{}`: {} after {:.1} s", r.run, r.fault, s.exit, s.seconds))
            .collect();
        if !stops.is_empty() {
            let _ = writeln!(
                t,
                "\nSIGTERM stops that were not `exit 0` within the drain timeout ({:?}) + 1 s:\n{}",
                self.config.drain,
                stops.join("\n")
            );
        }
        let bad: Vec<String> = self.runs.iter().filter(|r| !r.clean()).map(RunOutcome::line).collect();
        if !bad.is_empty() {
            let _ = writeln!(t, "\nRuns that went wrong:\n```\n{}\n```", bad.join("\n"));
        }
        t
    }

    /// Writes `chaos-<time>.json`, `latest.json` and `latest.md` into `dir`.
    fn write(&self, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
        crate::results::write(dir, "chaos", self.machine.unix_time, self, &self.table())
    }

    /// Fails when any run lost, duplicated, reordered or corrupted a result,
    /// left a call hung, or could not inject its fault.
    fn check(&self) -> anyhow::Result<()> {
        let t = &self.totals;
        if t.runs == 0 {
            bail!("no run was made");
        }
        if t.bad_runs > 0 {
            bail!(
                "{} of {} runs broke the contract: lost {}/{}, duplicated {}/{}, reordered {}/{} (client/log), wrong payloads {}, hung calls {}, AMQP lost {}, fault errors {}",
                t.bad_runs,
                t.runs,
                t.client_lost,
                t.log_lost,
                t.client_duplicated,
                t.log_duplicated,
                t.client_reordered,
                t.log_reordered,
                t.wrong_payload,
                t.hung_calls,
                t.amqp_lost,
                t.fault_errors
            );
        }
        Ok(())
    }
}
