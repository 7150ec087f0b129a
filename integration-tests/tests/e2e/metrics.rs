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

/// The cluster the known workload runs on (one worker, a payload limit the
/// oversized events break).
pub fn workload_cluster() -> integration_tests::ClusterBuilder {
    Cluster::builder()
        .workers(1)
        .harmonizer_args(["--max-payload-bytes", "64"])
        .worker_args(["--concurrency".to_owned(), CONCURRENCY.to_string()])
}

/// Subscribers on the gRPC and SSE channels, open while the workload ran.
pub struct Subscribers {
    pub grpc: tonic::Streaming<ordo_proto::v1::EventResult>,
    pub sse: sse::SseStream,
}

/// Runs the known workload on stream `stream` of `cluster` (built from
/// [`workload_cluster`]): `N` events, one FAILED, some refused, with a
/// subscriber on gRPC and SSE that saw every released result.
pub async fn known_workload(cluster: &Cluster, stream: &str) -> Subscribers {
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
    // The gateway counts the results it hears live, not those it reads from
    // the log while its subscription to the stream's channel is not confirmed
    // yet: so the workload starts once Redis has that subscription (on a
    // loaded machine it took longer than the first releases).
    let channel = ordo_core::keys::stream_release_channel(stream, false);
    let admin = cluster.redis_conn().expect("the cluster's Redis");
    eventually(DEADLINE, || {
        let (channel, mut admin) = (channel.clone(), admin.clone());
        async move {
            let (_, subscribers): (String, u64) =
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel).query_async(&mut admin).await?;
            anyhow::ensure!(subscribers >= 1, "{channel} has no subscriber in Redis yet");
            Ok(())
        }
    })
    .await;

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
    Subscribers { grpc, sse }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_counts_a_known_workload_on_its_metrics_endpoint() {
    let cluster = workload_cluster().start().await;
    let stream = "metrics";
    let Subscribers { grpc, sse } = known_workload(&cluster, stream).await;

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

/// Retries, timeouts, cancels and FAILED at non-zero values, exactly: one
/// event of `N` outlives every attempt (as in `give_up`). Its first attempt
/// times out at the harmonizer, is cancelled on its worker and retried once;
/// the retry times out too, and the event is given up (FAILED in its place).
/// The other events take 1 ms against a 1 s attempt time, so none of them
/// times out (if the machine stalls for a second, this test says so).
///
/// The stuck event is the first: nothing is released before it is given up,
/// about 2 s in, by when the call's follow has long subscribed its stream's
/// release channel. The gateway counts what it hears on that channel; a
/// result released before the subscription is confirmed reaches the call
/// through the log's catch-up read and is not counted, so with a later stuck
/// event the count would depend on how fast the subscription came (it did:
/// 7 of 11 on a loaded CI machine).
///
/// On the worker side each abandoned attempt ends once, but by whichever
/// comes first: the harmonizer's cancel (sent when its sweep, every 250 ms,
/// finds the attempt past its time) or the attempt's own deadline (the same
/// 1 s, counted from its arrival). So cancels + timeouts is exactly 2, and
/// the split between them is only bounded.
#[tokio::test(flavor = "multi_thread")]
async fn timeouts_retries_cancels_and_failed_are_counted_as_they_happen() {
    const N: u64 = 12;
    const STUCK: u64 = 0;
    let cluster =
        Cluster::builder().workers(2).harmonizer_args(["--event-timeout", "1s", "--max-attempts", "2"]).start().await;
    let stream = "metrics-timeouts";
    let events = (0..N)
        .map(|seq| {
            let latency = if seq == STUCK { "fixed:5s" } else { "fixed:1ms" };
            with_attr(event(stream, seq, "async-echo", format!("{seq}")), "latency", latency)
        })
        .collect();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE).await.expect("every answer");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    let failed: Vec<u64> = results.iter().filter(|r| r.status() == ResultStatus::Failed).map(|r| r.sequence).collect();
    assert_eq!(failed, vec![STUCK], "{results:?}");

    eventually(DEADLINE, || async {
        let m = cluster.scrape("harmonizer").await?;
        let got = (
            m.sum("ordo_harmonizer_attempts_total", &[]),
            m.sum("ordo_harmonizer_retries_total", &[]),
            m.sum("ordo_harmonizer_timeouts_total", &[]),
            m.sum("ordo_harmonizer_failed_total", &[]),
            m.sum("ordo_harmonizer_hand_backs_total", &[]),
        );
        let want = ((N + 1) as f64, 1.0, 2.0, 1.0, 0.0);
        if got == want { Ok(()) } else { Err(anyhow::anyhow!("harmonizer: {got:?}, want {want:?}\n{}", m.text)) }
    })
    .await;
    // Both workers' counters, summed: which one ran which attempt is the pool's choice.
    eventually(DEADLINE, || async {
        let mut total = (0.0, 0.0, 0.0, 0.0, 0.0);
        for i in 0..2 {
            let m = cluster.scrape(&cluster.worker_name(i)).await?;
            total.0 += m.sum("ordo_worker_attempts_total", &[]);
            total.1 += m.sum("ordo_worker_results_total", &[("status", "ok")]);
            total.2 += m.sum("ordo_worker_cancels_total", &[]);
            total.3 += m.sum("ordo_worker_timeouts_total", &[]);
            total.4 += m.sum("ordo_worker_in_flight", &[]);
        }
        let (attempts, ok, cancels, timeouts, in_flight) = total;
        let exact = (attempts, ok, cancels + timeouts, in_flight);
        let want = ((N + 1) as f64, (N - 1) as f64, 2.0, 0.0);
        anyhow::ensure!(
            exact == want,
            "workers: {total:?} (cancels + timeouts = {}), want {want:?}",
            cancels + timeouts
        );
        Ok(())
    })
    .await;
    // The FAILED placeholder is stored and released like any result, with its dead letter.
    eventually(DEADLINE, || async {
        let r = cluster.scrape("reassembler-0").await?;
        let p = cluster.scrape("push-gateway").await?;
        let got = (
            r.sum("ordo_results_stored_total", &[("status", "failed")]),
            r.sum("ordo_dead_letters_total", &[("status", "failed")]),
            p.sum("ordo_results_released_total", &[("status", "failed")]),
            p.sum("ordo_results_released_total", &[("status", "ok")]),
        );
        let want = (1.0, 1.0, 1.0, (N - 1) as f64);
        if got == want { Ok(()) } else { Err(anyhow::anyhow!("reassembler/push-gateway: {got:?}, want {want:?}")) }
    })
    .await;
}

