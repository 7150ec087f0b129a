//! One `Follow` call (the harmonizer's: the streams of one `Process` call)
//! in one task: every followed stream is a cursor in a map and an entry in
//! the hub's [`Group`], not a task, a channel and a log read of its own.
//! New streams, and streams that missed live releases, are caught up from
//! their logs together ([`Log::read_many`]: one round trip for up to
//! [`READ_AT_ONCE`] streams). A harmonizer that follows ever-new short
//! streams therefore pays a map entry and a share of one read per stream.
//!
//! The rules are a [`crate::session`]'s, per stream: subscribe (join the
//! group) before reading the log, so nothing released in between is
//! missed; forward each position once, in order; a live batch that starts
//! beyond the cursor, or a lag (a full channel, a slot subscription
//! confirmed), sends the stream back to its log. A cursor the log cannot
//! serve (older than retention) ends that stream only: its error batch is
//! sent, and it is no longer followed.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use ordo_core::hash::{Map, Set};
use ordo_proto::v1::{EventResult, FollowBatch, FollowRequest, ReleasedBatch, StreamCursor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::{
    Shutdown,
    hub::{Group, Hub},
    log::{Log, LogError, PAGE},
};

/// Live batches buffered for one call (a full buffer sends the streams
/// that did not fit back to their logs; nothing is lost).
const GROUP_BUFFER: usize = 16_384;
/// Streams caught up per log read.
const READ_AT_ONCE: usize = 256;

pub type Out = mpsc::Sender<Result<FollowBatch, Status>>;

/// Serves one Follow call until the harmonizer ends it (half-close, reset),
/// the receiver goes away, or shutdown (UNAVAILABLE: the follower resumes
/// from what it received). `inbound` is the call's requests: a gRPC
/// `Streaming`, or a channel of a [`Local`] follow.
pub async fn run<S>(hub: Arc<Hub>, log: Log, shutdown: Shutdown, mut inbound: S, out: Out)
where
    S: Stream<Item = Result<FollowRequest, Status>> + Unpin,
{
    let mut call = Call {
        group: hub.group(GROUP_BUFFER),
        followed: Followed::default(),
        to_read: Set::default(),
        log,
        backoff: ordo_runtime::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
    };
    loop {
        if !call.to_read.is_empty() {
            match call.catch_up(&out, &shutdown).await {
                Caught::Up => {}
                Caught::Gone => return,
            }
        }
        tokio::select! {
            _ = out.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = out.send(Err(crate::service::shutting_down())).await;
                return;
            }
            request = inbound.next() => match request {
                Some(Ok(request)) => call.apply(request),
                None | Some(Err(_)) => return,
            },
            batch = call.group.rx.recv() => {
                let Some(batch) = batch else { return };
                if !call.live(&batch, &out).await {
                    return;
                }
            }
            () = call.group.lag.raised() => call.lagged(),
            // More to catch up: go round again without waiting.
            () = std::future::ready(()), if !call.to_read.is_empty() => {}
        }
    }
}

/// The next position to forward of every followed stream, counted in
/// `ordo_push_followed_streams` while it lives.
#[derive(Default)]
struct Followed(Map<String, u64>);

impl Drop for Followed {
    fn drop(&mut self) {
        crate::metrics::FOLLOWED_STREAMS.decrement(self.0.len() as f64);
    }
}

struct Call {
    group: Group,
    followed: Followed,
    /// Streams whose log must be read from their cursor: new ones, lagged
    /// ones, and those whose live batches skipped positions.
    to_read: Set<String>,
    log: Log,
    backoff: ordo_runtime::backoff::Backoff,
}

enum Caught {
    /// One round of reads done (more may be left in `to_read`).
    Up,
    /// The receiver is gone, or shutdown: the call is over.
    Gone,
}

impl Call {
    /// Removals first, then additions (the follower relies on this order).
    fn apply(&mut self, request: FollowRequest) {
        for stream in &request.remove {
            self.remove(stream);
        }
        for cursor in request.add {
            self.add(cursor);
        }
    }

