//! The intake: the durable pull consumer, its deliveries numbered per key in
//! Redis (one script call per batch) and handed to the call driver.
//!
//! **Why the consumer is recreated at its ack floor + 1.** A pull consumer
//! delivers new messages in stream order, but a delivery lost on the way
//! (NATS restarted, the connection broke, the source died before numbering
//! what it had fetched) is redelivered only after `ack_wait`, behind later
//! messages of the same key — numbering those first would reorder the key.
//! So on start, on every NATS reconnect, and whenever the consumer sequence
//! of a delivery skips one, the source deletes the consumer and creates it
//! again from its ack floor + 1: every position not acked comes again, in
//! stream order; those already numbered get their numbers back from Redis,
//! the others the next ones. The floor is also kept in Redis (raised from the
//! consumer's ack floor every few seconds), so a crash between the delete
//! and the create starts from it rather than from the stream's beginning.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use futures::{FutureExt as _, StreamExt as _};
use ordo_proto::{Event, OrderingMode};
use ordo_runtime::backoff::Backoff;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{Shared, config::Config, mapping::Assigned, message::Decoder, metrics};

/// How often the consumer's ack floor is copied to Redis (and mappings below it trimmed).
pub(crate) const FLOOR_EVERY: Duration = Duration::from_secs(2);

/// What the intake needs besides the shared state.
pub(crate) struct Intake {
    pub shared: Arc<Shared>,
    pub js: jetstream::Context,
    pub config: Config,
    pub decoder: Decoder,
    /// Woken on every NATS (re)connect after the first.
    pub reconnected: Arc<Notify>,
    /// Towards the call driver: (key, sequence) of each new event.
    pub outbound: mpsc::Sender<(String, u64)>,
}

/// Why a delivery stream was left.
enum Leave {
    Stop,
    Reset(&'static str),
}

impl Intake {
    /// Consumes until `stop`; recreates the consumer whenever delivery may
    /// have skipped a position.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if stop.is_cancelled() {
                return;
            }
            let consumer = tokio::select! {
                () = stop.cancelled() => return,
                consumer = self.reset_consumer() => consumer,
            };
            let consumer = match consumer {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), stream = %self.config.stream, "cannot (re)create the consumer; retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            metrics::RESETS.increment(1);
            match self.consume(consumer, &stop, &mut backoff).await {
                Leave::Stop => return,
                Leave::Reset(why) => tracing::info!(why, "recreating the consumer at its ack floor + 1"),
            }
        }
    }

    /// Deletes the durable consumer and creates it again from the ack floor
    /// (the higher of the consumer's and the one kept in Redis) + 1.
    async fn reset_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.js.get_stream(&self.config.stream).await?;
        let kept = self.shared.mapping.floor().await?;
        let server = match stream.get_consumer::<pull::Config>(&self.config.name).await {
            Ok(mut consumer) => consumer.info().await.map(|info| info.ack_floor.stream_sequence).unwrap_or(0),
            Err(_) => 0,
        };
        let floor = self.shared.mapping.raise_floor(kept.max(server)).await?;
        // A missing consumer is what we want here.
        let _ = stream.delete_consumer(&self.config.name).await;
        let deliver_policy =
            if floor == 0 { DeliverPolicy::All } else { DeliverPolicy::ByStartSequence { start_sequence: floor + 1 } };
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(self.config.name.clone()),
                description: Some("ordo-source: acked once each message's result is released".into()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.config.ack_wait,
                max_ack_pending: i64::try_from(self.config.max_in_flight).unwrap_or(i64::MAX),
                filter_subject: self.config.filter_subject.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        tracing::info!(stream = %self.config.stream, consumer = %self.config.name, from = floor + 1, "consuming");
        Ok(consumer)
    }

    async fn consume(
        &self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Leave {
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.config.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot pull from the consumer");
                backoff.wait().await;
                return Leave::Reset("the pull failed");
            }
        };
        // A fresh consumer numbers its deliveries from 1.
        let mut expected = 1u64;
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => return Leave::Stop,
                () = self.reconnected.notified() => return Leave::Reset("reconnected to NATS"),
                first = messages.next() => first,
            };
            let Some(first) = first else { return Leave::Reset("the delivery stream ended") };
            let mut batch = vec![first];
            while batch.len() < self.config.batch {
                match messages.next().now_or_never() {
                    Some(Some(next)) => batch.push(next),
                    _ => break,
                }
            }
            let mut good = Vec::with_capacity(batch.len());
            let mut skipped = false;
            for delivery in batch {
                let message = match delivery {
                    Ok(message) => message,
                    Err(error) => {
                        // Missed heartbeats and the like: the stream goes on pulling.
                        tracing::debug!(%error, "pull stream");
                        continue;
                    }
                };
                let Ok(info) = message.info() else {
                    tracing::warn!(subject = %message.subject, "a delivery without JetStream metadata; ignored");
                    continue;
                };
                if info.consumer_sequence != expected {
                    tracing::warn!(
                        expected,
                        got = info.consumer_sequence,
                        "a delivery was skipped; numbering stops here"
                    );
                    skipped = true;
                    break;
                }
                expected += 1;
                metrics::CONSUMED.increment(1);
                let position = info.stream_sequence;
                let headers: Vec<(String, String)> = message
                    .headers
                    .iter()
                    .flat_map(|map| map.iter())
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |value| (AsRef::<str>::as_ref(name).to_owned(), value.as_str().to_owned()))
                    })
                    .collect();
                let decoded =
                    self.decoder.decode(&message.subject, headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
                match decoded {
                    Ok(incoming) => good.push((position, incoming, message)),
                    Err(reason) => self.shared.dead_letter(&message, position, &reason).await,
                }
            }
            if !good.is_empty()
                && let Err(leave) = self.number(good, stop).await
            {
                return leave;
            }
            backoff.reset();
            if skipped {
                return Leave::Reset("a delivery was skipped");
            }
        }
    }

    /// Numbers a batch in Redis (retried until it answers) and hands every
    /// new event to the call driver.
    async fn number(
        &self,
        good: Vec<(u64, crate::message::Incoming, jetstream::Message)>,
        stop: &CancellationToken,
    ) -> Result<(), Leave> {
        let pairs: Vec<(u64, String)> =
            good.iter().map(|(position, incoming, _)| (*position, incoming.key.clone())).collect();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let assigned = loop {
            match self.shared.mapping.assign(&pairs).await {
                Ok(assigned) => break assigned,
                Err(error) => {
                    metrics::REDIS_ERRORS.increment(1);
                    tracing::warn!(%error, "cannot number the batch in Redis; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Err(Leave::Stop),
                        () = backoff.wait() => {}
                    }
                }
            }
        };
        let released = self.released(&good, stop).await?;
        for ((position, incoming, message), assigned) in good.into_iter().zip(assigned) {
            match assigned {
                Assigned::Sequence(sequence) if released.get(&incoming.key).is_some_and(|next| sequence < *next) => {
                    // Released already (a redelivery after its result came
                    // back): the harmonizer would take a resend on this call
                    // for a duplicate and answer nothing, so ack it here.
                    tracing::debug!(position, key = %incoming.key, sequence, "delivered again after its result was released; acked");
                    if message.ack().await.is_ok() {
                        metrics::ACKED.increment(1);
                    }
                    self.shared.wake_sink(incoming.key);
                }
                Assigned::Sequence(sequence) => {
                    let stream_id = self.shared.stream_id(&incoming.key);
                    let payload = message.payload.clone();
                    let new = self.shared.lock_flight().insert(
                        &incoming.key,
                        sequence,
                        position,
                        message,
                        || Event {
                            stream_id,
                            sequence,
                            operation: incoming.operation,
                            payload,
                            attributes: incoming.attributes,
                            mode: OrderingMode::Ordered as i32,
                            ..Default::default()
                        },
                        std::time::Instant::now(),
                    );
                    self.shared.update_in_flight();
                    if new {
                        // Bounded: the consumer delivers at most max_ack_pending unacked messages.
                        if self.outbound.send((incoming.key, sequence)).await.is_err() {
                            return Err(Leave::Stop);
                        }
                    }
                }
                Assigned::Done => {
                    tracing::debug!(position, "delivered again after it was done; acked");
                    if message.ack().await.is_ok() {
                        metrics::ACKED.increment(1);
                    }
                }
                Assigned::Late => {
                    let reason = format!(
                        "arrived after a later message of key {:?} was numbered (it would be out of order)",
                        incoming.key
                    );
                    self.shared.dead_letter(&message, position, &reason).await;
                }
            }
        }
        Ok(())
    }
}

