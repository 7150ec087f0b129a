//! The machine's RabbitMQ (127.0.0.1:5672, guest/guest) as tests use it: a
//! queue bound to an exchange that keeps consuming across broker restarts,
//! and a guard that stops the broker's application and always starts it
//! again (`rabbitmqctl stop_app` / `start_app`, which keeps the node).
//!
//! Tests that use RabbitMQ put `amqp` in their name: `.config/nextest.toml`
//! runs them one at a time (one of them stops the broker). Each uses its own
//! exchange ([`unique_name`]) and deletes it at the end ([`QueueConsumer::delete`]);
//! queues also expire on their own after ten idle minutes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::{process::Command, task::JoinHandle, time::Instant};

/// The broker every test uses.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BROKER_ADDR: &str = "127.0.0.1:5672";

/// `prefix` plus a random suffix: a name no other test (or run) uses.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}.{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// True once the broker accepts TCP connections.
pub async fn broker_listening() -> bool {
    tokio::net::TcpStream::connect(BROKER_ADDR).await.is_ok()
}

/// Waits (at most a minute) for the broker to accept connections.
///
/// # Panics
/// When it does not: RabbitMQ must be running (`.ci/run` starts it).
pub async fn require_broker() {
    let until = Instant::now() + Duration::from_secs(60);
    while !broker_listening().await {
        assert!(
            Instant::now() < until,
            "RabbitMQ is not listening on {BROKER_ADDR}: start it with `rabbitmq-server -detached` \
             (or `rabbitmqctl start_app` if the node runs with its app stopped)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The message `type` property (`ordo.result` or `ordo.gap`).
    pub kind: String,
    pub routing_key: String,
    pub headers: BTreeMap<String, String>,
    pub sequence: Option<u64>,
    pub position: Option<u64>,
    pub content_type: String,
    pub delivery_mode: Option<u8>,
    pub redelivered: bool,
    pub body: Vec<u8>,
}

fn header_number(table: &FieldTable, key: &str) -> Option<u64> {
    match table.inner().get(key)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// A durable queue bound to `exchange` with one routing key, consumed (with
/// acks after recording) by a task that reconnects whenever the broker goes
/// away. Redeliveries after a reconnect are recorded too (`redelivered`).
#[derive(Debug)]
pub struct QueueConsumer {
    pub exchange: String,
    pub queue: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Drop for QueueConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect() -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name("ordo-test-consumer".into());
    tokio::time::timeout(Duration::from_secs(10), Connection::connect(AMQP_URL, properties))
        .await
        .context("connecting to RabbitMQ timed out")?
        .context("connecting to RabbitMQ")
}

/// Declares the exchange exactly as the push-gateway does (durable topic).
async fn declare(channel: &lapin::Channel, exchange: &str, queue: &str, routing_key: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            ShortString::from(exchange),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    channel
        .queue_declare(ShortString::from(queue), QueueDeclareOptions { durable: true, ..Default::default() }, arguments)
        .await?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(routing_key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

impl QueueConsumer {
    /// Declares `exchange` and a fresh queue bound with `routing_key`, then
    /// consumes. The binding exists when this returns.
    pub async fn bind(exchange: &str, routing_key: &str) -> anyhow::Result<Self> {
        let queue = unique_name("ordo-test-queue");
        let connection = connect().await?;
        let channel = connection.create_channel().await?;
        declare(&channel, exchange, &queue, routing_key).await?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(consume_forever(
            Some(connection),
            exchange.to_owned(),
            queue.clone(),
            routing_key.to_owned(),
            received.clone(),
        ));
        Ok(Self { exchange: exchange.to_owned(), queue, received, task })
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `done(received)` holds, at most `deadline`.
    pub async fn wait_until(&self, deadline: Duration, done: impl Fn(&[Received]) -> bool) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            let received = self.received();
            if done(&received) {
                return Ok(());
            }
            if Instant::now() >= until {
                let positions: Vec<Option<u64>> = received.iter().map(|r| r.position).collect();
                bail!("timed out after {deadline:?}; {} messages, positions {positions:?}", received.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops consuming and deletes the queue and the exchange.
    pub async fn delete(self) -> anyhow::Result<()> {
        self.task.abort();
        let connection = connect().await?;
        let channel = connection.create_channel().await?;
        channel.queue_delete(ShortString::from(self.queue.as_str()), QueueDeleteOptions::default()).await?;
        channel.exchange_delete(ShortString::from(self.exchange.as_str()), ExchangeDeleteOptions::default()).await?;
        let _ = connection.close(200, "bye".into()).await;
        Ok(())
    }
}

async fn consume_forever(
    mut first: Option<Connection>,
    exchange: String,
    queue: String,
    routing_key: String,
    received: Arc<Mutex<Vec<Received>>>,
) {
    loop {
        let connection = match first.take() {
            Some(connection) => Ok(connection),
            None => connect().await,
        };
        if let Ok(connection) = connection {
            let outcome = consume(&connection, &exchange, &queue, &routing_key, &received).await;
            if let Err(error) = outcome {
                eprintln!("test consumer of {queue}: {error:#}; reconnecting");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn consume(
    connection: &Connection,
    exchange: &str,
    queue: &str,
    routing_key: &str,
    received: &Mutex<Vec<Received>>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    declare(&channel, exchange, queue, routing_key).await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from("ordo-test"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let properties = &delivery.properties;
        let table = properties.headers().clone().unwrap_or_default();
        let message = Received {
            kind: properties.kind().as_ref().map(|k| k.as_str().to_owned()).unwrap_or_default(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            headers: table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), header_text(v))).collect(),
            sequence: header_number(&table, "ordo-sequence"),
            position: header_number(&table, "ordo-position"),
            content_type: properties.content_type().as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default(),
            delivery_mode: *properties.delivery_mode(),
            redelivered: delivery.redelivered,
            body: delivery.data.clone(),
        };
        received.lock().unwrap_or_else(|p| p.into_inner()).push(message);
        delivery.ack(BasicAckOptions::default()).await?;
    }
    bail!("the consumer was cancelled")
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let output = tokio::time::timeout(Duration::from_secs(120), Command::new("rabbitmqctl").args(args).output())
        .await
        .with_context(|| format!("rabbitmqctl {args:?} did not finish within 120 s"))?
        .with_context(|| format!("cannot run rabbitmqctl {args:?}"))?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The broker's application, stopped (`rabbitmqctl stop_app`). Started again
/// by [`StoppedBroker::start`], or on drop — also when the test panics — so a
/// failing test never leaves the machine without RabbitMQ.
#[derive(Debug)]
pub struct StoppedBroker {
    restarted: bool,
}

/// Stops the broker's application (the node keeps running).
pub async fn stop_broker() -> anyhow::Result<StoppedBroker> {
    // From here on, whatever happens, drop restarts it.
    let guard = StoppedBroker { restarted: false };
    rabbitmqctl(&["stop_app"]).await?;
    Ok(guard)
}

impl StoppedBroker {
    /// Starts the application again and waits until it accepts connections.
    pub async fn start(mut self) -> anyhow::Result<()> {
        rabbitmqctl(&["start_app"]).await?;
        self.restarted = true;
        require_broker().await;
        Ok(())
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if self.restarted {
            return;
        }
        eprintln!("ordo testkit: starting RabbitMQ's application again (rabbitmqctl start_app)");
        match std::process::Command::new("rabbitmqctl").arg("start_app").status() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("ordo testkit: rabbitmqctl start_app failed with {status}"),
            Err(error) => eprintln!("ordo testkit: cannot run rabbitmqctl start_app: {error}"),
        }
    }
}
