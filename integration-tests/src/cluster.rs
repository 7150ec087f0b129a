//! The whole Ordo topology for one test: a private redis-server (or, with
//! [`ClusterBuilder::redis_cluster`], a private Redis Cluster), `stateless`,
//! N `reassembler`s, `push-gateway`, M `stateful-worker`s and one or more
//! `harmonizer`s (sharing everything behind them), each on its own 127.0.0.1
//! port, started in dependency order and each waited for until
//! `grpc.health.v1` says SERVING.
//!
//! All logs go to one temporary directory (printed at start). When a test
//! fails (the cluster is dropped while panicking), or when `TEST_LOG` is set,
//! the last lines of every log are printed; on failure the directory is kept.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use futures::future::{join_all, try_join_all};
use ordo_proto::v1::{
    ListOperationsRequest, ListOperationsResponse, harmonizer_client::HarmonizerClient,
    push_gateway_client::PushGatewayClient, reassembler_client::ReassemblerClient,
};
use ordo_registry::Store;
use tempfile::TempDir;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{
    eventually::eventually,
    ports::free_port,
    process::{ServiceProcess, ServiceSpec, binary, indent},
    redis_cluster::RedisCluster,
    redis_server::{RedisServer, RedisTlsFiles},
    tls::TestPki,
};

/// Default time each service gets to report SERVING.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a registry change may take to show in `ListOperations` (services
/// poll every 250 ms; workers announce new capabilities on the next poll).
pub const REGISTRY_DEADLINE: Duration = Duration::from_secs(15);
/// How long connecting to the private Redis may take.
const REDIS_CONNECT: Duration = Duration::from_secs(5);
/// Lines of each log printed on failure or with `TEST_LOG`.
const LOG_LINES: usize = 40;
/// How long [`Cluster::dead_letters`] asks a page again while it is answered UNAVAILABLE.
pub const UNAVAILABLE_RETRY: Duration = Duration::from_secs(15);

/// One worker of a heterogeneous pool: its binary (in the bin directory) and
/// its own flags, on top of the testkit's (`--listen`, `--reassemblers`,
/// `--redis-url`, `--name`) and [`ClusterBuilder::worker_args`].
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    binary: String,
    args: Vec<String>,
    /// Whether it takes `--stateless` (the demo callback operation needs it).
    stateless: bool,
}

impl WorkerSpec {
    /// The `stateful-worker` binary (the demo operations).
    pub fn stateful_worker() -> Self {
        Self { binary: "stateful-worker".into(), args: Vec::new(), stateless: true }
    }

    /// Another binary built on `ordo-worker` (e.g. `rust-worker`, from
    /// `examples/rust-worker`): it gets the worker flags every `ordo-worker`
    /// binary has, but no `--stateless`.
    pub fn binary(name: impl Into<String>) -> Self {
        Self { binary: name.into(), args: Vec::new(), stateless: false }
    }

    /// Extra flags of this worker, e.g. `["--operations", "async-echo"]`.
    pub fn args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.args.extend(strings(args));
        self
    }
}

/// Configures a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    workers: usize,
    harmonizers: usize,
    extra_workers: Vec<WorkerSpec>,
    reassemblers: usize,
    harmonizer_args: Vec<String>,
    worker_args: Vec<String>,
    reassembler_args: Vec<String>,
    push_gateway_args: Vec<String>,
    stateless_args: Vec<String>,
    env: Vec<(String, String)>,
    startup_deadline: Duration,
    durable_redis: bool,
    /// The test client's TLS when the services run with TLS ([`ClusterBuilder::tls`]).
    tls: Option<ClientTlsConfig>,
    redis_tls: Option<RedisTlsFiles>,
    /// The Redis ACL user every service connects as ([`ClusterBuilder::redis_user`]).
    redis_user: Option<crate::redis_acl::AclUser>,
    /// A private Redis Cluster instead of one redis-server ([`ClusterBuilder::redis_cluster`]).
    redis_cluster: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            workers: 1,
            harmonizers: 1,
            extra_workers: Vec::new(),
            reassemblers: 1,
            harmonizer_args: Vec::new(),
            worker_args: Vec::new(),
            reassembler_args: Vec::new(),
            push_gateway_args: Vec::new(),
            stateless_args: Vec::new(),
            env: Vec::new(),
            startup_deadline: STARTUP_DEADLINE,
            durable_redis: false,
            tls: None,
            redis_tls: None,
            redis_user: None,
            redis_cluster: false,
        }
    }
}

