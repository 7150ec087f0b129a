//! The `ordo.v1.Reassembler` gRPC service.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ordo_proto::v1::{
    Completed, DeadLetter, DeliverAck, DeliverBatch, GetDeadLetterRequest, GetStreamRequest, ListDeadLettersRequest,
    ListDeadLettersResponse, OrderingMode, StreamState,
    reassembler_server::{Reassembler, ReassemblerServer},
};
use ordo_runtime::{Shutdown, readiness::Readiness};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    batcher::{Batcher, Closed},
    dead_letters,
    store::{Item, Store},
};

/// Batches of one Deliver call stored concurrently (acks still go out in order).
const BATCHES_IN_FLIGHT_PER_CALL: usize = 64;

/// A Redis outage shorter than this is ridden out by retries (a restart);
/// once it lasts longer, calls are refused at once instead of waiting.
const REFUSE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything that can go wrong serving a request; the one place it becomes a
/// gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] std::sync::Arc<redis::RedisError>),
    #[error(transparent)]
    Closed(#[from] Closed),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Redis(cause) => {
                tracing::warn!(error = %cause, "redis unavailable");
                Status::unavailable("reorder state store unavailable; redeliver the batch")
            }
            Error::Closed(_) => Status::unavailable("reassembler shutting down; deliver elsewhere"),
            Error::Invalid(message) => Status::invalid_argument(message),
            Error::NotFound(message) => Status::not_found(message),
        }
    }
}

#[derive(Clone)]
pub struct ReassemblerService {
    batcher: Batcher,
    store: Store,
    readiness: Readiness,
    shutdown: Shutdown,
}

impl ReassemblerService {
    pub fn new(batcher: Batcher, store: Store, readiness: Readiness, shutdown: Shutdown) -> Self {
        Self { batcher, store, readiness, shutdown }
    }

    /// UNAVAILABLE at once while Redis has been unreachable for a while.
    fn check_ready(&self) -> Result<(), Status> {
        if self.readiness.down_for(REFUSE_AFTER) {
            return Err(Status::unavailable("reorder state store unreachable; deliver elsewhere or later"));
        }
        Ok(())
    }

    pub fn into_server(self) -> ReassemblerServer<Self> {
        ReassemblerServer::new(self)
            .max_decoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ordo_runtime::server::MAX_MESSAGE_BYTES)
    }
}

/// Turns a delivered batch into store items. A malformed result (no result,
/// no stream id) is logged and skipped, never retried: failing the batch would
/// make the sender redeliver the same poison forever.
/// Each item's result status, in order, goes to `statuses` (for metrics).
fn to_items(batch: DeliverBatch, statuses: &mut Vec<ordo_proto::ResultStatus>) -> Vec<Item> {
    let batch_id = batch.batch_id;
    batch
        .results
        .into_iter()
        .filter_map(|completed| {
            let item = item_of(completed);
            if item.is_none() {
                tracing::warn!(batch_id, "dropping a delivered result without stream id");
            }
            item
        })
        .map(|(item, status)| {
            statuses.push(status);
            item
        })
        .collect()
}

/// One completed result as a store item, with its status; `None` without
/// a result or a stream id. Opens the result's `reassembler.store` span and
/// puts its context into the stored result, so that whoever serves the
/// released result continues the event's trace.
pub(crate) fn item_of(completed: Completed) -> Option<(Item, ordo_proto::ResultStatus)> {
    let mode = completed.mode();
    let mut result = completed.result.filter(|r| !r.stream_id.is_empty())?;
    let span = ordo_runtime::telemetry::event_span(
        "reassembler.store",
        &result.stream_id,
        result.sequence,
        &result.trace_context,
    );
    result.trace_context = ordo_runtime::telemetry::inject(&span, &result.trace_context);
    let dead_letter = dead_letters::letter_for(&result, completed.dead_letter);
    let status = result.status();
    let item = Item {
        stream_id: result.stream_id.clone(),
        sequence: result.sequence,
        mode: if mode == OrderingMode::Unordered { mode } else { OrderingMode::Ordered },
        body: result.encode_to_vec(),
        dead_letter: dead_letter.map(|letter| letter.encode_to_vec()).unwrap_or_default(),
    };
    Some((item, status))
}

/// Counts what a script call did with items of these statuses (and dead
/// letters): stored for the first time, or duplicates.
pub(crate) fn count(flags: &[bool], statuses: &[ordo_proto::ResultStatus], letters: &[bool]) {
    for ((&new, &status), &letter) in flags.iter().zip(statuses).zip(letters) {
        if new {
            crate::metrics::stored(status, letter);
        } else {
            crate::metrics::DUPLICATES.increment(1);
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<DeliverAck, Status>> + Send>>;

#[tonic::async_trait]
impl Reassembler for ReassemblerService {
    type DeliverStream = AckStream;

    async fn deliver(
        &self,
        request: Request<Streaming<DeliverBatch>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let batcher = self.batcher.clone();
        let service = self.clone();
        let shutdown = self.shutdown.clone();
        let acks = request
            .into_inner()
            // On shutdown, stop taking batches: those already taken are stored
            // and acked, then the call ends with UNAVAILABLE (below) so the
            // sender redelivers the rest to another reassembler.
            .take_until(self.shutdown.clone().cancelled_owned())
            .map(move |batch| {
                let batcher = batcher.clone();
                let ready = service.check_ready();
                async move {
                    let batch = batch?;
                    ready?;
                    let batch_id = batch.batch_id;
                    let total = batch.results.len() as u32;
                    let mut statuses = Vec::new();
                    let items = to_items(batch, &mut statuses);
                    let letters: Vec<bool> = items.iter().map(|item| !item.dead_letter.is_empty()).collect();
                    let flags = if items.is_empty() {
                        Vec::new()
                    } else {
                        batcher.submit(items).await.map_err(Error::from)?.map_err(|failed| Error::from(failed.error))?
                    };
                    count(&flags, &statuses, &letters);
                    let accepted = flags.iter().filter(|&&new| new).count() as u32;
                    Ok(DeliverAck { batch_id, accepted, duplicates: total - accepted })
                }
            })
            .buffered(BATCHES_IN_FLIGHT_PER_CALL)
            .chain(
                futures::stream::once(async move {
                    shutdown
                        .is_cancelled()
                        .then(|| Err(Status::unavailable("reassembler shutting down; deliver elsewhere")))
                })
                .filter_map(futures::future::ready),
            )
            // End the call at the first failure: the sender redelivers what is unacked.
            .scan(false, |failed, ack: Result<DeliverAck, Status>| {
                let out = if *failed { None } else { Some(ack) };
                if matches!(out, Some(Err(_))) {
                    *failed = true;
                }
                futures::future::ready(out)
            });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn get_stream(&self, request: Request<GetStreamRequest>) -> Result<Response<StreamState>, Status> {
        let stream_id = request.into_inner().stream_id;
        if stream_id.is_empty() {
            return Err(Error::Invalid("stream_id is required".into()).into());
        }
        self.check_ready()?;
        let state = ordo_runtime::redis_conn::call(|| self.store.stream_state(&stream_id))
            .await
            .map_err(|e| Error::Redis(std::sync::Arc::new(e)))?;
        Ok(Response::new(state))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Ok(Response::new(dead_letters::list(&self.store, request.into_inner()).await?))
    }

    async fn get_dead_letter(&self, request: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
        Ok(Response::new(dead_letters::get(&self.store, request.into_inner()).await?))
    }
}
