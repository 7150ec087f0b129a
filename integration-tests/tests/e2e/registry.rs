//! The operation registry as a versioned dataset: a version published
//! mid-stream is followed within a second, each event is answered under one
//! version (v1's output or v2's, never a mix, never lost), and events sent
//! after the harmonizer reports the new version use it; `pin` holds every
//! service on a version whatever is published, `unpin` follows the active one
//! again, `rollback` goes back one; a bad file is refused by `ordo registry
//! publish` with its line and changes nothing. Also the `ordo registry`
//! subcommands themselves, against a private Redis.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ExampleServer, ProcessCall, RedisServer,
    cli::{ordo, stderr, stdout},
    client::{LINGER, check_all_ok, check_in_order_exactly_once, event, with_attr},
    example::{example_registry, remote_operation},
};
use ordo_proto::v1::{Event, EventResult};

use crate::{DEADLINE, assert_ok, publish_and_wait};

/// The operation every version defines, each at another Python server.
const OP: &str = "text";

/// `Mid-<seq>`: mixed case, so shout, whisper and reverse all differ.
fn payload(seq: u64) -> String {
    format!("Mid-{seq}")
}

fn text_event(stream: &str, seq: u64) -> Event {
    with_attr(event(stream, seq, OP, payload(seq)), "max-delay-ms", "10")
}

/// What each server's behaviour makes of `payload(seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Shout,
    Reverse,
    Whisper,
}

impl Behaviour {
    fn apply(self, text: &str) -> String {
        match self {
            Behaviour::Shout => text.to_uppercase(),
            Behaviour::Reverse => text.chars().rev().collect(),
            Behaviour::Whisper => text.to_lowercase(),
        }
    }

    /// Which behaviour produced `result`, if any.
    fn of(result: &EventResult) -> Option<Self> {
        let text = payload(result.sequence);
        [Behaviour::Shout, Behaviour::Reverse, Behaviour::Whisper]
            .into_iter()
            .find(|b| result.payload.as_ref() == b.apply(&text).as_bytes())
    }
}

/// The example registry plus `text` at `endpoint`.
fn version_with(endpoint: &str) -> String {
    example_registry() + &remote_operation(OP, endpoint, &["timeout = \"5s\""])
}

/// Runs `n` events of a new stream through `text` and checks that they come
/// back in order, all OK, all answered by `expected`.
async fn check_batch(cluster: &Cluster, stream: &str, n: u64, expected: Behaviour) {
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed((0..n).map(|seq| text_event(stream, seq)).collect(), None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), n as usize)]), DEADLINE).await.expect("results");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, n), stream);
    assert_ok(check_all_ok(&results), stream);
    let wrong: Vec<String> = results
        .iter()
        .filter(|r| Behaviour::of(r) != Some(expected))
        .take(5)
        .map(|r| format!("#{} {:?}", r.sequence, String::from_utf8_lossy(&r.payload)))
        .collect();
    assert!(wrong.is_empty(), "{stream}: every result must be {expected:?}'s: {wrong:?}");
}

/// Removed from the `ordo` CLI's environment: only `--redis-url` names the
/// Redis, never the developer's configuration.
const NO_REDIS_ENV: &[&str] = &["ORDO_REDIS_URL"];

/// A registry file with an unknown kind on line 4, column 8.
const BAD_FILE: &str = "[[operation]]\nname = \"echo\"\n# the next line is wrong\nkind = \"sideways\"\n";
const BAD_FILE_ERROR: &str = "line 4, column 8: kind \"sideways\" is not one of \"stateful\", \"stateless\"";