    fn add(&mut self, cursor: StreamCursor) {
        if cursor.stream_id.is_empty() {
            return;
        }
        match self.followed.0.get_mut(&cursor.stream_id) {
            // A position not forwarded yet will come anyway.
            Some(next) if *next <= cursor.from_sequence => {}
            // A position already forwarded must be served again (the follower
            // asks because it needs it again, e.g. a resent event): from there.
            Some(next) => {
                *next = cursor.from_sequence;
                self.to_read.insert(cursor.stream_id);
            }
            None => {
                // Joined before the log is read: nothing released in between is missed.
                self.group.add(&cursor.stream_id);
                self.followed.0.insert(cursor.stream_id.clone(), cursor.from_sequence);
                crate::metrics::FOLLOWED_STREAMS.increment(1.0);
                self.to_read.insert(cursor.stream_id);
            }
        }
    }

    fn remove(&mut self, stream: &str) {
        if self.followed.0.remove(stream).is_some() {
            crate::metrics::FOLLOWED_STREAMS.decrement(1.0);
        }
        self.group.remove(stream);
        self.to_read.remove(stream);
    }

    fn lagged(&mut self) {
        for stream in self.group.lag.take() {
            if self.followed.0.contains_key(&stream) {
                self.to_read.insert(stream);
            }
        }
    }

    /// A live batch: forwarded from the cursor on, or the stream goes back
    /// to its log. False if the receiver is gone.
    async fn live(&mut self, batch: &ReleasedBatch, out: &Out) -> bool {
        let stream = batch.stream_id.as_str();
        // Not followed (any more), or its log read will cover this batch.
        let Some(next) = self.followed.0.get_mut(stream) else { return true };
        if self.to_read.contains(stream) {
            return true;
        }
        if batch.results.first().is_some_and(|r| r.position > *next) {
            self.to_read.insert(stream.to_owned());
            return true;
        }
        let results: Vec<EventResult> = batch.results.iter().filter(|r| r.position >= *next).cloned().collect();
        let Some(last) = results.last() else { return true };
        *next = last.position + 1;
        emit(out, stream, batch.next_sequence, results).await
    }

    /// Reads up to [`READ_AT_ONCE`] of the streams to read, in one round
    /// trip, and forwards what their logs hold from their cursors. A stream
    /// whose page was full stays to be read again; a Redis failure keeps
    /// them all, after a backoff (a subscriber sees a delay, not an error).
    async fn catch_up(&mut self, out: &Out, shutdown: &Shutdown) -> Caught {
        let cursors: Vec<(String, u64)> = self
            .to_read
            .iter()
            .take(READ_AT_ONCE)
            .filter_map(|stream| self.followed.0.get(stream).map(|next| (stream.clone(), *next)))
            .collect();
        if cursors.is_empty() {
            self.to_read.clear();
            return Caught::Up;
        }
        let asked: Vec<(&str, u64)> = cursors.iter().map(|(stream, from)| (stream.as_str(), *from)).collect();
        let pages = match self.log.read_many(&asked).await {
            Ok(pages) => pages,
            Err(error) => {
                tracing::warn!(%error, streams = asked.len(), "release logs unreadable; retrying");
                return tokio::select! {
                    () = self.backoff.wait() => Caught::Up,
                    _ = shutdown.cancelled() => Caught::Up,
                    _ = out.closed() => Caught::Gone,
                };
            }
        };
        let mut unreadable = false;
        for ((stream, from), page) in cursors.into_iter().zip(pages) {
            let page = match page {
                Ok(page) => match page.results.first() {
                    // Trimmed between the log's reads.
                    Some(first) if first.position != from => {
                        Err(LogError::Expired { stream: stream.clone(), wanted: from, oldest: first.position })
                    }
                    _ => Ok(page),
                },
                Err(error) => Err(error),
            };
            match page {
                Ok(page) => {
                    let count = page.results.len();
                    if count < PAGE {
                        self.to_read.remove(&stream);
                    }
                    let Some(last) = page.results.last() else { continue };
                    let next = last.position + 1;
                    self.followed.0.insert(stream.clone(), next);
                    if !emit(out, &stream, page.next_sequence.max(next), page.results).await {
                        return Caught::Gone;
                    }
                }
                // Read again on the next round, after a backoff.
                Err(LogError::Redis(error)) => {
                    tracing::warn!(stream, %error, "release log unreadable; retrying");
                    unreadable = true;
                }
                // The cursor cannot be served: that stream's follow is over.
                Err(error) => {
                    self.remove(&stream);
                    let status = Status::from(error);
                    let batch =
                        FollowBatch { stream_id: stream, error: status.message().to_owned(), ..Default::default() };
                    if out.send(Ok(batch)).await.is_err() {
                        return Caught::Gone;
                    }
                }
            }
        }
        if !unreadable {
            self.backoff.reset();
            return Caught::Up;
        }
        tokio::select! {
            () = self.backoff.wait() => Caught::Up,
            _ = shutdown.cancelled() => Caught::Up,
            _ = out.closed() => Caught::Gone,
        }
    }
}

