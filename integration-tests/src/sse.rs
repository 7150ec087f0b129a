//! A minimal Server-Sent Events client for tests: opens
//! `GET <base>/streams/<id>/events` (optionally with `Last-Event-ID` or a
//! query), and parses the `text/event-stream` body into events as a browser's
//! `EventSource` would (`id:`, `event:`, `data:` lines, blank line = end of
//! event, `:` comments ignored).

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::time::{Instant, timeout_at};

/// One received event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// The `data` as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.data).with_context(|| format!("event data is not JSON: {:?}", self.data))
    }

    /// The event id as a number (a release position).
    pub fn position(&self) -> anyhow::Result<u64> {
        self.id.as_deref().context("event without id")?.parse().context("event id is not a number")
    }
}

/// What a request answered before any event: the status and, for errors, the body.
#[derive(Debug)]
pub enum Opened {
    Stream(SseStream),
    Refused { status: u16, body: String },
}

/// An open event stream.
#[derive(Debug)]
pub struct SseStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    ended: bool,
}

/// `<base>/streams/<stream>/events` with an optional raw query (`from=3`).
pub fn events_url(base: &str, stream: &str, query: Option<&str>) -> String {
    let mut url = format!("{base}/streams/{stream}/events");
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Opens `url`, sending `Last-Event-ID: last_event_id` when given.
pub async fn open(url: &str, last_event_id: Option<u64>) -> anyhow::Result<Opened> {
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
    let mut request = client.get(url).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Ok(Opened::Refused { status, body });
    }
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        bail!("GET {url} answered 200 with content-type {content_type:?}, not text/event-stream");
    }
    Ok(Opened::Stream(SseStream { response, buffer: Vec::new(), ended: false }))
}

/// Opens `url` and insists on a stream (panics with the refusal otherwise).
pub async fn open_stream(url: &str, last_event_id: Option<u64>) -> anyhow::Result<SseStream> {
    match open(url, last_event_id).await? {
        Opened::Stream(stream) => Ok(stream),
        Opened::Refused { status, body } => bail!("GET {url} refused with {status}: {body}"),
    }
}

impl SseStream {
    /// The next event, or `None` when the server ended the response; fails at `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> anyhow::Result<Option<SseEvent>> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(event) = self.take_event() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            match timeout_at(until, self.response.chunk()).await {
                // Line ends may be CRLF; events never carry a bare CR.
                Ok(Ok(Some(chunk))) => self.buffer.extend(chunk.iter().filter(|b| **b != b'\r')),
                Ok(Ok(None)) => self.ended = true,
                Ok(Err(error)) => return Err(error).context("reading the event stream"),
                Err(_) => bail!("no event within {deadline:?}"),
            }
        }
    }

    /// Receives until `n` events of type `result` arrived (others are kept too).
    pub async fn collect(&mut self, n: usize, deadline: Duration) -> anyhow::Result<Vec<SseEvent>> {
        let until = Instant::now() + deadline;
        let mut events = Vec::new();
        while events.iter().filter(|e: &&SseEvent| e.event == "result").count() < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left).await.with_context(|| format!("after {} events", events.len()))? {
                Some(event) => events.push(event),
                None => bail!("the server ended the stream after {} events: {events:?}", events.len()),
            }
        }
        Ok(events)
    }

    /// Parses one complete event off the buffer, skipping comment-only blocks.
    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
            self.buffer.drain(..end + 2);
            let mut event = SseEvent { event: "message".into(), ..Default::default() };
            let mut data = Vec::new();
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                any = true;
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = value.to_owned(),
                    "data" => data.push(value.to_owned()),
                    _ => {}
                }
            }
            if any {
                event.data = data.join("\n");
                return Some(event);
            }
        }
    }
}
