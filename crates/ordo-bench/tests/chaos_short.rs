//! The short version of `just chaos`, run by `just test`: a handful of
//! faults (the harmonizer SIGKILLed while the client resends, a worker
//! frozen, the reassembler SIGTERMed and restarted, Redis killed and back
//! from its append-only file, the client dropping its calls), each on a
//! small workload of 8 streams over 2 calls. Every result must reach the
//! client exactly once and in order, every release log must hold each
//! sequence once, and every call must end. Speed is not asserted.

use std::time::Duration;

use ordo_bench::chaos::{self, Config, Fault, Target};
use ordo_bench::results::Report as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_mode_loses_duplicates_and_reorders_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let long = Config::long();
    let faults = vec![
        Fault::Kill(Target::Harmonizer),
        Fault::Stop(Target::Worker),
        Fault::Term(Target::Reassembler),
        Fault::RedisKill,
        Fault::DropCalls,
    ];
    let config = Config {
        runs: faults.len(),
        faults,
        workload: chaos::client::Workload {
            streams: 8,
            events_per_stream: 60,
            calls: 2,
            pace: Duration::from_millis(8),
            // Slower operations than the long suite's: more events in flight
            // when the fault hits, so a small run still resends many.
            latency: "uniform:5ms-60ms".into(),
            settle: Duration::from_secs(45),
            call_end: Duration::from_secs(10),
            ..long.workload.clone()
        },
        pause: Duration::from_secs(2),
        drain: Duration::from_secs(5),
        out_dir: dir.path().to_path_buf(),
        ..long
    };
    let report = chaos::run(&config).await.expect("the suite runs");
    let table = report.table();
    eprintln!("{table}");
    assert_eq!(report.totals.runs, 5, "{table}");
    assert!(
        report.runs.iter().any(|r| r.fault == "sigkill:harmonizer" && r.resent > 0)
            && report.runs.iter().any(|r| r.fault == "client-drop-calls" && r.resent > 0),
        "killing the harmonizer or dropping the calls mid-run must make the client resend, or the run proved nothing:\n{table}"
    );
    report.check().unwrap_or_else(|e| panic!("{e:#}\n{table}"));
    let json = report.write(dir.path()).expect("files are written");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("JSON file")).expect("valid JSON");
    assert_eq!(parsed["runs"].as_array().map(Vec::len), Some(5));
}
