//! Follows the released results of a call's streams through a `Follow`
//! stream ([`Releases`]: the push gateway's, or one served in this process
//! from Redis), in its own task so that a slow reconnect never
//! competes with reading client events. Reconnects resume each stream from the
//! position after the last result received, so nothing is missed.
//!
//! A stream is followed only while the call needs it: [`Follower::stop`]
//! drops its cursor here and removes it from the gateway's Follow call
//! (`FollowRequest.remove`), and a later [`Follower::follow`] starts again
//! from the cursor given then. Batches that still arrive for a stream no
//! longer followed are dropped. `ordo_followed_streams` counts the cursors
//! of every open call.

use std::time::Duration;

use ordo_runtime::backoff::Backoff;

use futures::{StreamExt as _, stream::BoxStream};
use ordo_core::hash::Map;
use ordo_proto::v1::{FollowBatch, FollowRequest, StreamCursor, push_gateway_client::PushGatewayClient};
use ordo_runtime::client::TracedChannel;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

/// Where released results are followed from (`--follow-releases`). Cheap to clone.
#[derive(Clone)]
pub enum Releases {
    /// The push gateway's `Follow` call: one more process hop per result.
    Gateway(PushGatewayClient<TracedChannel>),
    /// The same rules served here, on this process's own tail of the
    /// release channels and reads of the release logs.
    Redis(push_gateway::follow::Local),
}

impl Releases {
    /// One `Follow` stream: released batches of the streams `requests`
    /// add, until `requests` ends or the returned stream is dropped.
    pub async fn follow(
        &self,
        requests: mpsc::UnboundedReceiver<FollowRequest>,
    ) -> Result<BoxStream<'static, Result<FollowBatch, Status>>, Status> {
        match self {
            Self::Gateway(client) => {
                let mut client = client.clone();
                Ok(client.follow(UnboundedReceiverStream::new(requests)).await?.into_inner().boxed())
            }
            Self::Redis(local) => Ok(local.follow(UnboundedReceiverStream::new(requests)).boxed()),
        }
    }

    /// What is followed through, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gateway(_) => "push gateway",
            Self::Redis(_) => "release logs",
        }
    }
}

/// What the call asks of its follower, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Follow(StreamCursor),
    Stop(String),
}

pub struct Follower {
    changes: mpsc::UnboundedSender<Change>,
    pub batches: mpsc::Receiver<FollowBatch>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    pub fn start(releases: Releases) -> Self {
        let (changes, change_rx) = mpsc::unbounded_channel();
        let (batch_tx, batches) = mpsc::channel(256);
        let task = tokio::spawn(run(releases, change_rx, batch_tx));
        Self { changes, batches, task }
    }

    /// Follows `stream` from release position `from` (or keeps following it
    /// from an earlier position it already has).
    pub fn follow(&self, stream: &str, from: u64) {
        let _ = self.changes.send(Change::Follow(StreamCursor { stream_id: stream.to_owned(), from_sequence: from }));
    }

    /// Stops following `stream`: its cursor is forgotten, here and on the gateway.
    pub fn stop(&self, stream: &str) {
        let _ = self.changes.send(Change::Stop(stream.to_owned()));
    }
}

/// The cursor of every followed stream: the next release position wanted.
/// Counted in `ordo_followed_streams` while it lives.
#[derive(Default)]
struct Cursors(Map<String, u64>);

impl Cursors {
    /// Records a cursor; true if it changes what must be followed.
    fn merge(&mut self, cursor: &StreamCursor) -> bool {
        match self.0.get_mut(&cursor.stream_id) {
            Some(from) if *from <= cursor.from_sequence => false,
            Some(from) => {
                *from = cursor.from_sequence;
                true
            }
            None => {
                self.0.insert(cursor.stream_id.clone(), cursor.from_sequence);
                crate::metrics::FOLLOWED_STREAMS.increment(1.0);
                true
            }
        }
    }

    /// Forgets a stream; true if it was followed.
    fn remove(&mut self, stream: &str) -> bool {
        let removed = self.0.remove(stream).is_some();
        if removed {
            crate::metrics::FOLLOWED_STREAMS.decrement(1.0);
        }
        removed
    }

    /// Applies a change; the request that tells the gateway, if it changes anything.
    fn apply(&mut self, change: Change) -> Option<FollowRequest> {
        match change {
            Change::Follow(cursor) => {
                self.merge(&cursor).then(|| FollowRequest { add: vec![cursor], remove: Vec::new() })
            }
            Change::Stop(stream) => {
                self.remove(&stream).then(|| FollowRequest { add: Vec::new(), remove: vec![stream] })
            }
        }
    }

    /// A batch arrived: true if its stream is followed (then its cursor
    /// moves past the batch's last result), false if it is to be dropped.
    fn received(&mut self, batch: &FollowBatch) -> bool {
        let Some(from) = self.0.get_mut(&batch.stream_id) else { return false };
        if let Some(last) = batch.results.last() {
            *from = last.position + 1;
        }
        true
    }

    fn all(&self) -> Vec<StreamCursor> {
        self.0.iter().map(|(stream, from)| StreamCursor { stream_id: stream.clone(), from_sequence: *from }).collect()
    }
}

impl Drop for Cursors {
    fn drop(&mut self) {
        crate::metrics::FOLLOWED_STREAMS.decrement(self.0.len() as f64);
    }
}

/// Changes coalesced into one request, at most.
const MAX_CHANGES: usize = 1024;

