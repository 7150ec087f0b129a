//! Dead letters: every stored FAILED and GAP result leaves a record of its
//! event, attempts, last error and time in the dead-letter log
//! (`ordo_core::keys::DEAD_LETTERS`), so its owners can inspect, retry or
//! roll it back (`ordo dlq`).
//!
//! This module decides *what* is recorded with a delivered result
//! ([`letter_for`]) and serves `ListDeadLetters` / `GetDeadLetter`; the
//! release script writes the log (atomically with the result, only for the
//! result that is stored) and [`Store`] reads it. It never writes Redis.
//!
//! On a Redis Cluster there is one log per slot (`ordo:dlq:{<tag>}`, in the
//! slot of the streams it records): a listing finds them with a SCAN of
//! every master and merges them in id order, a stream's listing reads only
//! its slot's log, and ids carry the slot (`<ms>-<n>@<slot>`, [`LetterId`]).

use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt as _, TryStreamExt as _};
use ordo_core::{
    keys,
    limits::{self, MAX_STREAM_ID_BYTES},
};
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
/// stream for all streams (on a cluster, for all streams of a slot), so a
/// rare stream's page may come back short (with `next` set) rather than one
/// call reading the whole log.
const SCAN_BUDGET: usize = 20_000;
/// Per-slot logs read at once by an unfiltered listing on a cluster.
const LOG_READS: usize = 32;

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
    let after = match request.after.as_str() {
        "" => None,
        id => Some(LetterId::parse(id, "after", store.is_cluster())?),
    };
    if request.stream_id.is_empty() {
        return list_all(store, after, limit).await;
    }
    // A stream's dead letters are all in one log: the global one, or on a
    // cluster its slot's.
    let slot = store.is_cluster().then(|| keys::stream_slot(&request.stream_id));
    let log = slot.map_or_else(|| keys::DEAD_LETTERS.to_owned(), keys::dead_letters);
    let mut start = after.map_or_else(|| "-".to_owned(), |after| after.start_in(slot));
    let mut found = Vec::new();
    let mut scanned = 0;
    let mut last = None;
    while scanned < SCAN_BUDGET {
        let chunk = redis_conn::call(|| store.dead_letters_from(&log, &start, SCAN_CHUNK)).await.map_err(redis)?;
        let exhausted = chunk.len() < SCAN_CHUNK;
        scanned += chunk.len();
        for entry in chunk {
            start = format!("({}", entry.id);
            last = Some(LetterId::of(&entry.id, slot));
            if entry.stream_id == request.stream_id {
                found.push((slot, entry));
                if found.len() == limit {
                    return Ok(page(found, last));
                }
            }
        }
        if exhausted {
            return Ok(page(found, None));
        }
    }
    // Budget spent with more to read: the caller goes on from where we stopped.
    Ok(page(found, last))
}

/// An unfiltered page: from the one global log, or on a cluster merged from
/// every slot's log in id order ([`LetterId`]: entry id, then slot), reading
/// at most `limit` entries of each log.
async fn list_all(store: &Store, after: Option<LetterId>, limit: usize) -> Result<ListDeadLettersResponse, Error> {
    let logs = redis_conn::call(|| store.dead_letter_logs()).await.map_err(redis)?;
    let reads = logs.into_iter().map(|(slot, log)| {
        let start = after.as_ref().map_or_else(|| "-".to_owned(), |after| after.start_in(slot));
        async move {
            let entries = redis_conn::call(|| store.dead_letters_from(&log, &start, limit)).await?;
            Ok::<_, redis::RedisError>(entries.into_iter().map(move |entry| (slot, entry)))
        }
    });
    let mut merged: Vec<(Option<u16>, DeadLetterEntry)> = futures::stream::iter(reads)
        .buffer_unordered(LOG_READS)
        .try_collect::<Vec<_>>()
        .await
        .map_err(redis)?
        .into_iter()
        .flatten()
        .collect();
    merged.sort_by_cached_key(|(slot, entry)| LetterId::of(&entry.id, *slot).order());
    merged.truncate(limit);
    let next =
        if merged.len() == limit { merged.last().map(|(slot, entry)| LetterId::of(&entry.id, *slot)) } else { None };
    Ok(page(merged, next))
}

