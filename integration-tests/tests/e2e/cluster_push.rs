//! The push-gateway's live tail on sharded channels, on one node and on a
//! private Redis Cluster:
//!
//! - on one node, the gateway subscribes exactly the release channels of the
//!   slots of the streams somebody follows (`PUBSUB SHARDCHANNELS`), nothing
//!   global, and drops them when the subscribers leave;
//! - the whole suite on a Redis Cluster (`ClusterBuilder::redis_cluster`):
//!   a `Process` call, gRPC Subscribe and SSE subscribers of streams in three
//!   slots get every result once and in order across a `CLUSTER FAILOVER`
//!   mid-stream;
//! - the reassembler and the push-gateway alone on a cluster, fed through the
//!   reassembler's `Deliver` (as a worker would), so each fault lands between
//!   two chosen batches: Subscribe and SSE readers of a stream on each master
//!   get every result once and in order across a forced failover and a
//!   SIGKILLed master, each followed slot is then subscribed on its current
//!   master only, and none is left once nobody follows; a cursor mid-stream
//!   resumes there; the AMQP outbox publishes every stream in order (the
//!   machine's RabbitMQ).

use std::{collections::BTreeSet, time::Duration};

use integration_tests::{
    Cluster, ProcessCall, ServiceProcess,
    client::{LINGER, by_stream, check_in_order_exactly_once},
    eventually::try_eventually,
    ports::free_port,
    process::{ServiceSpec, binary},
    rabbitmq::{self, AMQP_URL, QueueConsumer, Received},
    redis_cluster::RedisCluster,
    sse,
};
use ordo_core::keys;
use ordo_proto::v1::{
    Completed, DeliverBatch, EventResult, OrderingMode, ResultStatus, StreamCursor, SubscribeRequest,
    reassembler_client::ReassemblerClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    DEADLINE, assert_ok, check_numbered_payloads, interleave, numbered_events,
    push::{check_sse_results, receive, subscribe},
};

