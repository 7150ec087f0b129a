//! The worker end to end in one process: a real `Work` call against a
//! worker on 127.0.0.1:0 that delivers to a fake reassembler (it stores
//! nothing, it records and acks), with the registry fixed, unreachable, or
//! in a private redis-server.

use std::{
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use clap::Parser;
use ordo_proto::v1::{
    DeliverAck, DeliverBatch, GetDeadLetterRequest, GetStreamRequest, ListDeadLettersRequest, ListDeadLettersResponse,
    StreamState,
    reassembler_server::{Reassembler, ReassemblerServer},
    stateful_worker_client::StatefulWorkerClient,
};
use ordo_registry::{Catalog, Kind, OperationSpec, Store};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;

use super::*;
use crate::args::MainConfig;

/// Records every result it is handed and acks each batch at once.
#[derive(Clone, Default)]
struct FakeReassembler {
    results: Arc<Mutex<Vec<Completed>>>,
}

#[tonic::async_trait]
impl Reassembler for FakeReassembler {
    type DeliverStream = Pin<Box<dyn Stream<Item = Result<DeliverAck, Status>> + Send>>;

    async fn deliver(
        &self,
        request: Request<Streaming<DeliverBatch>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let mut inbound = request.into_inner();
        let results = self.results.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(batch)) = inbound.message().await {
                let accepted = u32::try_from(batch.results.len()).unwrap_or(u32::MAX);
                lock(&results).extend(batch.results);
                if tx.send(Ok(DeliverAck { batch_id: batch.batch_id, accepted, duplicates: 0 })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
    async fn get_stream(&self, _: Request<GetStreamRequest>) -> Result<Response<StreamState>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_dead_letters(
        &self,
        _: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_dead_letter(&self, _: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Nothing listens on port 1: every registry read fails at once.
const NO_REDIS: &str = "redis://127.0.0.1:1";

struct Harness {
    client: StatefulWorkerClient<Channel>,
    results: Arc<Mutex<Vec<Completed>>>,
    shutdown: Shutdown,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    addr: std::net::SocketAddr,
}

impl Harness {
    /// A worker with `operations` and `follower` (`None`: [`Worker::run`]
    /// follows the registry at `--redis-url` itself).
    async fn start(operations: Operations, follower: Option<Follower>, flags: &[&str]) -> Self {
        let reassembler = FakeReassembler::default();
        let results = reassembler.results.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let reassembler_addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ReassemblerServer::new(reassembler))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut argv = vec!["worker", "--reassemblers", &reassembler_addr, "--name", "test-worker"];
        argv.extend_from_slice(flags);
        let args = MainConfig::try_parse_from(argv).expect("flags").0;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let worker = Worker::new(operations);
        let served = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                match follower {
                    Some(follower) => worker.serve(args, follower, listener, shutdown).await,
                    None => worker.run(args, listener, shutdown).await,
                }
            }
        });
        let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
        Self { client: StatefulWorkerClient::new(channel), results, shutdown, served, addr }
    }

    /// Opens a `Work` call: the sender of items and the stream of acks.
    async fn call(&self) -> (mpsc::Sender<WorkItem>, Streaming<WorkAck>) {
        let (tx, rx) = mpsc::channel(1024);
        let acks = self.client.clone().work(ReceiverStream::new(rx)).await.expect("work call").into_inner();
        (tx, acks)
    }

    fn result(&self, sequence: u64) -> Option<EventResult> {
        lock(&self.results).iter().filter_map(|c| c.result.clone()).find(|r| r.sequence == sequence)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(15), self.served).await;
        assert!(matches!(served, Ok(Ok(Ok(())))), "the worker stops cleanly: {served:?}");
    }
}

/// The next capability announcement, within a few seconds (the registry
/// is polled every 250 ms).
async fn next_capabilities(acks: &mut Streaming<WorkAck>) -> Capabilities {
    let announced = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(caps) = next_ack(acks).await.capabilities {
                return caps;
            }
        }
    });
    announced.await.expect("announced within a second or so")
}

async fn next_ack(acks: &mut Streaming<WorkAck>) -> WorkAck {
    match tokio::time::timeout(Duration::from_secs(10), acks.message()).await {
        Ok(Ok(Some(ack))) => ack,
        other => panic!("no ack: {other:?}"),
    }
}

/// Acks until one of every dispatch id in `ids` has come (capability
/// announcements are skipped), by dispatch id.
async fn acks_of(acks: &mut Streaming<WorkAck>, ids: &[u64]) -> HashMap<u64, WorkAck> {
    let mut got = HashMap::new();
    while !ids.iter().all(|id| got.contains_key(id)) {
        let ack = next_ack(acks).await;
        if ack.capabilities.is_none() {
            assert!(ids.contains(&ack.dispatch_id), "unexpected ack {ack:?}");
            got.insert(ack.dispatch_id, ack);
        }
    }
    got
}

