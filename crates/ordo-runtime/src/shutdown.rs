//! Shutdown: one token per process, cancelled on SIGTERM or Ctrl-C. Servers
//! stop accepting, services drain their in-flight work, and whatever is still
//! open after the drain timeout is dropped.

use std::time::Duration;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signals() -> Shutdown {
    let token = Shutdown::new();
    let child = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        child.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves `drain` after `shutdown` is cancelled: the hard deadline for draining.
pub async fn drain_deadline(shutdown: Shutdown, drain: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(drain).await;
    tracing::warn!(?drain, "drain timeout reached; dropping what is still open");
}
