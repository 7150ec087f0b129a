//! The deployment files of issue 9, item 2, checked by real tools and
//! against a live cluster:
//!
//! - `deploy/grafana/ordo.json` is a Grafana dashboard (schema 39 or later,
//!   the Prometheus datasource as the `DS_PROMETHEUS` variable, the panels
//!   an operator needs), every PromQL `expr` parses (`promtool check rules`
//!   on a rules file made of them), and every metric name it asks for is one
//!   a live cluster exports (the known workload of `metrics`, with AMQP on,
//!   scraped once per service);
//! - each of those scrapes passes `promtool check metrics` (names, units,
//!   `_total`, HELP);
//! - `deploy/prometheus/prometheus.yml` passes `promtool check config`;
//! - `compose/docker-compose.yml` validates against the Compose
//!   Specification schema (`check-jsonschema --builtin-schema
//!   vendor.compose-spec`), and wires Prometheus, Grafana and RabbitMQ.
//!
//! The tools are installed by `scripts/install-deps.sh`; a missing one fails
//! the test rather than skipping it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
};

use integration_tests::rabbitmq::{self, AMQP_URL};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::{
    DEADLINE,
    metrics::{known_workload, workload_cluster},
};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Runs `program args` (with `stdin` fed to it), returning its exit success and output.
async fn run_tool(program: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child =
        command.spawn().unwrap_or_else(|e| panic!("cannot run {program} (scripts/install-deps.sh installs it): {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.expect("the tool reads its input");
    }
    drop(input);
    let output = child.wait_with_output().await.expect("the tool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// PromQL keywords: binary-operator words, and the modifiers that take a
/// list of label names in parentheses (`by (le)`).
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
/// Aggregation operators: functions, even when `by (...)` stands before their parentheses.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names one PromQL expression selects. Strings, label matchers
/// (`{...}`), ranges (`[...]`) and grouping label lists (`by (...)`) are
/// skipped; of the identifiers left, those followed by `(` are functions or
/// aggregations, and the rest that are not keywords or numbers are metric
/// names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_to =
        |from: usize, close: char| chars[from..].iter().position(|&d| d == close).map_or(chars.len(), |n| from + n + 1);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            // A number (0.99, 1e3, 0x1f) is not a name, whatever letters it has.
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i < chars.len() && (is_part(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_start(c) => {
                let begin = i;
                while i < chars.len() && is_part(chars[i]) {
                    i += 1;
                }
                let word: String = chars[begin..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                if GROUPING.contains(&word.as_str()) {
                    if called {
                        i = skip_to(next + 1, ')');
                    }
                } else if !called && !KEYWORDS.contains(&word.as_str()) && !AGGREGATIONS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The sample names in a scrape's text (histograms as their `_bucket`,
/// `_sum` and `_count` series, as PromQL selects them).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(|c: char| c == '{' || c.is_whitespace()).next())
        .map(str::to_owned)
        .collect()
}

fn load_dashboard() -> Value {
    let path = repo_file("deploy/grafana/ordo.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel (rows included, and panels nested in collapsed rows).
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("the dashboard has panels") {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

/// Every `expr`, with the title of its panel.
fn exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| t["expr"].as_str().map(|e| (title.clone(), e.to_owned())))
        })
        .collect()
}

#[test]
fn promql_metric_names_are_extracted_without_functions_labels_or_numbers() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, instance) (rate(ordo_a_seconds_bucket{job="x", le!="1"}[$__rate_interval]))) / on (instance) group_left ordo_b"#,
    );
    assert_eq!(names, BTreeSet::from(["ordo_a_seconds_bucket".to_owned(), "ordo_b".to_owned()]));
    assert_eq!(metric_names("max(up) and sum(rate(x_total[5m]))"), BTreeSet::from(["up".into(), "x_total".into()]));
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_the_panels_an_operator_needs() {
    let dashboard = load_dashboard();
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 39, "schemaVersion {schema}");
    assert_eq!(dashboard["uid"], "ordo-overview");
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "the datasource is the DS_PROMETHEUS variable: {variables:?}"
    );
    let mut titles = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} twice");
        titles.insert(panel["title"].as_str().expect("every panel has a title").to_owned());
        if panel["type"] == "row" {
            continue;
        }
        for grid in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][grid].is_u64(), "{}: gridPos.{grid}", panel["title"]);
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
        let targets = panel["targets"].as_array().expect("a query panel has targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
            assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()), "{}: {target}", panel["title"]);
        }
    }
    for want in [
        "Events accepted per second",
        "Results released per second",
        "End-to-end latency",
        "Reorder wait",
        "Window fill",
        "Results pending in Redis",
        "Worker in flight vs limit",
        "Retries, timeouts, FAILED per second",
        "Dead letters",
        "Redis errors",
        "Release script",
        "Subscribers per channel",
        "AMQP outbox lag",
    ] {
        assert!(titles.contains(want), "no panel {want:?}: {titles:?}");
    }
    // Percentiles come from histogram buckets.
    let all: Vec<String> = exprs(&dashboard).into_iter().map(|(_, e)| e).collect();
    for histogram in ["ordo_event_latency_seconds", "ordo_reorder_wait_seconds", "ordo_release_script_duration_seconds"]
    {
        for quantile in ["0.5", "0.99"] {
            let want =
                format!("histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket[$__rate_interval])))");
            assert!(all.contains(&want), "no {want}");
        }
    }
}

