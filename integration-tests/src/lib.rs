//! Ordo's testkit: starts the real binaries (`harmonizer`, `stateless`,
//! `stateful-worker` or any `ordo-worker` binary, `reassembler`,
//! `push-gateway`) on ephemeral 127.0.0.1 ports next to a private
//! `redis-server`, and gives tests typed clients and the helpers they share.
//!
//! - [`cluster`]: the whole topology ([`Cluster::builder`]), waiting for
//!   `grpc.health.v1` SERVING, logs per process in one directory;
//!   heterogeneous worker pools ([`WorkerSpec`]); the operation registry in
//!   the cluster's Redis ([`Cluster::registry`],
//!   [`Cluster::wait_for_registry_version`], [`Cluster::wait_for_workers`]);
//!   the JetStream source next to it ([`Cluster::start_source`]).
//! - [`example`]: the examples' servers (`examples/python-operation`,
//!   `examples/http-operation`) as killable, restartable child processes,
//!   and the example registry file.
//! - [`process`]: one service process: kill (SIGKILL), terminate (SIGTERM),
//!   restart on the same port.
//! - [`redis_server`]: a private redis-server (never the shared one on 6379).
//! - [`nats`]: a private nats-server with JetStream (never the shared one on
//!   4222): kill and restart on the same port with the same store.
//! - [`redis_cluster`]: a private Redis Cluster, 3 masters with 1 replica
//!   each: kill and restart of a node, forced failover.
//! - [`redis_acl`]: a Redis ACL user limited to what Ordo needs, `default` off
//!   ([`ClusterBuilder::redis_user`]).
//! - [`client`]: events, a `Harmonizer.Process` call driver (and a paced
//!   feeder that counts what it sent), result checks.
//! - [`cli`]: the built `ordo` command-line tool, run with arguments.
//! - [`eventually`]: polling with a deadline instead of sleeping.
//! - [`metrics`]: scraping a service's Prometheus endpoint
//!   ([`Cluster::scrape`]) with a real parser of the text format.
//! - [`otlp`]: an in-process OTLP trace collector.
//! - [`sse`]: a Server-Sent Events client (the push-gateway's HTTP channel).
//! - [`rabbitmq`]: the machine's RabbitMQ: a reconnecting queue consumer and
//!   a guard that stops the broker and always starts it again.
//! - [`text`]: the paper's input text.
//! - [`tls`]: a CA, service and client certificates generated at test time.
//!
//! The binaries are not built by this crate: `cargo build --workspace --bins`
//! (or `just test`) first. Set `TEST_LOG=1` to print every process's log tail
//! at the end of a test; they are printed anyway when a test fails.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod dns;
pub mod eventually;
pub mod example;
pub mod metrics;
pub mod nats;
pub mod otlp;
pub mod ports;
pub mod process;
pub mod rabbitmq;
pub mod redis_acl;
pub mod redis_cluster;
pub mod redis_server;
pub mod sse;
pub mod text;
pub mod tls;

pub use client::{ProcessCall, stream_text, text_events};
pub use cluster::{Cluster, ClusterBuilder, WorkerSpec};
pub use eventually::eventually;
pub use example::ExampleServer;
pub use nats::NatsServer;
pub use process::ServiceProcess;
pub use redis_server::RedisServer;
pub use text::sonnets_text;
