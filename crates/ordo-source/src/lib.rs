//! Ordo's JetStream source and sink (`ordo-source`): ordered parallel
//! consumption of a real log.
//!
//! ```text
//! JetStream stream ──pull (durable, max_ack_pending)──► source ──Process──► harmonizer … reassembler
//!        ▲  +ACK once the result is back                 │ Redis: position → (key, sequence)  │
//!        └───────────────────────────────────────────────┘                                    ▼
//!  results.<key> ◄──publish (Nats-Msg-Id <key>:<position>, PubAck, then cursor CAS)── sink ◄── release logs
//! ```
//!
//! - [`source`]: the durable pull consumer; each batch of deliveries is
//!   numbered per key in one Redis script ([`mapping`]), so a redelivered
//!   message becomes the same (key, sequence); the consumer is recreated at
//!   its ack floor + 1 whenever a delivery may have been skipped.
//! - [`call`]: the one long-lived `Process` call, resent in order when it breaks;
//!   each settled result acks its JetStream deliveries.
//! - [`sink`]: publishes the released results per key from a cursor in Redis.
//! - [`message`] (key, operation and attributes of a message) and [`flight`]
//!   (the events in flight) decide without I/O.
//!
//! It writes only its own keys (`ordo:{source:<name>}:*`), never reorder state.

mod call;
pub mod config;
pub mod flight;
pub mod mapping;
pub mod message;
mod metrics;
pub mod sink;
mod source;

use ordo_runtime::task::Owned;
use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_nats::jetstream;
pub use config::Config;
pub use ordo_runtime::Shutdown;
use ordo_runtime::{
    readiness::{Dependency, Readiness},
    server::GrpcServer,
};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc},
};

use crate::{flight::Flight, mapping::Mapping, message::Decoder};

/// Headers of a dead letter, besides the message's own.
pub const DEAD_LETTER_ERROR_HEADER: &str = "Ordo-Error";
pub const DEAD_LETTER_SUBJECT_HEADER: &str = "Ordo-Source-Subject";
pub const DEAD_LETTER_SEQUENCE_HEADER: &str = "Ordo-Source-Sequence";

/// What the intake, the call and the sink share.
pub(crate) struct Shared {
    flight: Mutex<Flight<jetstream::Message>>,
    retries: Mutex<Vec<(String, u64, Instant)>>,
    /// `<name>:`, the prefix of this source's Ordo stream ids.
    prefix: String,
    mapping: Mapping,
    client: async_nats::Client,
    dead_letters: Option<String>,
    /// Wakes the sink for a key whose result came back (`None`: no sink).
    wake: Option<mpsc::Sender<String>>,
}

impl Shared {
    fn lock_flight(&self) -> MutexGuard<'_, Flight<jetstream::Message>> {
        self.flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The Ordo stream id of `key`: `<name>:<key>`.
    pub(crate) fn stream_id(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The key of one of this source's stream ids.
    pub(crate) fn key_of<'a>(&self, stream_id: &'a str) -> Option<&'a str> {
        stream_id.strip_prefix(&self.prefix)
    }

    fn update_in_flight(&self) {
        let len = self.lock_flight().len();
        metrics::IN_FLIGHT.set(len as f64);
    }

    fn retry_later(&self, key: String, sequence: u64, at: Instant) {
        let mut retries = self.retries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !retries.iter().any(|(k, s, _)| *k == key && *s == sequence) {
            retries.push((key, sequence, at));
        }
    }

    fn due_retries(&self, now: Instant) -> Vec<(String, u64)> {
        let mut retries = self.retries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (due, later): (Vec<_>, Vec<_>) = retries.drain(..).partition(|(_, _, at)| *at <= now);
        *retries = later;
        due.into_iter().map(|(key, sequence, _)| (key, sequence)).collect()
    }

    fn wake_sink(&self, key: String) {
        if let Some(wake) = &self.wake {
            // Full: the sink is busy and its sweep will find the key anyway.
            let _ = wake.try_send(key);
        }
    }

    /// Publishes `message` to the dead-letter subject (if any) with why, then
    /// terminates it (`+TERM`: never redelivered).
    pub(crate) async fn dead_letter(&self, message: &jetstream::Message, position: u64, reason: &str) {
        metrics::DEAD_LETTERS.increment(1);
        tracing::warn!(subject = %message.subject, position, reason, dead_letters = ?self.dead_letters, "dead letter");
        if let Some(subject) = &self.dead_letters {
            let mut headers = message.headers.clone().unwrap_or_default();
            let one_line: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            headers.insert(DEAD_LETTER_ERROR_HEADER, one_line.as_str());
            headers.insert(DEAD_LETTER_SUBJECT_HEADER, message.subject.as_str());
            headers.insert(DEAD_LETTER_SEQUENCE_HEADER, position.to_string().as_str());
            if let Err(error) =
                self.client.publish_with_headers(subject.clone(), headers, message.payload.clone()).await
            {
                tracing::warn!(%error, %subject, "cannot publish the dead letter");
            }
        }
        if let Err(error) = message.ack_with(jetstream::AckKind::Term).await {
            tracing::debug!(%error, "term (it will be redelivered and dead-lettered again)");
        }
    }
}

