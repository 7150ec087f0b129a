//! The one gRPC server builder every Ordo service uses: `grpc.health.v1`,
//! reflection v1 and v1alpha (grpcurl 1.8.6 speaks only v1alpha), a span per
//! call that continues the caller's trace, message-size limits, and graceful
//! shutdown with a drain deadline.
//!
//! Health tells the truth from the first moment: it is served as soon as the
//! listener is, NOT_SERVING while a required dependency is unreachable
//! ([`Readiness`]) and once shutdown starts, SERVING otherwise.
//!
//! TLS is the process's (`--tls-cert`/`--tls-key`, client certificates
//! required with `--tls-client-ca`; see [`crate::tls`]); health and reflection
//! are served over it like everything else, so probes need the same trust.

use std::{convert::Infallible, time::Duration};

use tokio::net::TcpListener;
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{Shutdown, readiness::Readiness, shutdown, telemetry};

/// Largest gRPC message any Ordo server accepts (events are checked against
/// their own, smaller payload limit first).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Collects a service's gRPC services, then serves them with the shared extras.
pub struct GrpcServer {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    readiness: Readiness,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServer {
    pub fn new() -> Self {
        Self {
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            readiness: Readiness::always(),
            tls: crate::tls::settings().grpc_server(),
        }
    }

    /// Serves with `tls` instead of the process's TLS (`None`: plaintext);
    /// for servers started inside tests.
    pub fn with_tls(mut self, tls: Option<tonic::transport::ServerTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Health follows `readiness` (SERVING only while every required
    /// dependency answers) instead of being SERVING from the start.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Adds a generated tonic server; its name is reported as SERVING by health.
    pub fn with_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves until `shutdown` is cancelled, then lets open calls finish for at
    /// most `drain`. Health turns NOT_SERVING as soon as shutdown starts, so a
    /// load balancer stops sending new work while old work drains.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown, drain: Duration) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let status = |ready: bool| if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        set_all(&health, &self.names, status(self.readiness.is_ready())).await;
        // Liveness (the Kubernetes probe): the process answers. Never follows
        // readiness, so a Redis outage or a drain does not get pods restarted.
        health.set_service_status(LIVENESS, ServingStatus::Serving).await;

        // List only what this server serves, not every service in the descriptor set.
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ordo_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            self.names.iter().fold(builder, |b, name| b.with_service_name(*name))
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let mut routes = self.routes;
        routes.add_service(health_service);
        routes.add_service(reflection_v1);
        routes.add_service(reflection_v1alpha);

        let names = self.names.clone();
        let stop = shutdown.clone();
        let mut readiness = self.readiness.clone();
        // Owned here and aborted below: health follows the dependencies, and
        // turns NOT_SERVING for good as soon as shutdown starts.
        let mark_down = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = readiness.changed() => match changed {
                        Some(ready) => set_all(&health, &names, status(ready)).await,
                        None => stop.cancelled().await,
                    },
                }
            }
            set_all(&health, &names, ServingStatus::NotServing).await;
        });

        let mut builder = Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .tcp_nodelay(true)
            .http2_adaptive_window(Some(true))
            .max_frame_size(Some(1 << 20))
            .trace_fn(telemetry::server_span)
            .add_routes(routes.routes())
            // tonic ignores `tcp_nodelay` for a caller-supplied listener: set it on
            // the incoming stream, or every small response waits for a delayed ACK.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(30))),
                shutdown.clone().cancelled_owned(),
            );
        let result = tokio::select! {
            result = server => result.map_err(anyhow::Error::from),
            _ = shutdown::drain_deadline(shutdown, drain) => Ok(()),
        };
        mark_down.abort();
        result
    }
}

/// The `grpc.health.v1` service name that is SERVING as long as the
/// process answers (liveness probes); `""` and the service names follow
/// readiness.
pub const LIVENESS: &str = "liveness";

async fn set_all(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
    health.set_service_status("", status).await;
}
