//! The harmonizer's errors and the one place they become gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stream_id is required")]
    MissingStreamId,
    #[error("stream_id of {len} bytes is longer than the limit of {limit} bytes")]
    StreamIdTooLong { len: usize, limit: usize },
    /// `name` is already cut for echoing (ordo_core::limits::echo).
    #[error("unknown operation {name:?}; known operations: {known}")]
    UnknownOperation { name: String, known: String },
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error(
        "sequence {0} is above the largest supported sequence {max} (2^53 - 1: the release script counts in doubles)",
        max = ordo_core::limits::MAX_SEQUENCE
    )]
    SequenceTooLarge(u64),
    #[error("malformed attributes: {0}")]
    MalformedAttributes(String),
    #[error(
        "sequence {sequence} of stream {stream:?} is beyond the window: accepted sequences are below {limit} (lowest unreleased {next} + window {window})"
    )]
    BeyondWindow { stream: String, sequence: u64, next: u64, window: u64, limit: u64 },
    #[error("sequence {sequence} of unordered stream {stream:?} was already released; read it from the push-gateway")]
    AlreadyReleased { stream: String, sequence: u64 },
    #[error(
        "sequence {sequence} of stream {stream:?} was settled as a gap (no event arrived within the stream's gap timeout); it will not be processed"
    )]
    GapSettled { stream: String, sequence: u64 },
    /// Released long ago: its result is past the release log's retention,
    /// or the log expired (`--stream-ttl`) while the stream's meta lives on
    /// as its dedup tombstone. It is not processed again.
    #[error("sequence {sequence} of stream {stream:?} was released, but its result is no longer kept: {reason}")]
    ResultExpired { stream: String, sequence: u64, reason: String },
    /// A known stateful operation that no live worker serves (nor did
    /// lately): the operation exists, so not NOT_FOUND; retry later.
    #[error("operation {0:?} has no live worker")]
    NoWorker(String),
    #[error("reorder state unavailable")]
    Redis(#[from] redis::RedisError),
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    #[error("shutting down")]
    ShuttingDown,
    /// No valid token (UNAUTHENTICATED), or one that may not write the stream
    /// (PERMISSION_DENIED).
    #[error(transparent)]
    Denied(#[from] ordo_runtime::auth::Denied),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::MissingStreamId
            | Error::StreamIdTooLong { .. }
            | Error::PayloadTooLarge { .. }
            | Error::SequenceTooLarge(_)
            | Error::MalformedAttributes(_) => Status::invalid_argument(message),
            Error::GapSettled { .. } => Status::failed_precondition(message),
            Error::UnknownOperation { .. } => Status::not_found(message),
            Error::BeyondWindow { .. } | Error::ResultExpired { .. } => Status::out_of_range(message),
            Error::AlreadyReleased { .. } => Status::already_exists(message),
            Error::Redis(cause) => {
                tracing::warn!(error = %cause, "redis unavailable");
                Status::unavailable(message)
            }
            Error::NoWorker(_) | Error::Unavailable(_) | Error::ShuttingDown => Status::unavailable(message),
            Error::Denied(denied) => Status::from(denied),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_worker_is_unavailable_and_unknown_is_not_found() {
        let status = Status::from(Error::NoWorker("shout".into()));
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "operation \"shout\" has no live worker")
        );
        let status = Status::from(Error::UnknownOperation { name: "x".into(), known: "a, b".into() });
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
}