#[tokio::test(flavor = "multi_thread")]
async fn a_version_published_mid_stream_is_followed_and_pin_unpin_rollback_switch_versions() {
    const N: u64 = 1200;
    let cluster = Cluster::builder().workers(2).start().await;
    let dir = cluster.log_dir().to_path_buf();
    let start = |name: &'static str, behaviour: &'static str| {
        let dir = dir.clone();
        async move {
            ExampleServer::python_operation(name, &dir, &["--op", &format!("{OP}={behaviour}")])
                .await
                .expect("the server starts")
        }
    };
    let (shout, reverse, whisper) = tokio::join!(
        start("python-shout", "shout"),
        start("python-reverse", "reverse"),
        start("python-whisper", "whisper")
    );
    let store = cluster.registry().await.expect("the cluster's redis");
    let workers = [cluster.worker_name(0), cluster.worker_name(1)];
    let workers: Vec<&str> = workers.iter().map(String::as_str).collect();

    let v1 = publish_and_wait(&cluster, &version_with(&shout.grpc_endpoint())).await;
    cluster.wait_for_workers(OP, &workers).await;

    // v1 to v2 while a stream runs.
    let stream = "registry-mid-stream";
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let feeder =
        call.feed_counted(N, Duration::from_millis(2), move |seq| text_event(stream, seq)).expect("the call is open");
    call.wait_for_total(200, DEADLINE).await.expect("the first results arrive");
    // Results already released were answered under v1; the rest may be either's.
    let answered = call.received().len() as u64;
    let before_publish = feeder.sent();
    let v2 = store.publish(&version_with(&reverse.grpc_endpoint())).await.expect("v2 is published");
    let listed = cluster.wait_for_registry_version(v2).await;
    let switched = feeder.sent();
    assert!(switched < N, "the stream ended before the harmonizer used v2; the test would prove nothing");
    let text_op = listed.operations.iter().find(|op| op.name == OP).expect("listed");
    assert_eq!(text_op.endpoint, reverse.grpc_endpoint(), "ListOperations shows v2's endpoint");
    eprintln!("v2 published after {before_publish} events were sent; the harmonizer used it after {switched}");
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes across the version change");
    feeder.join().await.expect("the feeder ends");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");
    assert_ok(check_in_order_exactly_once(&results, N), "sequences across the version change");
    assert_ok(check_all_ok(&results), "statuses across the version change");
    let mut problems = Vec::new();
    for result in &results {
        let behaviour = Behaviour::of(result);
        let sequence = result.sequence;
        let ok = match behaviour {
            Some(Behaviour::Shout) => sequence < switched,
            Some(Behaviour::Reverse) => sequence >= answered,
            _ => false,
        };
        if !ok {
            problems.push(format!("#{sequence} -> {:?} ({behaviour:?})", String::from_utf8_lossy(&result.payload)));
        }
    }
    assert!(
        problems.is_empty(),
        "each result is v1's (shout) or v2's (reverse); the {answered} answered before v2 was published are v1's, \
         and events sent after the harmonizer reported v2 are v2's; {} are not, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    let shouted = results.iter().filter(|r| Behaviour::of(r) == Some(Behaviour::Shout)).count();
    assert!(shouted >= 200 && shouted < N as usize, "both versions answered: {shouted} of {N} by v1");

    // pin 1: v1 is used whatever is published meanwhile.
    store.pin(v1).await.expect("pin 1");
    let listed = cluster.wait_for_registry_version(v1).await;
    assert!(listed.pinned, "ListOperations says the version is pinned: {listed:?}");
    let v3 = store.publish(&version_with(&whisper.grpc_endpoint())).await.expect("v3 is published");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = cluster.list_operations().await.expect("ListOperations");
    assert_eq!((listed.registry_version, listed.pinned), (v1, true), "a pinned registry ignores v3");
    check_batch(&cluster, "registry-pinned", 50, Behaviour::Shout).await;

    // unpin: the active version, v3.
    assert_eq!(store.unpin().await.expect("unpin"), Some(v1));
    let listed = cluster.wait_for_registry_version(v3).await;
    assert!(!listed.pinned, "{listed:?}");
    cluster.wait_for_workers(OP, &workers).await;
    check_batch(&cluster, "registry-unpinned", 50, Behaviour::Whisper).await;

    // rollback: the version before the active one, v2.
    assert_eq!(store.rollback().await.expect("rollback"), (v3, v2));
    cluster.wait_for_registry_version(v2).await;
    check_batch(&cluster, "registry-rolled-back", 50, Behaviour::Reverse).await;

    // A bad file, through the CLI as an operator would: refused with its line, nothing changes.
    let before = store.state().await.expect("registry state");
    let bad = dir.join("bad-registry.toml");
    std::fs::write(&bad, BAD_FILE).expect("write the bad file");
    let bad_path = bad.display().to_string();
    let redis_url = cluster.redis_url();
    let refused = ordo(&["registry", "publish", &bad_path, "--redis-url", &redis_url], NO_REDIS_ENV).await;
    assert_eq!(refused.status.code(), Some(1), "a bad file exits 1");
    assert_eq!(stderr(&refused).trim(), format!("{bad_path}: {BAD_FILE_ERROR}"));
    assert_eq!(store.state().await.expect("registry state"), before, "a refused file changes nothing");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cluster.list_operations().await.expect("ListOperations").registry_version, v2);
    check_batch(&cluster, "registry-after-bad-file", 20, Behaviour::Reverse).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ordo_registry_publishes_lists_shows_diffs_pins_unpins_and_rolls_back() {
    let redis = RedisServer::start().await.expect("a private redis-server");
    let url = redis.url();
    let dir = tempfile::tempdir().expect("a temp dir");
    let run = |args: Vec<String>| {
        let mut all: Vec<String> = vec!["registry".into()];
        all.extend(args);
        all.extend(["--redis-url".to_owned(), url.clone()]);
        async move { ordo(&all.iter().map(String::as_str).collect::<Vec<_>>(), NO_REDIS_ENV).await }
    };
    let args = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();

    let empty = run(args("list")).await;
    assert!(empty.status.success() && stdout(&empty).is_empty(), "nothing published yet");

    let first = example_registry();
    let first_path = dir.path().join("v1.toml");
    std::fs::write(&first_path, &first).expect("write v1");
    let published = run(vec!["publish".into(), first_path.display().to_string()]).await;
    assert!(published.status.success());
    assert!(stdout(&published).starts_with("published version 1 ("), "{}", stdout(&published));

    let second = first.replace("timeout = \"5s\"\nconcurrency = 256", "timeout = \"2s\"\nconcurrency = 256")
        + &remote_operation("extra", "grpc://127.0.0.1:1", &[]);
    assert_ne!(second, first);
    let second_path = dir.path().join("v2.toml");
    std::fs::write(&second_path, &second).expect("write v2");
    let published = run(vec!["publish".into(), second_path.display().to_string()]).await;
    assert!(published.status.success());
    let text = stdout(&published);
    assert!(text.starts_with("published version 2 ("), "{text}");
    assert!(text.contains("changes from version 1:\n  + extra\n  ~ shout: timeout \"5s\" -> \"2s\"\n"), "{text}");

    let listed = stdout(&run(args("list")).await);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(lines[0].trim_start().starts_with("1 ") && !lines[0].contains("active"), "{listed}");
    assert!(lines[1].trim_start().starts_with("2 ") && lines[1].ends_with("active (in use)"), "{listed}");

    let shown = run(args("show 1")).await;
    assert!(shown.status.success());
    assert_eq!(stdout(&shown), first, "show prints the file as published");
    assert_eq!(stdout(&run(args("show")).await), second, "without a version: the one in use");

    let diffed = run(args("diff 1 2")).await;
    assert_eq!(stdout(&diffed), "+ extra\n~ shout: timeout \"5s\" -> \"2s\"\n");

    let pinned = run(args("pin 1")).await;
    assert!(pinned.status.success(), "{pinned:?}");
    let listed = stdout(&run(args("list")).await);
    assert!(listed.lines().next().is_some_and(|l| l.ends_with("pinned (in use)")), "{listed}");
    assert!(listed.lines().nth(1).is_some_and(|l| l.ends_with("  active")), "{listed}");
    let missing = run(args("pin 9")).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("registry version 9 does not exist"), "{}", stderr(&missing));

    assert!(stdout(&run(args("unpin")).await).starts_with("unpinned (was version 1)"));
    let rolled = run(args("rollback")).await;
    assert!(stdout(&rolled).starts_with("rolled back: version 1 is active (was 2)"), "{rolled:?}");
    let again = run(args("rollback")).await;
    assert_eq!(again.status.code(), Some(1), "nothing before version 1");
    assert!(stderr(&again).contains("nothing to roll back to"), "{}", stderr(&again));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, BAD_FILE).expect("write the bad file");
    let refused = run(vec!["publish".into(), bad.display().to_string()]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stderr(&refused).trim(), format!("{}: {BAD_FILE_ERROR}", bad.display()));
    let listed = stdout(&run(args("list")).await);
    assert_eq!(listed.lines().count(), 2, "the bad file published nothing: {listed}");
    assert!(listed.lines().next().is_some_and(|l| l.ends_with("active (in use)")), "{listed}");
}
