//! A private `nats-server` with JetStream for one test: `-js -sd <temp dir>
//! -p <free port>` on 127.0.0.1, plus a monitoring port whose `/healthz`
//! says when JetStream is ready. It can be killed (SIGKILL) and restarted on
//! the same ports with the same store directory, so streams, consumers and
//! their acks survive a restart as they would in production (JetStream
//! writes its file store before it acknowledges a publish). The machine's
//! shared NATS on 4222 is never touched.
//!
//! The binary is `$ORDO_NATS_SERVER`, else `nats-server` on `PATH`, else
//! `/usr/sbin/nats-server` (Debian's package; `scripts/install-deps.sh`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

use crate::{
    ports::free_port,
    process::{OwnedChild, indent, open_log, send_signal, tail},
};

/// How long a start may take before it counts as failed (JetStream recovers
/// its store before `/healthz` answers ok).
const START_DEADLINE: Duration = Duration::from_secs(20);

/// The shared NATS of the machine: never ours.
const SHARED_NATS: u16 = 4222;

/// A running (or killed) private nats-server with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    monitor_port: u16,
    /// The working directory when the server owns it ([`NatsServer::start`]).
    _own_dir: Option<TempDir>,
    /// The JetStream store directory (`<dir>/jetstream`), kept across restarts.
    store_dir: PathBuf,
    log_path: PathBuf,
    child: OwnedChild,
}

impl NatsServer {
    /// Starts a server whose store and log live in a fresh temporary directory.
    pub async fn start() -> anyhow::Result<Self> {
        let own = tempfile::Builder::new().prefix("ordo-nats-").tempdir().context("cannot create a temp dir")?;
        let dir = own.path().to_path_buf();
        let mut server = Self::start_in(&dir).await?;
        server._own_dir = Some(own);
        Ok(server)
    }

    /// Starts a server whose store (`<dir>/nats-store`) and log
    /// (`<dir>/nats.log`) are in `dir` (a cluster's log directory, say).
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            let mut server = Self {
                port: free_nats_port(),
                monitor_port: free_nats_port(),
                _own_dir: None,
                store_dir: dir.join("nats-store"),
                log_path: dir.join("nats.log"),
                child: OwnedChild::default(),
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The OS process id while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGSTOP: the server freezes with its connections open until [`NatsServer::resume`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        send_signal(self.pid().context("nats-server is not running")?, "STOP")
    }

    /// SIGCONT after [`NatsServer::freeze`].
    pub fn resume(&self) -> anyhow::Result<()> {
        send_signal(self.pid().context("nats-server is not running")?, "CONT")
    }

    /// SIGKILL. Harmless when it is not running.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Kills it (if running) and starts it again on the same ports with the
    /// same store directory; returns once JetStream is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    /// The last `lines` lines of the server's log (all its runs).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let program = nats_server_binary();
        std::fs::create_dir_all(&self.store_dir)
            .with_context(|| format!("cannot create {}", self.store_dir.display()))?;
        let port = self.port.to_string();
        let monitor = self.monitor_port.to_string();
        let (stdout, stderr) = open_log(&self.log_path, &format!("{} -js -p {port}", program.display()))?;
        let child = Command::new(&program)
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-m", &monitor, "-sd"])
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!("cannot start {}: is nats-server installed (scripts/install-deps.sh)?", program.display())
            })?;
        self.child.set(child);

        let start = Instant::now();
        loop {
            if let Some(status) = self.child.exited("waiting for nats-server")? {
                bail!(
                    "nats-server on port {port} exited with {status}; last log lines:\n{}",
                    indent(&tail(&self.log_path, 20))
                );
            }
            if healthz(self.monitor_port).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_DEADLINE {
                self.kill();
                bail!(
                    "nats-server on port {port} was not healthy within {START_DEADLINE:?}; last log lines:\n{}",
                    indent(&tail(&self.log_path, 20))
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `$ORDO_NATS_SERVER`, else `nats-server` on `PATH`, else Debian's path.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ORDO_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

/// A free port that is not the shared NATS's.
fn free_nats_port() -> u16 {
    loop {
        let port = free_port();
        if port != SHARED_NATS {
            return port;
        }
    }
}

/// `GET /healthz` on the monitoring port answers 200 (the server is up and
/// JetStream has recovered its store).
async fn healthz(port: u16) -> anyhow::Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(1), exchange).await.context("/healthz timed out")??;
    if reply.starts_with(b"HTTP/1.0 200") || reply.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        bail!("/healthz: {}", String::from_utf8_lossy(&reply[..reply.len().min(200)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_kills_and_restarts_on_the_same_port_with_its_store() {
        let mut nats = NatsServer::start().await.expect("nats-server starts");
        assert_ne!(nats.port(), SHARED_NATS);
        let port = nats.port();
        {
            let client = async_nats::connect(nats.url()).await.expect("connect");
            let js = async_nats::jetstream::new(client);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "KEEP".into(),
                subjects: vec!["keep.>".into()],
                ..Default::default()
            })
            .await
            .expect("create stream");
            js.publish("keep.a", "one".into()).await.expect("publish").await.expect("puback");
        }
        nats.kill();
        assert!(healthz(nats.monitor_port).await.is_err(), "a killed server must not answer");
        nats.restart().await.expect("restart");
        assert_eq!(nats.port(), port);
        let client = async_nats::connect(nats.url()).await.expect("connect after restart");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("KEEP").await.expect("the stream survived the restart");
        assert_eq!(stream.info().await.expect("info").state.messages, 1, "its message too");
    }
}