fn item(dispatch_id: u64, operation: &str, payload: &str, registry_version: u64) -> WorkItem {
    WorkItem {
        dispatch_id,
        event: Some(Event {
            stream_id: "stream".into(),
            sequence: dispatch_id,
            operation: operation.into(),
            payload: Bytes::from(payload.to_owned()),
            ..Default::default()
        }),
        attempt: 1,
        timeout_ms: 10_000,
        max_attempts: 3,
        cancel: false,
        registry_version,
    }
}

fn on_attempt(mut item: WorkItem, attempt: u32, max_attempts: u32) -> WorkItem {
    item.attempt = attempt;
    item.max_attempts = max_attempts;
    item
}

fn upper() -> Operations {
    Operations::new()
        .with_fn("upper", "upper-cases", |_, event| async move { Ok(Bytes::from(event.payload.to_ascii_uppercase())) })
}

fn stateful(name: &str) -> OperationSpec {
    OperationSpec::new(name, Kind::Stateful)
}

fn fixed(catalog: Catalog) -> Follower {
    Follower::fixed(ordo_runtime::redis_conn::lazy(NO_REDIS).expect("url"), catalog)
}

#[tokio::test]
async fn starts_without_redis_announces_first_and_delivers_before_acking() {
    // Following a registry that cannot be read: the built-in operations.
    let harness = Harness::start(upper(), None, &["--redis-url", NO_REDIS]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", harness.addr)).expect("uri").connect_lazy(),
    );
    let (tx, mut acks) = harness.call().await;
    let first = next_ack(&mut acks).await;
    let caps = first.capabilities.expect("the first message announces capabilities");
    assert_eq!(caps.operations, ["upper"]);
    assert_eq!((caps.registry_version, caps.concurrency, caps.worker.as_str()), (0, 1024, "test-worker"));
    assert_eq!(first.dispatch_id, 0);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "Redis is not required");

    tx.send(item(1, "upper", "abc", 0)).await.expect("send");
    let ack = next_ack(&mut acks).await;
    assert!(ack.delivered && !ack.retry && ack.dispatch_id == 1, "{ack:?}");
    let result = harness.result(1).expect("delivered before the ack");
    assert_eq!((result.status(), result.payload.as_ref()), (ResultStatus::Ok, b"ABC".as_ref()));

    // Every call starts with the announcement.
    let (_tx2, mut acks2) = harness.call().await;
    assert!(next_ack(&mut acks2).await.capabilities.is_some());

    let listed = harness.client.clone().list_operations(ListOperationsRequest {}).await.expect("list").into_inner();
    let names: Vec<&str> = listed.operations.iter().map(|op| op.name.as_str()).collect();
    assert_eq!((names, listed.registry_version, listed.pinned), (vec!["upper"], 0, false));
    assert_eq!(listed.operations[0].description, "upper-cases");
    drop(tx);
    harness.stop().await;
}

#[tokio::test]
async fn each_attempt_runs_with_the_registry_version_of_its_event() {
    let remote = crate::remote::tests::grpc_server().await;
    let catalog = Catalog::new(
        5,
        0,
        [stateful("upper"), OperationSpec { endpoint: Some(remote), ..stateful("describe") }, stateful("orphan")],
    );
    let harness = Harness::start(upper(), Some(fixed(catalog)), &[]).await;
    let (tx, mut acks) = harness.call().await;
    let caps = next_ack(&mut acks).await.capabilities.expect("capabilities");
    assert_eq!((caps.operations, caps.registry_version), (vec!["describe".to_owned(), "upper".to_owned()], 5));

    tx.send(item(1, "upper", "abc", 5)).await.expect("send");
    // Version 3 cannot be read (no Redis): transient, handed back...
    tx.send(item(2, "upper", "abc", 3)).await.expect("send");
    // ...and FAILED on the last attempt.
    tx.send(on_attempt(item(3, "upper", "abc", 3), 3, 3)).await.expect("send");
    tx.send(item(4, "gone", "abc", 5)).await.expect("send");
    tx.send(item(5, "describe", "remote", 5)).await.expect("send");
    // In the version but neither remote nor compiled in: another worker may serve it.
    tx.send(item(6, "orphan", "x", 5)).await.expect("send");
    let got = acks_of(&mut acks, &[1, 2, 3, 4, 5, 6]).await;

    assert!(got[&1].delivered);
    assert_eq!(harness.result(1).map(|r| r.payload), Some(Bytes::from_static(b"ABC")));
    assert!(got[&2].retry && !got[&2].delivered, "{:?}", got[&2]);
    assert!(got[&2].error.contains("cannot read registry version 3"), "{}", got[&2].error);
    assert!(harness.result(2).is_none(), "a hand-back delivers nothing");
    let three = harness.result(3).expect("failed in place");
    assert!(three.status() == ResultStatus::Failed && three.error.contains("registry version 3"), "{three:?}");
    let four = harness.result(4).expect("failed in place");
    assert!(four.status() == ResultStatus::Failed && four.error.contains("not in registry version 5"), "{four:?}");
    let five = harness.result(5).expect("remote result");
    assert!(five.payload.starts_with(b"describe|stream|5|1|remote|"), "{five:?}");
    assert!(got[&6].retry && got[&6].error.contains("not compiled into worker test-worker"), "{:?}", got[&6]);
    let dead = lock(&harness.results).iter().filter(|c| c.dead_letter.is_some()).count();
    assert_eq!(dead, 2, "each FAILED result carries its dead letter");
    drop(tx);
    harness.stop().await;
}

