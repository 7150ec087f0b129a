//! What a process costs, read from Linux's `/proc`: CPU time (`utime` +
//! `stime` of `/proc/<pid>/stat`, in clock ticks), peak and current resident
//! memory (`VmHWM`, `VmRSS` of `/proc/<pid>/status`) and open descriptors
//! (`/proc/<pid>/fd`). The peak can be reset between
//! measurements by writing `5` to `/proc/<pid>/clear_refs` (our own children
//! only), so each variant of a benchmark gets its own peak.
//!
//! Nothing here fails a benchmark: a value that cannot be read is `None` and
//! shows as `n/a`.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use serde::Serialize;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux unless told otherwise).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100)
    })
}

fn proc_path(pid: Option<u32>, file: &str) -> PathBuf {
    match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/{file}")),
        None => PathBuf::from(format!("/proc/self/{file}")),
    }
}

/// CPU seconds (user + system) the process used so far; `None` is this process.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are utime and stime; `fields[0]` is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks() as f64)
}

/// Peak resident set size in bytes (`VmHWM`); `None` is this process.
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Current resident set size in bytes (`VmRSS`); `None` is this process.
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open file descriptors (entries of `/proc/<pid>/fd`: files, sockets,
/// pipes); `None` is this process.
pub fn open_fds(pid: Option<u32>) -> Option<usize> {
    Some(std::fs::read_dir(proc_path(pid, "fd")).ok()?.count())
}

/// Resets the peak RSS of `pid` to its current RSS. False if the kernel refused.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(proc_path(Some(pid), "clear_refs"), "5").is_ok()
}

/// One process to watch: a name for reports and its pid.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: Option<u32>,
}

/// CPU and peak memory of one process over one measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub name: String,
    /// CPU seconds used during the measurement.
    pub cpu_seconds: Option<f64>,
    /// Peak RSS during the measurement (since the reset), in MiB.
    pub peak_rss_mib: Option<f64>,
    /// False when the peak could not be reset: then it is the process's lifetime peak.
    pub peak_reset: bool,
}

/// A running measurement over a set of processes.
#[derive(Debug)]
pub struct Meter {
    watched: Vec<(Watched, Option<f64>, bool)>,
}

impl Meter {
    /// Resets every peak and records every CPU counter.
    pub fn start(watched: Vec<Watched>) -> Self {
        let watched = watched
            .into_iter()
            .map(|w| {
                let reset = w.pid.is_some_and(reset_peak_rss);
                let cpu = cpu_seconds(w.pid);
                (w, cpu, reset)
            })
            .collect();
        Self { watched }
    }

    /// CPU used since [`Meter::start`] and the peaks, per process.
    pub fn finish(&self) -> Vec<ProcessUsage> {
        self.watched
            .iter()
            .map(|(w, before, reset)| {
                let cpu = match (before, cpu_seconds(w.pid)) {
                    (Some(before), Some(after)) => Some((after - before).max(0.0)),
                    _ => None,
                };
                ProcessUsage {
                    name: w.name.clone(),
                    cpu_seconds: cpu,
                    peak_rss_mib: peak_rss_bytes(w.pid).map(|b| b as f64 / (1024.0 * 1024.0)),
                    peak_reset: *reset,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(clock_ticks() > 0);
        let cpu = cpu_seconds(None).expect("own /proc/self/stat");
        assert!(cpu >= 0.0);
        // RSS first: the peak, read after, can only be as high or higher
        // (other tests in this process allocate meanwhile).
        let now = rss_bytes(None).expect("own VmRSS");
        let rss = peak_rss_bytes(None).expect("own VmHWM");
        assert!(now > 0 && now <= rss, "VmRSS {now} is at most VmHWM {rss}");
        assert!(open_fds(None).is_some_and(|n| n >= 3), "stdin, stdout, stderr at least");
        assert!(rss > 1024 * 1024, "a test binary uses more than 1 MiB: {rss}");
        // Burn CPU until the kernel has charged this process at least two
        // ticks (10 ms each), and see the meter count them. Burning for a
        // fixed wall time is not enough on a loaded machine: the thread may
        // get no tick at all in it. The wall-time cap only bounds a broken
        // clock.
        let meter = Meter::start(vec![Watched { name: "self".into(), pid: None }]);
        let before = cpu_seconds(None).expect("own /proc/self/stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds(None).is_some_and(|now| now < before + 0.02)
            && start.elapsed() < std::time::Duration::from_secs(30)
        {
            for _ in 0..100_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
        }
        std::hint::black_box(x);
        let usage = meter.finish();
        assert!(usage[0].cpu_seconds.is_some_and(|s| s > 0.0), "{usage:?}");
    }
}
