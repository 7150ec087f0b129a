//! `ordo-source`'s flags (clap, every one with an `ORDO_SOURCE_*` variable)
//! and their checks at start-up.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ordo_core::duration;
use ordo_runtime::app::CommonArgs;

/// Where a message's key (its Ordo stream) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// A header of the message (e.g. `Ordo-Key`).
    Header(String),
    /// A token of the subject, 0-based (`orders.<key>` is `subject:1`).
    Subject(usize),
}

impl KeyFrom {
    /// `header:NAME` or `subject:N`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some(("header", name)) if !name.trim().is_empty() => Ok(Self::Header(name.trim().to_owned())),
            Some(("subject", index)) => index
                .trim()
                .parse::<usize>()
                .map(Self::Subject)
                .map_err(|_| format!("{text:?}: subject:N wants a 0-based token index, e.g. subject:1")),
            _ => Err(format!("{text:?}: use header:NAME (e.g. header:Ordo-Key) or subject:N (e.g. subject:1)")),
        }
    }
}

/// Ordo JetStream source and sink: consumes a JetStream stream through a
/// durable pull consumer, numbers each key's messages densely and durably
/// (in Redis), feeds them to the harmonizer over one `Process` call, acks each
/// message once its result is released, and publishes the released results
/// in order to `<sink-prefix>.<key>`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ordo-source", version)]
pub struct Config {
    /// Address of the gRPC health server (`grpc.health.v1`).
    #[arg(long, env = "ORDO_SOURCE_LISTEN", default_value = "0.0.0.0:50058")]
    pub listen: SocketAddr,
    /// Where the Prometheus metrics endpoint (`GET /metrics`) listens; `off` serves none.
    #[arg(long, env = "ORDO_SOURCE_METRICS_LISTEN", default_value = "0.0.0.0:9098", value_parser = ordo_runtime::metrics::parse_listen)]
    // Fully qualified: clap would otherwise treat it as an optional address.
    pub metrics_listen: ::std::option::Option<SocketAddr>,
    /// NATS server(s), comma-separated (`nats://host:port`).
    #[arg(long, env = "ORDO_SOURCE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The JetStream stream to consume (it must exist).
    #[arg(long, env = "ORDO_SOURCE_STREAM")]
    pub stream: String,
    /// Only messages on these subjects (a JetStream filter, wildcards allowed); default: all of the stream.
    #[arg(long, env = "ORDO_SOURCE_FILTER_SUBJECT")]
    pub filter_subject: Option<String>,
    /// Name of this source: the durable consumer's name, the Redis hash tag of
    /// its keys (`ordo:{source:<name>}:*`) and the prefix of its Ordo stream
    /// ids (`<name>:<key>`). One running process per name.
    #[arg(long, env = "ORDO_SOURCE_NAME", default_value = "ordo-source")]
    pub name: String,
    /// Where each message's key comes from: `header:NAME` or `subject:N`
    /// (0-based token of the subject). A message without one is dead-lettered.
    #[arg(long, env = "ORDO_SOURCE_KEY", default_value = "header:Ordo-Key", value_parser = KeyFrom::parse)]
    pub key: KeyFrom,
    /// Operation of every event; a message's `Ordo-Operation` header overrides it.
    #[arg(long, env = "ORDO_SOURCE_OPERATION", default_value = "async-echo")]
    pub operation: String,
    /// Attributes of every event (`name=value`, repeatable or comma-separated);
    /// a message's `Ordo-Attr-<name>` headers add to and override them.
    #[arg(long = "attribute", env = "ORDO_SOURCE_ATTRIBUTES", value_delimiter = ',', value_parser = parse_attribute)]
    pub attributes: Vec<(String, String)>,
    /// Harmonizer address (host:port).
    #[arg(long, env = "ORDO_SOURCE_HARMONIZER", default_value = "127.0.0.1:50051")]
    pub harmonizer: String,
    /// Redis holding the reorder state (the release logs the sink reads) and
    /// the source's own position → (key, sequence) map. One node.
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Messages in flight at most (delivered, not yet acked): the consumer's
    /// `max_ack_pending`. Keep it within the harmonizer's `--window` per key.
    #[arg(long, env = "ORDO_SOURCE_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Messages fetched per pull and numbered per Redis script call.
    #[arg(long, env = "ORDO_SOURCE_BATCH", default_value_t = 128)]
    pub batch: usize,
    /// The consumer's `ack_wait`: an unacked message is redelivered after it.
    /// Messages waiting longer for their result get in-progress acks (`+WPI`)
    /// every third of it, so a slow result is not redelivered.
    #[arg(long, env = "ORDO_SOURCE_ACK_WAIT", default_value = "30s", value_parser = duration::parse)]
    pub ack_wait: Duration,
    /// Where messages that cannot become events (no key, bad key) are
    /// published (core NATS, with `Ordo-Error`, `Ordo-Source-Subject` and
    /// `Ordo-Source-Sequence` headers) before they are terminated (`+TERM`);
    /// `off` only terminates and logs them. Default: `ordo.dead.<name>`.
    #[arg(long, env = "ORDO_SOURCE_DEAD_LETTER_SUBJECT")]
    pub dead_letter_subject: Option<String>,
    /// The sink: released results of key K are published to `<prefix>.K` with
    /// `Nats-Msg-Id: <K>:<position>`; `off` disables the sink.
    #[arg(long, env = "ORDO_SOURCE_SINK_PREFIX", default_value = "results")]
    pub sink_prefix: String,
    /// The JetStream stream the sink publishes into, created (subjects
    /// `<prefix>.>`, 2 min duplicate window) when it does not exist.
    #[arg(long, env = "ORDO_SOURCE_SINK_STREAM", default_value = "ORDO_RESULTS")]
    pub sink_stream: String,
    /// How often the sink sweeps every key the source has seen for released
    /// results it has not published (besides publishing as results arrive).
    #[arg(long, env = "ORDO_SOURCE_SINK_SWEEP", default_value = "2s", value_parser = duration::parse)]
    pub sink_sweep: Duration,
    #[command(flatten)]
    pub common: CommonArgs,
}

