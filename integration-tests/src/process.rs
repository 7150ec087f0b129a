//! One Ordo service process: spawned from the workspace's target directory
//! with `--listen 127.0.0.1:<port>`, its stdout and stderr appended to a log
//! file, and handles to SIGKILL it, SIGTERM it and restart it on the same port.
//! A process still running when its handle is dropped is killed.
//!
//! Children do not inherit the developer's Ordo configuration: variables
//! named `ORDO_*`, `HARMONIZER_*`, `STATELESS_*`, `WORKER_*`, `REASSEMBLER_*`,
//! `PUSH_GATEWAY_*` and `OTEL_*` are removed before the test's own are set.
//! `RUST_LOG` is passed through; `NO_COLOR=1` keeps the log files plain.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::ports::free_port;

/// Prefixes of environment variables that configure Ordo binaries.
const CONFIG_PREFIXES: &[&str] =
    &["ORDO_", "HARMONIZER_", "STATELESS_", "WORKER_", "REASSEMBLER_", "PUSH_GATEWAY_", "OTEL_"];

/// How many times a service is started on a new port when its port was taken
/// between the check and the child's bind.
const START_ATTEMPTS: u32 = 3;

/// Written to a log file before each start, so restarts are visible.
const START_MARKER: &str = "==== ordo testkit:";

/// The directory holding the service binaries: `$ORDO_BIN_DIR`, else the
/// profile directory this test binary was built into (`target/<profile>/`;
/// test binaries live in its `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ORDO_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the path of the running test binary");
    let dir = exe.parent().expect("the test binary has a parent directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of binary `name`.
///
/// # Panics
/// When it is not there: the binaries must be built before the tests.
pub fn binary(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary {name} not found in {}: run `cargo build --workspace --bins` first (`just test` does)",
            dir.display()
        );
    }
    path
}

/// What to run: a name for logs, the binary and its arguments (without
/// `--listen`, which the testkit adds) and extra environment.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Unique within a cluster, e.g. `reassembler-1`; also the log file name.
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A running (or killed) service process.
#[derive(Debug)]
pub struct ServiceProcess {
    spec: ServiceSpec,
    /// The loopback address it listens on (127.0.0.1 unless [`ServiceProcess::start_on`]).
    host: std::net::Ipv4Addr,
    port: u16,
    /// The `--metrics-listen` port the testkit chose (`None` when the spec
    /// sets `--metrics-listen` itself).
    metrics_port: Option<u16>,
    log_path: PathBuf,
    child: OwnedChild,
    starts: u32,
}

