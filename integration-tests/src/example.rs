//! The examples a user would run next to Ordo: `examples/python-operation`
//! (a grpcio server of `ordo.v1.Operation/Invoke`) and
//! `examples/http-operation` (a standard-library HTTP handler), each as a
//! child process on a free 127.0.0.1 port, logging to a file. A server can
//! be killed (SIGKILL) and restarted on the same port; it is killed when its
//! handle is dropped. Also the example registry file, with its endpoints
//! pointed at the test's servers.
//!
//! The Python interpreter is `$ORDO_PYTHON`, else `python3`. A missing
//! package (grpcio, grpcio-tools) fails the test with a message naming
//! `bash scripts/install-deps.sh`: tests never skip silently.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{net::TcpStream, time::Instant};

use crate::{
    ports::free_port,
    process::{OwnedChild, indent, open_log, tail},
    text::workspace_root,
};

/// The endpoint of the Python operation in `examples/registry.toml`.
pub const REGISTRY_PYTHON_ENDPOINT: &str = "grpc://127.0.0.1:50070";
/// Scheme, host and port of the HTTP operation in `examples/registry.toml`.
pub const REGISTRY_HTTP_BASE: &str = "http://127.0.0.1:50080";

/// How long a server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Starts on a new port when the port was taken between check and bind.
const START_ATTEMPTS: u32 = 3;

/// The Python interpreter the examples run with.
pub fn python() -> String {
    std::env::var("ORDO_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// Checks that the interpreter imports `modules`.
///
/// # Panics
/// When it cannot, naming the install script.
pub fn require_python_modules(modules: &[&str]) {
    let interpreter = python();
    let import = if modules.is_empty() { "pass".to_owned() } else { format!("import {}", modules.join(", ")) };
    let output = Command::new(&interpreter).args(["-c", &import]).stdin(Stdio::null()).output();
    let problem = match output {
        Ok(output) if output.status.success() => return,
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        Err(error) => format!("cannot run {interpreter}: {error}"),
    };
    panic!(
        "this test runs the Python examples and needs {interpreter} with {}: run `bash scripts/install-deps.sh` \
         (it installs examples/python-operation/requirements.txt)\n  `{interpreter} -c '{import}'` said: {problem}",
        if modules.is_empty() { "no extra package".to_owned() } else { modules.join(", ") }
    );
}

/// `examples/<name>`.
pub fn example_dir(name: &str) -> PathBuf {
    workspace_root().join("examples").join(name)
}

/// `examples/registry.toml` as it is.
pub fn example_registry() -> String {
    let path = workspace_root().join("examples/registry.toml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A registry `[[operation]]` table of a stateful operation at `endpoint`,
/// with `extra` lines (e.g. `attempts = 2`).
pub fn remote_operation(name: &str, endpoint: &str, extra: &[&str]) -> String {
    let mut table = format!("\n[[operation]]\nname = \"{name}\"\nkind = \"stateful\"\nendpoint = \"{endpoint}\"\n");
    for line in extra {
        table.push_str(line);
        table.push('\n');
    }
    table
}

/// One example server process.
#[derive(Debug)]
pub struct ExampleServer {
    name: String,
    script: PathBuf,
    args: Vec<String>,
    port: u16,
    log_path: PathBuf,
    child: OwnedChild,
    starts: u32,
}

impl ExampleServer {
    /// `examples/python-operation/server.py --port <free> args…`, logging to
    /// `<log_dir>/<name>.log`; waits until it accepts connections.
    ///
    /// # Panics
    /// When grpcio or grpcio-tools is missing (see [`require_python_modules`]).
    pub async fn python_operation(name: &str, log_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        require_python_modules(&["grpc", "grpc_tools"]);
        Self::start(name, example_dir("python-operation").join("server.py"), log_dir, args).await
    }

    /// `examples/http-operation/server.py --port <free> args…`.
    pub async fn http_operation(name: &str, log_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        require_python_modules(&[]);
        Self::start(name, example_dir("http-operation").join("server.py"), log_dir, args).await
    }

    /// Runs the Python `script` with `--port <free port>` and `args`.
    pub async fn start(name: &str, script: PathBuf, log_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            let mut server = Self {
                name: name.to_owned(),
                script: script.clone(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                port: free_port(),
                log_path: log_dir.join(format!("{name}.log")),
                child: OwnedChild::default(),
                starts: 0,
            };
            server.launch()?;
            match server.wait_accepting().await {
                Ok(()) => return Ok(server),
                Err(_) if attempt < START_ATTEMPTS && server.lost_its_port() => attempt += 1,
                Err(error) => return Err(error),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `grpc://127.0.0.1:<port>`, as the registry names a gRPC operation.
    pub fn grpc_endpoint(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// SIGKILL, and reap it. Harmless when it is not running.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port and waits until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()?;
        self.wait_accepting().await
    }

    fn command_line(&self) -> String {
        format!("{} {} --port {} {}", python(), self.script.display(), self.port, self.args.join(" "))
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let (stdout, stderr) =
            open_log(&self.log_path, &format!("start #{} of {}: {}", self.starts, self.name, self.command_line()))?;
        let child = Command::new(python())
            .arg(&self.script)
            .arg("--port")
            .arg(self.port.to_string())
            .args(&self.args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.command_line()))?;
        self.child.set(child);
        Ok(())
    }

    /// Waits until the port accepts a TCP connection, failing early (with
    /// its log) if the process exits.
    async fn wait_accepting(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.exited("waiting for the example server")? {
                bail!(
                    "{} exited with {status} before it accepted connections on port {}\n  command: {}\n  \
                     last log lines ({}):\n{}",
                    self.name,
                    self.port,
                    self.command_line(),
                    self.log_path.display(),
                    indent(&self.log_tail(30))
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() >= START_DEADLINE {
                self.kill();
                bail!(
                    "{} did not accept connections on port {} within {START_DEADLINE:?}\n  last log lines:\n{}",
                    self.name,
                    self.port,
                    indent(&self.log_tail(30))
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn lost_its_port(&self) -> bool {
        let log = self.log_tail(30);
        log.contains("in use") || log.contains("Failed to bind") || log.contains("failed to bind")
    }
}

impl Drop for ExampleServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "ordo testkit: last lines of {} ({}):\n{}",
                self.name,
                self.log_path.display(),
                indent(&self.log_tail(30))
            );
        }
    }
}