ordo_runtime::service_config!(Config, validate = Config::check);

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: an attribute is name=value (e.g. latency=exp:10ms)")),
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        if self.stream.trim().is_empty() {
            return Err("--stream names the JetStream stream to consume".into());
        }
        if self.name.is_empty() || self.name.contains(['{', '}', '.', '*', '>', ' ']) {
            return Err(format!(
                "--name {:?}: a non-empty name without braces, dots, wildcards or spaces (it names a consumer)",
                self.name
            ));
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight must be at least 1".into());
        }
        if self.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err("--ack-wait must be at least 1s".into());
        }
        if ordo_runtime::redis_conn::is_cluster_url(&self.redis_url) {
            return Err("--redis-url: ordo-source does not support a Redis Cluster yet (one node)".into());
        }
        if self.sink_enabled() && (self.sink_prefix.is_empty() || self.sink_prefix.contains(['*', '>', ' '])) {
            return Err(format!("--sink-prefix {:?}: a subject prefix without wildcards or spaces", self.sink_prefix));
        }
        Ok(())
    }

    /// The attributes every event starts with.
    pub fn attribute_map(&self) -> HashMap<String, String> {
        self.attributes.iter().cloned().collect()
    }

    /// False for `--sink-prefix off`.
    pub fn sink_enabled(&self) -> bool {
        !self.sink_prefix.eq_ignore_ascii_case("off")
    }

    /// The dead-letter subject, `None` for `off`.
    pub fn dead_letters(&self) -> Option<String> {
        match &self.dead_letter_subject {
            Some(subject) if subject.eq_ignore_ascii_case("off") => None,
            Some(subject) => Some(subject.clone()),
            None => Some(format!("ordo.dead.{}", self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use ordo_runtime::app::ServiceConfig as _;

    use super::*;

    #[test]
    fn key_sources_parse_and_bad_ones_say_what_to_write() {
        assert_eq!(KeyFrom::parse("header:Ordo-Key"), Ok(KeyFrom::Header("Ordo-Key".into())));
        assert_eq!(KeyFrom::parse("subject:1"), Ok(KeyFrom::Subject(1)));
        assert!(KeyFrom::parse("subject:x").expect_err("refused").contains("0-based"));
        assert!(KeyFrom::parse("header:").expect_err("refused").contains("header:NAME"));
        assert!(KeyFrom::parse("key").expect_err("refused").contains("subject:N"));
    }

    #[test]
    fn defaults_parse_and_checks_refuse_bad_values() {
        let config = Config::try_parse_from(["ordo-source", "--stream", "ORDERS"]).expect("defaults parse");
        assert!(config.validate().is_ok());
        assert_eq!(config.dead_letters().as_deref(), Some("ordo.dead.ordo-source"));
        assert!(config.sink_enabled());
        let config = Config::try_parse_from([
            "ordo-source",
            "--stream",
            "ORDERS",
            "--attribute",
            "latency=fixed:5ms,mode=x",
            "--dead-letter-subject",
            "off",
            "--sink-prefix",
            "off",
        ])
        .expect("flags parse");
        assert_eq!(config.attribute_map().get("latency").map(String::as_str), Some("fixed:5ms"));
        assert_eq!(config.dead_letters(), None);
        assert!(!config.sink_enabled());
        for bad in [
            vec!["--name", "a.b"],
            vec!["--max-in-flight", "0"],
            vec!["--ack-wait", "10ms"],
            vec!["--redis-url", "redis+cluster://127.0.0.1:7000"],
            vec!["--sink-prefix", "results.>"],
        ] {
            let config = Config::try_parse_from(["ordo-source", "--stream", "S"].into_iter().chain(bad.clone()))
                .expect("parses");
            assert!(config.validate().is_err(), "{bad:?} must be refused");
        }
        assert!(Config::try_parse_from(["ordo-source", "--stream", "S", "--attribute", "=x"]).is_err());
    }
}
