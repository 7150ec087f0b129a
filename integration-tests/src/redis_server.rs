//! A private `redis-server` for one test: a free 127.0.0.1 port, no
//! persistence (`--save '' --appendonly no`), its own working directory. It
//! can be killed and restarted on the same port. The machine's shared Redis
//! on 6379 is never touched.
//!
//! With [`RedisServer::start_with_tls`] it also listens for TLS on a second
//! port (`rediss://`, [`RedisServer::tls_url`]); the plain port stays for the
//! testkit's own PING and checks.

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

/// How long a start may take before it counts as failed.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running (or killed) private redis-server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Working directory when the server owns it (started with [`RedisServer::start`]).
    _own_dir: Option<TempDir>,
    dir: PathBuf,
    log_path: PathBuf,
    child: OwnedChild,
    /// Append-only file with an fsync per write: survives SIGKILL.
    durable: bool,
    /// The TLS port and the server's certificate, key and CA files.
    tls: Option<(u16, RedisTlsFiles)>,
}

/// The PEM files of a TLS redis-server (it does not ask clients for certificates).
#[derive(Debug, Clone)]
pub struct RedisTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts a server in a fresh temporary directory.
    pub async fn start() -> anyhow::Result<Self> {
        let own = tempfile::Builder::new().prefix("ordo-redis-").tempdir().context("cannot create a temp dir")?;
        let dir = own.path().to_path_buf();
        let mut server = Self::start_in(&dir).await?;
        server._own_dir = Some(own);
        Ok(server)
    }

    /// Starts a server whose working directory and log (`redis.log`) are in `dir`.
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, false).await
    }

    /// Like [`RedisServer::start_in`]; a `durable` server keeps an append-only
    /// file fsynced on every write (`appendfsync always`), so a SIGKILL and
    /// restart loses nothing — the production setting for reorder state.
    pub async fn start_with(dir: &Path, durable: bool) -> anyhow::Result<Self> {
        Self::start_with_tls(dir, durable, None).await
    }

    /// Like [`RedisServer::start_with`], plus a TLS port when `tls` is given.
    pub async fn start_with_tls(dir: &Path, durable: bool, tls: Option<RedisTlsFiles>) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            let mut server = Self {
                port: free_port(),
                _own_dir: None,
                dir: dir.to_path_buf(),
                log_path: dir.join("redis.log"),
                child: OwnedChild::default(),
                durable,
                tls: tls.clone().map(|files| (free_port(), files)),
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OS process id while the server runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `rediss://127.0.0.1:<tls port>` when started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(port, _)| format!("rediss://127.0.0.1:{port}"))
    }

    /// SIGSTOP: Redis freezes with its connections open until [`RedisServer::resume`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        send_signal(self.pid().context("redis-server is not running")?, "STOP")
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn resume(&self) -> anyhow::Result<()> {
        send_signal(self.pid().context("redis-server is not running")?, "CONT")
    }

    /// SIGKILL. Harmless when it is not running.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port: empty, unless it is durable.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    /// Sends PING and expects PONG.
    pub async fn ping(&self) -> anyhow::Result<()> {
        ping(self.port).await
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let program = std::env::var("ORDO_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = self.port.to_string();
        let (stdout, stderr) = open_log(&self.log_path, &format!("{program} --port {port}"))?;
        let child = Command::new(&program)
            .args(["--save", "", "--port", &port, "--bind", "127.0.0.1"])
            .args(if self.durable {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .args(match &self.tls {
                Some((port, files)) => vec![
                    "--tls-port".into(),
                    port.to_string().into(),
                    "--tls-cert-file".into(),
                    files.cert.clone().into_os_string(),
                    "--tls-key-file".into(),
                    files.key.clone().into_os_string(),
                    "--tls-ca-cert-file".into(),
                    files.ca.clone().into_os_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ],
                None => Vec::<std::ffi::OsString>::new(),
            })
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
            if let Some(status) = self.child.exited("waiting for redis-server")? {
                bail!(
                    "redis-server on port {port} exited with {status}; last log lines:\n{}",
                    indent(&tail(&self.log_path, 20))
                );
            }
            if ping(self.port).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_DEADLINE {
                self.kill();
                bail!("redis-server on port {port} did not answer PING within {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One inline PING over a fresh connection.
async fn ping(port: u16) -> anyhow::Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await?;
        anyhow::Ok(reply[..n].to_vec())
    };
    let reply = tokio::time::timeout(Duration::from_secs(1), exchange).await.context("PING timed out")??;
    if reply.starts_with(b"+PONG") {
        Ok(())
    } else {
        bail!("unexpected PING reply {:?}", String::from_utf8_lossy(&reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_kills_and_restarts_on_the_same_port() {
        let mut redis = RedisServer::start().await.expect("redis-server starts");
        assert_ne!(redis.port(), 6379);
        redis.ping().await.expect("PONG");
        let port = redis.port();
        redis.kill();
        assert!(redis.ping().await.is_err(), "a killed server must not answer");
        redis.restart().await.expect("restart");
        assert_eq!(redis.port(), port);
        redis.ping().await.expect("PONG after restart");
    }
}