/// Runs the source (and the sink unless `--sink-prefix off`): health on
/// `listener`, until `shutdown`; then it stops consuming and gives what is in
/// flight the drain timeout to come back and be acked.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    metrics::describe();
    let redis = ordo_runtime::redis_conn::connect(&config.redis_url)?;
    let reconnected = Arc::new(Notify::new());
    let client = {
        let reconnected = reconnected.clone();
        // The first connect is no reconnect: the intake creates the consumer then anyway.
        let connected_before = Arc::new(std::sync::atomic::AtomicBool::new(false));
        async_nats::ConnectOptions::new()
            .name(format!("ordo-source {}", config.name))
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let reconnected = reconnected.clone();
                let connected_before = connected_before.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            if connected_before.swap(true, std::sync::atomic::Ordering::SeqCst) {
                                reconnected.notify_one();
                            }
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            })
            .connect(config.nats_url.as_str())
            .await?
    };
    let nats_probe = client.clone();
    let (readiness, _watcher) = Readiness::watch(
        vec![
            Dependency::redis(redis.clone()),
            Dependency::new("nats", move || {
                let state = nats_probe.connection_state();
                async move {
                    match state {
                        async_nats::connection::State::Connected => Ok(()),
                        other => Err(format!("NATS is {other}")),
                    }
                }
            }),
        ],
        shutdown.clone(),
    );
    let js = jetstream::new(client.clone());
    let (wake, woken) = mpsc::channel(4096);
    let shared = Arc::new(Shared {
        flight: Mutex::new(Flight::default()),
        retries: Mutex::new(Vec::new()),
        prefix: format!("{}:", config.name),
        mapping: Mapping::new(redis, &config.name),
        client,
        dead_letters: config.dead_letters(),
        wake: config.sink_enabled().then_some(wake),
    });
    let drain = config.common.drain_timeout;
    // Intake and helpers stop at shutdown; the call and the sink go on while
    // results of what is in flight still come back (at most the drain).
    let stop_intake = shutdown.child_token();
    let stop_rest = tokio_util::sync::CancellationToken::new();
    let (outbound, inbound) = mpsc::channel(config.max_in_flight.max(1));
    let decoder = Decoder::new(config.key.clone(), config.operation.clone(), config.attribute_map(), &config.name);

    let intake = Owned::spawn(
        source::Intake {
            shared: shared.clone(),
            js: js.clone(),
            config: config.clone(),
            decoder,
            reconnected,
            outbound,
        }
        .run(stop_intake.clone()),
    );
    let floor = Owned::spawn(source::keep_floor(shared.clone(), js.clone(), config.clone(), stop_rest.clone()));
    let progress = Owned::spawn(source::keep_in_progress(shared.clone(), config.ack_wait, stop_rest.clone()));
    let call = Owned::spawn(call::drive(shared.clone(), config.harmonizer.clone(), inbound, stop_intake.clone()));
    let sink = config.sink_enabled().then(|| {
        let sink = sink::Sink {
            prefix: config.sink_prefix.clone(),
            stream: config.sink_stream.clone(),
            sweep: config.sink_sweep,
        };
        Owned::spawn(sink.run(shared.clone(), js.clone(), woken, stop_rest.clone()))
    });
    tracing::info!(stream = %config.stream, name = %config.name, harmonizer = %config.harmonizer, sink = config.sink_enabled(), "ordo-source started");

    let served = GrpcServer::new().with_readiness(readiness).serve(listener, shutdown.clone(), drain).await;
    stop_intake.cancel();
    intake.finish(Duration::from_secs(1)).await;
    // The call returns once nothing is in flight (or the drain runs out).
    let drained = call.finish(drain).await;
    if drained.is_none() {
        let left = shared.lock_flight().len();
        tracing::warn!(left, "stopping with events in flight: their messages will be redelivered");
    }
    stop_rest.cancel();
    if let Some(sink) = sink {
        sink.finish(drain).await;
    }
    floor.finish(Duration::from_millis(200)).await;
    progress.finish(Duration::from_millis(200)).await;
    served
}