fn strings<I>(args: I) -> Vec<String>
where
    I: IntoIterator,
    I::Item: Into<String>,
{
    args.into_iter().map(Into::into).collect()
}

impl ClusterBuilder {
    /// Every service on a private Redis Cluster (`redis_cluster`: 3 masters
    /// with 1 replica each, node timeout 1 s) through its `redis+cluster://`
    /// URL, instead of one redis-server; [`Cluster::redis_cluster`] kills,
    /// restarts and fails over its nodes. Not with [`Self::durable_redis`],
    /// [`Self::redis_tls`] or [`Self::redis_user`] (starting fails).
    pub fn redis_cluster(mut self) -> Self {
        self.redis_cluster = true;
        self
    }

    /// A Redis Cluster on which every release script call waits for one
    /// replica (`--redis-wait-replicas 1`, 500 ms): a killed master then loses
    /// nothing the reassembler acknowledged. Set in the environment of every
    /// service, so that one storing its results itself (`--store-results
    /// redis`) waits too. For the failover tests.
    pub fn redis_cluster_waiting_for_a_replica(self) -> Self {
        self.redis_cluster().env("REASSEMBLER_REDIS_WAIT_REPLICAS", "1").env("REASSEMBLER_REDIS_WAIT_TIMEOUT", "500ms")
    }

    /// A redis-server that survives SIGKILL (append-only file, fsync always).
    pub fn durable_redis(mut self) -> Self {
        self.durable_redis = true;
        self
    }

    /// Every service connects to Redis as `user` (created before they start;
    /// the `default` user is then off, so [`Cluster::redis_url`] no longer works).
    pub fn redis_user(mut self, user: crate::redis_acl::AclUser) -> Self {
        self.redis_user = Some(user);
        self
    }

    /// Every service with TLS from `pki` on every server and channel (and
    /// SSE over https); `mtls` also makes every gRPC server require client
    /// certificates. The cluster's own clients trust the CA and present
    /// the test client's certificate.
    pub fn tls(mut self, pki: &TestPki, mtls: bool) -> Self {
        self.env.extend(pki.service_env(mtls));
        self.tls = Some(pki.client_tls());
        self
    }

    /// A redis-server that also listens for TLS; the services get its
    /// `rediss://` URL and trust `pki`'s CA through `ORDO_REDIS_CA`.
    pub fn redis_tls(mut self, pki: &TestPki) -> Self {
        self.redis_tls = Some(RedisTlsFiles {
            cert: pki.path("service.pem"),
            key: pki.path("service-key.pem"),
            ca: pki.path("ca.pem"),
        });
        self.env.push(("ORDO_REDIS_CA".to_owned(), pki.path("ca.pem").display().to_string()));
        self
    }

    /// Number of plain `stateful-worker`s (default 1), named `worker-<i>`.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Adds a worker with a binary and flags of its own, after the plain
    /// ones (`.workers(0).worker(a).worker(b)` for a pool of just those),
    /// named `<binary>-<i>` (`i` its index among all workers).
    pub fn worker(mut self, spec: WorkerSpec) -> Self {
        self.extra_workers.push(spec);
        self
    }

    /// Number of harmonizers (default 1), each with the same flags, sharing
    /// the workers, stateless, reassemblers, push-gateway and Redis: the
    /// front doors a client-side balancer spreads calls over. The first is
    /// named `harmonizer` ([`Cluster::harmonizer`]), the others
    /// `harmonizer-<i>` ([`Cluster::harmonizer_at`]).
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn harmonizers(mut self, n: usize) -> Self {
        assert!(n >= 1, "a cluster needs at least one harmonizer");
        self.harmonizers = n;
        self
    }

