//! Ordo's push gateway: serves each stream's released results in order from
//! any cursor, then keeps tailing, over three channels:
//!
//! - gRPC `Subscribe` (and the harmonizer's internal `Follow`): [`service`];
//! - Server-Sent Events over HTTP for browsers: [`sse`];
//! - AMQP 0.9.1 to a RabbitMQ topic exchange, with the release logs as an
//!   outbox: [`amqp`].
//!
//! A client that reconnects with its last seen position + 1 misses nothing;
//! a cursor older than retention (by count or by age) gets an explicit error
//! (OUT_OF_RANGE, HTTP 410), never a silent gap.
//!
//! It reads reorder state and never writes it: [`hub`] tails the release
//! channels of the slots it follows, [`log`] reads the release logs,
//! [`session`] joins the two. The only keys it writes are its own AMQP
//! publish cursors and lease ([`amqp::outbox`]). It runs against one Redis
//! node or a Redis Cluster (`--redis-url redis+cluster://…`) alike.

pub mod amqp;
pub mod follow;
mod https;
pub mod hub;
pub mod json;
pub mod log;
pub mod metrics;
pub mod service;
pub mod session;
pub mod sse;

use ordo_runtime::task::Owned;
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
pub use ordo_runtime::Shutdown;
use ordo_runtime::{
    app::CommonArgs,
    readiness::{Dependency, Readiness},
    server::GrpcServer,
};
use tokio::net::TcpListener;

/// The broker a bare `--amqp` connects to.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Ordo push gateway: streams released results to subscribers, in order,
/// resumable from any retained position, over gRPC, Server-Sent Events and
/// (when enabled) AMQP.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "push-gateway", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "PUSH_GATEWAY_LISTEN", default_value = "0.0.0.0:50055")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "PUSH_GATEWAY_METRICS_LISTEN", default_value = "0.0.0.0:9095", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    /// Redis holding the release logs: one node (`redis://`, `rediss://`)
    /// or a Redis Cluster (`redis+cluster://host:port[,host:port…]`).
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Released batches buffered per subscriber; a subscriber that falls
    /// further behind is served from the log instead (memory stays bounded).
    #[arg(long, env = "PUSH_GATEWAY_SUBSCRIBER_BUFFER", default_value_t = 1024)]
    pub subscriber_buffer: usize,
    /// How long a release-channel slot stays subscribed after the last
    /// stream followed in it left (`0s`: unsubscribe at once). Many short
    /// streams then do not subscribe and unsubscribe their slots over and
    /// over; at most 16,384 slots are ever held.
    #[arg(long, env = "PUSH_GATEWAY_HUB_SLOT_HOLD", default_value = "30s", value_parser = ordo_core::duration::parse)]
    pub hub_slot_hold: Duration,
    /// Results released longer ago than this are expired for subscribers:
    /// asking for one fails (gRPC OUT_OF_RANGE, SSE 410) as if it had been
    /// trimmed. `off` keeps them as long as the log does (count retention is
    /// the reassembler's `--retention`). The AMQP outbox ignores this limit.
    #[arg(long, env = "PUSH_GATEWAY_RETENTION_AGE", default_value = "off", value_parser = parse_optional_duration)]
    // Fully qualified: clap would otherwise treat it as an optional `Duration`.
    pub retention_age: ::std::option::Option<Duration>,
    /// Address of the Server-Sent Events HTTP server
    /// (`GET /streams/{stream_id}/events`), or `off`.
    #[arg(long, env = "PUSH_GATEWAY_SSE_LISTEN", default_value = "0.0.0.0:50056", value_parser = parse_optional_addr)]
    pub sse_listen: ::std::option::Option<SocketAddr>,
    /// Origins (comma-separated, e.g. `https://app.example.com`) whose browser
    /// pages may read the event streams (CORS); `*` for any, only when given.
    /// Default: none (no CORS headers: same-origin pages and non-browser clients only).
    #[arg(long, env = "PUSH_GATEWAY_SSE_ALLOW_ORIGIN", value_delimiter = ',', value_name = "ORIGINS")]
    pub sse_allow_origin: Vec<String>,
    /// Interval of SSE keep-alive comments (keeps idle connections open
    /// through proxies).
    #[arg(long, env = "PUSH_GATEWAY_SSE_KEEP_ALIVE", default_value = "15s", value_parser = ordo_core::duration::parse)]
    pub sse_keep_alive: Duration,
    /// Publish every released result to RabbitMQ at this AMQP 0.9.1 URL
    /// (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`). AMQP is on when
    /// this or `--amqp` is given, off otherwise.
    #[arg(long, env = "PUSH_GATEWAY_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// Turn AMQP publishing on with the default URL
    /// (amqp://guest:guest@127.0.0.1:5672/%2f) unless `--amqp-url` says otherwise.
    #[arg(long, env = "PUSH_GATEWAY_AMQP", default_value_t = false)]
    pub amqp: bool,
    /// PEM CA bundle trusted for an amqps:// broker, on top of the system
    /// roots (default: --tls-ca). The client certificate is --tls-cert/--tls-key.
    #[arg(long, env = "PUSH_GATEWAY_AMQP_CA", value_name = "PEM")]
    pub amqp_ca: Option<std::path::PathBuf>,
    /// The durable topic exchange results are published to (routing key =
    /// stream id). Declared at connect if missing.
    #[arg(long, env = "PUSH_GATEWAY_AMQP_EXCHANGE", default_value = "ordo.results")]
    pub amqp_exchange: String,
    /// Body of each AMQP message: `json` (as SSE's data) or `protobuf`
    /// (an encoded ordo.v1.EventResult).
    #[arg(long, env = "PUSH_GATEWAY_AMQP_BODY", value_enum, default_value = "json")]
    pub amqp_body: amqp::BodyFormat,
    /// How often the AMQP outbox lag (`ordo_amqp_outbox_lag_results`:
    /// released results the broker has not confirmed) is sampled from Redis.
    #[arg(long, env = "PUSH_GATEWAY_AMQP_LAG_INTERVAL", default_value = "10s", value_parser = ordo_core::duration::parse)]
    pub amqp_lag_interval: Duration,
    /// Bearer-token authorization of Subscribe and SSE (off unless a key is given).
    #[command(flatten)]
    pub auth: ordo_runtime::auth::AuthArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_optional_duration(text: &str) -> Result<Option<Duration>, String> {
    match text.trim() {
        "off" | "0" | "" => Ok(None),
        other => ordo_core::duration::parse(other).map(Some),
    }
}

