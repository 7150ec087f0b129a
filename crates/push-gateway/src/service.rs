//! The `ordo.v1.PushGateway` gRPC service, and the one place where log
//! errors become gRPC statuses.
//!
//! On shutdown every open Subscribe and Follow call ends at once with
//! UNAVAILABLE (not OK: the stream is not over), so subscribers and the
//! harmonizer's followers resume elsewhere from their last position + 1
//! instead of holding the gateway open until its drain timeout.
//!
//! With authorization on (`--auth-*`), `Subscribe` needs a bearer token that
//! may read every stream it asks for (UNAUTHENTICATED / PERMISSION_DENIED).
//! `Follow` is internal (the harmonizer's) and is protected by mTLS instead.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use ordo_proto::v1::{
    EventResult, FollowBatch, FollowRequest, StreamCursor, SubscribeRequest,
    push_gateway_server::{PushGateway, PushGatewayServer},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use ordo_runtime::readiness::Readiness;

use crate::{
    Shutdown,
    hub::Hub,
    log::{Log, LogError},
    session,
};

/// Most streams one Subscribe call may follow.
pub const MAX_STREAMS_PER_CALL: usize = 1024;
/// Longest stream id accepted (as the harmonizer).
pub const MAX_STREAM_ID_BYTES: usize = 256;

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
    readiness: Readiness,
    auth: ordo_runtime::auth::Auth,
}

/// A Redis outage shorter than this is ridden out by retries (a restart);
/// once it lasts longer, new calls are refused at once instead of waiting.
const REFUSE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) fn shutting_down() -> Status {
    Status::unavailable("push-gateway shutting down; resubscribe from your last position + 1")
}

/// What a session task sends: batches, then possibly the error that ended it
/// (with its stream id).
type SessionItem = Result<FollowBatch, (String, Status)>;

/// Aborts the session tasks of a call when the call's task ends, however it ends.
struct Sessions(Vec<JoinHandle<()>>);

impl Drop for Sessions {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

impl PushGatewayService {
    pub fn new(hub: Arc<Hub>, log: Log, shutdown: Shutdown, readiness: Readiness) -> Self {
        Self { hub, log, shutdown, readiness, auth: ordo_runtime::auth::Auth::off() }
    }

    /// Checks every Subscribe's token with `auth`.
    pub fn with_auth(mut self, auth: ordo_runtime::auth::Auth) -> Self {
        self.auth = auth;
        self
    }

    /// UNAVAILABLE at once for a new call while Redis has been unreachable
    /// for a while, or while shutting down.
    fn check_ready(&self) -> Result<(), Status> {
        if self.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        if self.readiness.down_for(REFUSE_AFTER) {
            return Err(Status::unavailable("release log unreachable; resubscribe from your last position + 1"));
        }
        Ok(())
    }

    pub fn into_server(self) -> PushGatewayServer<Self> {
        PushGatewayServer::new(self).max_encoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES)
    }

    fn spawn_session(&self, cursor: StreamCursor, out: mpsc::Sender<SessionItem>) -> JoinHandle<()> {
        let (hub, log, shutdown) = (self.hub.clone(), self.log.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let stream = cursor.stream_id.clone();
            let (batches, mut batch_rx) = mpsc::channel(1);
            let follow = session::follow(hub, log, cursor.stream_id, cursor.from_sequence, batches, shutdown);
            tokio::pin!(follow);
            // Forward batches as they come; the session's outcome comes last.
            let outcome = loop {
                tokio::select! {
                    outcome = &mut follow => break outcome,
                    Some(batch) = batch_rx.recv() => {
                        if out.send(Ok(batch)).await.is_err() {
                            return;
                        }
                    }
                }
            };
            while let Ok(batch) = batch_rx.try_recv() {
                if out.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            if let Err(error) = outcome {
                let _ = out.send(Err((stream, Status::from(error)))).await;
            }
        })
    }
}

fn validate_cursors(request: SubscribeRequest) -> Result<Vec<StreamCursor>, Status> {
    let mut cursors = request.streams;
    if !request.stream_id.is_empty() {
        cursors.insert(0, StreamCursor { stream_id: request.stream_id, from_sequence: request.from_sequence });
    }
    if cursors.is_empty() {
        return Err(Status::invalid_argument("stream_id is required (or one entry in streams)"));
    }
    if cursors.len() > MAX_STREAMS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} streams on one call; at most {MAX_STREAMS_PER_CALL}",
            cursors.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for cursor in &cursors {
        if cursor.stream_id.is_empty() {
            return Err(Status::invalid_argument("every stream cursor needs a stream_id"));
        }
        if cursor.stream_id.len() > MAX_STREAM_ID_BYTES {
            return Err(Status::invalid_argument(format!("stream_id is longer than {MAX_STREAM_ID_BYTES} bytes")));
        }
        if !seen.insert(cursor.stream_id.as_str()) {
            return Err(Status::invalid_argument(format!(
                "stream {:?} is listed twice; give each stream one cursor",
                cursor.stream_id
            )));
        }
    }
    Ok(cursors)
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<EventResult, Status>> + Send>>;
type FollowStream = Pin<Box<dyn Stream<Item = Result<FollowBatch, Status>> + Send>>;

const OUT_BUFFER: usize = 256;

#[tonic::async_trait]
impl PushGateway for PushGatewayService {
    type SubscribeStream = ResultStream;
    type FollowStream = FollowStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let grant = self.auth.authorize(request.metadata())?;
        let cursors = validate_cursors(request.into_inner())?;
        for cursor in &cursors {
            grant.check_read(&cursor.stream_id)?;
        }
        self.check_ready()?;
        // Refuse a cursor older than retention up front, with its status.
        for cursor in &cursors {
            self.log.check(&cursor.stream_id, cursor.from_sequence).await?;
        }
        let (items, mut item_rx) = mpsc::channel(OUT_BUFFER);
        let sessions = Sessions(cursors.into_iter().map(|c| self.spawn_session(c, items.clone())).collect());
        drop(items);
        let (results, result_rx) = mpsc::channel(OUT_BUFFER);
        let shutdown = self.shutdown.clone();
        let subscriber = crate::metrics::Subscriber::new(&crate::metrics::SUBSCRIBERS_GRPC);
        tokio::spawn(async move {
            let _sessions = sessions;
            let _subscriber = subscriber;
            // Flatten batches; the first stream error ends the whole call with its status.
            loop {
                let item = tokio::select! {
                    // A subscriber that went away frees its sessions even when nothing is released.
                    _ = results.closed() => return,
                    _ = shutdown.cancelled() => {
                        let _ = results.send(Err(shutting_down())).await;
                        return;
                    }
                    item = item_rx.recv() => item,
                };
                match item {
                    Some(Ok(batch)) => {
                        for result in batch.results {
                            if results.send(Ok(result)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err((_, status))) => {
                        let _ = results.send(Err(status)).await;
                        return;
                    }
                    // Every session ended. On shutdown they end first (each
                    // sees the token too), and the subscriber must still be
                    // told to resubscribe, not get a clean end of stream.
                    None => {
                        if shutdown.is_cancelled() {
                            let _ = results.send(Err(shutting_down())).await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(result_rx))))
    }

    async fn follow(&self, request: Request<Streaming<FollowRequest>>) -> Result<Response<Self::FollowStream>, Status> {
        self.check_ready()?;
        let inbound = request.into_inner();
        let (out, out_rx) = mpsc::channel(OUT_BUFFER);
        tokio::spawn(crate::follow::run(self.hub.clone(), self.log.clone(), self.shutdown.clone(), inbound, out));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}