#[tokio::test]
async fn an_operation_timeout_is_handed_back_then_failed_on_the_last_attempt() {
    let remote = crate::remote::tests::grpc_server().await;
    let catalog = Catalog::new(
        1,
        0,
        [
            OperationSpec { endpoint: Some(remote), timeout: Some(Duration::from_millis(200)), ..stateful("slow") },
            OperationSpec { timeout: Some(Duration::from_millis(100)), ..stateful("sleepy") },
        ],
    );
    let sleepy = Operations::new().with_fn("sleepy", "", |_, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(Bytes::new())
    });
    let harness = Harness::start(sleepy, Some(fixed(catalog)), &[]).await;
    let (tx, mut acks) = harness.call().await;
    next_ack(&mut acks).await;
    let started = Instant::now();
    tx.send(item(1, "slow", "", 1)).await.expect("send");
    tx.send(item(2, "sleepy", "", 1)).await.expect("send");
    tx.send(on_attempt(item(3, "slow", "", 1), 2, 2)).await.expect("send");
    let got = acks_of(&mut acks, &[1, 2, 3]).await;
    assert!(started.elapsed() < Duration::from_secs(5), "the timeouts ended the calls: {:?}", started.elapsed());
    assert!(got[&1].retry && got[&1].error.contains("timed out after 200ms"), "{:?}", got[&1]);
    assert!(got[&2].retry && got[&2].error.contains("timed out after 100ms"), "{:?}", got[&2]);
    let last = harness.result(3).expect("failed in place");
    assert!(last.status() == ResultStatus::Failed && last.error.contains("timed out"), "{last:?}");
    drop(tx);
    harness.stop().await;
}

#[tokio::test]
async fn an_operations_concurrency_limit_is_respected() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let counted = {
        let (running, peak) = (running.clone(), peak.clone());
        Operations::new().with_fn("counted", "", move |_, _| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(Bytes::new())
            }
        })
    };
    let catalog = Catalog::new(1, 0, [OperationSpec { concurrency: Some(2), ..stateful("counted") }]);
    let harness = Harness::start(counted, Some(fixed(catalog)), &[]).await;
    let (tx, mut acks) = harness.call().await;
    next_ack(&mut acks).await;
    let ids: Vec<u64> = (1..=12).collect();
    for &id in &ids {
        tx.send(item(id, "counted", "", 1)).await.expect("send");
    }
    let got = acks_of(&mut acks, &ids).await;
    assert!(got.values().all(|ack| ack.delivered), "{got:?}");
    assert_eq!(peak.load(Ordering::SeqCst), 2, "at most 2 at once, and the limit was reached");
    drop(tx);
    harness.stop().await;
}

