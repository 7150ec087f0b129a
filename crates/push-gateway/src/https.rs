//! Serving the SSE router over HTTPS: each accepted connection is handed to
//! tokio-rustls, then to hyper's HTTP/1.1 server with graceful shutdown.
//! axum's own `serve` only speaks plaintext.
//!
//! The certificate is the process's (`--tls-cert`/`--tls-key`). Client
//! certificates are never asked for: SSE is for browsers, which cannot be
//! expected to hold one; `--tls-client-ca` (mTLS) applies to gRPC only, and
//! SSE readers are authorized by their bearer token.
//!
//! Owns nothing beyond one task per open connection, all in a [`JoinSet`]
//! dropped (aborted) with the serving future.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown, service::TowerToHyperService};
use ordo_runtime::Shutdown;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};

/// A client gets this long to finish its TLS handshake: a silent one must not
/// hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on `listener` until `shutdown`, then waits for
/// the open connections to end (the caller bounds that wait by the drain).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            // Reap finished connections so the set stays as large as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "cannot accept an SSE connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = TowerToHyperService::new(router.clone());
                let watcher = graceful.watcher();
                connections.spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "SSE TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "SSE TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(%peer, %error, "SSE connection ended with an error");
                    }
                });
            }
        }
    }
    // Open event streams end as their sessions see the shutdown; idle
    // keep-alive connections are closed now.
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}
