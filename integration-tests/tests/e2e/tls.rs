//! TLS and mTLS, with certificates generated at test time
//! (`integration_tests::tls::TestPki`): every service serves gRPC over TLS
//! and requires client certificates, every internal hop (harmonizer →
//! stateless, workers, reassemblers, push-gateway; worker → reassembler and
//! stateless) dials over mTLS, SSE is served over https, `rediss://` works
//! against a TLS redis-server, and grpcurl and `ordo` talk TLS. Clients
//! without a certificate, in plaintext, or not trusting the CA are refused.

use std::{process::Stdio, time::Duration};

use bytes::Bytes;
use integration_tests::{
    Cluster,
    cli::ordo,
    client::{check_all_ok, check_in_order_exactly_once, event, payload_text, stream_text},
    process::{binary, health_status_with},
    tls::TestPki,
};
use ordo_proto::v1::OrderingMode;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::DEADLINE;

const TEXT: &str = "ordered over mutual TLS";

fn pki() -> TestPki {
    TestPki::generate().expect("certificates are generated")
}

/// One health Check over a fresh connection with `tls` (`None`: plaintext);
/// the error's full chain as text when it fails.
async fn check(addr: &str, tls: Option<ClientTlsConfig>) -> Result<ServingStatus, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let chain = |error: &dyn std::error::Error| {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    };
    let channel = endpoint.connect().await.map_err(|e| chain(&e))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|status| format!("{status:?}"))?;
    Ok(response.into_inner().status())
}

/// Reads `url` (Server-Sent Events) with `client` until `n` `data:` lines of
/// `event: result` arrived; returns their JSON.
async fn sse_results(client: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut response = client.get(url).header("accept", "text/event-stream").send().await?;
    anyhow::ensure!(response.status() == 200, "GET {url}: {}", response.status());
    let mut text = String::new();
    let mut results = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while results.len() < n {
        let chunk = tokio::time::timeout_at(until, response.chunk())
            .await
            .map_err(|_| anyhow::anyhow!("{} of {n} results within {DEADLINE:?}: {text:?}", results.len()))??;
        let Some(chunk) = chunk else { anyhow::bail!("the stream ended after {} results", results.len()) };
        text.push_str(&String::from_utf8_lossy(&chunk).replace('\r', ""));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if block.lines().any(|l| l == "event: result") {
                let data: String = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                results.push(serde_json::from_str(&data)?);
            }
        }
    }
    Ok(results)
}