/// Every expression, as a recording rule (Grafana's `$__rate_interval`
/// replaced by a duration), through Prometheus's own PromQL parser.
#[tokio::test]
async fn every_dashboard_expression_parses_as_promql() {
    let dashboard = load_dashboard();
    let mut rules = String::from("groups:\n  - name: ordo-dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs(&dashboard).iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "1m");
        rules.push_str(&format!("      - record: ordo:dashboard:expr{i}\n        expr: {}\n", serde_json::json!(expr)));
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).expect("the rules file is written");
    let (ok, output) = run_tool("promtool", &["check", "rules", &file.to_string_lossy()], None).await;
    assert!(ok, "promtool check rules:\n{output}\n{rules}");
    assert!(output.contains("SUCCESS"), "{output}");
}

#[tokio::test]
async fn the_prometheus_config_passes_promtool() {
    let path = repo_file("deploy/prometheus/prometheus.yml");
    let (ok, output) = run_tool("promtool", &["check", "config", &path.to_string_lossy()], None).await;
    assert!(ok, "promtool check config:\n{output}");
    // One job per service, at its compose name and metrics port.
    let text = std::fs::read_to_string(&path).expect("prometheus.yml");
    for target in [
        "harmonizer:9091",
        "stateless:9092",
        "stateful-worker-1:9093",
        "stateful-worker-2:9093",
        "reassembler:9094",
        "push-gateway:9095",
    ] {
        assert!(text.contains(&format!("\"{target}\"")), "no scrape target {target}");
    }
}

#[tokio::test]
async fn the_compose_file_is_valid_compose_spec_with_prometheus_grafana_and_rabbitmq() {
    let path = repo_file("compose/docker-compose.yml");
    let path = path.to_string_lossy();
    let (ok, output) =
        run_tool("python3", &["-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", &path], None).await;
    assert!(ok, "check-jsonschema (compose-spec):\n{output}");
    // The validator does reject what the spec does not allow (else this test could not fail).
    let bad = tempfile::Builder::new().suffix(".yml").tempfile().expect("a temporary file");
    std::fs::write(bad.path(), "services:\n  a:\n    image: x\n    portz: [\"1:1\"]\n").expect("written");
    let (ok, output) = run_tool(
        "python3",
        &["-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", &bad.path().to_string_lossy()],
        None,
    )
    .await;
    assert!(!ok && output.contains("portz"), "an invalid compose file passed:\n{output}");

    let text = std::fs::read_to_string(&*path).expect("the compose file");
    for want in [
        "image: prom/prometheus:",
        "../deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        "image: grafana/grafana:",
        "../deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "../deploy/grafana/ordo.json:/var/lib/grafana/dashboards/ordo.json:ro",
        "image: rabbitmq:",
        "PUSH_GATEWAY_AMQP_URL: amqp://ordo:ordo@rabbitmq:5672/%2f",
        "\"9090:9090\"",
        "\"3000:3000\"",
    ] {
        assert!(text.contains(want), "the compose file lacks {want:?}");
    }
    for port in 9091..=9095 {
        assert!(text.contains(&format!("\"{port}:{port}\"")), "metrics port {port} is not published");
    }
    let provisioning = std::fs::read_to_string(repo_file("deploy/grafana/provisioning/dashboards/ordo.yml"))
        .expect("the dashboard provider");
    assert!(provisioning.contains("path: /var/lib/grafana/dashboards"), "{provisioning}");
    let datasource = std::fs::read_to_string(repo_file("deploy/grafana/provisioning/datasources/prometheus.yml"))
        .expect("the datasource");
    assert!(datasource.contains("url: http://prometheus:9090") && datasource.contains("type: prometheus"));
}