/// Applies `changes` (up to [`MAX_CHANGES`] of them) and returns the requests
/// that tell the gateway, in as few as keep their meaning: the gateway
/// applies a request's removals before its additions, so a stream stopped
/// after it was added in the same request starts a new one.
fn coalesce(cursors: &mut Cursors, changes: impl Iterator<Item = Change>) -> Vec<FollowRequest> {
    let mut requests = Vec::new();
    let mut request = FollowRequest::default();
    let mut added = std::collections::HashSet::new();
    for change in changes.take(MAX_CHANGES) {
        if let Change::Stop(stream) = &change
            && added.contains(stream)
        {
            requests.push(std::mem::take(&mut request));
            added.clear();
        }
        if let Some(one) = cursors.apply(change) {
            added.extend(one.add.iter().map(|cursor| cursor.stream_id.clone()));
            request.add.extend(one.add);
            request.remove.extend(one.remove);
        }
    }
    if !request.add.is_empty() || !request.remove.is_empty() {
        requests.push(request);
    }
    requests
}

async fn run(releases: Releases, mut changes: mpsc::UnboundedReceiver<Change>, batches: mpsc::Sender<FollowBatch>) {
    let mut cursors = Cursors::default();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        // Nothing to follow: no Follow call is held open for this call.
        while cursors.0.is_empty() {
            match changes.recv().await {
                Some(change) => {
                    cursors.apply(change);
                }
                None => return,
            }
        }
        // Unbounded, so that sending a request never waits: a wait here
        // (requests full) while the other side waits to hand over a batch
        // (batches full, and this loop not reading them) was a deadlock
        // that stalled a call for good (`--follow-releases redis` at 32k
        // streams). What queues is bounded as `changes` is: one change per
        // stream opened or forgotten, coalesced into few requests.
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(FollowRequest { add: cursors.all(), remove: Vec::new() });
        match releases.follow(rx).await {
            Ok(mut incoming) => {
                backoff.reset();
                loop {
                    tokio::select! {
                        change = changes.recv() => {
                            let Some(change) = change else { return };
                            // With the changes already queued: a burst of new
                            // streams goes in a few requests, not one each.
                            let mut queued = Some(change);
                            let requests = coalesce(&mut cursors, std::iter::from_fn(|| {
                                queued.take().or_else(|| changes.try_recv().ok())
                            }));
                            if requests.into_iter().any(|request| tx.send(request).is_err()) {
                                break;
                            }
                        }
                        batch = incoming.next() => match batch {
                            Some(Ok(batch)) => {
                                if cursors.received(&batch) && batches.send(batch).await.is_err() {
                                    return;
                                }
                            }
                            None => break,
                            Some(Err(status)) => {
                                tracing::warn!(%status, from = releases.name(), "follow stream broke; resuming");
                                break;
                            }
                        }
                    }
                }
            }
            Err(status) => tracing::warn!(%status, "cannot follow released results; retrying"),
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use ordo_proto::v1::EventResult;

    use super::*;

    fn follow(stream: &str, from: u64) -> Change {
        Change::Follow(StreamCursor { stream_id: stream.into(), from_sequence: from })
    }

    fn batch(stream: &str, positions: std::ops::Range<u64>) -> FollowBatch {
        let results = positions.map(|position| EventResult { position, ..Default::default() }).collect();
        FollowBatch { stream_id: stream.into(), results, ..Default::default() }
    }

    #[test]
    fn changes_are_coalesced_without_reordering_a_stop_after_a_follow() {
        let mut cursors = Cursors::default();
        let changes = vec![follow("a", 0), follow("b", 3), Change::Stop("c".into()), follow("a", 1)];
        let requests = coalesce(&mut cursors, changes.into_iter());
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].add.iter().map(|c| c.stream_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(requests[0].remove.is_empty(), "c was never followed");
        // Stop a (added earlier in this batch) then follow it again: the stop
        // must reach the gateway after a's addition, and the new follow after it.
        let changes = vec![follow("d", 0), Change::Stop("d".into()), follow("d", 2), Change::Stop("b".into())];
        let requests = coalesce(&mut cursors, changes.into_iter());
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[0].add[0].stream_id, "d");
        assert!(requests[0].remove.is_empty());
        assert_eq!(requests[1].remove, ["d".to_owned(), "b".to_owned()]);
        assert_eq!(requests[1].add.len(), 1);
        assert_eq!(requests[1].add[0].from_sequence, 2);
        assert_eq!(cursors.0.get("d"), Some(&2));
        assert!(!cursors.0.contains_key("b"));
    }

    #[test]
    fn a_stopped_stream_is_forgotten_and_followed_again_from_its_new_cursor() {
        let mut cursors = Cursors::default();
        let added = cursors.apply(follow("s", 0)).expect("a new stream is followed");
        assert_eq!(added.add.len(), 1);
        assert!(cursors.apply(follow("s", 1)).is_none(), "a later cursor changes nothing");
        assert!(cursors.received(&batch("s", 0..2)));
        assert_eq!(cursors.0.get("s"), Some(&2), "resumes after the last result received");
        let stopped = cursors.apply(Change::Stop("s".into())).expect("a followed stream is removed");
        assert_eq!(stopped.remove, vec!["s".to_owned()]);
        assert!(cursors.0.is_empty());
        assert!(cursors.apply(Change::Stop("s".into())).is_none(), "stopping twice tells the gateway once");
        assert!(!cursors.received(&batch("s", 2..3)), "a late batch of a stopped stream is dropped");
        assert!(cursors.0.is_empty(), "and does not bring its cursor back");
        let again = cursors.apply(follow("s", 5)).expect("followed again");
        assert_eq!(again.add[0].from_sequence, 5);
        assert_eq!(cursors.all().len(), 1);
    }
}
