//! Generated Ordo wire types and gRPC stubs (from `proto/ordo/v1/ordo.proto`),
//! the descriptor set for server reflection, and the small helpers that every
//! service uses to read and build wire messages. Conversions live here and
//! nowhere else.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ordo.v1");
}

/// Encoded `FileDescriptorSet` of every Ordo service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ordo_descriptor");

pub use v1::{Event, EventResult, OrderingMode, ResultStatus};

impl Event {
    /// True when the stream releases results in completion order.
    pub fn is_unordered(&self) -> bool {
        self.mode() == OrderingMode::Unordered
    }
}

impl EventResult {
    /// A result for `event` carrying its identity and trace context,
    /// stamped with the current time as its completion time.
    pub fn for_event(event: &Event, status: ResultStatus) -> Self {
        Self {
            stream_id: event.stream_id.clone(),
            sequence: event.sequence,
            status: status as i32,
            trace_context: event.trace_context.clone(),
            completed_unix_nanos: unix_nanos(),
            ..Default::default()
        }
    }

    /// A successful result with `payload`.
    pub fn ok(event: &Event, payload: impl Into<prost::bytes::Bytes>) -> Self {
        Self { payload: payload.into(), ..Self::for_event(event, ResultStatus::Ok) }
    }

    /// A FAILED result with a human-readable reason.
    pub fn failed(event: &Event, error: impl Into<String>) -> Self {
        Self { error: error.into(), ..Self::for_event(event, ResultStatus::Failed) }
    }

    /// A REJECTED result (bidirectional stream only) with its gRPC status.
    pub fn rejected(stream_id: &str, sequence: u64, status: &tonic::Status) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            sequence,
            status: ResultStatus::Rejected as i32,
            code: status.code() as i32,
            error: status.message().to_owned(),
            ..Default::default()
        }
    }

    /// A PROCESSING ticket: the result will be pushed later.
    pub fn processing(event: &Event) -> Self {
        Self::for_event(event, ResultStatus::Processing)
    }

    /// A PROCESSING ticket for `(stream_id, sequence)`, when the event itself
    /// is no longer at hand.
    pub fn processing_of(stream_id: &str, sequence: u64) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            sequence,
            status: ResultStatus::Processing as i32,
            completed_unix_nanos: unix_nanos(),
            ..Default::default()
        }
    }
}

impl v1::DeadLetter {
    /// The dead letter of `event` settled with `status` (FAILED or GAP) after
    /// `attempts`, stamped now; its id is assigned when stored.
    pub fn of(event: Event, status: ResultStatus, attempts: u32, error: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            event: Some(event),
            status: status as i32,
            attempts,
            error: error.into(),
            at_unix_ms: unix_nanos() / 1_000_000,
        }
    }
}

impl v1::ReleasedBatches {
    /// First byte of an encoded `ReleasedBatches` (field 15,
    /// length-delimited); a bare `ReleasedBatch` starts with `0x0a`.
    pub const TAG: u8 = 15 << 3 | 2;

    /// The batches of one release-channel message: an encoded
    /// `ReleasedBatches` (what the release script publishes), or a bare
    /// `ReleasedBatch` (what versions before it published), told apart by
    /// the first byte. An empty payload holds no batch.
    pub fn decode_message(payload: &[u8]) -> Result<Vec<v1::ReleasedBatch>, prost::DecodeError> {
        use prost::Message as _;
        match payload.first() {
            None => Ok(Vec::new()),
            Some(&Self::TAG) => Ok(Self::decode(payload)?.batches),
            Some(_) => Ok(vec![v1::ReleasedBatch::decode(payload)?]),
        }
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