impl ServiceProcess {
    /// Starts `spec` on a free port, logging to `<log_dir>/<name>.log`, and
    /// waits until it reports SERVING on `grpc.health.v1` (at most `deadline`).
    pub async fn start(spec: ServiceSpec, log_dir: &Path, deadline: Duration) -> anyhow::Result<Self> {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        let mut attempt = 1;
        loop {
            let mut process = Self {
                spec: spec.clone(),
                host: std::net::Ipv4Addr::LOCALHOST,
                port: free_port(),
                metrics_port: (!spec.args.iter().any(|a| a.starts_with("--metrics-listen"))).then(free_port),
                log_path: log_path.clone(),
                child: OwnedChild::default(),
                starts: 0,
            };
            process.launch()?;
            match process.wait_serving(deadline).await {
                Ok(()) => return Ok(process),
                Err(error) if attempt < START_ATTEMPTS && process.lost_its_port() => {
                    eprintln!(
                        "ordo testkit: {} could not bind port {}; retrying on another port",
                        spec.name, process.port
                    );
                    attempt += 1;
                    let _ = error;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts `spec` listening on `host:port` (another loopback address,
    /// e.g. 127.0.0.2, so that several services share one port number as
    /// the pods behind a DNS name do), and waits until it is SERVING.
    pub async fn start_on(
        spec: ServiceSpec,
        host: std::net::Ipv4Addr,
        port: u16,
        log_dir: &Path,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        let mut process = Self {
            metrics_port: (!spec.args.iter().any(|a| a.starts_with("--metrics-listen"))).then(free_port),
            spec,
            host,
            port,
            log_path,
            child: OwnedChild::default(),
            starts: 0,
        };
        process.launch()?;
        process.wait_serving(deadline).await?;
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/metrics`: the Prometheus endpoint, on a free
    /// port of its own unless the spec passed `--metrics-listen` itself.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_port.map(|port| format!("http://127.0.0.1:{port}/metrics"))
    }

    /// `127.0.0.1:<port>`, as peers are configured with.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `http://127.0.0.1:<port>`, for clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The OS process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The command line, for logs and error messages.
    pub fn command_line(&self) -> String {
        let mut line = format!("{} --listen {}", self.spec.binary.display(), self.addr());
        if let Some(port) = self.metrics_port {
            line.push_str(&format!(" --metrics-listen 127.0.0.1:{port}"));
        }
        for arg in &self.spec.args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGSTOP: the process freezes with its sockets open (peers see a hang,
    /// not a reset) until [`ServiceProcess::resume`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.spec.name))?;
        send_signal(pid, "STOP")
    }

    /// SIGCONT after [`ServiceProcess::freeze`].
    pub fn resume(&self) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.spec.name))?;
        send_signal(pid, "CONT")
    }

    /// SIGKILL, and reap the process. Harmless when it is not running.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// SIGTERM, then wait up to `timeout` for the process to exit (it drains
    /// and flushes its spans); SIGKILL and an error if it does not.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(pid) = self.child.pid() else { bail!("{} is not running", self.spec.name) };
        let sent =
            Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("cannot run `kill -TERM`")?;
        if !sent.success() {
            bail!("`kill -TERM {pid}` failed for {}: {sent}", self.spec.name);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.exited("waiting for the process")? {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                self.kill();
                bail!("{} did not exit within {timeout:?} after SIGTERM; killed it", self.spec.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process again on the same port (killing it first if it
    /// still runs) and waits until it is SERVING.
    pub async fn restart(&mut self, deadline: Duration) -> anyhow::Result<()> {
        self.kill();
        self.launch()?;
        self.wait_serving(deadline).await
    }

    /// Waits until the process reports SERVING, failing early (with its log)
    /// if it exits.
    pub async fn wait_serving(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let addr = self.addr();
        loop {
            if let Some(status) = self.child.exited("waiting for the process")? {
                bail!(
                    "{} exited with {status} before it was serving on {addr}\n  command: {}\n  last log lines ({}):\n{}",
                    self.spec.name,
                    self.command_line(),
                    self.log_path.display(),
                    indent(&self.log_tail(30))
                );
            }
            if self.child.pid().is_none() {
                bail!("{} is not running", self.spec.name);
            }
            if health_status_with(&addr, crate::tls::probe_tls(&self.spec.env)).await == Some(ServingStatus::Serving) {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                bail!(
                    "{} did not report SERVING on {addr} within {deadline:?}\n  last log lines ({}):\n{}",
                    self.spec.name,
                    self.log_path.display(),
                    indent(&self.log_tail(30))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of the process's log (all its runs).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// Whether the current run's log says the port was taken.
    fn lost_its_port(&self) -> bool {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let current = log.rsplit(START_MARKER).next().unwrap_or_default();
        current.contains("in use") || current.contains("AddrInUse")
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let (stdout, stderr) = open_log(
            &self.log_path,
            &format!("start #{} of {}: {}", self.starts, self.spec.name, self.command_line()),
        )?;
        let mut command = Command::new(&self.spec.binary);
        command.arg("--listen").arg(self.addr());
        if let Some(port) = self.metrics_port {
            command.arg("--metrics-listen").arg(format!("127.0.0.1:{port}"));
        }
        command.args(&self.spec.args);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| CONFIG_PREFIXES.iter().any(|p| k.starts_with(p))) {
                command.env_remove(key);
            }
        }
        // Log files are not terminals: no ANSI colours (a test may override).
        command.env("NO_COLOR", "1");
        command.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.spec.binary.display()))?;
        self.child.set(child);
        Ok(())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child process of a handle (a service, an example server, a
/// redis-server) while it runs: killed and reaped by [`OwnedChild::kill`],
/// forgotten once it was seen to exit. Not killed when dropped: each handle
/// kills it in its own `Drop`, before anything else goes.
#[derive(Debug, Default)]
pub(crate) struct OwnedChild(Option<Child>);

impl OwnedChild {
    /// Owns `child` (a start after a kill or an exit).
    pub(crate) fn set(&mut self, child: Child) {
        self.0 = Some(child);
    }

    /// The OS process id while there is a child.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// True while the child has not exited (forgets it once it has, or when
    /// its state cannot be read).
    pub(crate) fn is_running(&mut self) -> bool {
        match self.0.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) => {
                self.0 = None;
                false
            }
            None => false,
        }
    }

    /// The child's exit status if it has exited (then it is forgotten);
    /// `None` while it runs or when there is none. A failure to read its
    /// state is an error with `context`.
    pub(crate) fn exited(&mut self, context: &'static str) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.0.as_mut() else { return Ok(None) };
        let status = child.try_wait().context(context)?;
        if status.is_some() {
            self.0 = None;
        }
        Ok(status)
    }

    /// SIGKILL, and reap it. Harmless when there is none.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` (a name `kill(1)` knows: `STOP`, `CONT`, `TERM`, …) to
/// `pid`. Through `kill(1)` rather than libc, as the crate forbids unsafe code.
pub fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .with_context(|| format!("cannot run `kill -{signal}`"))?;
    if !sent.success() {
        bail!("`kill -{signal} {pid}` failed: {sent}");
    }
    Ok(())
}

/// `grpc.health.v1.Health/Check` of the whole server (`service: ""`), or
/// `None` when it does not answer within a second.
pub async fn health_status(addr: &str) -> Option<ServingStatus> {
    health_status_with(addr, None).await
}

/// [`health_status`] over TLS when `tls` is given (a service started with `ORDO_TLS_*`).
pub async fn health_status_with(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Option<ServingStatus> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).ok()?;
    }
    let channel = endpoint.connect().await.ok()?;
    let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Opens `path` for appending, writes a start marker, and returns two handles
/// for a child's stdout and stderr.
pub(crate) fn open_log(path: &Path, header: &str) -> anyhow::Result<(File, File)> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log {}", path.display()))?;
    writeln!(file, "{START_MARKER} {header}").with_context(|| format!("cannot write {}", path.display()))?;
    let second = file.try_clone().context("cannot duplicate the log handle")?;
    Ok((file, second))
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}
