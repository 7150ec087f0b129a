//! Where every program of this crate leaves its numbers: a JSON file named
//! after the run (`<kind>-<unix time>.json`), the same as `latest.json`, and
//! the printed tables as `latest.md`; and the one way a report ends a run
//! (print, write, then pass or fail).

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use serde::Serialize;

/// Writes `<kind>-<unix_time>.json`, `latest.json` and `latest.md` into
/// `dir`; returns the first path.
pub fn write(
    dir: &Path,
    kind: &str,
    unix_time: u64,
    report: &impl Serialize,
    markdown: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    let path = dir.join(format!("{kind}-{unix_time}.json"));
    for p in [&path, &dir.join("latest.json")] {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let md = dir.join("latest.md");
    std::fs::write(&md, markdown).with_context(|| format!("cannot write {}", md.display()))?;
    Ok(path)
}

/// A finished run's report.
pub trait Report {
    /// The tables, as printed and as `latest.md`.
    fn table(&self) -> String;
    /// Writes the files; returns the JSON path.
    fn write(&self, dir: &Path) -> anyhow::Result<PathBuf>;
    /// Whether the run passed.
    fn check(&self) -> anyhow::Result<()>;
}

/// Awaits `run`, prints its tables, writes its files into `dir` and exits 0
/// only if it passed; any error is printed as `<program>: error: …`.
pub async fn finish<R: Report>(program: &str, dir: &Path, run: impl Future<Output = anyhow::Result<R>>) -> ExitCode {
    let outcome = async {
        let report = run.await?;
        println!("\n{}", report.table());
        let path = report.write(dir)?;
        println!("JSON: {}", path.display());
        report.check()
    };
    match outcome.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
