//! What goes on the wire to RabbitMQ: bodies, properties and headers
//! (documented in `docs/push.md`; change both together).
//!
//! Every message is persistent (delivery mode 2) and carries headers
//! `ordo-stream-id`, `ordo-sequence` and `ordo-position` (64-bit signed
//! integers, AMQP type `l`) and `ordo-status`, plus `message_id` =
//! `<stream>/<position>` and `type` = `ordo.result`. A lost range is announced
//! by one `type` = `ordo.gap` message with headers `ordo-gap-from` (first lost
//! position) and `ordo-gap-to` (first position published after the gap).
//! A FAILED or GAP result is also published as a dead letter: the same body
//! and headers, `type` = `ordo.dead-letter`, `message_id` =
//! `<stream>/<position>/dead-letter`, routing key `dead-letter.<stream>`.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use ordo_proto::v1::{EventResult, ResultStatus};
use prost::Message;

use crate::json;

/// Message `type` of a result.
pub const RESULT_TYPE: &str = "ordo.result";
/// Message `type` of a gap announcement.
pub const GAP_TYPE: &str = "ordo.gap";
/// Message `type` of a dead letter (a FAILED or GAP result's second copy).
pub const DEAD_LETTER_TYPE: &str = "ordo.dead-letter";

/// How a result is encoded in the message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BodyFormat {
    /// The JSON of the SSE channel (`application/json`).
    Json,
    /// The encoded `ordo.v1.EventResult` (`application/x-protobuf`).
    Protobuf,
}

/// Persistent: written to disk by the broker (for durable queues).
const PERSISTENT: u8 = 2;

fn signed(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn properties(kind: &str, content_type: &str, message_id: String, headers: FieldTable) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from(content_type))
        .with_type(ShortString::from(kind))
        .with_app_id(ShortString::from("ordo-push-gateway"))
        .with_timestamp(now_secs())
        .with_headers(headers);
    // A message id is a short string: skip it for stream ids too long for one.
    if let Ok(id) = ShortString::try_new(message_id) {
        properties = properties.with_message_id(id);
    }
    properties
}

/// The body and properties of one released result.
pub fn result(result: &EventResult, format: BodyFormat) -> (Vec<u8>, BasicProperties) {
    encode(result, format, RESULT_TYPE, format!("{}/{}", result.stream_id, result.position))
}

/// True for the results that are also published as dead letters.
pub fn is_dead_letter(result: &EventResult) -> bool {
    matches!(result.status(), ResultStatus::Failed | ResultStatus::Gap)
}

/// The body and properties of a FAILED or GAP result's dead-letter copy. Its
/// own message id, so a consumer of both routing keys that drops repeats by
/// message id keeps both.
pub fn dead_letter(result: &EventResult, format: BodyFormat) -> (Vec<u8>, BasicProperties) {
    encode(result, format, DEAD_LETTER_TYPE, format!("{}/{}/dead-letter", result.stream_id, result.position))
}

fn encode(result: &EventResult, format: BodyFormat, kind: &str, id: String) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert("ordo-stream-id".into(), text(&result.stream_id));
    headers.insert("ordo-sequence".into(), signed(result.sequence));
    headers.insert("ordo-position".into(), signed(result.position));
    headers.insert("ordo-status".into(), text(json::status_name(result)));
    let (body, content_type) = match format {
        BodyFormat::Json => (json::encode(result).into_bytes(), "application/json"),
        BodyFormat::Protobuf => (result.encode_to_vec(), "application/x-protobuf"),
    };
    (body, properties(kind, content_type, id, headers))
}

/// The announcement that positions `from..to` of `stream` will never be published.
pub fn gap(stream: &str, from: u64, to: u64) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert("ordo-stream-id".into(), text(stream));
    headers.insert("ordo-gap-from".into(), signed(from));
    headers.insert("ordo-gap-to".into(), signed(to));
    let body = serde_json::json!({
        "stream_id": stream,
        "gap_from": from,
        "gap_to": to,
        "error": "these results were trimmed from the release log before the broker confirmed them",
    })
    .to_string()
    .into_bytes();
    (body, properties(GAP_TYPE, "application/json", format!("{stream}/gap/{from}"), headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_and_gap_results_are_dead_letters_with_their_own_id() {
        let mut failed = EventResult {
            stream_id: "s".into(),
            sequence: 2,
            position: 2,
            status: ResultStatus::Failed as i32,
            error: "boom".into(),
            ..Default::default()
        };
        assert!(is_dead_letter(&failed));
        let (body, properties) = dead_letter(&failed, BodyFormat::Json);
        assert_eq!(body, result(&failed, BodyFormat::Json).0, "the same body as the result");
        assert_eq!(properties.kind().as_ref().map(|k| k.as_str()), Some(DEAD_LETTER_TYPE));
        assert_eq!(properties.message_id().as_ref().map(|k| k.as_str()), Some("s/2/dead-letter"));
        failed.status = ResultStatus::Gap as i32;
        assert!(is_dead_letter(&failed));
        failed.status = ResultStatus::Ok as i32;
        assert!(!is_dead_letter(&failed));
    }
}