/// A worker killed (SIGKILL) mid-stream: the events it held are retried on
/// the other one. How many it held at that instant is not deterministic, so
/// the retry count is bounded (at least one, since both workers are kept
/// busy; at most the events not yet answered), while the identities between
/// the counters are exact: attempts = accepted + retries, nothing timed
/// out, handed back or given up, and every event got exactly one OK result.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_events_are_counted_as_retries() {
    const N: u64 = 300;
    let mut cluster = Cluster::builder().workers(2).worker_args(["--concurrency", "16"]).start().await;
    let stream = "metrics-failover".to_owned();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let events = (0..N)
        .map(|seq| with_attr(event(&stream, seq, "async-echo", format!("{seq}")), "latency", "fixed:20ms"))
        .collect();
    call.feed(events, Some(Duration::from_millis(2)));
    call.wait_for_total(40, DEADLINE).await.expect("the first results arrive");
    let answered = call.received().len() as u64;
    assert!(answered < N, "the stream finished before the kill; the test would prove nothing");
    cluster.worker_process(0).kill();
    call.wait_for_counts(&BTreeMap::from([(stream.clone(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    if let Err(e) = integration_tests::client::check_in_order_exactly_once(&results, N) {
        panic!("{e}");
    }
    assert!(results.iter().all(|r| r.status() == ResultStatus::Ok), "{results:?}");

    let m = eventually(DEADLINE, || async {
        let m = cluster.scrape("harmonizer").await?;
        let accepted = m.sum("ordo_events_accepted_total", &[("operation", "async-echo")]);
        let (attempts, retries) =
            (m.sum("ordo_harmonizer_attempts_total", &[]), m.sum("ordo_harmonizer_retries_total", &[]));
        anyhow::ensure!(accepted == N as f64, "accepted {accepted}\n{}", m.text);
        anyhow::ensure!(attempts == accepted + retries, "attempts {attempts} != {accepted} + {retries}\n{}", m.text);
        anyhow::ensure!(m.sum("ordo_harmonizer_in_flight_events", &[]) == 0.0, "still in flight\n{}", m.text);
        Ok(m)
    })
    .await;
    let retries = m.sum("ordo_harmonizer_retries_total", &[]);
    assert!(
        retries >= 1.0 && retries <= (N - answered) as f64,
        "retries {retries} (answered before the kill: {answered})"
    );
    for name in ["ordo_harmonizer_timeouts_total", "ordo_harmonizer_failed_total", "ordo_harmonizer_hand_backs_total"] {
        assert_eq!(m.sum(name, &[]), 0.0, "{name}\n{}", m.text);
    }
    // The survivor ran its own share and every retry; the dead one's count died with it.
    let survivor = cluster.scrape(&cluster.worker_name(1)).await.expect("the surviving worker is scraped");
    let ran = survivor.sum("ordo_worker_results_total", &[("status", "ok")]);
    assert!(ran >= retries && ran <= N as f64, "survivor results {ran}, retries {retries}\n{}", survivor.text);
    eprintln!("killed a worker after {answered} answers: {retries} retries, the survivor produced {ran} results");
}

/// A TCP proxy to the machine's RabbitMQ that can be made unreachable: while
/// down it accepts and at once drops every connection (and the ones it
/// forwarded), so the gateway sees a broker that is gone, on a port that
/// stays ours.
struct BrokerProxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl BrokerProxy {
    async fn start(up: bool) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for the proxy");
        let port = listener.local_addr().expect("its address").port();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(up));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let up = flag.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cuts = cuts.clone();
                // Only a cut after this connection was made ends it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self { port, up: flag, cut, task }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The AMQP outbox lag (`ordo_amqp_outbox_lag_results`) counts what was
/// released and not confirmed: with the broker unreachable from the start it
/// is exactly the number of released results (nothing is confirmed); once the
/// broker is reachable it drains to 0 and the confirms match. A second
/// outage mid-run makes it grow again, and it drains again.
#[tokio::test(flavor = "multi_thread")]
async fn amqp_outbox_lag_grows_while_the_broker_is_unreachable_and_drains_to_zero() {
    const N: u64 = 25;
    integration_tests::rabbitmq::require_broker().await;
    let proxy = BrokerProxy::start(false).await;
    let exchange = integration_tests::rabbitmq::unique_name("ordo.test.lag");
    let cluster = Cluster::builder()
        .push_gateway_args(["--amqp-url", &proxy.url(), "--amqp-exchange", &exchange, "--amqp-lag-interval", "200ms"])
        .start()
        .await;
    let gauge = |want: f64, confirmed: f64| {
        let cluster = &cluster;
        async move {
            eventually(DEADLINE, || async {
                let m = cluster.scrape("push-gateway").await?;
                let got = (m.sum("ordo_amqp_outbox_lag_results", &[]), m.sum("ordo_amqp_confirmed_total", &[]));
                anyhow::ensure!(m.has("ordo_amqp_outbox_lag_results"), "no lag gauge yet\n{}", m.text);
                if got == (want, confirmed) {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("(lag, confirmed) {got:?}, want {:?}", (want, confirmed)))
                }
            })
            .await;
        }
    };
    let run = |stream: String| {
        let cluster = &cluster;
        async move {
            let mut call = ProcessCall::open(&cluster.harmonizer());
            call.feed((0..N).map(|seq| event(&stream, seq, "upper", format!("{seq}"))).collect(), None);
            call.wait_for_counts(&BTreeMap::from([(stream, N as usize)]), DEADLINE).await.expect("every answer");
            call.finish(LINGER).await.expect("the call ends cleanly");
        }
    };

    // Unreachable from the start: every released result is lag.
    gauge(0.0, 0.0).await;
    run("lag-a".to_owned()).await;
    gauge(N as f64, 0.0).await;
    // Reachable: published, confirmed, drained.
    proxy.set_up(true);
    gauge(0.0, N as f64).await;
    // Gone again mid-run: the lag grows by what was released meanwhile.
    proxy.set_up(false);
    run("lag-b".to_owned()).await;
    gauge(N as f64, N as f64).await;
    proxy.set_up(true);
    gauge(0.0, (2 * N) as f64).await;

    // The exchange the gateway declared is the test's own: remove it.
    if let Ok(consumer) = integration_tests::rabbitmq::QueueConsumer::bind(&exchange, "#").await {
        let _ = consumer.delete().await;
    }
}
