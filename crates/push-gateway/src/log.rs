//! Reads of a stream's release log (written only by the reassembler; this
//! module never writes it).
//!
//! Retention has two limits. By count, the reassembler trims each log
//! (`--retention`): a position below the first entry is gone. By age, this
//! gateway's `--retention-age` makes entries released longer ago than that
//! *expired* for subscribers: each log entry carries its release time (field
//! `t`, Redis server milliseconds), and a cursor whose first entry is older
//! than the limit fails with [`LogError::Expired`] exactly as if it had been
//! trimmed. Entries without `t` (written before release times were recorded)
//! never expire by age. The AMQP outbox reads with [`Log::read_entries`],
//! which ignores the age limit: results waiting for a broker are published
//! however late.

use std::time::Duration;

use ordo_core::keys;
use ordo_proto::v1::EventResult;
use ordo_runtime::redis_conn::RedisConn;
use prost::Message;
use redis::streams::{StreamId, StreamRangeReply};

/// Entries read per round trip when catching up.
pub const PAGE: usize = 512;

/// Log entry field holding the encoded result.
const RESULT_FIELD: &str = "r";
/// Log entry field holding the release time (Redis `TIME`, Unix milliseconds).
const RELEASED_AT_FIELD: &str = "t";

/// Finds a log's oldest position whose release time is within the age limit,
/// by binary search over the (contiguous, time-ordered) positions. Read-only.
/// KEYS[1] = log; ARGV[1] = age limit in ms. Returns -1 for an empty log.
const OLDEST_BY_AGE: &str = r"
local log = KEYS[1]
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
if #first == 0 then return -1 end
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
local function position(id) return tonumber(string.sub(id, 3)) - 1 end
local function fresh(entry)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return tonumber(fields[i + 1]) >= cutoff end
  end
  return true
end
local lo, hi = position(first[1][1]), position(last[1][1]) + 1
if fresh(first[1]) then return lo end
lo = lo + 1
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  local id = '0-' .. (mid + 1)
  local entry = redis.call('XRANGE', log, id, id)
  if #entry == 0 or not fresh(entry[1]) then lo = mid + 1 else hi = mid end
end
return lo
";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "position {wanted} of stream {stream:?} is older than retention (oldest retained: {oldest}); resume from {oldest} or later"
    )]
    Expired { stream: String, wanted: u64, oldest: u64 },
    #[error("corrupt log entry {id} of stream {stream:?}")]
    Corrupt { stream: String, id: String },
}

#[derive(Clone)]
pub struct Log {
    conn: RedisConn,
    max_age: Option<Duration>,
    oldest_by_age: redis::Script,
}

/// One page of the log.
#[derive(Debug, Default)]
pub struct Page {
    pub results: Vec<EventResult>,
    /// The stream's lowest unreleased sequence when the page was read.
    pub next_sequence: u64,
}

/// One page of the log as the outbox sees it: no age limit, no error for a
/// trimmed cursor (the caller decides what a gap means for it).
#[derive(Debug, Default)]
pub struct Entries {
    /// Results from the first retained position at or after the cursor.
    pub results: Vec<EventResult>,
    /// The stream's next release position (0 when it has no state at all).
    pub released: u64,
    /// Whether the stream has any reorder state (its meta hash exists).
    pub exists: bool,
}

/// The raw answer of one log read.
struct Fetched {
    next: u64,
    released: u64,
    exists: bool,
    /// Position of the first retained entry (by count), if the log has any.
    first: Option<u64>,
    /// Entries from the cursor on: (position, release time ms, result).
    page: Vec<(u64, Option<u64>, EventResult)>,
    /// Redis server time, Unix milliseconds (0 when no age limit needs it).
    now_ms: u64,
}