impl Intake {
    /// Each key's lowest unreleased sequence (the stream's `next` in its
    /// meta), read in one pipeline; retried until Redis answers.
    async fn released(
        &self,
        good: &[(u64, crate::message::Incoming, jetstream::Message)],
        stop: &CancellationToken,
    ) -> Result<std::collections::HashMap<String, u64>, Leave> {
        let keys: Vec<String> = good
            .iter()
            .map(|(_, incoming, _)| incoming.key.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.hget(ordo_core::keys::meta(&self.shared.stream_id(key)), "next");
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let mut conn = self.shared.mapping.connection();
            match pipe.query_async::<Vec<Option<u64>>>(&mut conn).await {
                Ok(next) => {
                    return Ok(keys.into_iter().zip(next).map(|(key, next)| (key, next.unwrap_or(0))).collect());
                }
                Err(error) => {
                    metrics::REDIS_ERRORS.increment(1);
                    tracing::warn!(%error, "cannot read the keys' release positions; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Err(Leave::Stop),
                        () = backoff.wait() => {}
                    }
                }
            }
        }
    }
}

/// Copies the consumer's ack floor to Redis every [`FLOOR_EVERY`] and trims
/// the mappings below it.
pub(crate) async fn keep_floor(shared: Arc<Shared>, js: jetstream::Context, config: Config, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FLOOR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let floor = async {
            let mut consumer: jetstream::consumer::Consumer<pull::Config> =
                js.get_consumer_from_stream(&config.name, &config.stream).await?;
            anyhow::Ok(consumer.info().await?.ack_floor.stream_sequence)
        };
        match floor.await {
            Ok(floor) => {
                if let Err(error) = shared.mapping.raise_floor(floor).await {
                    metrics::REDIS_ERRORS.increment(1);
                    tracing::debug!(%error, "cannot record the ack floor");
                }
            }
            Err(error) => tracing::debug!(error = format!("{error:#}"), "cannot read the consumer's ack floor"),
        }
    }
}

/// Sends in-progress acks (`+WPI`) for deliveries waiting for their result
/// longer than a third of `ack_wait`, so JetStream does not redeliver them.
pub(crate) async fn keep_in_progress(shared: Arc<Shared>, ack_wait: Duration, stop: CancellationToken) {
    let every = ack_wait / 3;
    let mut tick = tokio::time::interval((every / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = shared.lock_flight().due_progress(std::time::Instant::now(), every);
        for delivery in due {
            if let Err(error) = delivery.ack_with(AckKind::Progress).await {
                tracing::debug!(%error, "in-progress ack");
            }
        }
    }
}
