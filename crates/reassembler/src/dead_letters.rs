//! Dead letters: every stored FAILED and GAP result leaves a record of its
//! event, attempts, last error and time in the dead-letter log
//! (`ordo_core::keys::DEAD_LETTERS`), so its owners can inspect, retry or
//! roll it back (`ordo dlq`).
//!
//! This module decides *what* is recorded with a delivered result
//! ([`letter_for`]) and serves `ListDeadLetters` / `GetDeadLetter`; the
//! release script writes the log (atomically with the result, only for the
//! result that is stored) and [`Store`] reads it. It never writes Redis.

use std::time::{SystemTime, UNIX_EPOCH};

use ordo_core::limits::{self, MAX_STREAM_ID_BYTES};
use ordo_proto::v1::{
    DeadLetter, Event, EventResult, GetDeadLetterRequest, ListDeadLettersRequest, ListDeadLettersResponse, ResultStatus,
};
use ordo_runtime::redis_conn;
use prost::Message;

use crate::{
    service::Error,
    store::{DeadLetterEntry, Store},
};

/// Dead letters per page when the request names no limit.
pub const DEFAULT_LIMIT: u32 = 100;
/// Most dead letters per page.
pub const MAX_LIMIT: u32 = 1000;
/// Entries read per Redis call while filtering by stream.
const SCAN_CHUNK: usize = 1000;
/// Most entries one filtered `ListDeadLetters` call examines: the log is one
/// stream for all streams, so a rare stream's page may come back short (with
/// `next` set) rather than one call reading the whole log.
const SCAN_BUDGET: usize = 20_000;

/// The dead letter to record with `result`: for a FAILED or GAP result, the
/// producer's (`given`), completed from the result where it left fields
/// empty, or one made from the result alone when the producer set none, so
/// every stored FAILED and GAP result is recorded whoever produced it. `None`
/// for any other status (a dead letter on an OK result is ignored).
pub fn letter_for(result: &EventResult, given: Option<DeadLetter>) -> Option<DeadLetter> {
    let status = result.status();
    if !matches!(status, ResultStatus::Failed | ResultStatus::Gap) {
        if given.is_some() {
            tracing::debug!(stream = %result.stream_id, sequence = result.sequence, ?status, "ignoring a dead letter on a result that is not FAILED or GAP");
        }
        return None;
    }
    let mut letter = given.unwrap_or_default();
    // Assigned when stored.
    letter.id.clear();
    let event = letter.event.get_or_insert_with(Event::default);
    // The log entry is keyed by the result's stream and sequence; the event must agree.
    event.stream_id.clone_from(&result.stream_id);
    event.sequence = result.sequence;
    letter.status = status as i32;
    if letter.error.is_empty() {
        letter.error.clone_from(&result.error);
    }
    if letter.at_unix_ms == 0 {
        letter.at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    }
    Some(letter)
}

/// `ListDeadLetters`: oldest first, optionally of one stream, paged by id.
pub async fn list(store: &Store, request: ListDeadLettersRequest) -> Result<ListDeadLettersResponse, Error> {
    if request.stream_id.len() > MAX_STREAM_ID_BYTES {
        return Err(Error::Invalid(format!(
            "stream_id {} is longer than {MAX_STREAM_ID_BYTES} bytes",
            limits::echo(&request.stream_id)
        )));
    }
    let limit = match request.limit {
        0 => DEFAULT_LIMIT,
        n if n > MAX_LIMIT => {
            return Err(Error::Invalid(format!("limit {n} is above the maximum of {MAX_LIMIT} dead letters per page")));
        }
        n => n,
    } as usize;
    let mut after = match request.after.as_str() {
        "" => None,
        id => Some(valid_id(id, "after")?.to_owned()),
    };
    let redis = |e| Error::Redis(std::sync::Arc::new(e));

    if request.stream_id.is_empty() {
        let entries = redis_conn::call(|| store.dead_letters_after(after.as_deref(), limit)).await.map_err(redis)?;
        let next = if entries.len() == limit {
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        return Ok(ListDeadLettersResponse { dead_letters: entries.into_iter().map(decode).collect(), next });
    }

    let mut found = Vec::new();
    let mut scanned = 0;
    while scanned < SCAN_BUDGET {
        let chunk = redis_conn::call(|| store.dead_letters_after(after.as_deref(), SCAN_CHUNK)).await.map_err(redis)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        scanned += chunk.len();
        for entry in chunk {
            after = Some(entry.id.clone());
            if entry.stream_id == request.stream_id {
                found.push(entry);
                if found.len() == limit {
                    return Ok(ListDeadLettersResponse {
                        next: after.unwrap_or_default(),
                        dead_letters: found.into_iter().map(decode).collect(),
                    });
                }
            }
        }
        if exhausted {
            return Ok(ListDeadLettersResponse {
                dead_letters: found.into_iter().map(decode).collect(),
                next: String::new(),
            });
        }
    }
    // Budget spent with more to read: the caller goes on from where we stopped.
    Ok(ListDeadLettersResponse {
        dead_letters: found.into_iter().map(decode).collect(),
        next: after.unwrap_or_default(),
    })
}

/// `GetDeadLetter`: one dead letter by id.
pub async fn get(store: &Store, request: GetDeadLetterRequest) -> Result<DeadLetter, Error> {
    if request.id.is_empty() {
        return Err(Error::Invalid("id is required (a dead letter's id, as listed by ListDeadLetters)".into()));
    }
    let id = valid_id(&request.id, "id")?;
    // Transient Redis errors (a restart) are retried briefly before answering UNAVAILABLE.
    match redis_conn::call(|| store.dead_letter(id)).await.map_err(|e| Error::Redis(std::sync::Arc::new(e)))? {
        Some(entry) => Ok(decode(entry)),
        None => Err(Error::NotFound(format!(
            "no dead letter {id}: unknown, or trimmed past the reassembler's --dead-letter-retention"
        ))),
    }
}

/// `text` if it is a dead-letter id (`<ms>-<n>`, as Redis assigns them).
fn valid_id<'a>(text: &'a str, what: &str) -> Result<&'a str, Error> {
    let number = |part: &str| part.bytes().all(|b| b.is_ascii_digit()) && part.parse::<u64>().is_ok();
    let ok = text.split_once('-').is_some_and(|(ms, n)| number(ms) && number(n));
    if ok {
        Ok(text)
    } else {
        Err(Error::Invalid(format!(
            "{what} {:?} is not a dead-letter id (<milliseconds>-<number>, e.g. 1700000000000-0)",
            limits::echo(text)
        )))
    }
}