fn parse_optional_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "off" | "" => Ok(None),
        other => other.parse().map(Some).map_err(|e| format!("{other:?}: {e} (host:port, or off)")),
    }
}

impl Config {
    /// The AMQP settings, when AMQP publishing is on.
    pub fn amqp(&self) -> Option<amqp::AmqpConfig> {
        if !self.amqp && self.amqp_url.is_none() {
            return None;
        }
        Some(amqp::AmqpConfig {
            url: self.amqp_url.clone().unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned()),
            exchange: self.amqp_exchange.clone(),
            body: self.amqp_body,
            lag_interval: self.amqp_lag_interval,
            ca: self.amqp_ca.clone(),
        })
    }
}

ordo_runtime::service_config!(Config, validate = Config::check);

impl Config {
    /// Cross-field checks clap cannot express.
    fn check(&self) -> Result<(), String> {
        // Unreadable or malformed key files stop the start with exit code 64.
        ordo_runtime::auth::Auth::from_args(&self.auth)?;
        sse::cors(&self.sse_allow_origin)?;
        if self.subscriber_buffer == 0 {
            return Err("--subscriber-buffer must be at least 1".into());
        }
        if self.amqp_lag_interval.is_zero() {
            return Err("--amqp-lag-interval must be more than 0".into());
        }
        if self.sse_keep_alive.is_zero() {
            return Err("--sse-keep-alive must be positive".into());
        }
        if let Some(amqp) = self.amqp() {
            amqp.url.parse::<lapin::uri::AMQPUri>().map_err(|e| format!("--amqp-url is not an AMQP URL: {e}"))?;
            amqp::tls::config(amqp.ca.as_deref())?;
            let exchange = &amqp.exchange;
            let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
            if exchange.is_empty() || exchange.len() > 255 || !exchange.chars().all(valid) {
                return Err(format!(
                    "--amqp-exchange {exchange:?} must be 1 to 255 characters of letters, digits, '-', '_', '.', ':'"
                ));
            }
            if exchange.starts_with("amq.") {
                return Err(format!("--amqp-exchange {exchange:?}: names starting with \"amq.\" are reserved"));
            }
        }
        Ok(())
    }
}

/// Runs the gateway: gRPC on `listener`, SSE on `--sse-listen` (bound here).
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let sse = match config.sse_listen {
        Some(addr) => Some(
            TcpListener::bind(addr).await.with_context(|| format!("cannot listen for Server-Sent Events on {addr}"))?,
        ),
        None => None,
    };
    run_with(config, listener, sse, shutdown).await
}

