//! A private Redis Cluster for one test: 3 masters with 1 replica each, six
//! `redis-server --cluster-enabled yes` processes on free 127.0.0.1 ports
//! (client and cluster-bus port both drawn), each in its own directory of
//! one temp dir with an append-only file (`appendfsync everysec`), joined by
//! `redis-cli --cluster create … --cluster-replicas 1`. A node can be killed
//! and restarted on the same port with its files (it rejoins the cluster),
//! and a replica can take over its master (`CLUSTER FAILOVER`). The node
//! timeout is 1 s, so a killed master's replica is promoted within seconds.
//! The machine's shared Redis on 6379 is never touched.
//!
//! Clients connect with [`RedisCluster::url`] (`redis+cluster://…`, every
//! node listed), as the services do.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::{
    ports::free_port,
    process::{OwnedChild, indent, open_log, tail},
};

/// Masters, and nodes in all (one replica per master).
pub const MASTERS: usize = 3;
pub const NODES: usize = 2 * MASTERS;
/// How long the cluster may take to form or to settle after a change.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Node {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    log_path: PathBuf,
    child: OwnedChild,
}

/// A running private Redis Cluster; every node is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: TempDir,
}

/// One line of `CLUSTER NODES`, as much of it as tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Index of the node in this cluster ([`RedisCluster::port`]).
    pub index: usize,
    pub id: String,
    pub master: bool,
    /// Marked failed (`fail` flag) by the node asked.
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served, for a master (`a-b` or `a`).
    pub slots: Vec<(u16, u16)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.child.kill();
        }
    }
}

