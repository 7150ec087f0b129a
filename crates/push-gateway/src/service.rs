//! The `ordo.v1.PushGateway` gRPC service.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use futures::Stream;
use ordo_proto::v1::{
    EventResult, FollowBatch, FollowRequest, StreamCursor, SubscribeRequest,
    push_gateway_server::{PushGateway, PushGatewayServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Shutdown,
    hub::Hub,
    log::{Log, LogError},
    session,
};

impl From<LogError> for Status {
    fn from(error: LogError) -> Self {
        match error {
            LogError::Expired { .. } => Status::out_of_range(error.to_string()),
            LogError::Redis(cause) => {
                tracing::warn!(error = %cause, "redis unavailable");
                Status::unavailable("release log unavailable; resubscribe from your last position + 1")
            }
            LogError::Corrupt { .. } => {
                tracing::error!(%error, "corrupt release log");
                Status::data_loss(error.to_string())
            }
        }
    }
}

#[derive(Clone)]
pub struct PushGatewayService {
    hub: Arc<Hub>,
    log: Log,
    shutdown: Shutdown,
}

impl PushGatewayService {
    pub fn new(hub: Arc<Hub>, log: Log, shutdown: Shutdown) -> Self {
        Self { hub, log, shutdown }
    }

    pub fn into_server(self) -> PushGatewayServer<Self> {
        PushGatewayServer::new(self).max_encoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES)
    }

    fn spawn_session(&self, cursor: StreamCursor, out: mpsc::Sender<FollowBatch>) -> tokio::task::JoinHandle<()> {
        let (hub, log, shutdown) = (self.hub.clone(), self.log.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let stream = cursor.stream_id.clone();
            if let Err(error) =
                session::follow(hub, log, cursor.stream_id, cursor.from_sequence, out.clone(), shutdown).await
            {
                let status = Status::from(error);
                let _ = out
                    .send(FollowBatch { stream_id: stream, error: status.message().to_owned(), ..Default::default() })
                    .await;
            }
        })
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<EventResult, Status>> + Send>>;
type FollowStream = Pin<Box<dyn Stream<Item = Result<FollowBatch, Status>> + Send>>;

const OUT_BUFFER: usize = 256;

#[tonic::async_trait]
impl PushGateway for PushGatewayService {
    type SubscribeStream = ResultStream;
    type FollowStream = FollowStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let mut cursors = request.streams;
        if !request.stream_id.is_empty() {
            cursors.insert(0, StreamCursor { stream_id: request.stream_id, from_sequence: request.from_sequence });
        }
        if cursors.is_empty() {
            return Err(Status::invalid_argument("stream_id is required (or one entry in streams)"));
        }
        if cursors.iter().any(|c| c.stream_id.is_empty()) {
            return Err(Status::invalid_argument("every stream cursor needs a stream_id"));
        }
        // Refuse a cursor older than retention up front, with its status.
        for cursor in &cursors {
            self.log.check(&cursor.stream_id, cursor.from_sequence).await?;
        }
        let (batches, mut batch_rx) = mpsc::channel(OUT_BUFFER);
        let sessions: Vec<_> = cursors.into_iter().map(|c| self.spawn_session(c, batches.clone())).collect();
        drop(batches);
        let (results, result_rx) = mpsc::channel(OUT_BUFFER);
        tokio::spawn(async move {
            // Flatten batches; the first stream error ends the whole call with its status.
            while let Some(batch) = batch_rx.recv().await {
                if !batch.error.is_empty() {
                    let _ = results.send(Err(Status::out_of_range(batch.error))).await;
                    break;
                }
                for result in batch.results {
                    if results.send(Ok(result)).await.is_err() {
                        break;
                    }
                }
            }
            sessions.iter().for_each(|s| s.abort());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(result_rx))))
    }

    async fn follow(&self, request: Request<Streaming<FollowRequest>>) -> Result<Response<Self::FollowStream>, Status> {
        let mut inbound = request.into_inner();
        let (batches, mut batch_rx) = mpsc::channel::<FollowBatch>(OUT_BUFFER);
        let (out, out_rx) = mpsc::channel(OUT_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            let mut sessions: HashMap<String, (u64, tokio::task::JoinHandle<()>)> = HashMap::new();
            loop {
                tokio::select! {
                    request = inbound.message() => match request {
                        Ok(Some(request)) => {
                            for cursor in request.add {
                                if cursor.stream_id.is_empty() {
                                    continue;
                                }
                                // Re-following a stream from an earlier position restarts its session.
                                if let Some((from, session)) = sessions.get(&cursor.stream_id) {
                                    if *from <= cursor.from_sequence && !session.is_finished() {
                                        continue;
                                    }
                                    session.abort();
                                }
                                let key = cursor.stream_id.clone();
                                let from = cursor.from_sequence;
                                sessions.insert(key, (from, service.spawn_session(cursor, batches.clone())));
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    batch = batch_rx.recv() => {
                        let Some(batch) = batch else { break };
                        if out.send(Ok(batch)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            for (_, session) in sessions.values() {
                session.abort();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
