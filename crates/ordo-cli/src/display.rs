//! How results are shown: one line per result, whatever bytes the payload
//! holds, so that output stays greppable and line-oriented.

use std::fmt::Write as _;

use ordo_proto::{EventResult, ResultStatus};

/// `OK`, `FAILED`, ... (the proto name without its prefix); unknown values
/// from a newer server are shown as numbers rather than rejected.
pub fn status_name(status: i32) -> String {
    match ResultStatus::try_from(status) {
        Ok(known) => known.as_str_name().trim_start_matches("RESULT_STATUS_").to_owned(),
        Err(_) => format!("STATUS_{status}"),
    }
}

/// A gRPC status code by name (`InvalidArgument`), as carried by REJECTED results.
pub fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from(code))
}

/// The payload as UTF-8 (lossy) with control characters and backslashes
/// escaped, so a payload never spans or breaks lines.
pub fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' || c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A failed call as `NotFound: message` (tonic's own Display is wordier),
/// keeping the underlying cause of transport failures.
pub fn rpc_error(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// `seq status payload`, followed by the error (and code) when there is one.
/// An empty payload leaves no trailing space.
pub fn result_line(result: &EventResult) -> String {
    let mut line = format!("{} {}", result.sequence, status_name(result.status));
    if !result.payload.is_empty() {
        let _ = write!(line, " {}", one_line(&result.payload));
    }
    if result.status == ResultStatus::Rejected as i32 {
        let _ = write!(line, " code={}", code_name(result.code));
    }
    if !result.error.is_empty() {
        let _ = write!(line, " error={:?}", result.error);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_line_breaks_and_keeps_unicode() {
        assert_eq!(one_line("a\nb\\c é".as_bytes()), "a\\nb\\\\c é");
        assert_eq!(one_line(&[0xff, b'x']), "\u{fffd}x");
    }

    #[test]
    fn formats_results() {
        let ok =
            EventResult { sequence: 7, status: ResultStatus::Ok as i32, payload: "h".into(), ..Default::default() };
        assert_eq!(result_line(&ok), "7 OK h");
        let failed = EventResult {
            sequence: 8,
            status: ResultStatus::Failed as i32,
            error: "boom".into(),
            ..Default::default()
        };
        assert_eq!(result_line(&failed), "8 FAILED error=\"boom\"");
        assert_eq!(status_name(99), "STATUS_99");
        assert_eq!(code_name(3), "InvalidArgument");
    }
}