    /// Number of reassembler replicas (default 1).
    pub fn reassemblers(mut self, n: usize) -> Self {
        self.reassemblers = n;
        self
    }

    /// Extra harmonizer flags, e.g. `["--window", "16"]`.
    pub fn harmonizer_args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.harmonizer_args.extend(strings(args));
        self
    }

    /// Extra flags for every worker.
    pub fn worker_args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.worker_args.extend(strings(args));
        self
    }

    /// Extra flags for every reassembler.
    pub fn reassembler_args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.reassembler_args.extend(strings(args));
        self
    }

    /// Extra push-gateway flags.
    pub fn push_gateway_args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.push_gateway_args.extend(strings(args));
        self
    }

    /// Extra stateless flags.
    pub fn stateless_args<I: IntoIterator<Item: Into<String>>>(mut self, args: I) -> Self {
        self.stateless_args.extend(strings(args));
        self
    }

    /// An environment variable for every service (not redis).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long each service may take to report SERVING.
    pub fn startup_deadline(mut self, deadline: Duration) -> Self {
        self.startup_deadline = deadline;
        self
    }

    /// Starts everything.
    ///
    /// # Panics
    /// When a binary is missing or a service does not come up (with its log).
    pub async fn start(self) -> Cluster {
        match self.try_start().await {
            Ok(cluster) => cluster,
            Err(error) => panic!("cluster did not start: {error:#}"),
        }
    }

    /// Starts everything; on error the log directory is kept and named.
    pub async fn try_start(self) -> anyhow::Result<Cluster> {
        let mut logs = tempfile::Builder::new().prefix("ordo-it-").tempdir().context("cannot create the log dir")?;
        eprintln!("ordo testkit: service logs in {}", logs.path().display());
        match self.start_in(logs.path()).await {
            Ok(parts) => Ok(Cluster::assemble(parts, logs)),
            Err(error) => {
                logs.disable_cleanup(true);
                Err(error.context(format!("logs kept in {}", logs.path().display())))
            }
        }
    }

    async fn start_in(self, dir: &Path) -> anyhow::Result<Parts> {
        // Resolve every binary first: a missing one panics with how to build it.
        let bins = Bins {
            harmonizer: binary("harmonizer"),
            stateless: binary("stateless"),
            reassembler: binary("reassembler"),
            push_gateway: binary("push-gateway"),
        };
        let worker_specs: Vec<(String, std::path::PathBuf, WorkerSpec)> =
            std::iter::repeat_n(WorkerSpec::stateful_worker(), self.workers)
                .map(|spec| (false, spec))
                .chain(self.extra_workers.iter().cloned().map(|spec| (true, spec)))
                .enumerate()
                .map(|(i, (extra, spec))| {
                    let name = if extra { format!("{}-{i}", spec.binary) } else { format!("worker-{i}") };
                    (name, binary(&spec.binary), spec)
                })
                .collect();
        let deadline = self.startup_deadline;
        let spec = |name: String, binary: &std::path::Path, args: Vec<String>| ServiceSpec {
            name,
            binary: binary.to_path_buf(),
            args,
            env: self.env.clone(),
        };

        let (redis, redis_url) = if self.redis_cluster {
            if self.durable_redis || self.redis_tls.is_some() || self.redis_user.is_some() {
                anyhow::bail!("redis_cluster() does not combine with durable_redis(), redis_tls() or redis_user()");
            }
            let cluster = RedisCluster::start().await.context("the private Redis Cluster")?;
            let url = cluster.url();
            (Redis::Cluster(cluster), url)
        } else {
            let redis = RedisServer::start_with_tls(dir, self.durable_redis, self.redis_tls.clone())
                .await
                .context("redis-server")?;
            let mut redis_url = redis.tls_url().unwrap_or_else(|| redis.url());
            if let Some(user) = &self.redis_user {
                redis_url = user.apply(&redis_url).await.context("the Redis ACL user")?;
            }
            (Redis::Single(redis), redis_url)
        };

        let stateless = ServiceProcess::start(
            spec("stateless".into(), &bins.stateless, self.stateless_args.clone()),
            dir,
            deadline,
        );
        let reassemblers = try_join_all((0..self.reassemblers).map(|i| {
            let mut args = strings(["--redis-url", &redis_url]);
            args.extend(self.reassembler_args.iter().cloned());
            ServiceProcess::start(spec(format!("reassembler-{i}"), &bins.reassembler, args), dir, deadline)
        }));
        let mut pg_args = strings(["--redis-url", &redis_url]);
        // Server-Sent Events on a port of its own unless the test chose one
        // (the default 50056 would clash between concurrent clusters).
        let sse_port = if self.push_gateway_args.iter().any(|a| a.starts_with("--sse-listen")) {
            None
        } else {
            let port = free_port();
            pg_args.extend(strings(["--sse-listen".to_owned(), format!("127.0.0.1:{port}")]));
            Some(port)
        };
        pg_args.extend(self.push_gateway_args.iter().cloned());
        let push_gateway =
            ServiceProcess::start(spec("push-gateway".into(), &bins.push_gateway, pg_args), dir, deadline);
        let (stateless, reassemblers, push_gateway) = tokio::join!(stateless, reassemblers, push_gateway);
        let (stateless, reassemblers, push_gateway) = (stateless?, reassemblers?, push_gateway?);
        let reassembler_list = reassemblers.iter().map(ServiceProcess::addr).collect::<Vec<_>>().join(",");

        // Every worker follows the registry in the private Redis (never the
        // machine's shared one) and announces its process name.
        let workers = try_join_all(worker_specs.iter().map(|(name, path, worker)| {
            let mut args = strings(["--reassemblers", &reassembler_list, "--redis-url", &redis_url, "--name", name]);
            if worker.stateless {
                args.extend(strings(["--stateless".to_owned(), stateless.addr()]));
            }
            args.extend(self.worker_args.iter().cloned());
            args.extend(worker.args.iter().cloned());
            ServiceProcess::start(spec(name.clone(), path, args), dir, deadline)
        }))
        .await?;
        let worker_list = workers.iter().map(ServiceProcess::addr).collect::<Vec<_>>().join(",");

        let mut args = strings([
            "--stateless",
            &stateless.addr(),
            "--workers",
            &worker_list,
            "--reassemblers",
            &reassembler_list,
            "--push-gateway",
            &push_gateway.addr(),
            "--redis-url",
            &redis_url,
        ]);
        args.extend(self.harmonizer_args.iter().cloned());
        let harmonizers = try_join_all((0..self.harmonizers).map(|i| {
            let name = if i == 0 { "harmonizer".to_owned() } else { format!("harmonizer-{i}") };
            ServiceProcess::start(spec(name, &bins.harmonizer, args.clone()), dir, deadline)
        }))
        .await?;

        Ok(Parts {
            redis,
            redis_url,
            stateless,
            reassemblers,
            push_gateway,
            workers,
            harmonizers,
            sse_port,
            tls: self.tls,
        })
    }
}

