//! AMQP 0.9.1 delivery: every released result is published to a durable
//! topic exchange (routing key = stream id) as a persistent message, with
//! publisher confirms, per stream strictly in release order.
//!
//! The release logs in Redis are the outbox. A stream's results are read
//! from its log from the stream's publish cursor ([`outbox`]), published in
//! position order on one channel, and the cursor moves only after the broker
//! confirmed all of them. Anything released while the broker is down (or
//! while this process is) stays in the log and is published, in order, once
//! it is back. Delivery is at least once: after a failure the unconfirmed
//! tail is published again, and every message carries its sequence and
//! position so a consumer can drop a repeat. A repeat only ever carries a
//! position the queue has already been given: each publisher publishes a
//! stream in order from a cursor that only moves forward past confirmed
//! messages.
//!
//! Which streams to publish: while it leads, the publisher holds the hub's
//! [`Firehose`], which names every stream with a live release (the hub then
//! subscribes every slot's release channel: the publisher follows every
//! stream, so it hears every release, once); a full scan of Redis (every
//! master on a cluster: at start, after each broker reconnect, on becoming
//! leader, once the firehose hears every slot, and whenever it lagged,
//! e.g. after a failover) finds whatever released unnoticed. Several gateway
//! replicas may run with AMQP on: one holds a lease per exchange and
//! publishes, the others stand by without a firehose (so a standby's hub
//! subscribes only the slots its own subscribers follow).
//!
//! A cursor left behind the log's oldest entry (the reassembler trimmed
//! results the broker never got) is reported, never skipped silently: an
//! `ordo.gap` message names the lost positions before publishing goes on.
//!
//! Dead letters: every FAILED or GAP result is published a second time, right
//! after itself, with routing key `dead-letter.<stream id>` and type
//! `ordo.dead-letter`, under the same confirms (the cursor moves past neither
//! until both are confirmed). A queue bound to `dead-letter.#` thus gets every
//! dead letter at least once, per stream in release order.

mod lag;
pub mod message;
pub mod outbox;
pub mod tls;

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::future::join_all;
use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{FieldTable, ShortString},
};
use ordo_runtime::backoff::Backoff;
use tokio::time::Instant;

pub use self::message::BodyFormat;
use self::outbox::Outbox;
use crate::{
    Shutdown,
    hub::{Firehose, Hub},
    log::{Log, LogError},
};

/// How AMQP publishing is set up.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub url: String,
    pub exchange: String,
    pub body: BodyFormat,
    /// How often the outbox lag is sampled ([`lag`]).
    pub lag_interval: Duration,
    /// `--amqp-ca`: extra CA trusted for `amqps://` ([`tls`]).
    pub ca: Option<std::path::PathBuf>,
}

/// Results read and published per stream per round (then confirmed).
const PAGE: usize = 256;
/// Streams published concurrently (on one channel).
const PARALLEL_STREAMS: usize = 16;
/// Longest wait for a broker confirm before the connection is considered broken.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The publishing lease: its lifetime and how often it is renewed.
const LEASE_TTL: Duration = Duration::from_secs(10);
const LEASE_RENEW: Duration = Duration::from_secs(3);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MIN_REDIS_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Routing key prefix of dead letters (FAILED and GAP results).
pub const DEAD_LETTER_PREFIX: &str = "dead-letter.";

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused (nacked) position {position} of stream {stream:?}")]
    Nack { stream: String, position: u64 },
    #[error("no confirm from the broker within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
    #[error("no connection to the broker within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl PublishError {
    /// True when the broker connection must be rebuilt (else Redis failed).
    fn is_broker(&self) -> bool {
        matches!(self, Self::Broker(_) | Self::Nack { .. } | Self::ConfirmTimeout | Self::ConnectTimeout)
    }
}

/// What publishing one page of a stream left to do.
enum Progress {
    /// Everything released so far is confirmed.
    Done,
    /// More remains (a full page, or the cursor moved under us): go again.
    More,
}

/// Publishes until `shutdown`. Owns its broker connection; reconnects forever.
pub async fn run(config: AmqpConfig, log: Log, hub: Arc<Hub>, shutdown: Shutdown) {
    crate::metrics::describe_amqp();
    let outbox = Outbox::new(log.connection(), &config.exchange);
    let _lag = lag::spawn(outbox.clone(), config.lag_interval, shutdown.clone());
    let tls = match tls::config(config.ca.as_deref()) {
        Ok(tls) => tls,
        Err(error) => {
            // Checked at start-up; the file changed since.
            tracing::error!(%error, "AMQP publishing off: its TLS settings are unusable");
            return;
        }
    };
    let publisher = Publisher {
        tls,
        outbox,
        hub,
        firehose: None,
        log,
        config,
        dirty: HashSet::new(),
        queue: VecDeque::new(),
        need_scan: true,
        leader_since: None,
        renewed_at: None,
        shutdown,
    };
    publisher.run().await;
}