impl Log {
    /// `max_age`: entries released longer ago are expired for subscribers.
    pub fn new(conn: RedisConn, max_age: Option<Duration>) -> Self {
        Self { conn, max_age, oldest_by_age: redis::Script::new(OLDEST_BY_AGE) }
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The commands of one read of `stream` from `from` (all in its slot):
    /// three (the server's clock too when an age limit needs it). This runs
    /// for every catch-up, so it asks for nothing more.
    fn commands(&self, stream: &str, from: u64, count: usize) -> Vec<redis::Cmd> {
        let mut meta = redis::cmd("HMGET");
        meta.arg(keys::meta(stream)).arg(&["next", "released"]);
        let mut first = redis::cmd("XRANGE");
        first.arg(keys::log(stream)).arg("-").arg("+").arg("COUNT").arg(1);
        let mut page = redis::cmd("XRANGE");
        page.arg(keys::log(stream)).arg(keys::log_id(from)).arg("+").arg("COUNT").arg(count.max(1));
        let mut commands = vec![meta, first, page];
        if self.max_age.is_some() {
            commands.push(redis::cmd("TIME"));
        }
        commands
    }

    async fn fetch(&self, stream: &str, from: u64, count: usize) -> Result<Fetched, LogError> {
        let slot = keys::stream_slot(stream);
        let commands: Vec<(u16, redis::Cmd)> =
            self.commands(stream, from, count).into_iter().map(|command| (slot, command)).collect();
        // One round trip; a Redis restart breaks the connection once: retried
        // (bounded, jittered) so a reader sees a short delay, not an error.
        let replies = ordo_runtime::redis_conn::query_each::<redis::Value>(&self.conn, &commands).await?;
        parse(stream, replies)
    }

    /// Reads many streams at once, each from its cursor (at most [`PAGE`]
    /// results each), in one round trip (on a cluster one per slot): the
    /// catch-up of a `Follow` call's new and lagged streams. The outer error
    /// is Redis failing the whole read (retry it); each stream's own answer is
    /// as [`Self::read_from`]'s.
    pub async fn read_many(&self, cursors: &[(&str, u64)]) -> Result<Vec<Result<Page, LogError>>, LogError> {
        let mut commands = Vec::new();
        let mut counts = Vec::with_capacity(cursors.len());
        for (stream, from) in cursors {
            let slot = keys::stream_slot(stream);
            let own = self.commands(stream, *from, PAGE);
            counts.push(own.len());
            commands.extend(own.into_iter().map(|command| (slot, command)));
        }
        let mut replies =
            ordo_runtime::redis_conn::query_each::<redis::Value>(&self.conn, &commands).await?.into_iter();
        let mut pages = Vec::with_capacity(cursors.len());
        for ((stream, from), count) in cursors.iter().zip(counts) {
            let fetched = parse(stream, replies.by_ref().take(count).collect());
            pages.push(match fetched {
                Ok(fetched) => self.page(stream, *from, fetched).await,
                Err(error) => Err(error),
            });
        }
        Ok(pages)
    }

    /// Whether an entry released at `released_at` is past the age limit at `now_ms`.
    fn too_old(&self, released_at: Option<u64>, now_ms: u64) -> bool {
        match (self.max_age, released_at) {
            (Some(age), Some(at)) => at.saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)) <= now_ms,
            _ => false,
        }
    }

    /// The oldest position a subscriber may still ask for.
    pub async fn oldest_retained(&self, stream: &str) -> Result<u64, LogError> {
        let fetched = self.fetch(stream, 0, 1).await?;
        self.oldest_of(stream, &fetched).await
    }

    async fn oldest_of(&self, stream: &str, fetched: &Fetched) -> Result<u64, LogError> {
        let Some(first) = fetched.first else { return Ok(fetched.released) };
        let Some(age) = self.max_age else { return Ok(first) };
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let oldest: i64 = ordo_runtime::redis_conn::call(|| {
            let mut conn = self.conn.clone();
            let log = keys::log(stream);
            async move { self.oldest_by_age.key(log).arg(age_ms).invoke_async(&mut conn).await }
        })
        .await?;
        Ok(u64::try_from(oldest).unwrap_or(fetched.released))
    }

    /// Fails with [`LogError::Expired`] when `from` is trimmed or too old.
    async fn ensure_retained(&self, stream: &str, from: u64, fetched: &Fetched) -> Result<(), LogError> {
        let trimmed = from < fetched.first.unwrap_or(fetched.released);
        let aged = fetched.page.first().is_some_and(|(_, at, _)| self.too_old(*at, fetched.now_ms));
        if trimmed || aged {
            let oldest = self.oldest_of(stream, fetched).await?;
            return Err(LogError::Expired { stream: stream.to_owned(), wanted: from, oldest });
        }
        Ok(())
    }

    /// Results from release position `from` on (at most [`PAGE`]). Fails with
    /// [`LogError::Expired`] when `from` was trimmed away or is past the age limit.
    pub async fn read_from(&self, stream: &str, from: u64) -> Result<Page, LogError> {
        let fetched = self.fetch(stream, from, PAGE).await?;
        self.page(stream, from, fetched).await
    }

    async fn page(&self, stream: &str, from: u64, fetched: Fetched) -> Result<Page, LogError> {
        self.ensure_retained(stream, from, &fetched).await?;
        let next_sequence = fetched.next;
        Ok(Page { results: fetched.page.into_iter().map(|(_, _, r)| r).collect(), next_sequence })
    }

    /// Fails with [`LogError::Expired`] if `from` is older than retention.
    pub async fn check(&self, stream: &str, from: u64) -> Result<(), LogError> {
        let fetched = self.fetch(stream, from, 1).await?;
        self.ensure_retained(stream, from, &fetched).await
    }

    /// Up to `count` results from the first retained position at or after
    /// `from`, ignoring the age limit (for the AMQP outbox).
    pub async fn read_entries(&self, stream: &str, from: u64, count: usize) -> Result<Entries, LogError> {
        let fetched = self.fetch(stream, from, count).await?;
        Ok(Entries {
            results: fetched.page.into_iter().map(|(_, _, r)| r).collect(),
            released: fetched.released,
            exists: fetched.exists,
        })
    }
}