/// Runs grpcurl (installed by scripts/install-deps.sh); its stdout, or a
/// panic with its output.
async fn grpcurl(args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("grpcurl").args(args).stdin(Stdio::null()).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("grpcurl {args:?} did not finish within 30 s"))
    .unwrap_or_else(|e| panic!("cannot run grpcurl (scripts/install-deps.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed with {}:\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn path(pki: &TestPki, name: &str) -> String {
    pki.path(name).display().to_string()
}

/// (1) + (4) + (6): a whole cluster with mTLS on every hop orders a stream
/// end to end (stateful callbacks that call the stateless service, so
/// harmonizer → worker → stateless → reassembler → push-gateway → harmonizer
/// all run over mTLS), Submit works, SSE delivers the results over https,
/// and grpcurl checks health and lists services through reflection over TLS.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_over_mtls_orders_streams_serves_sse_over_https_and_answers_grpcurl() {
    let pki = pki();
    let cluster = Cluster::builder().tls(&pki, true).start().await;
    let client = cluster.harmonizer();

    let results =
        stream_text(&client, "tls-text", TEXT, "callback", "uniform:0ms-5ms", OrderingMode::Ordered, DEADLINE)
            .await
            .expect("every result over mTLS");
    crate::assert_ok(check_in_order_exactly_once(&results, TEXT.len() as u64), "Process over mTLS");
    crate::assert_ok(check_all_ok(&results), "Process over mTLS");
    assert_eq!(payload_text(&results), TEXT, "the callback echoes every character, in order");

    let submitted = client
        .clone()
        .submit(event("tls-submit", 0, "upper", Bytes::from_static(b"secret")))
        .await
        .expect("Submit over mTLS")
        .into_inner();
    assert_eq!(submitted.payload.as_ref(), b"SECRET");
    let stateful = client
        .clone()
        .submit(event("tls-submit", 1, "async-upper", Bytes::from_static(b"worker")))
        .await
        .expect("a stateful Submit over mTLS")
        .into_inner();
    assert_eq!(stateful.payload.as_ref(), b"WORKER");

    // SSE over https with the same certificate; plain http on it fails.
    let https = pki.reqwest().expect("an https client");
    let url = format!("{}/streams/tls-text/events?from=0", cluster.sse_url());
    assert!(url.starts_with("https://"), "{url}");
    let events = sse_results(&https, &url, TEXT.len()).await.expect("SSE over https");
    use base64::Engine as _;
    let text: String = events
        .iter()
        .filter_map(|e| e["payload"].as_str())
        .filter_map(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .collect();
    let sequences: Vec<u64> = events.iter().filter_map(|e| e["sequence"].as_u64()).collect();
    assert_eq!(sequences, (0..TEXT.len() as u64).collect::<Vec<_>>(), "SSE results in order: {events:?}");
    assert_eq!(text, TEXT, "SSE payloads (base64 in the JSON)");
    let plain = reqwest::Client::new().get(url.replacen("https://", "http://", 1)).send().await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain http to the https SSE port must not be served: {plain:?}"
    );

    // grpcurl: health and reflection over TLS with the client certificate.
    let addr = cluster.harmonizer_addr();
    let tls_args =
        ["-cacert", &path(&pki, "ca.pem"), "-cert", &path(&pki, "client.pem"), "-key", &path(&pki, "client-key.pem")];
    let mut health = tls_args.to_vec();
    health.extend([addr.as_str(), "grpc.health.v1.Health/Check"]);
    let answer: serde_json::Value = serde_json::from_str(&grpcurl(&health).await).expect("JSON from grpcurl");
    assert_eq!(answer["status"], "SERVING", "{answer}");
    let mut list = tls_args.to_vec();
    list.extend([addr.as_str(), "list"]);
    let services = grpcurl(&list).await;
    assert!(services.lines().any(|l| l.trim() == "ordo.v1.Harmonizer"), "reflection over TLS: {services}");
}

