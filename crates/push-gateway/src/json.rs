//! The JSON form of a released result, shared by the SSE and AMQP channels
//! (documented in `docs/push.md`; change both together).
//!
//! `payload` is always base64 (standard alphabet, padded) because payloads are
//! bytes; `payload_utf8` repeats it as text when it is valid UTF-8, so
//! browser code can skip the decoding. Numbers are plain JSON numbers.

use base64::Engine as _;
use ordo_proto::v1::{EventResult, ResultStatus};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ResultJson<'a> {
    pub stream_id: &'a str,
    pub sequence: u64,
    /// Release position: the SSE event id, equal to `sequence` in ORDERED mode.
    pub position: u64,
    /// `OK` or `FAILED` (nothing else is ever released).
    pub status: &'static str,
    pub payload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_utf8: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub error: &'a str,
    pub completed_unix_nanos: u64,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub trace_context: &'a std::collections::HashMap<String, String>,
}

/// Short name of a result status: `OK`, `FAILED`, `PROCESSING`, `REJECTED`, `GAP`.
pub fn status_name(result: &EventResult) -> &'static str {
    match result.status() {
        ResultStatus::Ok => "OK",
        ResultStatus::Failed => "FAILED",
        ResultStatus::Processing => "PROCESSING",
        ResultStatus::Rejected => "REJECTED",
        ResultStatus::Gap => "GAP",
        ResultStatus::Unspecified => "UNSPECIFIED",
    }
}

impl<'a> ResultJson<'a> {
    pub fn new(result: &'a EventResult) -> Self {
        Self {
            stream_id: &result.stream_id,
            sequence: result.sequence,
            position: result.position,
            status: status_name(result),
            payload: base64::engine::general_purpose::STANDARD.encode(&result.payload),
            payload_utf8: std::str::from_utf8(&result.payload).ok(),
            error: &result.error,
            completed_unix_nanos: result.completed_unix_nanos,
            trace_context: &result.trace_context,
        }
    }
}

/// `result` as one line of JSON.
pub fn encode(result: &EventResult) -> String {
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(&ResultJson::new(result)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_base64_and_text_when_utf8() {
        let result = EventResult {
            stream_id: "s".into(),
            sequence: 3,
            position: 3,
            status: ResultStatus::Ok as i32,
            payload: b"hi".to_vec().into(),
            ..Default::default()
        };
        let value: serde_json::Value = serde_json::from_str(&encode(&result)).expect("valid JSON");
        assert_eq!(value["payload"], "aGk=");
        assert_eq!(value["payload_utf8"], "hi");
        assert_eq!(value["status"], "OK");
        assert_eq!(value["position"], 3);
        assert!(value.get("error").is_none());

        let binary = EventResult { payload: vec![0xff, 0x00].into(), ..result };
        let value: serde_json::Value = serde_json::from_str(&encode(&binary)).expect("valid JSON");
        assert_eq!(value["payload"], "/wA=");
        assert!(value.get("payload_utf8").is_none());
    }
}
