//! Follows the released results of a call's streams through the push
//! gateway's `Follow` stream, in its own task so that a slow reconnect never
//! competes with reading client events. Reconnects resume each stream from the
//! position after the last result received, so nothing is missed.

use std::{collections::HashMap, time::Duration};

use ordo_runtime::backoff::Backoff;

use ordo_proto::v1::{FollowBatch, FollowRequest, StreamCursor, push_gateway_client::PushGatewayClient};
use ordo_runtime::client::TracedChannel;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub struct Follower {
    adds: mpsc::UnboundedSender<StreamCursor>,
    pub batches: mpsc::Receiver<FollowBatch>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    pub fn start(client: PushGatewayClient<TracedChannel>) -> Self {
        let (adds, add_rx) = mpsc::unbounded_channel();
        let (batch_tx, batches) = mpsc::channel(256);
        let task = tokio::spawn(run(client, add_rx, batch_tx));
        Self { adds, batches, task }
    }

    /// Follows `stream` from release position `from` (or keeps following it
    /// from an earlier position it already has).
    pub fn follow(&self, stream: &str, from: u64) {
        let _ = self.adds.send(StreamCursor { stream_id: stream.to_owned(), from_sequence: from });
    }
}

/// Records a cursor; true if it changes what must be followed.
fn merge(cursors: &mut HashMap<String, u64>, cursor: &StreamCursor) -> bool {
    match cursors.get_mut(&cursor.stream_id) {
        Some(from) if *from <= cursor.from_sequence => false,
        Some(from) => {
            *from = cursor.from_sequence;
            true
        }
        None => {
            cursors.insert(cursor.stream_id.clone(), cursor.from_sequence);
            true
        }
    }
}

async fn run(
    client: PushGatewayClient<TracedChannel>,
    mut adds: mpsc::UnboundedReceiver<StreamCursor>,
    batches: mpsc::Sender<FollowBatch>,
) {
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if cursors.is_empty() {
            match adds.recv().await {
                Some(cursor) => {
                    merge(&mut cursors, &cursor);
                }
                None => return,
            }
        }
        let (tx, rx) = mpsc::channel(64);
        let all = cursors
            .iter()
            .map(|(stream, from)| StreamCursor { stream_id: stream.clone(), from_sequence: *from })
            .collect();
        let _ = tx.try_send(FollowRequest { add: all });
        let mut client = client.clone();
        match client.follow(ReceiverStream::new(rx)).await {
            Ok(response) => {
                let mut incoming = response.into_inner();
                backoff.reset();
                loop {
                    tokio::select! {
                        cursor = adds.recv() => {
                            let Some(cursor) = cursor else { return };
                            if merge(&mut cursors, &cursor) && tx.send(FollowRequest { add: vec![cursor] }).await.is_err() {
                                break;
                            }
                        }
                        batch = incoming.message() => match batch {
                            Ok(Some(batch)) => {
                                if let Some(last) = batch.results.last() {
                                    cursors.insert(batch.stream_id.clone(), last.position + 1);
                                }
                                if batches.send(batch).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::warn!(%status, "follow stream from push-gateway broke; resuming");
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