/// One read's replies ([`Log::commands`]) as a [`Fetched`].
fn parse(stream: &str, replies: Vec<redis::Value>) -> Result<Fetched, LogError> {
    use redis::FromRedisValue;
    let mut replies = replies.into_iter();
    let mut next_reply = || {
        replies
            .next()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "a log read lost a reply")))
    };
    fn value<T: FromRedisValue>(reply: redis::Value) -> Result<T, LogError> {
        T::from_redis_value(reply).map_err(|error| LogError::Redis(error.into()))
    }
    let (next, released): (Option<u64>, Option<u64>) = value(next_reply()?)?;
    let first: StreamRangeReply = value(next_reply()?)?;
    let page: StreamRangeReply = value(next_reply()?)?;
    let time: Option<(u64, u64)> = match next_reply() {
        Ok(time) => Some(value(time)?),
        Err(_) => None,
    };
    // The reassembler's script writes `next` and `released` together in
    // every call, so the meta hash exists exactly when they do.
    let exists = next.is_some() || released.is_some();
    let mut entries = Vec::with_capacity(page.ids.len());
    for entry in page.ids {
        let corrupt = || LogError::Corrupt { stream: stream.to_owned(), id: entry.id.clone() };
        let position = keys::position_of(&entry.id).ok_or_else(corrupt)?;
        let Some(redis::Value::BulkString(body)) = entry.map.get(RESULT_FIELD) else { return Err(corrupt()) };
        let mut result = EventResult::decode(body.as_slice()).map_err(|_| corrupt())?;
        // Older log entries carry their position in the id only.
        result.position = position;
        entries.push((position, released_at(&entry), result));
    }
    Ok(Fetched {
        next: next.unwrap_or(0),
        released: released.unwrap_or(0),
        exists,
        first: first.ids.first().and_then(|entry| keys::position_of(&entry.id)),
        page: entries,
        now_ms: time.map_or(0, |(secs, micros)| secs.saturating_mul(1000).saturating_add(micros / 1000)),
    })
}

fn released_at(entry: &StreamId) -> Option<u64> {
    entry.map.get(RELEASED_AT_FIELD).and_then(|value| redis::from_redis_value_ref::<u64>(value).ok())
}