fn redis(error: redis::RedisError) -> Error {
    Error::Redis(std::sync::Arc::new(error))
}

/// The response of `letters` (with their log's slot), `next` set when more
/// may follow.
fn page(letters: Vec<(Option<u16>, DeadLetterEntry)>, next: Option<LetterId>) -> ListDeadLettersResponse {
    ListDeadLettersResponse {
        dead_letters: letters.into_iter().map(|(slot, entry)| decode(entry, slot)).collect(),
        next: next.map(|id| id.to_string()).unwrap_or_default(),
    }
}

/// `GetDeadLetter`: one dead letter by id.
pub async fn get(store: &Store, request: GetDeadLetterRequest) -> Result<DeadLetter, Error> {
    if request.id.is_empty() {
        return Err(Error::Invalid("id is required (a dead letter's id, as listed by ListDeadLetters)".into()));
    }
    let id = LetterId::parse(&request.id, "id", store.is_cluster())?;
    let log = id.slot.map_or_else(|| keys::DEAD_LETTERS.to_owned(), keys::dead_letters);
    let entry_id = id.entry_id();
    // Transient Redis errors (a restart) are retried briefly before answering UNAVAILABLE.
    match redis_conn::call(|| store.dead_letter(&log, &entry_id)).await.map_err(redis)? {
        Some(entry) => Ok(decode(entry, id.slot)),
        None => Err(Error::NotFound(format!(
            "no dead letter {}: unknown, or trimmed past the reassembler's --dead-letter-retention",
            request.id
        ))),
    }
}

/// A dead letter's id as users see it: its log entry id (`<ms>-<n>`, as
/// Redis assigns them), and on a Redis Cluster `@<slot>` of its log, since
/// each slot's log assigns entry ids of its own (two logs may hold the same
/// one). Ids order by entry id, then slot: the order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LetterId {
    ms: u64,
    n: u64,
    slot: Option<u16>,
}

impl LetterId {
    /// The id of entry `entry_id` (as Redis returned it) of `slot`'s log.
    fn of(entry_id: &str, slot: Option<u16>) -> Self {
        let (ms, n) = parse_entry_id(entry_id).unwrap_or_else(|| {
            // Redis assigns every entry id: never reached but for a corrupt reply.
            tracing::warn!(entry_id, "a dead-letter entry id that is not <ms>-<n>");
            (0, 0)
        });
        Self { ms, n, slot }
    }

    /// `text` as an id of this reassembler's Redis (a cluster: `@<slot>`
    /// required; one node: refused).
    fn parse(text: &str, what: &str, cluster: bool) -> Result<Self, Error> {
        let (entry, slot) = match text.split_once('@') {
            Some((entry, slot)) => (entry, Some(slot)),
            None => (text, None),
        };
        let invalid = || {
            let form = if cluster {
                "<milliseconds>-<number>@<slot> on a Redis Cluster, e.g. 1700000000000-0@4711"
            } else {
                "<milliseconds>-<number>, e.g. 1700000000000-0"
            };
            Error::Invalid(format!("{what} {:?} is not a dead-letter id ({form})", limits::echo(text)))
        };
        let (ms, n) = parse_entry_id(entry).ok_or_else(invalid)?;
        let slot = match (slot, cluster) {
            (None, false) => None,
            (Some(slot), true) => {
                let slot: u16 = number(slot).then(|| slot.parse().ok()).flatten().ok_or_else(invalid)?;
                if slot >= keys::SLOTS {
                    return Err(invalid());
                }
                Some(slot)
            }
            (None, true) | (Some(_), false) => return Err(invalid()),
        };
        Ok(Self { ms, n, slot })
    }

    /// The entry id in its log.
    fn entry_id(&self) -> String {
        format!("{}-{}", self.ms, self.n)
    }