/// The dead letter of a log entry, its id the entry id. An unreadable record
/// still names its stream and sequence, so it is never silently lost.
fn decode(entry: DeadLetterEntry) -> DeadLetter {
    let mut letter = DeadLetter::decode(entry.letter.as_slice()).unwrap_or_else(|error| {
        tracing::warn!(id = %entry.id, %error, "undecodable dead letter");
        DeadLetter { error: format!("the stored dead letter is unreadable: {error}"), ..Default::default() }
    });
    letter.id = entry.id;
    let event = letter.event.get_or_insert_with(Event::default);
    if event.stream_id.is_empty() {
        event.stream_id = entry.stream_id;
        event.sequence = entry.sequence;
    }
    letter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: ResultStatus) -> EventResult {
        EventResult {
            stream_id: "s".into(),
            sequence: 4,
            status: status as i32,
            error: "boom".into(),
            ..Default::default()
        }
    }

    #[test]
    fn failed_and_gap_results_always_get_a_letter() {
        for status in [ResultStatus::Failed, ResultStatus::Gap] {
            let letter = letter_for(&result(status), None).expect("a letter");
            assert_eq!(letter.status(), status);
            assert_eq!(letter.error, "boom");
            let event = letter.event.expect("event");
            assert_eq!((event.stream_id.as_str(), event.sequence), ("s", 4));
            assert!(letter.at_unix_ms > 0);
        }
        assert_eq!(letter_for(&result(ResultStatus::Ok), Some(DeadLetter::default())), None);
    }

    #[test]
    fn a_producers_letter_is_kept_and_completed() {
        let given = DeadLetter {
            id: "forged".into(),
            event: Some(Event {
                stream_id: "other".into(),
                operation: "op".into(),
                payload: "p".into(),
                ..Default::default()
            }),
            attempts: 3,
            error: "last attempt timed out".into(),
            at_unix_ms: 7,
            ..Default::default()
        };
        let letter = letter_for(&result(ResultStatus::Failed), Some(given)).expect("a letter");
        assert_eq!(letter.id, "");
        assert_eq!((letter.attempts, letter.error.as_str(), letter.at_unix_ms), (3, "last attempt timed out", 7));
        let event = letter.event.expect("event");
        assert_eq!((event.stream_id.as_str(), event.sequence, event.operation.as_str()), ("s", 4, "op"));
    }

    #[test]
    fn ids_are_validated() {
        assert!(valid_id("1700000000000-0", "id").is_ok());
        for bad in ["", "x", "1-", "-1", "1-2-3", "+1-2", "1-+2", "a-b", "99999999999999999999-0"] {
            assert!(valid_id(bad, "id").is_err(), "{bad:?}");
        }
        let Err(Error::Invalid(message)) = valid_id(&"9".repeat(10_000), "after") else { panic!("invalid") };
        assert!(message.len() < 200, "the echo is cut: {message}");
    }
}