/// The private Redis of a [`Cluster`]: one node, or a Redis Cluster.
#[derive(Debug)]
enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

struct Bins {
    harmonizer: std::path::PathBuf,
    stateless: std::path::PathBuf,
    reassembler: std::path::PathBuf,
    push_gateway: std::path::PathBuf,
}

struct Parts {
    redis: Redis,
    /// The URL the services were given.
    redis_url: String,
    stateless: ServiceProcess,
    reassemblers: Vec<ServiceProcess>,
    push_gateway: ServiceProcess,
    workers: Vec<ServiceProcess>,
    harmonizers: Vec<ServiceProcess>,
    sse_port: Option<u16>,
    tls: Option<ClientTlsConfig>,
}

/// A running Ordo topology. Dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    /// At least one; the first is [`Cluster::harmonizer`].
    harmonizers: Vec<ServiceProcess>,
    workers: Vec<ServiceProcess>,
    push_gateway: ServiceProcess,
    reassemblers: Vec<ServiceProcess>,
    stateless: ServiceProcess,
    redis: Redis,
    redis_url: String,
    harmonizer_channels: Vec<Channel>,
    push_gateway_channel: Channel,
    reassembler_channels: Vec<Channel>,
    sse_port: Option<u16>,
    tls: Option<ClientTlsConfig>,
    logs: TempDir,
}

