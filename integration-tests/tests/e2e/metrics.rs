//! Prometheus metrics (issue 9, item 1): every service serves the text
//! format on its own `--metrics-listen` port (the testkit gives each a free
//! one). After a known workload the counters of every service, parsed by a
//! real Prometheus parser (`prometheus-parse`), match what was sent.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, event, with_attr},
    eventually, sse,
};
use ordo_proto::v1::{ResultStatus, SubscribeRequest};

use crate::DEADLINE;

/// Events of the workload's stream that are accepted (one of them FAILED).
const N: u64 = 20;
/// The stateful ones (the other is a stateless `json-validate`).
const STATEFUL: u64 = N - 1;
/// The sequence of the FAILED one (invalid JSON for `json-validate`).
const FAILED_AT: u64 = 7;
/// Unknown operations (NOT_FOUND) and oversized payloads (INVALID_ARGUMENT).
const UNKNOWN_OPS: u64 = 2;
const OVERSIZED: u64 = 1;
const CONCURRENCY: u64 = 7;

#[tokio::test(flavor = "multi_thread")]
async fn every_service_counts_a_known_workload_on_its_metrics_endpoint() {
    let cluster = Cluster::builder()
        .workers(1)
        .harmonizer_args(["--max-payload-bytes", "64"])
        .worker_args(["--concurrency".to_owned(), CONCURRENCY.to_string()])
        .start()
        .await;
    let stream = "metrics";
    let mut events: Vec<_> = (0..N)
        .map(|seq| {
            if seq == FAILED_AT {
                event(stream, seq, "json-validate", "{not json")
            } else {
                with_attr(event(stream, seq, "async-echo", format!("e{seq}")), "latency", "fixed:2ms")
            }
        })
        .collect();
    // Refused before any sequence logic: they leave no gap behind.
    for i in 0..UNKNOWN_OPS {
        events.push(event(stream, N + i, &format!("no-such-op-{i}"), "x"));
    }
    for i in 0..OVERSIZED {
        events.push(event(stream, N + UNKNOWN_OPS + i, "async-echo", vec![b'x'; 100]));
    }
    let total = events.len();

    // A subscriber on each channel while the workload runs.
    let mut grpc = cluster
        .push_gateway()
        .subscribe(SubscribeRequest { stream_id: stream.into(), from_sequence: 0, streams: vec![] })
        .await
        .expect("Subscribe opens")
        .into_inner();
    let mut sse =
        sse::open_stream(&sse::events_url(&cluster.sse_url(), stream, None), None).await.expect("the SSE stream opens");

    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), total)]), DEADLINE).await.expect("every answer arrives");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    let count = |status: ResultStatus| results.iter().filter(|r| r.status() == status).count() as u64;
    assert_eq!(
        (count(ResultStatus::Ok), count(ResultStatus::Failed), count(ResultStatus::Rejected)),
        (STATEFUL, 1, UNKNOWN_OPS + OVERSIZED),
        "{results:?}"
    );
    // Both subscribers saw every released result.
    for _ in 0..N {
        grpc.message().await.expect("Subscribe delivers").expect("Subscribe stays open");
    }
    let seen = sse.collect(N as usize, DEADLINE).await.expect("SSE delivers");
    assert_eq!(seen.len() as u64, N);

    // The harmonizer: accepted by operation, rejected by code with bounded
    // operation labels, attempts, end-to-end latency.
    let harmonizer = eventually(DEADLINE, || async {
        let m = cluster.scrape("harmonizer").await?;
        let got = (
            m.sum("ordo_events_accepted_total", &[("operation", "async-echo")]),
            m.sum("ordo_events_accepted_total", &[("operation", "json-validate")]),
            m.sum("ordo_events_rejected_total", &[("code", "NOT_FOUND"), ("operation", "unknown")]),
            m.sum("ordo_events_rejected_total", &[("code", "INVALID_ARGUMENT"), ("operation", "async-echo")]),
            m.sum("ordo_harmonizer_attempts_total", &[]),
            m.histogram_count("ordo_event_latency_seconds", &[]),
        );
        let want = (STATEFUL as f64, 1.0, UNKNOWN_OPS as f64, OVERSIZED as f64, STATEFUL as f64, N as f64);
        if got == want { Ok(m) } else { Err(anyhow::anyhow!("harmonizer: {got:?}, want {want:?}\n{}", m.text)) }
    })
    .await;
    assert_eq!(harmonizer.sum("ordo_events_rejected_total", &[]), (UNKNOWN_OPS + OVERSIZED) as f64);
    assert!(
        !harmonizer.text.contains("no-such-op"),
        "an operation outside the registry is never a label value:\n{}",
        harmonizer.text
    );
    for name in ["ordo_harmonizer_retries_total", "ordo_harmonizer_timeouts_total", "ordo_harmonizer_failed_total"] {
        assert_eq!(harmonizer.sum(name, &[]), 0.0, "{name}\n{}", harmonizer.text);
    }
    eventually(DEADLINE, || async {
        let m = cluster.scrape("harmonizer").await?;
        anyhow::ensure!(m.has("ordo_harmonizer_window_occupancy_ratio"), "no window gauge yet\n{}", m.text);
        anyhow::ensure!(m.sum("ordo_harmonizer_in_flight_events", &[]) == 0.0, "events still in flight\n{}", m.text);
        Ok(())
    })
    .await;

    // The worker: every stateful event once, in its limit, nothing left running.
    let worker = cluster.worker_name(0);
    eventually(DEADLINE, || async {
        let m = cluster.scrape(&worker).await?;
        let got = (
            m.sum("ordo_worker_attempts_total", &[]),
            m.sum("ordo_worker_results_total", &[("status", "ok")]),
            m.sum("ordo_worker_concurrency_limit", &[]),
            m.sum("ordo_worker_in_flight", &[]),
            m.sum("ordo_worker_hand_backs_total", &[]) + m.sum("ordo_worker_timeouts_total", &[]),
        );
        let want = (STATEFUL as f64, STATEFUL as f64, CONCURRENCY as f64, 0.0, 0.0);
        if got == want { Ok(()) } else { Err(anyhow::anyhow!("worker: {got:?}, want {want:?}\n{}", m.text)) }
    })
    .await;

    // The reassembler: stored by status, the dead letter, the script timed.
    eventually(DEADLINE, || async {
        let m = cluster.scrape("reassembler-0").await?;
        let got = (
            m.sum("ordo_results_stored_total", &[("status", "ok")]),
            m.sum("ordo_results_stored_total", &[("status", "failed")]),
            m.sum("ordo_dead_letters_total", &[("status", "failed")]),
            m.sum("ordo_dead_letters_total", &[]),
            m.sum("ordo_redis_errors_total", &[]),
        );
        let want = (STATEFUL as f64, 1.0, 1.0, 1.0, 0.0);
        anyhow::ensure!(got == want, "reassembler: {got:?}, want {want:?}\n{}", m.text);
        let calls = m.histogram_count("ordo_release_script_duration_seconds", &[]);
        let batches = m.histogram_count("ordo_release_batch_size", &[]);
        anyhow::ensure!(calls >= 1.0 && calls <= N as f64, "script calls {calls}\n{}", m.text);
        anyhow::ensure!(batches == calls, "batches {batches} != script calls {calls}\n{}", m.text);
        Ok(())
    })
    .await;
    assert_eq!(cluster.dead_letters(stream).await.expect("ListDeadLetters").len(), 1);

    // The push-gateway: released by status, reorder wait, one subscriber per channel.
    eventually(DEADLINE, || async {
        let m = cluster.scrape("push-gateway").await?;
        let got = (
            m.sum("ordo_results_released_total", &[("status", "ok")]),
            m.sum("ordo_results_released_total", &[("status", "failed")]),
            m.histogram_count("ordo_reorder_wait_seconds", &[]),
            m.sum("ordo_subscribers", &[("channel", "grpc")]),
            m.sum("ordo_subscribers", &[("channel", "sse")]),
        );
        let want = (STATEFUL as f64, 1.0, N as f64, 1.0, 1.0);
        if got == want { Ok(()) } else { Err(anyhow::anyhow!("push-gateway: {got:?}, want {want:?}\n{}", m.text)) }
    })
    .await;

    // The stateless service: the one execution, FAILED.
    let m = cluster.scrape("stateless").await.expect("the stateless service is scraped");
    assert_eq!(
        m.sum("ordo_stateless_executions_total", &[("operation", "json-validate"), ("status", "failed")]),
        1.0,
        "{}",
        m.text
    );

    // Submit counts too: one accepted (answered inline, its latency
    // observed) and one refused, as deltas of the harmonizer's counters.
    let before = cluster.scrape("harmonizer").await.expect("the harmonizer is scraped");
    let answered = cluster
        .harmonizer()
        .submit(event("metrics-submit", 0, "upper", "abc"))
        .await
        .expect("Submit answers")
        .into_inner();
    assert_eq!(answered.status(), ResultStatus::Ok, "{answered:?}");
    let refused = cluster.harmonizer().submit(event("metrics-submit", 1, "no-such-op", "x")).await;
    assert_eq!(refused.map_err(|s| s.code()).err(), Some(tonic::Code::NotFound));
    let after = cluster.scrape("harmonizer").await.expect("the harmonizer is scraped");
    let delta = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(
        (
            delta("ordo_events_accepted_total", &[("operation", "upper")]),
            delta("ordo_events_rejected_total", &[("code", "NOT_FOUND"), ("operation", "unknown")]),
            after.histogram_count("ordo_event_latency_seconds", &[])
                - before.histogram_count("ordo_event_latency_seconds", &[]),
        ),
        (1.0, 1.0, 1.0),
        "{}",
        after.text
    );

    // Subscribers that leave are no longer counted.
    drop((grpc, sse));
    eventually(Duration::from_secs(10), || async {
        let m = cluster.scrape("push-gateway").await?;
        let left = m.sum("ordo_subscribers", &[]);
        if left == 0.0 { Ok(()) } else { Err(anyhow::anyhow!("{left} subscribers left\n{}", m.text)) }
    })
    .await;
}

/// A metrics port that is taken is a configuration error (exit code 64,
/// like the gRPC port), and a bad value is refused by the flag parser.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_or_malformed_metrics_address_stops_the_service_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port of our own");
    let metrics = taken.local_addr().expect("its address").to_string();
    let run = |metrics: String| async move {
        let listen = format!("127.0.0.1:{}", integration_tests::ports::free_port());
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(integration_tests::process::binary("stateless"))
                .args(["--listen", &listen, "--metrics-listen", &metrics])
                .env("NO_COLOR", "1")
                .output(),
        )
        .await
        .expect("the service exits at once")
        .expect("the binary runs");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, stderr) = run(metrics).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("cannot listen for metrics"), "{stderr}");
    let (code, stderr) = run("nine".to_owned()).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
}