/// (2) + (3): with a client CA set, a client without a certificate, with a
/// certificate the CA did not sign, in plaintext, or not trusting the
/// services' CA is refused; the same checks pass with the right identity,
/// also through `ordo health` and `ordo submit`.
#[tokio::test(flavor = "multi_thread")]
async fn clients_without_the_right_certificate_or_trust_are_refused() {
    let pki = pki();
    let mut cluster = Cluster::builder().tls(&pki, true).start().await;
    let addr = cluster.harmonizer_addr();

    assert_eq!(check(&addr, Some(pki.client_tls())).await, Ok(ServingStatus::Serving), "the right identity");
    let anonymous = check(&addr, Some(pki.anonymous_tls())).await;
    assert!(anonymous.is_err(), "no client certificate must be refused: {anonymous:?}");
    let impostor = check(&addr, Some(pki.impostor_tls())).await;
    assert!(impostor.is_err(), "a certificate of another CA must be refused: {impostor:?}");
    let plaintext = check(&addr, None).await;
    assert!(plaintext.is_err(), "plaintext must fail against a TLS port: {plaintext:?}");
    let untrusting = check(&addr, Some(pki.stranger_tls())).await.expect_err("the client does not trust the CA");
    assert!(
        untrusting.to_lowercase().contains("certificate") || untrusting.contains("UnknownIssuer"),
        "the error should say the certificate is not trusted: {untrusting}"
    );
    // Every service, not only the front door.
    let gateway = cluster.push_gateway_process().addr();
    assert_eq!(health_status_with(&gateway, Some(pki.client_tls())).await, Some(ServingStatus::Serving));
    assert_eq!(
        health_status_with(&gateway, Some(pki.anonymous_tls())).await,
        None,
        "the push-gateway requires client certificates too"
    );

    // The CLI: with --tls-* it works, without it fails with a message.
    let tls = [
        "--tls-ca",
        &path(&pki, "ca.pem"),
        "--tls-cert",
        &path(&pki, "client.pem"),
        "--tls-key",
        &path(&pki, "client-key.pem"),
    ];
    let mut args = vec!["health", "--addr", addr.as_str()];
    args.extend(tls);
    let ok = ordo(&args, &[]).await;
    assert!(ok.status.success(), "ordo health over mTLS: {}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    let mut submit = vec![
        "submit",
        "--addr",
        addr.as_str(),
        "--stream",
        "cli-tls",
        "--seq",
        "0",
        "--op",
        "upper",
        "--payload",
        "hi",
    ];
    submit.extend(tls);
    let submitted = ordo(&submit, &[]).await;
    assert!(submitted.status.success(), "ordo submit over mTLS: {}", String::from_utf8_lossy(&submitted.stderr));
    assert!(
        String::from_utf8_lossy(&submitted.stdout).contains("HI"),
        "{}",
        String::from_utf8_lossy(&submitted.stdout)
    );
    let refused = ordo(&["health", "--addr", addr.as_str()], &[]).await;
    assert!(!refused.status.success(), "plaintext ordo health against TLS must fail");
    let missing = ordo(&["health", "--addr", addr.as_str(), "--tls-ca", "/nonexistent/ca.pem"], &[]).await;
    assert_eq!(missing.status.code(), Some(2), "a missing CA file is a usage error");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/ca.pem"));
}

/// (5): `rediss://` against a redis-server that speaks only TLS on the port
/// the services get, trusting the CA through `ORDO_REDIS_CA`: a stream is
/// ordered end to end (reassembler scripts, push-gateway tail and reads,
/// registry followers all on TLS).
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_on_rediss_orders_a_stream() {
    let pki = pki();
    let mut cluster = Cluster::builder().redis_tls(&pki).start().await;
    let results = stream_text(
        &cluster.harmonizer(),
        "rediss",
        TEXT,
        "async-upper",
        "uniform:0ms-3ms",
        OrderingMode::Ordered,
        DEADLINE,
    )
    .await
    .expect("every result through rediss");
    crate::assert_ok(check_in_order_exactly_once(&results, TEXT.len() as u64), "rediss");
    assert_eq!(payload_text(&results), TEXT.to_uppercase());
    // Every service connection is on the TLS port (CLIENT LIST's laddr),
    // none on the plain one the testkit keeps for itself.
    let tls_url = cluster.redis().tls_url().expect("a TLS redis");
    let tls_port = tls_url.rsplit(':').next().expect("a port").to_owned();
    let client = redis::Client::open(cluster.redis_url()).expect("the plain url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("the plain port");
    let () = redis::cmd("CLIENT").arg("SETNAME").arg("ordo-test").query_async(&mut conn).await.expect("SETNAME");
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.expect("CLIENT LIST");
    let others: Vec<&str> = list.lines().filter(|l| !l.contains("name=ordo-test ")).collect();
    let on_tls = others.iter().filter(|l| l.contains(&format!("laddr=127.0.0.1:{tls_port} "))).count();
    assert!(on_tls >= 3, "reassembler, push-gateway, harmonizer and worker connect over TLS: {list}");
    assert_eq!(on_tls, others.len(), "every service connection is on the TLS port {tls_port}: {list}");
}

/// Bad TLS configuration is a configuration error (exit 64) that names the
/// problem, before anything is served.
#[tokio::test(flavor = "multi_thread")]
async fn bad_tls_files_exit_64_with_a_clear_message() {
    let pki = pki();
    let run = |env: Vec<(&str, String)>| {
        let mut command = tokio::process::Command::new(binary("stateless"));
        command.args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"]).stdin(Stdio::null());
        command.env_remove("ORDO_TLS_CERT").env_remove("ORDO_TLS_KEY").env_remove("ORDO_TLS_CA");
        command.env_remove("ORDO_TLS_CLIENT_CA");
        for (key, value) in env {
            command.env(key, value);
        }
        async move { tokio::time::timeout(Duration::from_secs(30), command.output()).await }
    };
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("ORDO_TLS_CERT", path(&pki, "service.pem"))], "--tls-cert needs --tls-key"),
        (
            vec![("ORDO_TLS_CERT", path(&pki, "service.pem")), ("ORDO_TLS_KEY", "/nonexistent/key.pem".into())],
            "/nonexistent/key.pem",
        ),
        (
            vec![("ORDO_TLS_CERT", path(&pki, "service.pem")), ("ORDO_TLS_KEY", path(&pki, "client-key.pem"))],
            "do not make an identity",
        ),
        (vec![("ORDO_TLS_CA", path(&pki, "service-key.pem"))], "no PEM certificate"),
        (vec![("ORDO_TLS_CLIENT_CA", path(&pki, "ca.pem"))], "--tls-client-ca needs --tls-cert"),
    ];
    for (env, wanted) in cases {
        let shown = format!("{env:?}");
        let output = run(env).await.expect("exits promptly").expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{shown}: {stderr}");
        assert!(stderr.contains(wanted), "{shown}: expected {wanted:?} in {stderr}");
    }
}