    /// Where to start reading `slot`'s log to get the entries after this
    /// id in listing order: after the same entry id in this id's slot and
    /// those before it; at it in later slots.
    fn start_in(&self, slot: Option<u16>) -> String {
        if slot > self.slot { self.entry_id() } else { format!("({}", self.entry_id()) }
    }

    fn order(&self) -> (u64, u64, Option<u16>) {
        (self.ms, self.n, self.slot)
    }
}

impl std::fmt::Display for LetterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.slot {
            None => write!(f, "{}-{}", self.ms, self.n),
            Some(slot) => write!(f, "{}-{}@{slot}", self.ms, self.n),
        }
    }
}

fn number(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())
}

/// `(ms, n)` of a stream entry id `<ms>-<n>`.
fn parse_entry_id(text: &str) -> Option<(u64, u64)> {
    let (ms, n) = text.split_once('-')?;
    if !number(ms) || !number(n) {
        return None;
    }
    Some((ms.parse().ok()?, n.parse().ok()?))
}

/// The dead letter of a log entry of `slot`'s log, its id the
/// [`LetterId`]. An unreadable record still names its stream and sequence,
/// so it is never silently lost.
fn decode(entry: DeadLetterEntry, slot: Option<u16>) -> DeadLetter {
    let mut letter = DeadLetter::decode(entry.letter.as_slice()).unwrap_or_else(|error| {
        tracing::warn!(id = %entry.id, %error, "undecodable dead letter");
        DeadLetter { error: format!("the stored dead letter is unreadable: {error}"), ..Default::default() }
    });
    letter.id = LetterId::of(&entry.id, slot).to_string();
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
        let single = |text: &str| LetterId::parse(text, "id", false);
        let cluster = |text: &str| LetterId::parse(text, "id", true);
        assert_eq!(single("1700000000000-0").expect("valid"), LetterId { ms: 1_700_000_000_000, n: 0, slot: None });
        assert_eq!(cluster("17-2@16383").expect("valid"), LetterId { ms: 17, n: 2, slot: Some(16383) });
        for bad in ["", "x", "1-", "-1", "1-2-3", "+1-2", "1-+2", "a-b", "99999999999999999999-0", "1-0@5"] {
            assert!(single(bad).is_err(), "{bad:?}");
        }
        for bad in ["1-0", "1-0@", "1-0@16384", "1-0@+5", "1-0@5@6", "x@5", "1-0@99999999999"] {
            assert!(cluster(bad).is_err(), "{bad:?}");
        }
        let Err(Error::Invalid(message)) = single(&"9".repeat(10_000)) else { panic!("invalid") };
        assert!(message.len() < 200, "the echo is cut: {message}");
        let Err(Error::Invalid(message)) = cluster("1-0") else { panic!("invalid") };
        assert!(message.contains("@<slot>"), "{message}");
    }

    #[test]
    fn cluster_ids_print_as_parsed_and_order_by_entry_then_slot() {
        let id = LetterId { ms: 5, n: 1, slot: Some(42) };
        assert_eq!(id.to_string(), "5-1@42");
        assert_eq!(LetterId::parse(&id.to_string(), "id", true).expect("valid"), id);
        assert_eq!(LetterId { slot: None, ..id }.to_string(), "5-1");
        // After 5-1@42: the same entry id only in later slots.
        assert_eq!(id.start_in(Some(41)), "(5-1");
        assert_eq!(id.start_in(Some(42)), "(5-1");
        assert_eq!(id.start_in(Some(43)), "5-1");
        assert_eq!(LetterId { slot: None, ..id }.start_in(None), "(5-1");
        let mut ids = [
            LetterId { ms: 6, n: 0, slot: Some(1) },
            LetterId { ms: 5, n: 1, slot: Some(43) },
            id,
            LetterId { ms: 5, n: 0, slot: Some(9000) },
        ];
        ids.sort_by_key(LetterId::order);
        let printed: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["5-0@9000", "5-1@42", "5-1@43", "6-0@1"]);
    }
}