/// Batches buffered between a [`Local`] follow's task and its reader.
const LOCAL_BUFFER: usize = 256;

/// `Follow` served in the caller's own process (the harmonizer's
/// `--follow-releases redis`): the same rules as a gateway's `Follow` call,
/// on a hub and log of its own, without the hop through a push gateway.
/// Cheap to clone; the live tail stops when the last clone is dropped.
#[derive(Clone)]
pub struct Local {
    hub: Arc<Hub>,
    log: Log,
    /// Never cancelled while a clone lives: a follow served here ends only
    /// when its requests end or its reader goes (the owner's drain still
    /// needs its releases).
    stop: Shutdown,
    _tail: Arc<(ordo_runtime::task::Owned<()>, tokio_util::sync::DropGuard)>,
}

impl Local {
    /// Tails the release channels of `redis_url` (one node or a cluster)
    /// and reads release logs through `conn`. `slot_hold` as the gateway's
    /// `--hub-slot-hold`.
    pub fn start(
        redis_url: &str,
        conn: ordo_runtime::redis_conn::RedisConn,
        slot_hold: Duration,
    ) -> anyhow::Result<Self> {
        crate::metrics::describe_tail();
        let source = crate::hub::Source::new(redis_url)?;
        let hub = Hub::for_source(LOCAL_BUFFER, slot_hold, &source);
        let stop = Shutdown::new();
        let tail = ordo_runtime::task::Owned::spawn(hub.clone().listen(source, stop.clone()));
        let guard = stop.clone().drop_guard();
        Ok(Self { hub, log: Log::new(conn, None), stop, _tail: Arc::new((tail, guard)) })
    }

    /// One follow: `requests` as a `Follow` call's, the batches (or the
    /// error of a stream that cannot be served, in its batch) as its
    /// responses. It ends when `requests` ends or the returned stream is dropped.
    pub fn follow<S>(&self, requests: S) -> ReceiverStream<Result<FollowBatch, Status>>
    where
        S: Stream<Item = FollowRequest> + Send + Unpin + 'static,
    {
        let (out, batches) = mpsc::channel(LOCAL_BUFFER);
        let inbound = requests.map(Ok::<_, Status>);
        tokio::spawn(run(self.hub.clone(), self.log.clone(), self.stop.clone(), inbound, out));
        ReceiverStream::new(batches)
    }
}

/// Sends one stream's results (with their delivery spans). False if the receiver is gone.
async fn emit(out: &Out, stream: &str, next_sequence: u64, mut results: Vec<EventResult>) -> bool {
    crate::session::trace_delivery(stream, &mut results);
    let batch = FollowBatch { stream_id: stream.to_owned(), next_sequence, results, error: String::new() };
    out.send(Ok(batch)).await.is_ok()
}
