//! DNS discovery (`dns://name:port` peers) against a real resolver path: a
//! DNS server in the test process (testkit `dns`) whose records change while
//! a stream runs, the services resolving through it (`--dns-server`, short
//! `--dns-refresh`). Two workers share one port number on different
//! loopback addresses (127.0.0.2, 127.0.0.3), as the pods behind a headless
//! Service do; the workers find the reassembler by DNS too.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use integration_tests::{
    Cluster, ProcessCall, ServiceProcess,
    client::{LINGER, check_all_ok, check_in_order_exactly_once},
    dns::DnsServer,
    eventually,
    ports::free_port,
    process::{ServiceSpec, binary},
};

use crate::{DEADLINE, check_numbered_payloads, numbered_events};

const WORKERS: &str = "workers.ordo.test";
const REASSEMBLERS: &str = "reassemblers.ordo.test";
const REFRESH: &str = "200ms";

/// A stateful worker named `name` on `host:port`, finding the reassemblers through `dns`.
async fn start_worker(
    cluster: &Cluster,
    dns: &DnsServer,
    reassembler_port: u16,
    name: &str,
    host: Ipv4Addr,
    port: u16,
) -> ServiceProcess {
    let args = [
        "--reassemblers".to_owned(),
        format!("dns://{REASSEMBLERS}:{reassembler_port}"),
        "--redis-url".to_owned(),
        cluster.redis_url(),
        "--name".to_owned(),
        name.to_owned(),
        "--dns-server".to_owned(),
        dns.addr().to_string(),
        "--dns-refresh".to_owned(),
        REFRESH.to_owned(),
    ];
    let spec = ServiceSpec {
        name: name.to_owned(),
        binary: binary("stateful-worker"),
        args: args.into_iter().collect(),
        env: Vec::new(),
    };
    ServiceProcess::start_on(spec, host, port, cluster.log_dir(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("{name} starts on {host}:{port}: {error:#}"))
}

/// Attempts worker `process` made, from its metrics.
async fn attempts(process: &ServiceProcess) -> f64 {
    let url = process.metrics_url().expect("the testkit chose its metrics port");
    let metrics = integration_tests::metrics::scrape(&url).await.expect("the worker serves metrics");
    metrics.sum("ordo_worker_attempts_total", &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_found_by_dns_come_and_go_while_a_stream_stays_complete_and_in_order() {
    const N: u64 = 3000;
    let dns = DnsServer::start().await.expect("the DNS server starts");
    let (first_ip, second_ip) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    // One port number for both workers: the name carries one port.
    let port = free_port();
    dns.set(WORKERS, &[IpAddr::V4(first_ip)]).expect("a record");
    dns.set(REASSEMBLERS, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]).expect("a record");

    // The harmonizer knows its workers only by name.
    let mut cluster = Cluster::builder()
        .workers(0)
        .harmonizer_args([
            "--workers".to_owned(),
            format!("dns://{WORKERS}:{port}"),
            "--dns-server".to_owned(),
            dns.addr().to_string(),
            "--dns-refresh".to_owned(),
            REFRESH.to_owned(),
        ])
        .start()
        .await;
    let reassembler = cluster.reassembler_process(0).port();
    let mut first = start_worker(&cluster, &dns, reassembler, "worker-a", first_ip, port).await;
    cluster.wait_for_workers("async-echo", &["worker-a"]).await;

    let stream = "dns-discovery".to_owned();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(&stream, N, "async-echo", "exp:5ms"), Some(Duration::from_millis(2)));
    call.wait_for_total(200, DEADLINE).await.expect("the first results arrive through worker-a");

    // A second record: the harmonizer adds the worker without any config change.
    let second = start_worker(&cluster, &dns, reassembler, "worker-b", second_ip, port).await;
    dns.set(WORKERS, &[IpAddr::V4(first_ip), IpAddr::V4(second_ip)]).expect("a record");
    cluster.wait_for_workers("async-echo", &["worker-a", "worker-b"]).await;
    eventually(Duration::from_secs(30), || async {
        let got = attempts(&second).await;
        if got > 0.0 { Ok(()) } else { Err(anyhow::anyhow!("worker-b made no attempt yet")) }
    })
    .await;

    // The first record goes, then its worker is killed: what it held is done elsewhere.
    assert!(!call.fed(), "the stream ended before worker-a left; the test would prove nothing");
    dns.set(WORKERS, &[IpAddr::V4(second_ip)]).expect("a record");
    cluster.wait_for_workers("async-echo", &["worker-b"]).await;
    let before_kill = attempts(&second).await;
    first.kill();
    eprintln!("worker-a gone after {} results", call.received().len());
    assert!(!call.fed(), "the stream ended before worker-a was killed; the test would prove nothing");

    call.wait_for_counts(&BTreeMap::from([(stream.clone(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes on worker-b");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    check_all_ok(&results).expect("every result is OK");
    check_numbered_payloads(&results).expect("every result is its event's");
    check_in_order_exactly_once(&results, N).expect("in order, exactly once");
    assert!(attempts(&second).await > before_kill, "the rest of the stream ran on worker-b");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_dns_peer_is_a_configuration_error() {
    let dns = DnsServer::start().await.expect("the DNS server starts");
    let started = Cluster::builder()
        .workers(1)
        .harmonizer_args(["--workers", "dns://workers.ordo.test", "--dns-server", &dns.addr().to_string()])
        .startup_deadline(Duration::from_secs(10))
        .try_start()
        .await;
    let error = format!("{:#}", started.expect_err("the harmonizer refuses a dns:// peer without a port"));
    assert!(error.contains("dns://workers.ordo.test") && error.contains("needs a port"), "{error}");
}