#[tokio::test]
async fn a_cancel_drops_the_running_operation_and_nothing_is_acked() {
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Notify::new());
    let ops = {
        let (dropped, started) = (dropped.clone(), started.clone());
        upper().with_fn("hang", "", move |_, _| {
            let guard = Dropped(dropped.clone());
            let started = started.clone();
            async move {
                let _guard = guard;
                started.notify_one();
                std::future::pending::<()>().await;
                Ok(Bytes::new())
            }
        })
    };
    let harness = Harness::start(ops, None, &["--redis-url", NO_REDIS, "--registry-pin", "0"]).await;
    let (tx, mut acks) = harness.call().await;
    next_ack(&mut acks).await;
    tx.send(item(1, "hang", "", 0)).await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), started.notified()).await.expect("started");
    tx.send(WorkItem { dispatch_id: 1, cancel: true, ..Default::default() }).await.expect("cancel");
    // A cancel ahead of its item: the item is never run.
    tx.send(WorkItem { dispatch_id: 2, cancel: true, ..Default::default() }).await.expect("cancel");
    tx.send(item(2, "upper", "never", 0)).await.expect("send");
    tx.send(item(3, "upper", "after", 0)).await.expect("send");
    let ack = next_ack(&mut acks).await;
    assert_eq!((ack.dispatch_id, ack.delivered), (3, true), "only the last item is acked: {ack:?}");
    assert!(dropped.load(Ordering::SeqCst), "the cancelled operation's future was dropped");
    assert!(harness.result(1).is_none() && harness.result(2).is_none());
    drop(tx);
    harness.stop().await;
}

/// Every slot taken by an operation that never ends, and the queue behind
/// it full of attempts whose deadline passed: the call is not read while the
/// queue is full, so only a sweep of the queue makes room for the cancel
/// behind it. The sweep runs on its own timer (nothing else wakes the call
/// here), so the cancel is read long before the hung attempt's own deadline.
#[tokio::test]
async fn a_full_queue_of_expired_attempts_is_swept_so_the_cancel_behind_it_is_read() {
    let started = Arc::new(tokio::sync::Notify::new());
    let ops = {
        let started = started.clone();
        upper().with_fn("hang", "", move |_, _| {
            let started = started.clone();
            async move {
                started.notify_one();
                std::future::pending::<()>().await;
                Ok(Bytes::new())
            }
        })
    };
    let flags = ["--redis-url", NO_REDIS, "--registry-pin", "0", "--concurrency", "1"];
    let harness = Harness::start(ops, None, &flags).await;
    let (tx, mut acks) = harness.call().await;
    next_ack(&mut acks).await;
    // Its own deadline (60 s) is far beyond next_ack's 10 s.
    tx.send(WorkItem { timeout_ms: 60_000, ..item(1, "hang", "", 0) }).await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), started.notified()).await.expect("started");
    let queued = 1000..1000 + QUEUED_PER_CALL as u64;
    for id in queued.clone() {
        tx.send(WorkItem { timeout_ms: 200, ..item(id, "upper", "expires", 0) }).await.expect("send");
    }
    tx.send(WorkItem { dispatch_id: 1, cancel: true, ..Default::default() }).await.expect("cancel");
    tx.send(item(2, "upper", "after", 0)).await.expect("send");
    // Queued attempts that had not expired yet when room was made may run
    // first (they arrived over some milliseconds); the hung one never acks.
    loop {
        let ack = next_ack(&mut acks).await;
        if ack.dispatch_id == 2 {
            assert!(ack.delivered, "{ack:?}");
            break;
        }
        assert!(queued.contains(&ack.dispatch_id), "only queued attempts or the last item are acked: {ack:?}");
    }
    assert!(harness.result(1).is_none(), "the cancelled operation delivered nothing");
    drop(tx);
    harness.stop().await;
}

