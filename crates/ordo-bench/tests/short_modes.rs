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
        workloads: vec![WorkloadId::A, WorkloadId::B, WorkloadId::C],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_short_mode_has_a_row_per_point() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = bench::Config {
        workloads: vec![WorkloadId::D],
        many_streams: vec![8, 64],
        many_streams_events: 512,
        many_streams_calls: 2,
        many_streams_in_flight: 64,
        deadline: Duration::from_secs(60),
        out_dir: dir.path().to_path_buf(),
        ..bench::Config::default()
    };
    let report = bench::run(&config).await.expect("the benchmark runs");
    report.check().expect("no point lost, duplicated or misordered a result");
    let [workload] = &report.workloads[..] else { panic!("one workload: {:?}", report.workloads.len()) };
    assert_eq!(workload.id, WorkloadId::D);
    let d = workload.many_streams.as_ref().expect("(d) has its points");
    assert_eq!((d.baseline_streams, workload.variants.len()), (8, 2));
    let streams: Vec<usize> = d.points.iter().map(|p| p.streams).collect();
    assert_eq!(streams, [8, 64], "one row per point, in the order asked");
    for (p, v) in d.points.iter().zip(&workload.variants) {
        assert_eq!((p.events, v.events, v.order_violations, v.failed, v.duplicates), (512, 512, 0, 0, 0), "{}", v.name);
        assert_eq!(p.events_per_stream * p.streams, 512);
        assert!(p.events_per_s > 0.0, "{p:?}");
        assert!(p.service_cpu_us_per_event.is_some_and(|c| c > 0.0), "{p:?}");
        assert!(p.service_cpu_us_per_stream.is_some_and(|c| c > 0.0), "{p:?}");
        assert!(p.throughput_ratio.is_some_and(|r| r > 0.0), "{p:?}");
        assert!(p.redis.error.is_none(), "{:?}", p.redis.error);
        // Every stream leaves at least its meta hash and its log in Redis.
        assert!(p.redis.keys_added().is_some_and(|k| k >= 2 * p.streams as i64), "{:?}", p.redis);
        assert!(p.redis_bytes_per_stream.is_some_and(|b| b > 0.0), "{:?}", p.redis);
        let one = p.redis.one_stream.expect("MEMORY USAGE of one stream");
        assert!(one.meta.is_some_and(|b| b > 0) && one.log.is_some_and(|b| b > 0), "{one:?}");
        for name in ["harmonizer", "push-gateway", "redis"] {
            assert!(
                v.processes.iter().any(|u| u.name == name && u.peak_rss_mib.is_some_and(|r| r > 0.0)),
                "{name}: {:?}",
                v.processes
            );
        }
    }
    assert_eq!(d.points[0].throughput_ratio, Some(1.0), "the baseline is the first point");
    let tables = report.tables();
    for needle in ["| 8 | 64 | 512 |", "| 64 | 8 | 512 |", "push-gateway"] {
        assert!(tables.contains(needle), "{needle:?} missing:\n{tables}");
    }
    let json = report.write(dir.path()).expect("JSON is written");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("JSON file")).expect("valid JSON");
    let points = &parsed["workloads"][0]["many_streams"]["points"];
    assert_eq!(points.as_array().map(Vec::len), Some(2), "{parsed}");
    assert!(points[1]["redis"]["used_memory_after"].as_u64().is_some_and(|b| b > 0), "{parsed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_short_mode_runs_each_topology_and_meters_every_redis_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = bench::Config {
        workloads: vec![WorkloadId::E],
        saturation_calls: 2,
        saturation_streams: 4,
        saturation_events: 400,
        saturation_in_flight: 64,
        deadline: Duration::from_secs(60),
        out_dir: dir.path().to_path_buf(),
        ..bench::Config::default()
    };
    let report = bench::run(&config).await.expect("the benchmark runs");
    report.check().expect("no topology lost, duplicated or misordered a result");
    let [workload] = &report.workloads[..] else { panic!("one workload: {:?}", report.workloads.len()) };
    assert_eq!(workload.id, WorkloadId::E);
    assert_eq!(workload.variants.len(), 3, "one variant per topology");
    for v in &workload.variants {
        assert_eq!((v.events, v.order_violations, v.failed, v.duplicates), (400, 0, 0, 0), "{}", v.name);
        assert!(v.service_cpu_s_per_million.is_some_and(|c| c > 0.0), "{}: every process metered", v.name);
    }
    let roles = |i: usize| -> Vec<String> { workload.variants[i].processes.iter().map(|p| p.name.clone()).collect() };
    assert!(roles(0).contains(&"redis".to_owned()), "{:?}", roles(0));
    assert!(roles(1).contains(&"redis (×6, summed)".to_owned()), "all six cluster nodes: {:?}", roles(1));
    assert!(roles(2).contains(&"worker (×2, summed)".to_owned()), "{:?}", roles(2));
    assert!(roles(2).contains(&"reassembler (×2, summed)".to_owned()), "{:?}", roles(2));
    // Topologies are not ORDERED/UNORDERED pairs: no ratio target may pair them.
    assert!(report.targets.iter().all(|t| !t.target.starts_with("(e)")), "{:?}", report.targets);
}