/// [`run`] with the SSE listener given (or none: no SSE).
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    sse_listener: Option<TcpListener>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Lazy: health is served (NOT_SERVING) at once, even while Redis is down.
    // One node or a Redis Cluster, by the URL (`redis+cluster://`).
    let conn = ordo_runtime::redis_conn::connect(&config.redis_url)?;
    let (readiness, _watcher) = Readiness::watch(vec![Dependency::redis(conn.clone())], shutdown.clone());
    metrics::describe();
    let source = hub::Source::new(&config.redis_url)?;
    let hub = hub::Hub::for_source(config.subscriber_buffer, config.hub_slot_hold, &source);
    let log = log::Log::new(conn, config.retention_age);
    let drain = config.common.drain_timeout;
    // Stops everything when shutdown comes, or when the gRPC or SSE server fails.
    let stop = shutdown.child_token();

    let _tail = Owned::spawn(hub.clone().listen(source, stop.clone()));
    let amqp = config.amqp().map(|amqp| {
        tracing::info!(exchange = %amqp.exchange, "AMQP publishing on");
        Owned::spawn(amqp::run(amqp, log.clone(), hub.clone(), stop.clone()))
    });
    let auth = ordo_runtime::auth::Auth::from_args(&config.auth).map_err(anyhow::Error::msg)?;
    auth.log_startup("push-gateway");
    let cors = sse::cors(&config.sse_allow_origin).map_err(anyhow::Error::msg)?;
    let sse = sse_listener.map(|listener| {
        let state = sse::SseState {
            hub: hub.clone(),
            log: log.clone(),
            shutdown: stop.clone(),
            keep_alive: config.sse_keep_alive,
            readiness: readiness.clone(),
            auth: auth.clone(),
        };
        let router = sse::router(state, cors);
        let stop = stop.clone();
        Owned::spawn(async move {
            let served = sse::serve(listener, router, stop.clone(), drain).await;
            if served.is_err() {
                stop.cancel();
            }
            served
        })
    });

    let service = service::PushGatewayService::new(hub, log, stop.clone(), readiness.clone()).with_auth(auth);
    let served = GrpcServer::new()
        .with_readiness(readiness)
        .with_service(service.into_server())
        .serve(listener, stop.clone(), drain)
        .await;
    stop.cancel();
    // The helpers saw the cancellation: each gets the drain time to finish.
    let sse_served = match sse {
        Some(sse) => sse.finish(drain).await.unwrap_or(Ok(())),
        None => Ok(()),
    };
    if let Some(amqp) = amqp {
        amqp.finish(drain).await;
    }
    served.and(sse_served.context("the Server-Sent Events server failed"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use ordo_runtime::app::ServiceConfig;

    use super::*;

    #[test]
    fn defaults_and_off_values_parse() {
        let config = Config::try_parse_from(["push-gateway"]).expect("defaults parse");
        assert_eq!(config.retention_age, None);
        assert_eq!(config.sse_listen, Some(SocketAddr::from(([0, 0, 0, 0], 50056))));
        assert!(config.amqp().is_none(), "AMQP is off unless asked for");
        assert!(ServiceConfig::validate(&config).is_ok());

        let config = Config::try_parse_from([
            "push-gateway",
            "--retention-age",
            "90s",
            "--sse-listen",
            "off",
            "--amqp",
            "--amqp-exchange",
            "my.results",
        ])
        .expect("flags parse");
        assert_eq!(config.retention_age, Some(Duration::from_secs(90)));
        assert_eq!(config.sse_listen, None);
        let amqp = config.amqp().expect("--amqp turns AMQP on");
        assert_eq!(amqp.url, DEFAULT_AMQP_URL);
        assert_eq!(amqp.exchange, "my.results");
        assert!(ServiceConfig::validate(&config).is_ok());
    }

    #[test]
    fn bad_amqp_settings_are_refused() {
        for args in [
            ["push-gateway", "--amqp-url", "http://nope", "--amqp-exchange", "x"],
            ["push-gateway", "--amqp-url", DEFAULT_AMQP_URL, "--amqp-exchange", "amq.topic"],
            ["push-gateway", "--amqp-url", DEFAULT_AMQP_URL, "--amqp-exchange", "bad name"],
        ] {
            let config = Config::try_parse_from(args).expect("flags parse");
            assert!(ServiceConfig::validate(&config).is_err(), "{args:?} must be refused");
        }
    }
}