/// Sharded channels anyone subscribes (`PUBSUB SHARDCHANNELS`).
async fn shard_channels(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<BTreeSet<String>> {
    let channels: Vec<String> = redis::cmd("PUBSUB").arg("SHARDCHANNELS").query_async(conn).await?;
    Ok(channels.into_iter().collect())
}

/// Global (non-sharded) channels anyone subscribes (`PUBSUB CHANNELS`).
async fn global_channels(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Vec<String>> {
    Ok(redis::cmd("PUBSUB").arg("CHANNELS").query_async(conn).await?)
}

/// `n` stream ids (prefixed `prefix`), each in a slot of its own.
/// `n` stream ids whose releases go to `n` different channels on a single
/// node, hence also to different slots (a cluster's channels).
fn streams_in_distinct_slots(prefix: &str, n: usize) -> Vec<String> {
    let mut channels = BTreeSet::new();
    (0..).map(|i| format!("{prefix}-{i}")).filter(|s| channels.insert(single_node_channel(s))).take(n).collect()
}

/// The release channel of `stream` on a single node (a group of slots).
fn single_node_channel(stream: &str) -> String {
    keys::stream_release_channel(stream, false)
}

#[tokio::test(flavor = "multi_thread")]
async fn single_node_gateway_subscribes_only_the_slots_of_followed_streams() {
    // No hold: a slot is let go as soon as nobody follows it (the default
    // keeps it 30 s; `a_slot_is_held_…` below).
    let cluster = Cluster::builder().push_gateway_args(["--hub-slot-hold", "0s"]).start().await;
    let client = redis::Client::open(cluster.redis_url()).expect("the test redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("the test redis");
    let nothing = try_eventually(DEADLINE, || {
        let mut conn = conn.clone();
        async move { shard_channels(&mut conn).await.map(|c| c.is_empty().then_some(())).unwrap_or(None) }
    })
    .await;
    assert!(nothing.is_ok(), "nothing followed yet, nothing subscribed: {:?}", shard_channels(&mut conn).await);

    let streams = streams_in_distinct_slots("sharded", 2);
    let (followed, watched) = (&streams[0], &streams[1]);
    let mut grpc = subscribe(&cluster, followed, 0).await.expect("Subscribe opens");
    let sse_url = sse::events_url(&cluster.sse_url(), watched, Some("from=0"));
    let sse_stream = sse::open_stream(&sse_url, None).await.expect("the SSE stream opens");

    // Two channels, one per followed stream's group of slots.
    let two = try_eventually(DEADLINE, || {
        let mut conn = conn.clone();
        async move {
            let channels = shard_channels(&mut conn).await.ok()?;
            (channels.len() == 2).then_some(channels)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the two followed slots are subscribed: {e}"));
    let expected: BTreeSet<String> = streams.iter().map(|s| single_node_channel(s)).collect();
    assert_eq!(two, expected, "the channels are those of the followed streams' groups of slots");
    assert_eq!(global_channels(&mut conn).await.expect("PUBSUB CHANNELS"), Vec::<String>::new(), "no global channel");

    // The live tail works on them: results released now reach the subscriber.
    const N: u64 = 12;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(followed, N, "async-echo", "fixed:5ms"), Some(Duration::from_millis(10)));
    let got = receive(&mut grpc, N as usize, DEADLINE).await;
    assert_ok(check_in_order_exactly_once(&got, N), "Subscribe over the slot's channel");
    assert_ok(check_numbered_payloads(&got), "payloads");
    call.finish(LINGER).await.expect("the call ends cleanly");

    // Everyone leaves: every channel is dropped (the harmonizer's follow too,
    // after its linger).
    drop(grpc);
    drop(sse_stream);
    let none = try_eventually(DEADLINE, || {
        let mut conn = conn.clone();
        async move { shard_channels(&mut conn).await.map(|c| c.is_empty().then_some(())).unwrap_or(None) }
    })
    .await;
    assert!(none.is_ok(), "subscriptions dropped with their subscribers: {:?}", shard_channels(&mut conn).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_held_after_its_last_subscriber_leaves_and_serves_the_next_stream_there() {
    let cluster = Cluster::builder().push_gateway_args(["--hub-slot-hold", "1h"]).start().await;
    let client = redis::Client::open(cluster.redis_url()).expect("the test redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("the test redis");
    let stream = &streams_in_distinct_slots("held", 1)[0];
    let channel = single_node_channel(stream);
    let grpc = subscribe(&cluster, stream, 0).await.expect("Subscribe opens");
    let subscribed = try_eventually(DEADLINE, || {
        let mut conn = conn.clone();
        let channel = channel.clone();
        async move { shard_channels(&mut conn).await.ok().filter(|c| c.contains(&channel)).map(drop) }
    })
    .await;
    assert!(subscribed.is_ok(), "the followed slot is subscribed: {:?}", shard_channels(&mut conn).await);
    drop(grpc);
    // Well past the session's end and several listener rounds (3 s each).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let channels = shard_channels(&mut conn).await.expect("PUBSUB SHARDCHANNELS");
    assert!(channels.contains(&channel), "held for --hub-slot-hold: {channels:?}");
    // The held subscription serves a later subscriber of the slot at once.
    let mut again = subscribe(&cluster, stream, 0).await.expect("Subscribe opens again");
    const N: u64 = 6;
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(numbered_events(stream, N, "async-echo", "fixed:2ms"), None);
    let got = receive(&mut again, N as usize, DEADLINE).await;
    assert_ok(check_in_order_exactly_once(&got, N), "Subscribe on a held slot");
    call.finish(LINGER).await.expect("the call ends cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_whole_suite_subscribe_sse_and_the_call_across_a_forced_failover() {
    const N: u64 = 60;
    let mut cluster = Cluster::builder().redis_cluster_waiting_for_a_replica().workers(2).start().await;
    let urls: Vec<String> =
        (0..integration_tests::redis_cluster::NODES).map(|i| cluster.redis_cluster().node_url(i)).collect();
    wait_replicas_in_sync(&urls).await;
    let streams = streams_in_distinct_slots("suite-push", 3);
    let mut readers = Vec::new();
    for stream in &streams {
        let results = subscribe(&cluster, stream, 0).await.expect("Subscribe opens");
        readers.push((stream.clone(), tokio::spawn(collect_grpc(results, N as usize))));
    }
    let mut sse_readers = Vec::new();
    for stream in &streams {
        let url = sse::events_url(&cluster.sse_url(), stream, Some("from=0"));
        sse_readers.push((stream.clone(), tokio::spawn(collect_sse(url, N as usize))));
    }
    let mut call = ProcessCall::open(&cluster.harmonizer());
    let events = interleave(streams.iter().map(|s| numbered_events(s, N, "async-echo", "uniform:0ms-20ms")).collect());
    call.feed(events, Some(Duration::from_millis(15)));

    // A third in: the master of the first stream's slot fails over.
    let total = streams.len() * N as usize;
    call.wait_for_total(total / 3, DEADLINE).await.expect("a third of the results");
    let master = cluster.redis_cluster().master_of(keys::stream_slot(&streams[0])).await.expect("a master");
    let replica = cluster.redis_cluster().replica_of(master).await.expect("a replica");
    cluster.redis_cluster().failover(replica).await.expect("CLUSTER FAILOVER");
    assert!(!call.fed(), "the failover came mid-stream (events were still being sent)");

    call.wait_for_total(total, DEADLINE).await.expect("every result on the call");
    let got = call.finish(LINGER).await.expect("the call ends cleanly");
    for (stream, results) in by_stream(&got) {
        assert_ok(check_in_order_exactly_once(&results, N), &format!("the call's results of {stream}"));
    }
    for (stream, reader) in readers {
        let results = reader.await.expect("the Subscribe reader");
        assert_ok(check_in_order_exactly_once(&results, N), &format!("Subscribe of {stream}"));
        assert_ok(check_numbered_payloads(&results), "payloads");
    }
    for (stream, reader) in sse_readers {
        let events = reader.await.expect("the SSE reader");
        assert_eq!(events.len() as u64, N, "SSE of {stream}: every result once");
        assert_ok(check_sse_results(&events, &stream, 0), &format!("SSE of {stream}"));
    }
}

/// Waits until every replica of the cluster at node `urls` finished its
/// first sync with its master (until then a failed master has no replica fit
/// to take over, and `WAIT 1` fails).
async fn wait_replicas_in_sync(urls: &[String]) {
    let synced = try_eventually(DEADLINE, || {
        let urls = urls.to_vec();
        async move {
            for url in urls {
                let client = redis::Client::open(url).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    assert!(synced.is_ok(), "the replicas never synced: {synced:?}");
}

/// The reassembler and push-gateway binaries against a private Redis Cluster.
struct OnCluster {
    redis: RedisCluster,
    reassembler: ServiceProcess,
    push_gateway: ServiceProcess,
    sse_port: u16,
    dir: tempfile::TempDir,
}

impl OnCluster {
    async fn start(push_gateway_args: &[&str]) -> Self {
        let redis = RedisCluster::start().await.expect("a private Redis Cluster");
        let dir = tempfile::tempdir().expect("a log dir");
        let url = redis.url();
        let spec = |name: &str, args: Vec<String>| ServiceSpec {
            name: name.to_owned(),
            binary: binary(name),
            args,
            env: Vec::new(),
        };
        // Every script call waits for a replica, so a killed master loses
        // nothing that was acked (docs/scaling.md, "Durability per setting").
        let args = ["--redis-url", &url, "--redis-wait-replicas", "1", "--redis-wait-timeout", "500ms"];
        let reassembler = ServiceProcess::start(
            spec("reassembler", args.iter().map(|a| (*a).to_owned()).collect()),
            dir.path(),
            DEADLINE,
        )
        .await
        .expect("the reassembler serves on the cluster");
        let sse_port = free_port();
        // No hold: the tests check that no subscription is left once nobody follows.
        let mut args = vec![
            "--redis-url".into(),
            url,
            "--sse-listen".into(),
            format!("127.0.0.1:{sse_port}"),
            "--hub-slot-hold".into(),
            "0s".into(),
        ];
        args.extend(push_gateway_args.iter().map(|a| (*a).to_owned()));
        let mut push_gateway_spec = spec("push-gateway", args);
        // Subscription changes show in its log (for a failure's post-mortem).
        push_gateway_spec.env.push(("RUST_LOG".into(), "info,push_gateway=debug".into()));
        let push_gateway = ServiceProcess::start(push_gateway_spec, dir.path(), DEADLINE)
            .await
            .expect("the push-gateway serves on the cluster");
        let mut suite = Self { redis, reassembler, push_gateway, sse_port, dir };
        suite.wait_replicas_in_sync().await;
        suite
    }

    async fn wait_replicas_in_sync(&mut self) {
        let urls: Vec<String> = (0..integration_tests::redis_cluster::NODES).map(|i| self.redis.node_url(i)).collect();
        wait_replicas_in_sync(&urls).await;
    }

    fn sse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.sse_port)
    }

    async fn subscribe(&self, stream: &str) -> tonic::Streaming<EventResult> {
        let mut client = ordo_proto::v1::push_gateway_client::PushGatewayClient::connect(self.push_gateway.uri())
            .await
            .expect("the push-gateway");
        let request = SubscribeRequest { stream_id: stream.to_owned(), from_sequence: 0, streams: vec![] };
        client.subscribe(request).await.expect("Subscribe opens").into_inner()
    }

    /// Stores `results` through the reassembler's `Deliver` until it acked
    /// them (redelivering after any failure: the first result wins).
    async fn deliver(&self, batch_id: u64, results: &[(String, u64)]) {
        let batch = DeliverBatch {
            batch_id,
            results: results
                .iter()
                .map(|(stream, sequence)| Completed {
                    result: Some(EventResult {
                        stream_id: stream.clone(),
                        sequence: *sequence,
                        status: ResultStatus::Ok.into(),
                        payload: format!("{stream}:{sequence}").into_bytes().into(),
                        ..Default::default()
                    }),
                    mode: OrderingMode::Ordered.into(),
                    dead_letter: None,
                })
                .collect(),
        };
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.deliver_once(batch.clone()).await {
                Ok(()) => return,
                Err(error) if tokio::time::Instant::now() < until => {
                    eprintln!("deliver batch {batch_id}: {error:#}; again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("batch {batch_id} not acked within {DEADLINE:?}: {error:#}\n{}", self.logs()),
            }
        }
    }

    async fn deliver_once(&self, batch: DeliverBatch) -> anyhow::Result<()> {
        let mut client = ReassemblerClient::connect(self.reassembler.uri()).await?;
        let (tx, rx) = mpsc::channel(1);
        let id = batch.batch_id;
        tx.send(batch).await?;
        let mut acks = client.deliver(ReceiverStream::new(rx)).await?.into_inner();
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message()).await??;
        drop(tx);
        match ack {
            Some(ack) if ack.batch_id == id => Ok(()),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }

    fn logs(&self) -> String {
        format!(
            "{}\n{}\n{}\n(logs in {})",
            self.reassembler.log_tail(30),
            self.push_gateway.log_tail(30),
            self.redis.log_tails(10),
            self.dir.path().display()
        )
    }
}

/// Reads a Subscribe call until `n` results came, then for a little longer
/// to catch any duplicate; everything it got.
async fn collect_grpc(mut results: tonic::Streaming<EventResult>, n: usize) -> Vec<EventResult> {
    let mut got = receive(&mut results, n, DEADLINE * 2).await;
    while let Ok(Ok(Some(extra))) = tokio::time::timeout(Duration::from_secs(1), results.message()).await {
        got.push(extra);
    }
    got
}

/// Reads an SSE stream until `n` results came, then a little longer.
async fn collect_sse(url: String, n: usize) -> Vec<sse::SseEvent> {
    let mut events = sse::open_stream(&url, None).await.expect("the SSE stream opens");
    let mut got: Vec<sse::SseEvent> = events
        .collect(n, DEADLINE * 2)
        .await
        .expect("every result over SSE")
        .into_iter()
        .filter(|e| e.event == "result")
        .collect();
    while let Ok(Some(extra)) = events.next(Duration::from_secs(1)).await {
        if extra.event == "result" {
            got.push(extra);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_subscribe_and_sse_get_every_result_once_in_order_across_failovers() {
    const N: u64 = 60;
    let mut suite = OnCluster::start(&[]).await;

    // One stream on each master (their slots are spread over all three).
    let mut streams: Vec<(String, usize)> = Vec::new();
    for candidate in (0..).map(|i| format!("cluster-push-{i}")) {
        let master = suite.redis.master_of(keys::stream_slot(&candidate)).await.expect("CLUSTER NODES");
        if streams.iter().all(|(_, m)| *m != master) {
            streams.push((candidate, master));
        }
        if streams.len() == integration_tests::redis_cluster::MASTERS {
            break;
        }
    }
    let grpc: Vec<_> = futures::future::join_all(streams.iter().map(|(stream, _)| suite.subscribe(stream))).await;
    // Held to the end, so the slots stay followed after the readers are done.
    let holders: Vec<_> = futures::future::join_all(streams.iter().map(|(stream, _)| suite.subscribe(stream))).await;
    let collectors: Vec<_> = grpc
        .into_iter()
        .zip(&streams)
        .map(|(results, (stream, _))| (stream.clone(), tokio::spawn(collect_grpc(results, N as usize))))
        .collect();
    let sse_collectors: Vec<_> = streams
        .iter()
        .map(|(stream, _)| {
            let url = sse::events_url(&suite.sse_url(), stream, Some("from=0"));
            (stream.clone(), tokio::spawn(collect_sse(url, N as usize)))
        })
        .collect();

    // Pairs out of order (2k+1 before 2k), every stream in each batch; a
    // master failed over (`CLUSTER FAILOVER`) at a sixth, another killed at
    // a third (its replica promoted, then it comes back as a replica).
    let (moved_stream, moved_master) = streams[0].clone();
    let (killed_stream, killed_master) = streams[1].clone();
    let mut batch_id = 0;
    for pair in 0..N / 2 {
        for sequence in [2 * pair + 1, 2 * pair] {
            batch_id += 1;
            let batch: Vec<(String, u64)> = streams.iter().map(|(s, _)| (s.clone(), sequence)).collect();
            suite.deliver(batch_id, &batch).await;
        }
        if pair == N / 6 {
            let replica = suite.redis.replica_of(moved_master).await.expect("a replica");
            eprintln!("failing master {moved_master} (of {moved_stream}) over to replica {replica}");
            suite.redis.failover(replica).await.expect("CLUSTER FAILOVER");
        }
        if pair == N / 3 {
            let replica = suite.redis.replica_of(killed_master).await.expect("a replica");
            eprintln!("killing master {killed_master} (of {killed_stream}); replica {replica} takes over");
            suite.redis.kill(killed_master);
            suite.redis.wait_master(replica).await.expect("the replica is promoted");
            suite.redis.restart(killed_master).await.expect("the old master restarts");
            suite.redis.wait_settled().await.expect("the cluster settles");
        }
    }

    for (stream, collector) in collectors {
        let got = collector.await.expect("the Subscribe reader");
        assert_ok(check_in_order_exactly_once(&got, N), &format!("Subscribe of {stream}\n{}", suite.logs()));
        assert_ok(check_numbered_payloads(&got), "payloads");
    }
    for (stream, collector) in sse_collectors {
        let got = collector.await.expect("the SSE reader");
        assert_eq!(got.len() as u64, N, "SSE of {stream}: every result once");
        assert_ok(check_sse_results(&got, &stream, 0), &format!("SSE of {stream}"));
    }
    assert!(suite.push_gateway.is_running(), "the gateway rode out both failovers");

    // Still followed (by `holders`): each slot's channel is subscribed on the
    // master that serves the slot now, and nothing else anywhere.
    let masters = {
        let mut masters = Vec::new();
        for (stream, _) in &streams {
            masters.push(suite.redis.master_of(keys::stream_slot(stream)).await.expect("CLUSTER NODES"));
        }
        masters
    };
    let urls: Vec<String> = (0..integration_tests::redis_cluster::NODES).map(|i| suite.redis.node_url(i)).collect();
    let expected: BTreeSet<String> =
        streams.iter().map(|(s, _)| keys::released_channel(keys::stream_slot(s))).collect();
    let on_masters = try_eventually(Duration::from_secs(20), || {
        let (urls, expected, masters, streams) = (urls.clone(), expected.clone(), masters.clone(), streams.clone());
        async move {
            let found = channels_per_node(&urls).await?;
            let everywhere: BTreeSet<String> = found.iter().flatten().cloned().collect();
            let each_on_its_master = streams.iter().zip(&masters).all(|((stream, _), &master)| {
                found[master].contains(&keys::released_channel(keys::stream_slot(stream)))
            });
            (everywhere == expected && each_on_its_master).then_some(())
        }
    })
    .await;
    assert!(
        on_masters.is_ok(),
        "each followed slot is subscribed on its master now: {:?} per node, masters {masters:?}, expected {expected:?}",
        channels_per_node(&urls).await
    );
    // Nobody follows any more: no channel is left on any node.
    drop(holders);
    let none_left = try_eventually(Duration::from_secs(20), || {
        let urls = urls.clone();
        async move { channels_per_node(&urls).await?.iter().all(BTreeSet::is_empty).then_some(()) }
    })
    .await;
    assert!(
        none_left.is_ok(),
        "every channel dropped once nobody follows: {:?}\n{}",
        channels_per_node(&urls).await,
        suite.logs()
    );
}

/// `PUBSUB SHARDCHANNELS` of each node (an empty set for a node that is down).
async fn channels_per_node(urls: &[String]) -> Option<Vec<BTreeSet<String>>> {
    let mut found = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).ok()?;
        let channels = match client.get_multiplexed_async_connection().await {
            Ok(mut conn) => shard_channels(&mut conn).await.ok()?,
            Err(_) => BTreeSet::new(),
        };
        found.push(channels);
    }
    Some(found)
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_subscribe_resumes_from_a_cursor() {
    // A cursor in the middle of a stream on a cluster: catch-up from the log
    // (one slot per stream), then live.
    let suite = OnCluster::start(&[]).await;
    let stream = "cluster-cursor".to_owned();
    for sequence in 0..10 {
        suite.deliver(sequence + 1, &[(stream.clone(), sequence)]).await;
    }
    let mut client = ordo_proto::v1::push_gateway_client::PushGatewayClient::connect(suite.push_gateway.uri())
        .await
        .expect("the push-gateway");
    let request = SubscribeRequest {
        stream_id: String::new(),
        from_sequence: 0,
        streams: vec![StreamCursor { stream_id: stream.clone(), from_sequence: 4 }],
    };
    let mut results = client.subscribe(request).await.expect("Subscribe opens").into_inner();
    let mut got = receive(&mut results, 6, DEADLINE).await;
    for sequence in 10..20 {
        suite.deliver(sequence + 1, &[(stream.clone(), sequence)]).await;
    }
    got.extend(receive(&mut results, 10, DEADLINE).await);
    let positions: Vec<u64> = got.iter().map(|r| r.position).collect();
    assert_eq!(positions, (4..20).collect::<Vec<_>>(), "from the cursor on, in order, once");
}

/// `Ok` when `messages`, repeats of already-delivered positions dropped,
/// are the results at positions `0..n` of `stream` in order.
fn check_amqp(messages: &[Received], stream: &str, n: u64) -> Result<(), String> {
    let mut next = 0;
    for (i, message) in messages.iter().enumerate() {
        let Some(position) = message.position else { return Err(format!("message #{i} has no position")) };
        if message.kind != "ordo.result" || message.routing_key != stream {
            return Err(format!("message #{i} is not a result of {stream}: {message:?}"));
        }
        if position < next {
            continue;
        }
        if position > next {
            return Err(format!("message #{i} is position {position}, but {next} never came"));
        }
        let body: serde_json::Value =
            serde_json::from_slice(&message.body).map_err(|e| format!("message #{i}: not JSON: {e}"))?;
        if body["payload_utf8"] != format!("{stream}:{position}") {
            return Err(format!("message #{i} carries the wrong result: {body}"));
        }
        next += 1;
    }
    if next != n {
        return Err(format!("{next} of {n} positions ({} messages)", messages.len()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_amqp_outbox_publishes_every_stream_in_order() {
    rabbitmq::require_broker().await;
    const N: u64 = 20;
    let exchange = rabbitmq::unique_name("ordo.test.cluster");
    let consumer = QueueConsumer::bind(&exchange, "#").await.expect("a queue bound to the exchange");
    let streams = streams_in_distinct_slots("cluster-amqp", 8);

    // Results released before the gateway starts: found by the scan of every master.
    let suite = OnCluster::start(&["--amqp-url", AMQP_URL, "--amqp-exchange", &exchange]).await;
    let mut batch_id = 0;
    for sequence in 0..N / 2 {
        batch_id += 1;
        let batch: Vec<(String, u64)> = streams.iter().map(|s| (s.clone(), sequence)).collect();
        suite.deliver(batch_id, &batch).await;
    }
    // Then live: heard on the slots' channels by the leader's firehose.
    for sequence in N / 2..N {
        batch_id += 1;
        let batch: Vec<(String, u64)> = streams.iter().map(|s| (s.clone(), sequence)).collect();
        suite.deliver(batch_id, &batch).await;
    }
    let total = streams.len() * N as usize;
    let all = consumer
        .wait_until(DEADLINE, |messages| {
            messages.iter().filter_map(|m| Some((m.routing_key.clone(), m.position?))).collect::<BTreeSet<_>>().len()
                >= total
        })
        .await;
    if let Err(error) = all {
        panic!("every result reaches the queue: {error:#}\n{}", suite.logs());
    }
    let received = consumer.received();
    for stream in &streams {
        let of: Vec<Received> = received.iter().filter(|m| &m.routing_key == stream).cloned().collect();
        assert_ok(check_amqp(&of, stream, N), &format!("AMQP of {stream}"));
    }

    // The publish cursors (one hash for the exchange) say everything is confirmed.
    let client = redis::cluster::ClusterClient::new(
        (0..integration_tests::redis_cluster::NODES).map(|i| suite.redis.node_url(i)).collect::<Vec<_>>(),
    )
    .expect("cluster client");
    let conn = client.get_async_connection().await.expect("the cluster");
    let confirmed = try_eventually(DEADLINE, || {
        let mut conn = conn.clone();
        let (key, streams) = (format!("ordo:amqp:{exchange}:cursor"), streams.clone());
        async move {
            let cursors: Vec<Option<u64>> =
                redis::cmd("HMGET").arg(key).arg(&streams).query_async(&mut conn).await.ok()?;
            cursors.iter().all(|c| *c == Some(N)).then_some(())
        }
    })
    .await;
    assert!(confirmed.is_ok(), "every stream's cursor at {N}");
    consumer.delete().await.expect("queue and exchange deleted");
}
