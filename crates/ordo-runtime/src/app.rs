//! The body of every binary's `main`: parse the config (clap, env vars),
//! validate it (exit code 64 on bad config, like linkerd and sysexits.h),
//! start telemetry, bind the listener and run the service until shutdown.
//!
//! Exit is bounded: after SIGTERM/Ctrl-C a service's `run` has its drain
//! timeout to return (servers drop what is still open at that deadline); if
//! something still holds it a moment later, the process exits anyway, so an
//! orchestrator never needs SIGKILL. The bound is drain + [`EXIT_GRACE`].

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::net::TcpListener;

use crate::{Shutdown, metrics, shutdown, telemetry, tls};

/// Flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log format on stderr: `text` (readable) or `json`.
    #[arg(long, env = "ORDO_LOG_FORMAT", default_value = "text")]
    pub log_format: telemetry::LogFormat,
    /// After SIGTERM/Ctrl-C, how long in-flight work may take to finish.
    #[arg(long, env = "ORDO_DRAIN_TIMEOUT", default_value = "10s", value_parser = ordo_core::duration::parse)]
    pub drain_timeout: Duration,
    /// Worker threads of the process's async runtime; `0`: one per CPU the
    /// process may use (a cgroup CPU limit counts). For where that count is
    /// not what the process may use, as when several services share few
    /// cores (docs/benchmarks.md measured 1 per service there both ahead and
    /// level).
    #[arg(long, env = "ORDO_RUNTIME_THREADS", default_value_t = 0)]
    pub runtime_threads: usize,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
}

/// A service's configuration as `main` needs it.
pub trait ServiceConfig: clap::Parser + Send + 'static {
    /// Where the gRPC server listens.
    fn listen(&self) -> SocketAddr;
    fn common(&self) -> &CommonArgs;
    /// Where the Prometheus endpoint listens (`--metrics-listen`); `None`
    /// (`off`) serves none and records nothing.
    fn metrics_listen(&self) -> Option<SocketAddr>;
    /// Cross-field checks clap cannot express. The message is shown as is.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Implements [`ServiceConfig`] for a clap config with fields `listen:
/// SocketAddr`, `metrics_listen: Option<SocketAddr>` (parsed by
/// [`crate::metrics::parse_listen`]) and `common: CommonArgs`, optionally with a validation method
/// (`fn(&Self) -> Result<(), String>`).
#[macro_export]
macro_rules! service_config {
    ($config:ty) => {
        $crate::service_config!($config, validate = |_: &$config| Ok(()));
    };
    ($config:ty, validate = $validate:expr) => {
        impl $crate::app::ServiceConfig for $config {
            fn listen(&self) -> ::std::net::SocketAddr {
                self.listen
            }
            fn common(&self) -> &$crate::app::CommonArgs {
                &self.common
            }
            fn metrics_listen(&self) -> ::std::option::Option<::std::net::SocketAddr> {
                self.metrics_listen
            }
            fn validate(&self) -> Result<(), String> {
                ($validate)(self)
            }
        }
    };
}

/// Exit code for a configuration error (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 64;

/// How long after the drain timeout a service may still take to return
/// before the process exits without it (well within drain + 1 s, leaving time
/// to flush telemetry and stop the runtime).
pub const EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long the runtime may take to stop its tasks once `run` returned.
const RUNTIME_STOP: Duration = Duration::from_millis(200);

/// The process's multi-threaded runtime with `threads` workers (`0`: Tokio's
/// default, one per CPU available).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// Runs a service binary: `service` is its name in logs and traces; `run`
/// gets the config, the bound listener and the shutdown token.
pub fn run<C, F, Fut>(service: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = C::parse();
    if let Err(message) = config.validate() {
        eprintln!("{service}: invalid configuration: {message}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Before anything dials or serves: every server and channel of the
    // process reads this one setting (see `tls` for why it is process-wide).
    match config.common().tls.load() {
        Ok(settings) => {
            tls::install(settings);
        }
        Err(error) => {
            eprintln!("{service}: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let runtime = match runtime(config.common().runtime_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let drain = config.common().drain_timeout;
    let code = runtime.block_on(async move {
        let _telemetry = match telemetry::init(service, config.common().log_format) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{service}: cannot start telemetry: {error:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let addr = config.listen();
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%addr, %error, "cannot listen");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(service, listen = %local, "listening");
        if let Some(addr) = config.metrics_listen() {
            let metrics_listener = match TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%addr, %error, "cannot listen for metrics");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match metrics::install() {
                Ok(handle) => metrics::spawn_server(metrics_listener, handle),
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "cannot install the metrics recorder");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            tracing::info!(service, metrics_listen = %addr, "serving metrics");
        }
        let token = shutdown::on_signals();
        let overdue = {
            let token = token.clone();
            async move {
                shutdown::drain_deadline(token, drain).await;
                tokio::time::sleep(EXIT_GRACE).await;
            }
        };
        tokio::select! {
            result = run(config, listener, token) => match result {
                Ok(()) => {
                    tracing::info!(service, "stopped");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(service, error = format!("{error:#}"), "failed");
                    ExitCode::FAILURE
                }
            },
            // Draining is over by definition at the deadline: what is still
            // open was given up on, as the servers do, so this is a clean stop.
            () = overdue => {
                tracing::warn!(service, ?drain, "still stopping after the drain timeout; exiting anyway");
                ExitCode::SUCCESS
            }
        }
    });
    // Tasks still running (and blocking threads) must not hold the exit.
    runtime.shutdown_timeout(RUNTIME_STOP);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_threads_asked_for_or_one_per_cpu() {
        let one = runtime(1).expect("runtime");
        assert_eq!(one.metrics().num_workers(), 1);
        let three = runtime(3).expect("runtime");
        assert_eq!(three.metrics().num_workers(), 3);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let default = runtime(0).expect("runtime");
        assert_eq!(default.metrics().num_workers(), cpus);
    }

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn runtime_threads_is_a_flag_defaulting_to_zero() {
        use clap::Parser as _;
        if std::env::var_os("ORDO_RUNTIME_THREADS").is_none() {
            let args = Args::try_parse_from(["svc"]).expect("defaults");
            assert_eq!(args.common.runtime_threads, 0);
        }
        let args = Args::try_parse_from(["svc", "--runtime-threads", "1"]).expect("flag");
        assert_eq!(args.common.runtime_threads, 1);
        assert!(Args::try_parse_from(["svc", "--runtime-threads", "-1"]).is_err());
    }
}
