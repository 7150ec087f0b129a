//! Short modes of the experiment and the benchmark, on the real services
//! (the binaries of the profile this test was built with, or
//! `ORDO_BIN_DIR`): they must finish, write their files, and show no
//! re-assembled error. Speed is never asserted here; the numbers live in
//! `docs/benchmarks.md`.

use std::time::Duration;

use ordo_bench::{
    bench::{self, WorkloadId},
    experiment,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_short_mode_has_no_reassembled_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = experiment::Config {
        runs: 2,
        mean_delays: vec![Duration::from_millis(2), Duration::from_millis(5), Duration::from_millis(10)],
        pace: Duration::from_millis(1),
        parallel: 6,
        out_dir: dir.path().to_path_buf(),
        text: integration_tests::sonnets_text(),
        operation: experiment::OPERATION.into(),
    };
    let report = experiment::run(&config).await.expect("the experiment runs");
    report.check().expect("every run finished and no re-assembled run has an error");
    assert_eq!(report.runs.len(), 12, "2 runs × 3 delays × 2 modes");
    for run in report.runs.iter().filter(|r| r.mode == "re-assembled") {
        assert_eq!((run.differ, run.out_of_order, run.events), (0, 0, 2048), "{run:?}");
    }
    assert_eq!(report.cells.len(), 6);
    let chart = report.write(dir.path()).expect("files are written");
    for file in ["runs.csv", "summary.csv", "summary.json", "table.md"] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let summary = std::fs::read_to_string(dir.path().join("summary.csv")).expect("summary.csv");
    assert_eq!(summary.lines().count(), 7, "header and six cells:\n{summary}");
    match chart {
        Ok(png) => assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000), "{} is too small", png.display()),
        // A machine without fonts-dejavu-core gets no chart, and a warning.
        Err(why) => eprintln!("no chart: {why}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_short_mode_keeps_every_stream_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = bench::Config {
        events: 300,
        concurrency: 20,
        saturation_calls: 2,
        saturation_streams: 4,
        saturation_events: 2000,
        saturation_in_flight: 256,
        sequential_sample: 20,
        deadline: Duration::from_secs(60),
        out_dir: dir.path().to_path_buf(),
        ..bench::Config::default()
    };
    let report = bench::run(&config).await.expect("the benchmark runs");
    report.check().expect("no Ordo variant lost, duplicated or misordered a result");
    let ids: Vec<WorkloadId> = report.workloads.iter().map(|w| w.id).collect();
    assert_eq!(ids, [WorkloadId::A, WorkloadId::B, WorkloadId::C]);
    for workload in &report.workloads {
        let ordo: Vec<_> = workload.variants.iter().filter(|v| v.kind == "ordo").collect();
        // (a) and (c): client window and worker concurrency, both modes; (b): both modes.
        assert_eq!(ordo.len(), if workload.id == WorkloadId::B { 2 } else { 4 }, "{}", workload.title);
        for v in ordo {
            assert_eq!((v.events, v.order_violations, v.failed), (workload.events, 0, 0), "{}", v.name);
            if v.ordered {
                assert!(v.reorder_overhead.is_some(), "{}: results carry completion times", v.name);
            }
            assert!(v.processes.iter().any(|p| p.name == "harmonizer" && p.cpu_seconds.is_some()), "{}", v.name);
        }
    }
    let tables = report.tables();
    assert!(tables.contains("### Targets"), "{tables}");
    let json = report.write(dir.path()).expect("JSON is written");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("JSON file")).expect("valid JSON");
    assert_eq!(parsed["workloads"].as_array().map(Vec::len), Some(3));
}