/// Runs the known workload with AMQP on (so the AMQP series exist), scrapes
/// every service once, and checks the dashboard's metric names against the
/// union of what they export; each scrape also passes `promtool check
/// metrics`. `amqp` in the name: it runs apart from the test that stops
/// the broker (`.config/nextest.toml`).
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_asks_only_for_metrics_a_live_cluster_exports_amqp() {
    rabbitmq::require_broker().await;
    let exchange = rabbitmq::unique_name("ordo.test.dashboard");
    let cluster = workload_cluster()
        .push_gateway_args(["--amqp-url", AMQP_URL, "--amqp-exchange", &exchange, "--amqp-lag-interval", "200ms"])
        .start()
        .await;
    let _subscribers = known_workload(&cluster, "dashboard").await;
    // The lag is sampled: wait for its first sample.
    integration_tests::eventually(DEADLINE, || async {
        let m = cluster.scrape("push-gateway").await?;
        anyhow::ensure!(m.has("ordo_amqp_outbox_lag_results"), "no lag sample yet");
        Ok(())
    })
    .await;

    let services = [
        "harmonizer".to_owned(),
        "stateless".to_owned(),
        cluster.worker_name(0),
        "reassembler-0".to_owned(),
        "push-gateway".to_owned(),
    ];
    let mut exported: BTreeMap<String, String> = BTreeMap::new();
    let mut lint_failures = Vec::new();
    for service in &services {
        let m = cluster.scrape(service).await.unwrap_or_else(|e| panic!("scraping {service}: {e:#}"));
        for name in sample_names(&m.text) {
            exported.entry(name).or_insert_with(|| service.clone());
        }
        // Every family carries its HELP line.
        for family in m.text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split_whitespace().next().unwrap_or_default();
            assert!(m.text.contains(&format!("# HELP {name} ")), "{service}: {name} has no HELP\n{}", m.text);
        }
        let (ok, output) = run_tool("promtool", &["check", "metrics"], Some(&m.text)).await;
        if !ok || !output.trim().is_empty() {
            lint_failures.push(format!("{service}:\n{output}"));
        }
    }
    assert!(lint_failures.is_empty(), "promtool check metrics:\n{}", lint_failures.join("\n"));

    let dashboard = load_dashboard();
    let mut missing = Vec::new();
    let mut asked = BTreeSet::new();
    for (title, expr) in exprs(&dashboard) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{title}: no metric in {expr}");
        for name in names {
            if !exported.contains_key(&name) {
                missing.push(format!("{title}: {name} (in {expr})"));
            }
            asked.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics no service exports:\n{}\nexported: {:?}",
        missing.join("\n"),
        exported.keys()
    );
    // The dashboard covers every service.
    let covered: BTreeSet<&String> = asked.iter().filter_map(|name| exported.get(name)).collect();
    assert_eq!(covered.len(), services.len(), "services the dashboard shows: {covered:?}");

    if let Ok(consumer) = rabbitmq::QueueConsumer::bind(&exchange, "#").await {
        let _ = consumer.delete().await;
    }
}