/// A private redis-server on a free port, stopped when dropped.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    /// Another process may take the free port between our probe and
    /// redis-server's bind (then redis-server exits): a few tries, each on a
    /// new port.
    async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("addr").port()
            };
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/install-deps.sh installs it)");
            let mut server = Self { child, url: format!("redis://127.0.0.1:{port}") };
            let conn = ordo_runtime::redis_conn::lazy(&server.url).expect("url");
            for _ in 0..100 {
                if ordo_runtime::redis_conn::ping(&conn, Duration::from_millis(200)).await.is_ok() {
                    return server;
                }
                if matches!(server.child.try_wait(), Ok(Some(_))) {
                    break; // it exited: the port was taken
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last = server.url.clone();
        }
        panic!("redis-server did not answer on {last} (nor on 4 other free ports)");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn capabilities_follow_the_registry_and_are_announced_again() {
    let redis = RedisServer::start().await;
    let remote = crate::remote::tests::grpc_server().await;
    let ops =
        upper().with_fn("lower", "", |_, event| async move { Ok(Bytes::from(event.payload.to_ascii_lowercase())) });
    let harness = Harness::start(ops, None, &["--redis-url", &redis.url]).await;
    let (tx, mut acks) = harness.call().await;
    let caps = next_ack(&mut acks).await.capabilities.expect("capabilities");
    assert_eq!((caps.operations, caps.registry_version), (vec!["lower".to_owned(), "upper".to_owned()], 0));

    let store = Store::new(ordo_runtime::redis_conn::lazy(&redis.url).expect("url"));
    let file = format!(
        "[[operation]]\nname = \"upper\"\nkind = \"stateful\"\n\n\
         [[operation]]\nname = \"describe\"\nkind = \"stateful\"\nendpoint = \"{remote}\"\nconcurrency = 4\n"
    );
    let version = store.publish(&file).await.expect("publish");
    assert_eq!(version, 1);
    let announced = next_capabilities(&mut acks).await;
    assert_eq!(announced.operations, ["describe", "upper"], "lower is not in version 1");
    assert_eq!(announced.registry_version, 1);

    // An event of version 1 runs the remote operation; one of version 0
    // (accepted before the change) still runs under version 0.
    tx.send(item(1, "describe", "hi", 1)).await.expect("send");
    tx.send(item(2, "lower", "ABC", 0)).await.expect("send");
    let got = acks_of(&mut acks, &[1, 2]).await;
    assert!(got[&1].delivered && got[&2].delivered, "{got:?}");
    assert!(harness.result(1).expect("remote").payload.starts_with(b"describe|stream|1|"));
    assert_eq!(harness.result(2).expect("native").payload, Bytes::from_static(b"abc"));

    let listed = harness.client.clone().list_operations(ListOperationsRequest {}).await.expect("list").into_inner();
    assert_eq!((listed.registry_version, listed.pinned), (1, false));
    let describe = listed.operations.iter().find(|op| op.name == "describe").expect("listed");
    assert_eq!((describe.endpoint.as_str(), describe.concurrency), (remote.to_string().as_str(), 4));

    // A new version, then the global pin back to version 1: announced each time.
    let version = store.publish("[[operation]]\nname = \"upper\"\nkind = \"stateful\"\n").await.expect("publish");
    assert_eq!(version, 2);
    let announced = next_capabilities(&mut acks).await;
    assert_eq!((announced.operations, announced.registry_version), (vec!["upper".to_owned()], 2));
    store.pin(1).await.expect("pin");
    let announced = next_capabilities(&mut acks).await;
    assert_eq!((announced.operations.len(), announced.registry_version), (2, 1));
    let listed = harness.client.clone().list_operations(ListOperationsRequest {}).await.expect("list").into_inner();
    assert_eq!((listed.registry_version, listed.pinned), (1, true));
    drop(tx);
    harness.stop().await;

    // A harness pinned by flag ignores the registry.
    let pinned = Harness::start(upper(), None, &["--redis-url", &redis.url, "--registry-pin", "0"]).await;
    let (_tx, mut acks) = pinned.call().await;
    let caps = next_ack(&mut acks).await.capabilities.expect("capabilities");
    assert_eq!((caps.operations, caps.registry_version), (vec!["upper".to_owned()], 0));
    let listed = pinned.client.clone().list_operations(ListOperationsRequest {}).await.expect("list").into_inner();
    assert_eq!((listed.registry_version, listed.pinned), (0, true));
    drop(redis);
}

#[test]
fn early_cancels_are_remembered_once_and_bounded() {
    let mut early = EarlyCancels::default();
    early.insert(7);
    assert!(early.take(7));
    assert!(!early.take(7), "a cancel applies to one arrival");
    for id in 0..(EarlyCancels::MAX as u64 + 10) {
        early.insert(id);
    }
    assert!(!early.take(0), "the oldest are forgotten past the bound");
    assert!(early.take(EarlyCancels::MAX as u64 + 9));
    assert!(early.ids.len() <= EarlyCancels::MAX && early.order.len() <= EarlyCancels::MAX);
}

#[test]
fn an_absurd_timeout_means_no_deadline_not_a_panic() {
    let token = CancellationToken::new();
    let attempt = Attempt::new(WorkItem { timeout_ms: u64::MAX, ..Default::default() });
    assert!(attempt.deadline.is_none() || attempt.deadline.is_some_and(|d| d > Instant::now()));
    let attempt = Attempt::new(WorkItem { timeout_ms: 0, ..Default::default() });
    assert!(
        attempt.deadline.is_none()
            && attempt.budget.is_none()
            && !attempt.is_over(Instant::now(), token.is_cancelled())
    );
    let attempt = Attempt::new(WorkItem { timeout_ms: 1000, ..Default::default() });
    let (Some(deadline), Some(budget)) = (attempt.deadline, attempt.budget) else { panic!("a deadline") };
    assert!(budget < deadline, "the budget leaves time to hand the attempt back");
    token.cancel();
    assert!(attempt.is_over(Instant::now(), token.is_cancelled()), "the drain deadline ends queued attempts too");
}