/// A lazily connecting channel: it reconnects by itself after a restart.
fn lazy_channel(uri: String) -> Channel {
    Endpoint::from_shared(uri).expect("a testkit URI is valid").connect_timeout(Duration::from_secs(2)).connect_lazy()
}

/// [`lazy_channel`] to `127.0.0.1:<port>`, over TLS when `tls` is given.
fn service_channel(process: &ServiceProcess, tls: Option<&ClientTlsConfig>) -> Channel {
    match tls {
        None => lazy_channel(process.uri()),
        Some(tls) => Endpoint::from_shared(format!("https://{}", process.addr()))
            .and_then(|e| e.tls_config(tls.clone()))
            .expect("a testkit URI and TLS config are valid")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy(),
    }
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// One worker, one reassembler, default flags.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    fn assemble(parts: Parts, logs: TempDir) -> Self {
        Self {
            harmonizer_channels: parts.harmonizers.iter().map(|h| service_channel(h, parts.tls.as_ref())).collect(),
            push_gateway_channel: service_channel(&parts.push_gateway, parts.tls.as_ref()),
            reassembler_channels: parts.reassemblers.iter().map(|r| service_channel(r, parts.tls.as_ref())).collect(),
            tls: parts.tls,
            harmonizers: parts.harmonizers,
            workers: parts.workers,
            push_gateway: parts.push_gateway,
            reassemblers: parts.reassemblers,
            stateless: parts.stateless,
            redis: parts.redis,
            redis_url: parts.redis_url,
            sse_port: parts.sse_port,
            logs,
        }
    }

    /// A client of the (first) harmonizer, the front door.
    pub fn harmonizer(&self) -> HarmonizerClient<Channel> {
        self.harmonizer_at(0)
    }

    /// A client of harmonizer `i` (0 is [`Cluster::harmonizer`]); its channel
    /// reconnects by itself after the harmonizer restarts.
    ///
    /// # Panics
    /// When the cluster has no harmonizer `i` ([`ClusterBuilder::harmonizers`]).
    pub fn harmonizer_at(&self, i: usize) -> HarmonizerClient<Channel> {
        HarmonizerClient::new(self.harmonizer_channels[i].clone())
    }

    /// How many harmonizers the cluster runs.
    pub fn harmonizer_count(&self) -> usize {
        self.harmonizers.len()
    }

    /// A client of the push-gateway.
    pub fn push_gateway(&self) -> PushGatewayClient<Channel> {
        PushGatewayClient::new(self.push_gateway_channel.clone())
    }

    /// `http://127.0.0.1:<port>` of the push-gateway's Server-Sent Events
    /// (`https://` when the cluster runs with TLS).
    ///
    /// # Panics
    /// When the test set `--sse-listen` itself.
    pub fn sse_url(&self) -> String {
        let port = self.sse_port.expect("the testkit chose no SSE port: the test passed --sse-listen itself");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// Scrapes the Prometheus endpoint of the service process named `name`
    /// (`harmonizer`, `stateless`, `push-gateway`, `worker-<i>`,
    /// `reassembler-<i>`, as [`Cluster::log_tails`] names them).
    pub async fn scrape(&self, name: &str) -> anyhow::Result<crate::metrics::Metrics> {
        let process = self
            .processes()
            .find(|p| p.name() == name)
            .with_context(|| format!("no service process named {name:?}"))?;
        let url = process.metrics_url().with_context(|| format!("{name} was given --metrics-listen by the test"))?;
        crate::metrics::scrape(&url).await.with_context(|| format!("scraping {name}"))
    }

    /// A client of reassembler replica `i`.
    pub fn reassembler(&self, i: usize) -> ReassemblerClient<Channel> {
        ReassemblerClient::new(self.reassembler_channels[i].clone())
    }

    /// Every dead letter of `stream` (oldest first), following `next` to the
    /// end. A page answered UNAVAILABLE (Redis still recovering from a fault
    /// the test injected) is asked again, as the contract says, for up to
    /// [`UNAVAILABLE_RETRY`]; any other error is returned.
    pub async fn dead_letters(&self, stream: &str) -> anyhow::Result<Vec<ordo_proto::v1::DeadLetter>> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let request = ordo_proto::v1::ListDeadLettersRequest { stream_id: stream.to_owned(), after, limit: 0 };
            let started = std::time::Instant::now();
            let page = loop {
                match self.reassembler(0).list_dead_letters(request.clone()).await {
                    Err(status)
                        if status.code() == tonic::Code::Unavailable && started.elapsed() < UNAVAILABLE_RETRY =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    answer => break answer?.into_inner(),
                }
            };
            all.extend(page.dead_letters);
            if page.next.is_empty() {
                return Ok(all);
            }
            after = page.next;
        }
    }

    /// The private Redis as the test reaches it: `redis://127.0.0.1:<port>`
    /// of the redis-server (with neither TLS nor the ACL user), or the
    /// `redis+cluster://` URL of the Redis Cluster the services were given.
    pub fn redis_url(&self) -> String {
        match &self.redis {
            Redis::Single(redis) => redis.url(),
            Redis::Cluster(_) => self.redis_url.clone(),
        }
    }

    /// Whether the services run on a Redis Cluster ([`ClusterBuilder::redis_cluster`]).
    pub fn on_redis_cluster(&self) -> bool {
        matches!(self.redis, Redis::Cluster(_))
    }

    /// A connection to the private Redis, one node or the cluster (as the
    /// services connect: [`ordo_runtime::redis_conn::connect`]).
    pub fn redis_conn(&self) -> anyhow::Result<ordo_runtime::redis_conn::RedisConn> {
        ordo_runtime::redis_conn::connect(&self.redis_url())
    }

    /// The operation registry in the cluster's Redis (publish, pin, unpin,
    /// rollback, as `ordo registry` does), which every service follows.
    pub async fn registry(&self) -> anyhow::Result<Store> {
        let conn = self.redis_conn().context("the testkit's redis URL")?;
        tokio::time::timeout(REDIS_CONNECT, ordo_runtime::redis_conn::ping(&conn, REDIS_CONNECT))
            .await
            .context("connecting to the cluster's redis timed out")?
            .map_err(|e| anyhow::anyhow!("connecting to the cluster's redis: {e}"))?;
        Ok(Store::new(conn))
    }

    /// The harmonizer's `ListOperations`: its catalog, the registry version
    /// in use, and which workers serve each operation.
    pub async fn list_operations(&self) -> anyhow::Result<ListOperationsResponse> {
        Ok(self.harmonizer().list_operations(ListOperationsRequest {}).await?.into_inner())
    }

    /// Waits until the harmonizer's `ListOperations` reports registry
    /// `version` (a service picks a change up within a second) and returns it.
    ///
    /// # Panics
    /// After [`REGISTRY_DEADLINE`], with what it reported last.
    pub async fn wait_for_registry_version(&self, version: u64) -> ListOperationsResponse {
        eventually(REGISTRY_DEADLINE, || async {
            let listed = self.list_operations().await?;
            if listed.registry_version == version {
                Ok(listed)
            } else {
                Err(anyhow::anyhow!(
                    "the harmonizer uses registry version {} (pinned: {}), not {version}",
                    listed.registry_version,
                    listed.pinned
                ))
            }
        })
        .await
    }

    /// Waits until the harmonizer's `ListOperations` shows `operation`
    /// served by exactly `workers` (worker names, as [`Cluster::worker_name`]),
    /// and returns the listing.
    ///
    /// # Panics
    /// After [`REGISTRY_DEADLINE`], with what it reported last.
    pub async fn wait_for_workers(&self, operation: &str, workers: &[&str]) -> ListOperationsResponse {
        let mut wanted: Vec<String> = workers.iter().map(|w| (*w).to_owned()).collect();
        wanted.sort();
        eventually(REGISTRY_DEADLINE, || async {
            let listed = self.list_operations().await?;
            let Some(info) = listed.operations.iter().find(|op| op.name == operation) else {
                anyhow::bail!(
                    "registry version {} has no operation {operation:?}: {:?}",
                    listed.registry_version,
                    listed.operations.iter().map(|op| &op.name).collect::<Vec<_>>()
                );
            };
            let mut serving = info.workers.clone();
            serving.sort();
            if serving == wanted {
                Ok(listed)
            } else {
                Err(anyhow::anyhow!(
                    "{operation:?} is served by {serving:?}, not {wanted:?} (registry version {})",
                    listed.registry_version
                ))
            }
        })
        .await
    }

    /// The name worker `i` announces (its `--name`, the testkit's process name).
    pub fn worker_name(&self, i: usize) -> String {
        self.workers[i].name().to_owned()
    }

    /// `127.0.0.1:<port>` of the (first) harmonizer.
    pub fn harmonizer_addr(&self) -> String {
        self.harmonizer_addr_at(0)
    }

    /// `127.0.0.1:<port>` of harmonizer `i`.
    pub fn harmonizer_addr_at(&self, i: usize) -> String {
        self.harmonizers[i].addr()
    }

    /// The (first) harmonizer's process.
    pub fn harmonizer_process(&mut self) -> &mut ServiceProcess {
        self.harmonizer_process_at(0)
    }

    /// Harmonizer `i`'s process (kill, SIGTERM, restart on its port).
    pub fn harmonizer_process_at(&mut self, i: usize) -> &mut ServiceProcess {
        &mut self.harmonizers[i]
    }

    pub fn worker_process(&mut self, i: usize) -> &mut ServiceProcess {
        &mut self.workers[i]
    }

    pub fn reassembler_process(&mut self, i: usize) -> &mut ServiceProcess {
        &mut self.reassemblers[i]
    }

    pub fn push_gateway_process(&mut self) -> &mut ServiceProcess {
        &mut self.push_gateway
    }

    pub fn stateless_process(&mut self) -> &mut ServiceProcess {
        &mut self.stateless
    }

    /// The private redis-server (kill, restart, freeze).
    ///
    /// # Panics
    /// When the services run on a Redis Cluster ([`Cluster::redis_cluster`]).
    pub fn redis(&mut self) -> &mut RedisServer {
        match &mut self.redis {
            Redis::Single(redis) => redis,
            Redis::Cluster(_) => panic!("this cluster runs on a Redis Cluster: use Cluster::redis_cluster"),
        }
    }

    /// The private Redis Cluster (kill, restart, fail over its nodes), when
    /// started with [`ClusterBuilder::redis_cluster`].
    ///
    /// # Panics
    /// When the services run on one redis-server ([`Cluster::redis`]).
    pub fn redis_cluster(&mut self) -> &mut RedisCluster {
        match &mut self.redis {
            Redis::Cluster(cluster) => cluster,
            Redis::Single(_) => panic!("this cluster runs on one redis-server: use Cluster::redis"),
        }
    }

    /// Where every process logs (`<name>.log`, `redis.log`).
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Every service process, front to back.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut ServiceProcess> {
        self.harmonizers
            .iter_mut()
            .chain(self.workers.iter_mut())
            .chain(std::iter::once(&mut self.push_gateway))
            .chain(self.reassemblers.iter_mut())
            .chain(std::iter::once(&mut self.stateless))
    }

    /// `(name, pid)` of every service process, front to back, then
    /// `("redis", pid)`; the pid is `None` for a process that is not running.
    /// Benchmarks read CPU time and peak memory from `/proc/<pid>`.
    pub fn pids(&self) -> Vec<(String, Option<u32>)> {
        self.processes()
            .map(|p| (p.name().to_owned(), p.pid()))
            .chain(match &self.redis {
                Redis::Single(redis) => vec![("redis".to_owned(), redis.pid())],
                // Every node, masters and replicas: `redis-0` … `redis-5`.
                Redis::Cluster(cluster) => {
                    cluster.pids().into_iter().enumerate().map(|(index, pid)| (format!("redis-{index}"), pid)).collect()
                }
            })
            .collect()
    }

    fn processes(&self) -> impl Iterator<Item = &ServiceProcess> {
        self.harmonizers
            .iter()
            .chain(self.workers.iter())
            .chain(std::iter::once(&self.push_gateway))
            .chain(self.reassemblers.iter())
            .chain(std::iter::once(&self.stateless))
    }

    /// SIGTERM to every service at once; waits for all of them to exit
    /// (each drains and flushes its spans). Returns `(name, exit status)`.
    pub async fn terminate_all(
        &mut self,
        timeout: Duration,
    ) -> Vec<(String, anyhow::Result<std::process::ExitStatus>)> {
        join_all(self.processes_mut().map(|p| async move {
            let status = p.terminate(timeout).await;
            (p.name().to_owned(), status)
        }))
        .await
    }

    /// The last `lines` lines of every log, each under a header.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for process in self.processes() {
            out.push_str(&format!("---- {} ({}) ----\n", process.name(), process.log_path().display()));
            out.push_str(&indent(&process.log_tail(lines)));
            out.push('\n');
        }
        if let Redis::Cluster(cluster) = &self.redis {
            out.push_str("---- redis cluster ----\n");
            out.push_str(&indent(&cluster.log_tails(lines)));
            out.push('\n');
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for process in self.processes_mut() {
            process.kill();
        }
        match &mut self.redis {
            Redis::Single(redis) => redis.kill(),
            // Its nodes are killed when it drops, after this.
            Redis::Cluster(_) => {}
        }
        let failing = std::thread::panicking();
        let wanted = std::env::var("TEST_LOG").is_ok_and(|v| !v.is_empty() && v != "0");
        if failing || wanted {
            eprintln!("ordo testkit: last {LOG_LINES} log lines of each service:\n{}", self.log_tails(LOG_LINES));
        }
        if failing {
            self.logs.disable_cleanup(true);
            eprintln!("ordo testkit: the test failed; full logs kept in {}", self.logs.path().display());
        }
    }
}

/// The JetStream source (`ordo-source`) next to a cluster.
impl Cluster {
    /// Starts `ordo-source` named `name` (process and log `name`) against
    /// this cluster's harmonizer and Redis and the NATS at `nats_url`, with
    /// `args` (e.g. `--stream`), and waits until it serves health. The
    /// handle is the caller's (kill, restart on the same port).
    pub async fn start_source<I: IntoIterator<Item: Into<String>>>(
        &self,
        name: &str,
        nats_url: &str,
        args: I,
    ) -> anyhow::Result<ServiceProcess> {
        let mut all = vec![
            "--name".to_owned(),
            name.to_owned(),
            "--nats-url".to_owned(),
            nats_url.to_owned(),
            "--harmonizer".to_owned(),
            self.harmonizer_addr(),
            "--redis-url".to_owned(),
            self.redis_url(),
        ];
        all.extend(args.into_iter().map(Into::into));
        let spec = ServiceSpec { name: name.to_owned(), binary: binary("ordo-source"), args: all, env: Vec::new() };
        ServiceProcess::start(spec, self.log_dir(), Duration::from_secs(20)).await
    }
}