/// A TLS-terminating proxy in front of the machine's (plaintext) RabbitMQ:
/// a real `amqps://` endpoint without reconfiguring the shared broker.
/// Counts the TLS handshakes it completed.
async fn amqps_proxy(
    pki: &TestPki,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let chain = CertificateDer::pem_file_iter(pki.path("service.pem"))
        .expect("the service certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM");
    let key = PrivateKeyDer::from_pem_file(pki.path("service-key.pem")).expect("the service key");
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("a server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = handshakes.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, handshakes, task)
}

/// `amqps://` with `--amqp-ca`: the push-gateway publishes every released
/// result, in order, through TLS (the proxy saw the handshake).
#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_a_custom_ca_publishes_in_order() {
    use integration_tests::rabbitmq::{self, QueueConsumer};
    const N: usize = 8;
    rabbitmq::require_broker().await;
    let pki = pki();
    let (port, handshakes, proxy) = amqps_proxy(&pki).await;
    let exchange = rabbitmq::unique_name("ordo.test.amqps");
    let consumer = QueueConsumer::bind(&exchange, "amqps").await.expect("a queue bound to the exchange");
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let ca = path(&pki, "ca.pem");
    let cluster = Cluster::builder()
        .push_gateway_args(["--amqp-url", url.as_str(), "--amqp-exchange", exchange.as_str(), "--amqp-ca", ca.as_str()])
        .start()
        .await;
    let text = "amqps ok";
    assert_eq!(text.len(), N);
    let results =
        stream_text(&cluster.harmonizer(), "amqps", text, "async-echo", "fixed:0ms", OrderingMode::Ordered, DEADLINE)
            .await
            .expect("every result");
    crate::assert_ok(check_in_order_exactly_once(&results, N as u64), "the call");
    let delivered = |got: &[rabbitmq::Received]| {
        got.iter().filter_map(|m| m.position).collect::<std::collections::BTreeSet<_>>().len() >= N
    };
    consumer.wait_until(DEADLINE, delivered).await.expect("every result through amqps");
    let positions: Vec<u64> = consumer.received().iter().filter_map(|m| m.position).collect();
    let mut first_seen = Vec::new();
    for p in positions {
        if !first_seen.contains(&p) {
            first_seen.push(p);
        }
    }
    assert_eq!(first_seen, (0..N as u64).collect::<Vec<_>>(), "published in release order");
    assert!(handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the gateway connected over TLS");
    proxy.abort();
    let _ = consumer.delete().await;
}
