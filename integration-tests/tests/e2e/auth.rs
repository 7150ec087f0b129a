//! Authorization end to end: bearer JWTs on `Process`, `Submit`,
//! `Subscribe` and SSE (UNAUTHENTICATED vs PERMISSION_DENIED, 401 vs 403),
//! `ordo token` tokens (HS256 and RS256 with a JWKS kid) accepted by the
//! services, the SSE CORS default, and every service running as a Redis ACL
//! user limited to the documented rule with the `default` user off.

use std::{path::Path, time::Duration};

use base64::Engine as _;
use futures::StreamExt as _;
use integration_tests::{
    Cluster, cli,
    client::{event, sequences, with_attr, with_mode},
    redis_acl::{AclUser, ORDO_ACL_RULES},
    sse,
};
use ordo_proto::v1::{Event, EventResult, OrderingMode, ResultStatus, StreamCursor, SubscribeRequest};
use ordo_runtime::auth::{Permissions, SigningKey, TokenSpec};
use rsa::{
    pkcs8::{EncodePrivateKey as _, EncodePublicKey as _},
    traits::PublicKeyParts as _,
};
use tonic::{Code, Request};

use crate::DEADLINE;

const SECRET: &str = "e2e-secret-that-is-at-least-32-bytes-long";

fn token(secret: &str, write: &[&str], read: &[&str]) -> String {
    let spec = TokenSpec {
        subject: "e2e".into(),
        permissions: Permissions {
            write: write.iter().map(|s| (*s).to_owned()).collect(),
            read: read.iter().map(|s| (*s).to_owned()).collect(),
        },
        ttl: Duration::from_secs(600),
        ..Default::default()
    };
    ordo_runtime::auth::mint(&SigningKey::Hs256(secret.as_bytes().to_vec()), &spec).expect("mint")
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<String> = body.as_bytes().chunks(64).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Writes an RSA private key (PEM) and a JWKS holding its public half as
/// kid `kid`; returns the private key's path and the JWKS's.
fn rsa_files(dir: &Path, kid: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA key generation");
    let public = key.to_public_key();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
        "n": b64(&public.n_bytes()), "e": b64(&public.e_bytes()),
    }]});
    let (private, jwks_path) = (dir.join("rs256.pem"), dir.join("jwks.json"));
    std::fs::write(&private, pem("PRIVATE KEY", key.to_pkcs8_der().expect("PKCS#8").as_bytes())).expect("write");
    std::fs::write(&jwks_path, jwks.to_string()).expect("write");
    // The public key in PEM is not needed by the cluster, but must parse as the flag expects.
    let public_pem = pem("PUBLIC KEY", public.to_public_key_der().expect("SPKI").as_bytes());
    std::fs::write(dir.join("rs256.pub.pem"), public_pem).expect("write");
    (private, jwks_path)
}

fn async_echo(stream: &str, sequence: u64) -> Event {
    let payload = format!("{stream}:{sequence}").into_bytes();
    with_mode(with_attr(event(stream, sequence, "async-echo", payload), "latency", "fixed:5ms"), OrderingMode::Ordered)
}

/// One Process call with `token` (if any): sends `events`, then waits for
/// `expected` results (or the call's end) and half-closes.
async fn process(
    cluster: &Cluster,
    token: Option<&str>,
    events: Vec<Event>,
    expected: usize,
) -> Result<Vec<EventResult>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for event in events {
        tx.send(event).await.expect("queue");
    }
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let request = match token {
        Some(token) => with_token(requests, token),
        None => Request::new(requests),
    };
    let mut results = cluster.harmonizer().process(request).await?.into_inner();
    let mut received = Vec::new();
    let collect = async {
        while received.len() < expected {
            match results.message().await? {
                Some(result) => received.push(result),
                None => break,
            }
        }
        Ok::<_, tonic::Status>(())
    };
    tokio::time::timeout(DEADLINE, collect).await.expect("results within the deadline")?;
    drop(tx);
    Ok(received)
}

