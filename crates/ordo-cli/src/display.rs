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

/// `2026-11-23T14:46:11.123Z` for Unix milliseconds (UTC, proleptic Gregorian).
pub fn utc(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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
    fn times_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
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