impl RedisCluster {
    /// Starts six nodes and forms the cluster; returns once every node
    /// reports `cluster_state:ok` and agrees that all slots are served.
    pub async fn start() -> anyhow::Result<Self> {
        let dir =
            tempfile::Builder::new().prefix("ordo-redis-cluster-").tempdir().context("cannot create a temp dir")?;
        let mut cluster = Self { nodes: Vec::with_capacity(NODES), _dir: dir };
        for i in 0..NODES {
            let node_dir = cluster._dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir).with_context(|| format!("cannot create {}", node_dir.display()))?;
            let mut node = Node {
                port: free_port(),
                bus_port: free_port(),
                log_path: node_dir.join("redis.log"),
                dir: node_dir,
                child: OwnedChild::default(),
            };
            node.launch().await?;
            cluster.nodes.push(node);
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run redis-cli (is redis-tools installed? scripts/install-deps.sh)")?;
        if !created.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                created.status,
                indent(&String::from_utf8_lossy(&created.stdout)),
                indent(&String::from_utf8_lossy(&created.stderr))
            );
        }
        cluster.wait_settled().await?;
        Ok(cluster)
    }

    /// The OS process id of each node while it runs (for CPU and memory
    /// readings), by node index.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.nodes.iter().map(|node| node.child.pid()).collect()
    }

    /// `redis+cluster://` with every node, the URL services are given.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The client port of node `index`.
    pub fn port(&self, index: usize) -> u16 {
        self.nodes[index].port
    }

    /// `redis://` of node `index` alone (for commands to that node).
    pub fn node_url(&self, index: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[index].port)
    }

    /// The last lines of every node's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("node {i} (port {}):\n{}", n.port, indent(&tail(&n.log_path, lines))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL of node `index` (its files stay). Harmless when it is down.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].child.kill();
    }

    /// Starts node `index` again on its ports with its files: it rejoins
    /// (a master that was replaced comes back as a replica).
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].child.kill();
        self.nodes[index].launch().await
    }

    /// Whether node `index`'s process runs.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.nodes[index].child.is_running()
    }

    /// `CLUSTER NODES` as seen by the first running node.
    pub async fn nodes(&mut self) -> anyhow::Result<Vec<NodeInfo>> {
        let index = (0..NODES).find(|&i| self.is_running(i)).context("no cluster node runs")?;
        self.nodes_seen_by(index).await
    }

    /// `CLUSTER NODES` as node `seen_by` sees it (views converge by gossip,
    /// so right after a failover they may differ).
    async fn nodes_seen_by(&self, seen_by: usize) -> anyhow::Result<Vec<NodeInfo>> {
        let text: String = command(self.nodes[seen_by].port, redis::cmd("CLUSTER").arg("NODES")).await?;
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                bail!("unexpected CLUSTER NODES line {line:?}");
            }
            // ip:port@bus[,hostname]
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("no port in {line:?}"))?;
            let Some(index) = self.nodes.iter().position(|n| n.port == port) else { continue };
            let flags: Vec<&str> = fields[2].split(',').collect();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            out.push(NodeInfo {
                index,
                id: fields[0].to_owned(),
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail"),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            });
        }
        out.sort_by_key(|n| n.index);
        Ok(out)
    }

    /// The index of the master serving `slot` now.
    pub async fn master_of(&mut self, slot: u16) -> anyhow::Result<usize> {
        let nodes = self.nodes().await?;
        nodes
            .iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.index)
            .with_context(|| format!("no master serves slot {slot}: {nodes:?}"))
    }

    /// The index of a replica of master `master`.
    pub async fn replica_of(&mut self, master: usize) -> anyhow::Result<usize> {
        let nodes = self.nodes().await?;
        let id = &nodes.iter().find(|n| n.index == master).context("no such master")?.id;
        nodes
            .iter()
            .find(|n| n.master_id.as_deref() == Some(id.as_str()) && !n.failed)
            .map(|n| n.index)
            .with_context(|| format!("master {master} has no replica: {nodes:?}"))
    }

    /// `CLUSTER FAILOVER` on replica `replica`: it takes over its master's
    /// slots after catching up with it (nothing acknowledged is lost).
    /// Returns once it is a master and the cluster settled.
    pub async fn failover(&mut self, replica: usize) -> anyhow::Result<()> {
        let port = self.nodes[replica].port;
        let _: String = command(port, redis::cmd("CLUSTER").arg("FAILOVER")).await?;
        self.wait_master(replica).await
    }

    /// Waits until node `index` is a master (after a failover or a kill of
    /// its master) and the cluster settled.
    pub async fn wait_master(&mut self, index: usize) -> anyhow::Result<()> {
        let port = self.nodes[index].port;
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            let role: Result<Vec<redis::Value>, _> = command(port, &redis::cmd("ROLE")).await;
            if let Ok(role) = role
                && matches!(role.first(), Some(redis::Value::BulkString(r)) if r.as_slice() == b"master")
            {
                return self.wait_settled().await;
            }
            if Instant::now() > deadline {
                bail!("node {index} did not become a master within {SETTLE_DEADLINE:?}\n{}", self.log_tails(15));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node reports `cluster_state:ok` and all
    /// 16384 slots served by masters that are not failed.
    pub async fn wait_settled(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            if self.settled().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not settle within {SETTLE_DEADLINE:?}\n{}", self.log_tails(15));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn settled(&mut self) -> bool {
        // Every running node is ok and sees the same roles and slots: a node
        // whose view still has the old master would name it (CI flake: the
        // old master of a failed-over slot was taken for the master of
        // another one).
        let mut nodes: Option<Vec<NodeInfo>> = None;
        for i in 0..NODES {
            if !self.is_running(i) {
                continue;
            }
            let info: Result<String, _> = command(self.nodes[i].port, redis::cmd("CLUSTER").arg("INFO")).await;
            if !info.is_ok_and(|info| info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                return false;
            }
            let Ok(view) = self.nodes_seen_by(i).await else { return false };
            match &nodes {
                Some(first) if *first != view => return false,
                Some(_) => {}
                None => nodes = Some(view),
            }
        }
        let Some(nodes) = nodes else { return false };
        let served: u32 = nodes
            .iter()
            .filter(|n| n.master && !n.failed)
            .flat_map(|n| n.slots.iter())
            .map(|&(a, b)| u32::from(b - a) + 1)
            .sum();
        served == 16384
    }
}

impl Node {
    async fn launch(&mut self) -> anyhow::Result<()> {
        let program = std::env::var("ORDO_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let (stdout, stderr) = open_log(&self.log_path, &format!("{program} --port {port} (cluster)"))?;
        let child = Command::new(&program)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            .args(["--cluster-port", &self.bus_port.to_string(), "--cluster-node-timeout", "1000"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {program}: is redis-server installed (scripts/install-deps.sh)?"))?;
        self.child.set(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.exited("waiting for a cluster redis-server")? {
                bail!(
                    "cluster redis-server on port {port} exited with {status}; last log lines:\n{}",
                    indent(&tail(&self.log_path, 20))
                );
            }
            if command::<String>(self.port, &redis::cmd("PING")).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > SETTLE_DEADLINE {
                self.child.kill();
                bail!("cluster redis-server on port {port} did not answer PING within {SETTLE_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One command to the node on `port` alone, within a second.
async fn command<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}").as_str())?;
    let exchange = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<T>(&mut conn).await
    };
    Ok(tokio::time::timeout(Duration::from_secs(1), exchange).await.context("no answer within 1 s")??)
}
