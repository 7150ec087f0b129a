//! Connecting to an Ordo service. The CLI connects eagerly (unlike the
//! services' lazy channels) so that a wrong address fails at once with a clear
//! message instead of on the first call.
//!
//! TLS: `--tls-ca` (or `ORDO_TLS_CA`) makes every `host:port` an https
//! address trusting that CA; `--tls-cert`/`--tls-key` are the client
//! certificate for servers that require one (mTLS). Installed once for the
//! process ([`install_tls`]), as the services do, so Redis (`rediss://`,
//! `--redis-ca`) and every subcommand's channel follow it.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tonic::transport::Channel;

/// Largest message the CLI accepts: results may carry payloads up to the
/// harmonizer's limit (1 MiB by default, configurable), so stay well above it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long establishing the TCP + HTTP/2 connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS flags of every subcommand (`ordo --tls-ca ca.pem health …` or
/// after the subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct TlsFlags {
    /// PEM CA bundle to trust: services are then dialed over https.
    #[arg(long, env = "ORDO_TLS_CA", global = true, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (mTLS). Needs --tls-key.
    #[arg(long, env = "ORDO_TLS_CERT", global = true, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ORDO_TLS_KEY", global = true, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Name expected in the server's certificate instead of the host dialed.
    #[arg(long, env = "ORDO_TLS_SERVER_NAME", global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// PEM CA bundle trusted for rediss:// (default: --tls-ca, else the system roots).
    #[arg(long, env = "ORDO_REDIS_CA", global = true, value_name = "PEM")]
    redis_ca: Option<PathBuf>,
}

/// Loads the TLS flags (a bad file is an error naming it) and makes them the
/// process's, for every channel and Redis connection the command opens.
pub fn install_tls(flags: &TlsFlags) -> anyhow::Result<()> {
    let args = ordo_runtime::tls::TlsArgs {
        tls_cert: flags.tls_cert.clone(),
        tls_key: flags.tls_key.clone(),
        tls_client_ca: None,
        tls_ca: flags.tls_ca.clone(),
        tls_server_name: flags.tls_server_name.clone(),
        redis_ca: flags.redis_ca.clone(),
    };
    ordo_runtime::tls::install(args.load()?);
    Ok(())
}

/// Connects to `addr` (`host:port`, `http://host:port` or
/// `https://host:port`; a bare address is https with `--tls-ca`).
/// `call_timeout` bounds every call on the channel; leave it `None` for
/// long-lived streams.
pub async fn connect(addr: &str, call_timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let mut endpoint = ordo_runtime::client::endpoint(addr)
        .with_context(|| format!("invalid address {addr:?} (expected host:port)"))?
        .connect_timeout(call_timeout.map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT)))
        .tcp_nodelay(true);
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint.connect().await.map_err(|error| {
        // tonic's Display says only "transport error"; the cause (refused,
        // certificate unknown, …) is what a user needs.
        anyhow::anyhow!("cannot connect to {addr}: {}", causes(&error))
    })
}

/// An error and its sources, joined with ": ".
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
