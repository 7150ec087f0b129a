//! The durable map from a JetStream position (stream sequence) to the Ordo
//! event it became (key, sequence), and the sink's cursors. These are the
//! source's own keys; it never writes reorder state. All of one source share
//! the hash tag `{source:<name>}`, so on a cluster they would be one slot:
//!
//! - `ordo:{source:N}:pos` — hash: stream sequence → `"<sequence> <key>"`;
//! - `ordo:{source:N}:order` — sorted set of the mapped stream sequences
//!   (score = member), so that trimming below a floor is a range;
//! - `ordo:{source:N}:next` — hash: key → next sequence to assign (dense
//!   from 0); its fields are also the keys the sink follows;
//! - `ordo:{source:N}:last` — hash: key → highest stream sequence mapped;
//! - `ordo:{source:N}:floor` — every stream sequence ≤ it is done (acked);
//! - `ordo:{source:N}:sink` — hash: key → next release position to publish.
//!
//! One script call numbers a batch: a position already mapped gets its
//! mapping back (a redelivery becomes the same event), a new one the key's
//! next sequence — atomically with recording it, so a crash between the two
//! cannot happen. `next` and `last` are never trimmed: a key's numbering must
//! survive as long as its release log.

use ordo_runtime::redis_conn::RedisConn;

/// Numbers a batch. KEYS = pos, order, next, last, floor; ARGV = pairs of
/// (stream sequence, key). Per pair: the sequence (≥ 0); -1 if the position is
/// at or below the floor and unmapped (done before, its mapping trimmed); -2
/// if the key already has a later position mapped (it would be out of order).
const ASSIGN: &str = r"
local floor = tonumber(redis.call('GET', KEYS[5]) or '0')
local out = {}
for i = 1, #ARGV, 2 do
  local position = ARGV[i]
  local key = ARGV[i + 1]
  local found = redis.call('HGET', KEYS[1], position)
  if found then
    local space = string.find(found, ' ', 1, true)
    out[#out + 1] = tonumber(string.sub(found, 1, space - 1))
  elseif tonumber(position) <= floor then
    out[#out + 1] = -1
  else
    local last = tonumber(redis.call('HGET', KEYS[4], key) or '0')
    if tonumber(position) < last then
      out[#out + 1] = -2
    else
      local sequence = redis.call('HINCRBY', KEYS[3], key, 1) - 1
      redis.call('HSET', KEYS[1], position, sequence .. ' ' .. key)
      redis.call('ZADD', KEYS[2], position, position)
      redis.call('HSET', KEYS[4], key, position)
      out[#out + 1] = sequence
    end
  end
end
return out
";

/// Raises the floor (never lowers it) and forgets mappings at or below it.
/// KEYS = pos, order, floor; ARGV[1] = new floor. Returns the floor in force.
const TRIM: &str = r"
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
local floor = tonumber(ARGV[1])
if floor > current then
  redis.call('SET', KEYS[3], ARGV[1])
else
  floor = current
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', floor, 'LIMIT', 0, 4000)
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
return floor
";

/// Sets a sink cursor only if it still holds the expected value ('' = unset).
/// KEYS[1] = cursor hash; ARGV = key, expected, new.
const CAS: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
";

/// What one position of a batch became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    /// Event `sequence` of its key (new, or the same as before).
    Sequence(u64),
    /// At or below the floor: done before; ack it again.
    Done,
    /// The key already has a later position: numbering it would reorder.
    Late,
}

/// The source's keys in Redis and its scripts.
#[derive(Clone)]
pub struct Mapping {
    conn: RedisConn,
    pos: String,
    order: String,
    next: String,
    last: String,
    floor: String,
    sink: String,
    assign: redis::Script,
    trim: redis::Script,
    cas: redis::Script,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl Mapping {
    pub fn new(conn: RedisConn, source: &str) -> Self {
        let key = |suffix: &str| format!("ordo:{{source:{source}}}:{suffix}");
        Self {
            conn,
            pos: key("pos"),
            order: key("order"),
            next: key("next"),
            last: key("last"),
            floor: key("floor"),
            sink: key("sink"),
            assign: redis::Script::new(ASSIGN),
            trim: redis::Script::new(TRIM),
            cas: redis::Script::new(CAS),
        }
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Numbers `batch` (stream sequence, key) in one script call.
    pub async fn assign(&self, batch: &[(u64, String)]) -> redis::RedisResult<Vec<Assigned>> {
        let mut invocation = self.assign.prepare_invoke();
        invocation.key(&self.pos).key(&self.order).key(&self.next).key(&self.last).key(&self.floor);
        for (position, key) in batch {
            invocation.arg(position).arg(key);
        }
        let mut conn = self.conn.clone();
        let answers: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        if answers.len() != batch.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the assign script answered for a different number of positions",
            )));
        }
        Ok(answers
            .into_iter()
            .map(|answer| match answer {
                -1 => Assigned::Done,
                n if n < 0 => Assigned::Late,
                n => Assigned::Sequence(n.unsigned_abs()),
            })
            .collect())
    }

    /// The floor recorded last (0: none).
    pub async fn floor(&self) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        let floor: Option<u64> = redis::cmd("GET").arg(&self.floor).query_async(&mut conn).await?;
        Ok(floor.unwrap_or(0))
    }

    /// Raises the floor to `floor` (if higher) and trims mappings at or below
    /// it (a bounded number per call); returns the floor in force.
    pub async fn raise_floor(&self, floor: u64) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        self.trim.key(&self.pos).key(&self.order).key(&self.floor).arg(floor).invoke_async(&mut conn).await
    }

    /// Mappings kept (positions not yet below the floor).
    pub async fn mapped(&self) -> redis::RedisResult<u64> {
        let mut conn = self.conn.clone();
        redis::cmd("HLEN").arg(&self.pos).query_async(&mut conn).await
    }

    /// Every key the source has numbered, with how many events it has.
    pub async fn keys(&self) -> redis::RedisResult<Vec<(String, u64)>> {
        let mut conn = self.conn.clone();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<(String, u64)>) =
                redis::cmd("HSCAN").arg(&self.next).arg(cursor).arg("COUNT").arg(500).query_async(&mut conn).await?;
            keys.extend(page);
            cursor = next;
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }

    /// The sink's cursor of `key`: the next release position to publish.
    pub async fn cursor(&self, key: &str) -> redis::RedisResult<Option<u64>> {
        let mut conn = self.conn.clone();
        redis::cmd("HGET").arg(&self.sink).arg(key).query_async(&mut conn).await
    }

    /// Moves `key`'s cursor from `expected` to `to`; false if it moved meanwhile.
    pub async fn advance(&self, key: &str, expected: Option<u64>, to: u64) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let set: i64 = self.cas.key(&self.sink).arg(key).arg(expected).arg(to).invoke_async(&mut conn).await?;
        Ok(set == 1)
    }
}
