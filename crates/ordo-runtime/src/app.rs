//! The body of every binary's `main`: parse the config (clap, env vars),
//! validate it (exit code 64 on bad config, like linkerd and sysexits.h),
//! start telemetry, bind the listener and run the service until shutdown.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::net::TcpListener;

use crate::{Shutdown, shutdown, telemetry};

/// Flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log format on stderr: `text` (readable) or `json`.
    #[arg(long, env = "ORDO_LOG_FORMAT", default_value = "text")]
    pub log_format: telemetry::LogFormat,
    /// After SIGTERM/Ctrl-C, how long in-flight work may take to finish.
    #[arg(long, env = "ORDO_DRAIN_TIMEOUT", default_value = "10s", value_parser = ordo_core::duration::parse)]
    pub drain_timeout: Duration,
}

/// A service's configuration as `main` needs it.
pub trait ServiceConfig: clap::Parser + Send + 'static {
    /// Where the gRPC server listens.
    fn listen(&self) -> SocketAddr;
    fn common(&self) -> &CommonArgs;
    /// Cross-field checks clap cannot express. The message is shown as is.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Implements [`ServiceConfig`] for a clap config with fields `listen:
/// SocketAddr` and `common: CommonArgs`, optionally with a validation method
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
            fn validate(&self) -> Result<(), String> {
                ($validate)(self)
            }
        }
    };
}

/// Exit code for a configuration error (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 64;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
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
        let token = shutdown::on_signals();
        match run(config, listener, token).await {
            Ok(()) => {
                tracing::info!(service, "stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(service, error = format!("{error:#}"), "failed");
                ExitCode::FAILURE
            }
        }
    })
}