struct Publisher {
    config: AmqpConfig,
    tls: lapin::tcp::OwnedTLSConfig,
    log: Log,
    outbox: Outbox,
    hub: Arc<Hub>,
    /// Held while leading (see the module docs).
    firehose: Option<Firehose>,
    /// Streams that may have unconfirmed results, in round-robin order.
    dirty: HashSet<String>,
    queue: VecDeque<String>,
    need_scan: bool,
    leader_since: Option<Instant>,
    renewed_at: Option<Instant>,
    shutdown: Shutdown,
}

impl Publisher {
    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        while !self.shutdown.is_cancelled() {
            match self.connect().await {
                Ok((connection, channel)) => {
                    tracing::info!(exchange = %self.config.exchange, "connected to the AMQP broker");
                    backoff.reset();
                    // Whatever was released while we were away is found by a scan.
                    self.need_scan = true;
                    let outcome = self.publish_while_connected(&channel).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
                    match outcome {
                        Ok(()) => break,
                        Err(error) => tracing::warn!(%error, "AMQP publishing interrupted; reconnecting"),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, url = %redact(&self.config.url), "cannot connect to the AMQP broker; retrying")
                }
            }
            self.idle(backoff.next_delay()).await;
        }
        if self.leader_since.is_some()
            && let Err(error) = self.outbox.resign().await
        {
            tracing::debug!(%error, "could not resign the AMQP publishing lease");
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel), PublishError> {
        let properties = ConnectionProperties::default().with_connection_name("ordo-push-gateway".into());
        let runtime = lapin::runtime::default_runtime()?;
        let connect = Connection::connect_with_config(&self.config.url, properties, self.tls.clone(), runtime);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(connection) => connection?,
            Err(_) => return Err(PublishError::ConnectTimeout),
        };
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                ShortString::from(self.config.exchange.as_str()),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((connection, channel))
    }

    /// Waits `pause` (or until shutdown), still noting which streams release.
    async fn idle(&mut self, pause: Duration) {
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(until) => return,
                stream = next_released(&mut self.firehose) => match stream {
                    Some(stream) => self.mark(stream),
                    None => return,
                },
            }
        }
    }

    /// Notes that `stream` may have unpublished results. A standby replica
    /// notes nothing: on becoming leader it scans Redis instead, so its
    /// memory does not grow with every stream ever released.
    fn mark(&mut self, stream: String) {
        if self.leader_since.is_none() {
            return;
        }
        if self.dirty.insert(stream.clone()) {
            self.queue.push_back(stream);
        }
    }

    /// Holds (takes or renews) the publishing lease when due; true if we lead.
    async fn lead(&mut self) -> Result<bool, redis::RedisError> {
        if self.leader_since.is_some() && self.renewed_at.is_some_and(|at| at.elapsed() < LEASE_RENEW) {
            return Ok(true);
        }
        let leading = self.outbox.lead(LEASE_TTL).await?;
        match (leading, self.leader_since) {
            (true, None) => {
                tracing::info!(exchange = %self.config.exchange, "leading AMQP publishing");
                self.leader_since = Some(Instant::now());
                self.firehose = Some(self.hub.firehose());
                crate::metrics::SUBSCRIBERS_AMQP.set(1.0);
                self.need_scan = true;
            }
            (false, Some(_)) => {
                tracing::warn!(exchange = %self.config.exchange, "lost the AMQP publishing lease to another replica");
                self.leader_since = None;
                self.firehose = None;
                crate::metrics::SUBSCRIBERS_AMQP.set(0.0);
                self.dirty.clear();
                self.queue.clear();
            }
            _ => {}
        }
        self.renewed_at = leading.then(Instant::now);
        Ok(leading)
    }

    /// Publishes until shutdown (`Ok`) or a broker failure (`Err`). Redis
    /// failures are waited out here, keeping the broker connection.
    async fn publish_while_connected(&mut self, channel: &Channel) -> Result<(), PublishError> {
        let mut redis_backoff = Backoff::new(MIN_REDIS_BACKOFF, MAX_BACKOFF);
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            match self.round(channel).await {
                Ok(()) => redis_backoff.reset(),
                Err(error) if error.is_broker() => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, "AMQP outbox cannot read Redis; retrying");
                    self.idle(redis_backoff.next_delay()).await;
                }
            }
        }
    }

    /// One step: keep the lease, find work, publish one page of up to
    /// [`PARALLEL_STREAMS`] streams, or wait for something to do.
    async fn round(&mut self, channel: &Channel) -> Result<(), PublishError> {
        if !self.lead().await? {
            // Standing by: another replica publishes. Check the lease again soon.
            self.idle(LEASE_RENEW).await;
            return Ok(());
        }
        if self.firehose.as_ref().is_some_and(|firehose| firehose.signal.take()) {
            self.need_scan = true;
        }
        if self.need_scan {
            let found = self.outbox.scan().await?;
            if !found.is_empty() {
                tracing::info!(streams = found.len(), "AMQP outbox: streams with unpublished results");
            }
            found.into_iter().for_each(|stream| self.mark(stream));
            self.need_scan = false;
        }
        while let Some(stream) = self.firehose.as_mut().and_then(|firehose| firehose.rx.try_recv().ok()) {
            self.mark(stream);
        }
        if self.queue.is_empty() {
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(LEASE_RENEW) => {}
                heard = firehose_news(&mut self.firehose) => match heard {
                    News::Lagged => self.need_scan = true,
                    News::Released(Some(stream)) => self.mark(stream),
                    News::Released(None) => {}
                },
            }
            return Ok(());
        }
        let take = self.queue.len().min(PARALLEL_STREAMS);
        let streams: Vec<String> = self.queue.drain(..take).collect();
        for stream in &streams {
            self.dirty.remove(stream);
        }
        let outcomes = join_all(streams.iter().map(|stream| self.publish_page(channel, stream))).await;
        let mut failure = None;
        for (stream, outcome) in streams.into_iter().zip(outcomes) {
            match outcome {
                Ok(Progress::Done) => {}
                Ok(Progress::More) => self.mark(stream),
                Err(error) => {
                    self.mark(stream);
                    failure.get_or_insert(error);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Publishes the next page of `stream` from its cursor and, once the
    /// broker confirmed all of it, moves the cursor past it.
    async fn publish_page(&self, channel: &Channel, stream: &str) -> Result<Progress, PublishError> {
        let Ok(routing_key) = ShortString::try_new(stream) else {
            tracing::error!(stream, "stream id longer than 255 bytes cannot be an AMQP routing key; not published");
            return Ok(Progress::Done);
        };
        // Too long a stream id only loses the dead-letter copy, never the result.
        let dead_letter_key = ShortString::try_new(format!("{DEAD_LETTER_PREFIX}{stream}")).ok();
        let cursor = self.outbox.cursor(stream).await?;
        let from = cursor.unwrap_or(0);
        let entries = self.log.read_entries(stream, from, PAGE).await?;
        if !entries.exists {
            // The stream's state expired: nothing to publish, forget its cursor.
            if cursor.is_some() {
                self.outbox.compare_and_set(stream, cursor, None).await?;
            }
            return Ok(Progress::Done);
        }
        if from > entries.released {
            // The stream expired and started again from 0 under the same id.
            tracing::info!(stream, from, released = entries.released, "stream restarted; publishing it from its start");
            self.outbox.compare_and_set(stream, cursor, None).await?;
            return Ok(Progress::More);
        }
        let Some(first) = entries.results.first().map(|r| r.position) else { return Ok(Progress::Done) };
        let last = entries.results.last().map_or(first, |r| r.position);
        let exchange = ShortString::from(self.config.exchange.as_str());
        let mut confirms = Vec::with_capacity(entries.results.len() + 1);
        if cursor.is_some() && first > from {
            tracing::error!(
                stream,
                lost_from = from,
                lost_to = first,
                "results were trimmed before the broker got them"
            );
            let (body, properties) = message::gap(stream, from, first);
            let confirm = channel
                .basic_publish(exchange.clone(), routing_key.clone(), BasicPublishOptions::default(), &body, properties)
                .await?;
            confirms.push((from, confirm));
        }
        for result in &entries.results {
            let (body, properties) = message::result(result, self.config.body);
            let confirm = channel
                .basic_publish(exchange.clone(), routing_key.clone(), BasicPublishOptions::default(), &body, properties)
                .await?;
            confirms.push((result.position, confirm));
            if message::is_dead_letter(result) {
                let Some(key) = &dead_letter_key else {
                    tracing::error!(
                        stream,
                        position = result.position,
                        "stream id too long for a dead-letter routing key; dead letter not published"
                    );
                    continue;
                };
                let (body, properties) = message::dead_letter(result, self.config.body);
                let confirm = channel
                    .basic_publish(exchange.clone(), key.clone(), BasicPublishOptions::default(), &body, properties)
                    .await?;
                confirms.push((result.position, confirm));
            }
        }
        for (position, confirm) in confirms {
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(confirmation)) if confirmation.is_nack() => {
                    return Err(PublishError::Nack { stream: stream.to_owned(), position });
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => return Err(PublishError::ConfirmTimeout),
            }
        }
        let moved = self.outbox.compare_and_set(stream, cursor, Some(last + 1)).await?;
        if moved {
            crate::metrics::AMQP_CONFIRMED.increment(entries.results.len() as u64);
        }
        let more = !moved || entries.results.len() >= PAGE || last + 1 < entries.released;
        Ok(if more { Progress::More } else { Progress::Done })
    }
}

/// The next stream the firehose names (`None` once it closed); never, while
/// standing by without one.
async fn next_released(firehose: &mut Option<Firehose>) -> Option<String> {
    match firehose {
        Some(firehose) => firehose.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What the firehose said.
enum News {
    Lagged,
    Released(Option<String>),
}

/// The firehose's next stream or lag, whichever comes first; never without one.
async fn firehose_news(firehose: &mut Option<Firehose>) -> News {
    let Some(firehose) = firehose else { return std::future::pending().await };
    tokio::select! {
        () = firehose.signal.raised() => News::Lagged,
        stream = firehose.rx.recv() => News::Released(stream),
    }
}

/// `url` without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
    }
}