async fn sse_get(url: &str, authorization: Option<&str>, origin: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().expect("client");
    let mut request = client.get(url).header("accept", "text/event-stream");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    request.send().await.expect("GET answers")
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_decide_who_writes_and_reads_which_streams() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write");
    let (rs_private, jwks) = rsa_files(dir.path(), "k1");
    let auth_args = |extra: &[&str]| {
        let mut args = vec![
            "--auth-hs256-secret-file".to_owned(),
            secret.display().to_string(),
            "--auth-jwks-file".to_owned(),
            jwks.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let cluster = Cluster::builder()
        .harmonizer_args(auth_args(&[]))
        .push_gateway_args(auth_args(&["--sse-allow-origin", "https://app.example.com,http://localhost:3000"]))
        .start()
        .await;
    let orders = token(SECRET, &["orders-*"], &["orders-*"]);

    // Process: no token, a forged one, garbage → the call fails at once.
    for bad in [None, Some(token("another-secret-another-secret-xxxxx", &["*"], &["*"])), Some("garbage".to_owned())] {
        let status = process(&cluster, bad.as_deref(), vec![async_echo("orders-0", 0)], 1)
            .await
            .expect_err("no valid token: the call is refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    // Process with a token for orders-*: billing-1 events are refused one by
    // one, orders-1 events all come back in order on the same call.
    let mut events = Vec::new();
    for seq in 0..6 {
        events.push(async_echo("orders-1", seq));
        if seq < 2 {
            events.push(async_echo("billing-1", seq));
        }
    }
    let results = process(&cluster, Some(&orders), events, 8).await.expect("the call is accepted");
    let (billing, order_results): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.stream_id == "billing-1");
    assert_eq!(billing.len(), 2, "{billing:?}");
    for refused in &billing {
        assert_eq!(refused.status(), ResultStatus::Rejected, "{refused:?}");
        assert_eq!(refused.code, Code::PermissionDenied as i32, "{refused:?}");
        assert!(refused.error.contains("billing-1") && refused.error.contains("orders-*"), "{}", refused.error);
    }
    assert_eq!(sequences(&order_results), (0..6).collect::<Vec<_>>(), "orders-1 in order, none lost");
    assert!(order_results.iter().all(|r| r.status() == ResultStatus::Ok && r.payload.starts_with(b"orders-1:")));

    // Submit: none → UNAUTHENTICATED, other stream → PERMISSION_DENIED.
    let mut harmonizer = cluster.harmonizer();
    let upper = |stream: &str| event(stream, 0, "upper", b"hi".to_vec());
    let status = harmonizer.submit(upper("orders-2")).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = harmonizer.submit(with_token(upper("billing-2"), &orders)).await.expect_err("not its stream");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let result = harmonizer.submit(with_token(upper("orders-2"), &orders)).await.expect("allowed").into_inner();
    assert_eq!((result.status(), result.payload.as_ref()), (ResultStatus::Ok, &b"HI"[..]));
    // A write-only token still gets a stateful result inline (Submit waits
    // through the internal Follow, not a Subscribe needing read permission).
    let write_only = token(SECRET, &["orders-*"], &[]);
    let result =
        harmonizer.submit(with_token(async_echo("orders-3", 0), &write_only)).await.expect("allowed").into_inner();
    assert_eq!((result.status(), result.payload.as_ref()), (ResultStatus::Ok, &b"orders-3:0"[..]));

    // Subscribe needs read permission on every stream asked for.
    let mut push = cluster.push_gateway();
    let subscribe = |streams: &[&str]| SubscribeRequest {
        streams: streams.iter().map(|s| StreamCursor { stream_id: (*s).to_owned(), from_sequence: 0 }).collect(),
        ..Default::default()
    };
    let status = push.subscribe(subscribe(&["orders-1"])).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status =
        push.subscribe(with_token(subscribe(&["orders-1", "billing-1"]), &orders)).await.expect_err("billing-1");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = push.subscribe(with_token(subscribe(&["orders-1"]), &write_only)).await.expect_err("write-only");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let subscribed = push.subscribe(with_token(subscribe(&["orders-1"]), &orders)).await.expect("allowed");
    let read: Vec<u64> = tokio::time::timeout(
        DEADLINE,
        subscribed.into_inner().take(6).map(|r| r.expect("a released result").sequence).collect::<Vec<_>>(),
    )
    .await
    .expect("released results");
    assert_eq!(read, (0..6).collect::<Vec<_>>());

    // SSE: 401 with a Bearer challenge, 403, then 200 by header or ?access_token=.
    let base = cluster.sse_url();
    let url = sse::events_url(&base, "orders-1", None);
    for authorization in [None, Some("Bearer garbage".to_owned()), Some(format!("Basic {orders}"))] {
        let response = sse_get(&url, authorization.as_deref(), None).await;
        assert_eq!(response.status().as_u16(), 401, "{authorization:?}");
        let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{challenge:?}");
    }
    let billing_url = sse::events_url(&base, "billing-1", None);
    assert_eq!(sse_get(&billing_url, Some(&format!("Bearer {orders}")), None).await.status().as_u16(), 403);
    let by_query = sse::events_url(&base, "billing-1", Some(&format!("from=0&access_token={orders}")));
    match sse::open(&by_query, None).await.expect("GET answers") {
        sse::Opened::Refused { status, .. } => assert_eq!(status, 403),
        sse::Opened::Stream(_) => panic!("billing-1 must not be readable with an orders-* token"),
    }
    let mut stream =
        sse::open_stream(&sse::events_url(&base, "orders-1", Some(&format!("access_token={orders}"))), None)
            .await
            .expect("?access_token= opens the stream");
    let positions: Vec<u64> =
        stream.collect(6, DEADLINE).await.expect("six events").iter().map(|e| e.position().expect("an id")).collect();
    assert_eq!(positions, (0..6).collect::<Vec<_>>());
    let response = sse_get(&url, Some(&format!("Bearer {orders}")), Some("https://app.example.com")).await;
    assert_eq!(response.status().as_u16(), 200);
    let allowed = response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok());
    assert_eq!(allowed, Some("https://app.example.com"), "a listed origin is allowed");
    let response = sse_get(&url, Some(&format!("Bearer {orders}")), Some("https://evil.example")).await;
    assert!(response.headers().get("access-control-allow-origin").is_none(), "an unlisted origin is not");

    // `ordo token` output is what the services accept: HS256 and RS256 (JWKS kid).
    let addr = cluster.harmonizer_addr();
    let secret_arg = secret.display().to_string();
    let minted = cli::ordo(
        &[
            "token",
            "--hs256-secret-file",
            &secret_arg,
            "--sub",
            "cli",
            "--write",
            "cli-*",
            "--read",
            "cli-*",
            "--ttl",
            "10m",
        ],
        &["ORDO_AUTH_ISSUER", "ORDO_AUTH_AUDIENCE"],
    )
    .await;
    assert!(minted.status.success());
    let cli_token = cli::stdout(&minted).trim().to_owned();
    let submit = |stream: &str, token: &str| {
        vec![
            "submit".to_owned(),
            "--addr".to_owned(),
            addr.clone(),
            "--stream".to_owned(),
            stream.to_owned(),
            "--seq".to_owned(),
            "0".to_owned(),
            "--op".to_owned(),
            "upper".to_owned(),
            "--payload".to_owned(),
            "cli".to_owned(),
            "--token".to_owned(),
            token.to_owned(),
        ]
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli::ordo(&args, &["ORDO_TOKEN"]).await
    };
    let output = run(submit("cli-1", &cli_token)).await;
    assert!(output.status.success() && cli::stdout(&output).contains("CLI"), "{}", cli::stderr(&output));
    let output = run(submit("orders-9", &cli_token)).await;
    assert!(!output.status.success() && cli::stderr(&output).contains("PermissionDenied"), "{}", cli::stderr(&output));
    let output = run(submit("cli-2", "")).await;
    assert!(!output.status.success() && cli::stderr(&output).contains("Unauthenticated"), "{}", cli::stderr(&output));

    let private_arg = rs_private.display().to_string();
    let minted = cli::ordo(
        &["token", "--rs256-private-key-file", &private_arg, "--kid", "k1", "--sub", "rsa", "--write", "rsa-*"],
        &["ORDO_AUTH_HS256_SECRET_FILE", "ORDO_AUTH_ISSUER", "ORDO_AUTH_AUDIENCE"],
    )
    .await;
    assert!(minted.status.success());
    let rsa_token = cli::stdout(&minted).trim().to_owned();
    let output = run(submit("rsa-1", &rsa_token)).await;
    assert!(output.status.success(), "an RS256 token with kid k1 verifies: {}", cli::stderr(&output));
    let output = run(submit("rsa-1", &format!("{rsa_token}x"))).await;
    assert!(cli::stderr(&output).contains("Unauthenticated"), "a broken signature: {}", cli::stderr(&output));

    // grpcurl as the README shows it: `-H "authorization: Bearer $TOKEN"`.
    let request = r#"{"stream_id":"cli-3","sequence":0,"operation":"upper","payload":"aGk="}"#;
    let header = format!("authorization: Bearer {cli_token}");
    let grpcurl = |args: Vec<&str>| {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let run = tokio::process::Command::new("grpcurl").args(&args).output();
            tokio::time::timeout(Duration::from_secs(30), run).await.expect("grpcurl finishes").expect("grpcurl runs")
        }
    };
    let output = grpcurl(vec!["-plaintext", "-H", &header, "-d", request, &addr, "ordo.v1.Harmonizer/Submit"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("\"SEk=\""), "grpcurl with the token: {stdout}");
    let output = grpcurl(vec!["-plaintext", "-d", request, &addr, "ordo.v1.Harmonizer/Submit"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("Unauthenticated"), "grpcurl without: {stderr}");
}

const REGISTRY: &str = "[[operation]]\nname = \"upper\"\nkind = \"stateless\"\n\n\
[[operation]]\nname = \"async-echo\"\nkind = \"stateful\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn every_service_runs_as_a_redis_acl_user_limited_to_the_documented_rule() {
    // The rule tested here is the one the docs give operators.
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md"))
        .expect("docs/configuration.md");
    assert!(docs.contains(ORDO_ACL_RULES), "docs/configuration.md must give the tested ACL rule:\n{ORDO_ACL_RULES}");

    let user = AclUser::ordo();
    let cluster = Cluster::builder().redis_user(user.clone()).start().await;
    let plain_url = cluster.redis_url();
    let ordo_url = integration_tests::redis_acl::with_credentials(&plain_url, &user.name, &user.password);
    let admin_url = user.admin_url(&plain_url);

    // The operator's registry publish (Lua through EVALSHA) as the ordo user,
    // followed by the services.
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = dir.path().join("registry.toml");
    std::fs::write(&registry, REGISTRY).expect("write");
    let registry_arg = registry.display().to_string();
    let output =
        cli::ordo(&["registry", "publish", &registry_arg, "--redis-url", &ordo_url], &["ORDO_REDIS_URL"]).await;
    assert!(output.status.success(), "{}", cli::stderr(&output));
    cluster.wait_for_registry_version(1).await;

    // Events end to end: Process (ordered, two streams), Submit (stateless,
    // recorded by the harmonizer), a gap (dead letter), Subscribe and SSE reads.
    let mut events = Vec::new();
    for seq in 0..10 {
        events.push(async_echo("acl-a", seq));
        events.push(async_echo("acl-b", seq));
    }
    let results = process(&cluster, None, events, 20).await.expect("Process as the ACL user");
    for stream in ["acl-a", "acl-b"] {
        let mine: Vec<EventResult> = results.iter().filter(|r| r.stream_id == stream).cloned().collect();
        assert_eq!(sequences(&mine), (0..10).collect::<Vec<_>>(), "{stream} in order");
        assert!(mine.iter().all(|r| r.status() == ResultStatus::Ok), "{mine:?}");
    }
    let result = cluster.harmonizer().submit(event("acl-c", 0, "upper", b"acl".to_vec())).await.expect("Submit");
    assert_eq!(result.into_inner().payload.as_ref(), b"ACL");
    let gap = with_attr(async_echo("acl-gap", 1), "gap-timeout", "500ms");
    let results = process(&cluster, None, vec![gap], 2).await.expect("a gap");
    assert!(results.iter().any(|r| r.sequence == 0 && r.status() == ResultStatus::Gap), "{results:?}");
    let letters = cluster.dead_letters("acl-gap").await.expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let mut push = cluster.push_gateway();
    let request = SubscribeRequest { stream_id: "acl-a".into(), from_sequence: 3, streams: vec![] };
    let read: Vec<u64> = tokio::time::timeout(
        DEADLINE,
        push.subscribe(request)
            .await
            .expect("Subscribe")
            .into_inner()
            .take(7)
            .map(|r| r.expect("a result").sequence)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("released results");
    assert_eq!(read, (3..10).collect::<Vec<_>>());
    let response = sse_get(&sse::events_url(&cluster.sse_url(), "acl-b", None), None, Some("https://x.example")).await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers().get("access-control-allow-origin").is_none(),
        "no --sse-allow-origin: no CORS headers (the default is no longer *)"
    );

    // Redis refused nothing the services asked for...
    let admin = redis::Client::open(admin_url).expect("admin URL");
    let mut admin = admin.get_multiplexed_async_connection().await.expect("admin connects");
    let denials: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut admin).await.expect("ACL LOG");
    assert!(denials.is_empty(), "Redis denied the ordo user something: {denials:?}");

    // ...and the rule and the disabled default user do hold.
    let ordo = redis::Client::open(ordo_url).expect("ordo URL");
    let mut ordo = ordo.get_multiplexed_async_connection().await.expect("the ordo user connects");
    for (command, args) in [("GET", vec!["not-ordo"]), ("FLUSHALL", vec![]), ("CONFIG", vec!["GET", "maxmemory"])] {
        let refused = redis::cmd(command).arg(&args).query_async::<redis::Value>(&mut ordo).await;
        let error = refused.expect_err("outside the rule");
        assert!(error.to_string().to_lowercase().contains("noperm"), "{command} {args:?}: {error}");
    }
    let default = redis::Client::open(plain_url).expect("plain URL");
    let refused = match default.get_multiplexed_async_connection().await {
        Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(refused.is_err(), "the default user is off");
}
