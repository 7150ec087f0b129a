//! Claims: which events are in flight in *some* harmonizer, so that several
//! harmonizers sharing one Redis never release GAP for a sequence another one
//! is still working on.
//!
//! A call declares a gap for sequences it never accepted; with one
//! harmonizer, [`crate::pool::Pool::in_flight`] tells whether another call (or
//! a `Submit`) of the same process holds one of them. With several, the
//! sequence may be held by another harmonizer (a stream moved after a
//! reconnect, or a balancer spreading calls), which this process cannot see.
//! So every harmonizer writes a claim for each event it has held for
//! `--claim-after`, to `ordo:{s}:claims` (field: the sequence, value: when the
//! claim lapses, in Redis server milliseconds), renews it every
//! [`RENEW`] while it holds the event, and removes it once the event is
//! settled (its result, or FAILED, is stored). Before declaring a gap a call
//! asks [`claimed`]: a live claim on any of the sequences postpones the gap
//! by another gap timeout, as a local in-flight event does.
//!
//! Claims are written in the background, batched (one pipeline per period;
//! on a Redis Cluster one per slot, sent at once: `redis_conn::query_each`), never on the path of an
//! event, so events that settle within `--claim-after` (the common case)
//! cost no Redis write at all. The price: an event accepted by one harmonizer less than `--claim-after` before
//! another declares a gap over its sequence is treated like an event that
//! arrived after the gap: GAP wins (first result wins) and its call gets
//! FAILED_PRECONDITION for it. A claim of a harmonizer that died lapses after
//! at most [`LEASE`]; until then the gap waits (the client resends to another
//! harmonizer meanwhile, which claims the event itself).
//!
//! **Alone, claims cost nothing.** Claims matter only to another
//! harmonizer, so each one keeps a presence on its Redis
//! ([`ordo_core::keys::HARMONIZERS`]: instance id → lease end, renewed every
//! claim period, one script call) and learns in the same call how many
//! others are live. While none is, it writes no claims (only removes the
//! ones it wrote before, as they settle). The joiner protects the gap:
//! a harmonizer whose first presence (or first after its own went stale)
//! finds others live treats every gap as claimed for one [`LEASE`], by
//! which time every other harmonizer has seen it (a claim period is at most
//! [`RENEW`]) and claimed what it holds. A harmonizer whose presence is
//! stale (not renewed for `LEASE / 2`: Redis unreachable, or the process
//! stalled) treats every gap as claimed until it is renewed, because the
//! others may have stopped claiming while its presence lapsed. Two that find
//! each other at once are both protected: the first one's call saw no one and
//! the second one's call saw it (the script is atomic), so the second
//! claims from its first period and waits out the lease.
//!
//! Only claims are written here; they are not reorder state (the release
//! script neither reads nor writes them), and losing them (a Redis restart)
//! only makes a gap possible again as it is with one harmonizer.
//!
//! A stream's claims share its `{stream}` hash tag, so on a cluster
//! [`claimed`] (TIME and HMGET in one pipeline) runs on the master of the
//! stream's slot, and a failover loses at most the claims the replica had
//! not received (as losing them to a restart).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ordo_runtime::{redis_conn::RedisConn, sync::lock};

use crate::pool::Pool;

/// How long a claim lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often a held event's claim is written again.
pub const RENEW: Duration = Duration::from_secs(2);

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What `TIME` answers: seconds and microseconds.
type RedisTime = (u64, u64);

/// Redis server time in Unix milliseconds (every harmonizer uses the same clock).
fn redis_millis(time: RedisTime) -> u64 {
    time.0.saturating_mul(1000).saturating_add(time.1 / 1000)
}

/// Writes and removes the pool's claims for as long as the process runs
/// (through a drain too: the events it still holds then stay claimed):
/// every claim period (`claim_after / 2`, at least 10 ms, at most
/// [`RENEW`]) it renews its presence; unless it is alone, events held
/// `claim_after` or longer are claimed (or claimed again every [`RENEW`]);
/// settled ones are released.
pub async fn run(pool: Pool, redis: RedisConn, claim_after: Duration, presence: Arc<Presence>) {
    tracing::info!(claim_after = %ordo_core::duration::format(claim_after), "claiming events in flight for other harmonizers");
    let period = (claim_after / 2).clamp(Duration::from_millis(10), RENEW);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let script = redis::Script::new(PRESENCE_SCRIPT);
    let mut alone_before = None;
    loop {
        ticker.tick().await;
        let renewing = presence.renewing.lock().await;
        if presence.left.load(Ordering::Acquire) {
            return; // Drained and gone: nothing more to claim or renew.
        }
        let others = renew_presence(&redis, &script, &presence.id).await;
        drop(renewing);
        let now = std::time::Instant::now();
        presence.renewed(now, others.as_ref().ok().copied());
        match others {
            Ok(others) if alone_before != Some(others == 0) => {
                tracing::info!(others, "harmonizers present on this Redis besides this one");
                alone_before = Some(others == 0);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot renew this harmonizer's presence; claiming as if not alone");
                alone_before = None;
            }
        }
        // Claims first, then releases: an event claimed and settled within
        // one period is released after it was claimed.
        let claims = if presence.alone() { Vec::new() } else { pool.claims_due(now, claim_after, RENEW) };
        let settled = pool.settled_claims();
        if claims.is_empty() && settled.is_empty() {
            continue;
        }
        if let Err(error) = write(&redis, &claims, &settled).await {
            // Renewed within RENEW; a removal that was lost lapses by itself.
            tracing::warn!(%error, claims = claims.len(), released = settled.len(), "cannot write in-flight claims");
        }
    }
}

/// Renews `id`'s presence for a [`LEASE`] (Redis time), drops lapsed
/// ones, and counts the other live harmonizers. HSCAN, not HGETALL: the
/// documented ACL rule allows it.
const PRESENCE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now + lease))
redis.call('PEXPIRE', KEYS[1], lease)
local others, cursor = 0, '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = page[1]
  local items = page[2]
  for i = 1, #items, 2 do
    if items[i] ~= ARGV[1] then
      if (tonumber(items[i + 1]) or 0) > now then
        others = others + 1
      else
        redis.call('HDEL', KEYS[1], items[i])
      end
    end
  end
until cursor == '0'
return others
";

async fn renew_presence(redis: &RedisConn, script: &redis::Script, id: &str) -> redis::RedisResult<u64> {
    let mut conn = redis.clone();
    script.key(ordo_core::keys::HARMONIZERS).arg(id).arg(millis(LEASE)).invoke_async(&mut conn).await
}

/// What this harmonizer knows of the others on its Redis (see the module
/// docs): whether it may skip claims, and whether a gap may be trusted.
#[derive(Debug)]
pub struct Presence {
    /// This process's field in [`ordo_core::keys::HARMONIZERS`].
    id: String,
    state: Mutex<PresenceState>,
    /// Held while a renewal is under way, so that [`Self::leave`] removes
    /// the presence after it, never before it (which would write it again).
    renewing: tokio::sync::Mutex<()>,
    /// Set by [`Self::leave`]: no renewal after it.
    left: AtomicBool,
}

#[derive(Debug, Default)]
struct PresenceState {
    /// When the presence was last renewed, and how many others were live then.
    renewed: Option<(Instant, u64)>,
    /// Until when every gap is treated as claimed (a joiner's lease).
    wary_until: Option<Instant>,
}

impl Presence {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Self {
            id: format!("{}-{nanos:x}", std::process::id()),
            state: Mutex::default(),
            renewing: tokio::sync::Mutex::new(()),
            left: AtomicBool::new(false),
        }
    }

    /// Records a renewal at `now` (`others`: the live others it counted) or
    /// its failure (`None`).
    fn renewed(&self, now: Instant, others: Option<u64>) {
        let mut state = lock(&self.state);
        let Some(others) = others else { return };
        let fresh = state.renewed.is_some_and(|(at, _)| now.saturating_duration_since(at) < LEASE / 2);
        if others > 0 && !fresh {
            // Joined (or came back): the others may hold events unclaimed
            // until they see this presence.
            state.wary_until = Some(now + LEASE);
        }
        state.renewed = Some((now, others));
    }

    /// Removes this harmonizer's presence (at the end of a drain), within
    /// a second; if Redis does not answer, it lapses after a [`LEASE`].
    pub async fn leave(&self, redis: &RedisConn) {
        self.left.store(true, Ordering::Release);
        let _renewed = self.renewing.lock().await;
        let mut conn = redis.clone();
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(ordo_core::keys::HARMONIZERS).arg(&self.id);
        let removed = hdel.query_async::<u64>(&mut conn);
        match tokio::time::timeout(Duration::from_secs(1), removed).await {
            Ok(Ok(_)) => tracing::info!("this harmonizer's presence is removed"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot remove this harmonizer's presence; it lapses"),
            Err(_) => tracing::warn!("removing this harmonizer's presence timed out; it lapses"),
        }
    }

    /// Whether the last renewal is recent and found no other harmonizer.
    pub fn alone(&self) -> bool {
        let state = lock(&self.state);
        state.renewed.is_some_and(|(at, others)| others == 0 && at.elapsed() < LEASE / 2)
    }

    /// Whether a gap cannot be trusted on the claims alone: this
    /// harmonizer's presence is not (recently) renewed, or it joined others
    /// less than a [`LEASE`] ago.
    pub fn wary(&self, now: Instant) -> bool {
        let state = lock(&self.state);
        let stale = state.renewed.is_none_or(|(at, _)| now.saturating_duration_since(at) >= LEASE / 2);
        stale || state.wary_until.is_some_and(|until| now < until)
    }
}

impl Default for Presence {
    fn default() -> Self {
        Self::new()
    }
}

/// Groups `(stream, sequence)` pairs by stream.
fn by_stream(pairs: &[(String, u64)]) -> BTreeMap<&str, Vec<u64>> {
    let mut grouped: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (stream, sequence) in pairs {
        grouped.entry(stream.as_str()).or_default().push(*sequence);
    }
    grouped
}

async fn write(redis: &RedisConn, claims: &[(String, u64)], settled: &[(String, u64)]) -> redis::RedisResult<()> {
    let mut conn = redis.clone();
    let until = if claims.is_empty() {
        0
    } else {
        // On a cluster, one node's clock stamps claims that the masters of
        // other slots compare with their own in [`claimed`]: the nodes'
        // clocks are assumed to agree to well within LEASE (NTP). On one
        // node every stamp and comparison uses that node's clock.
        let now: RedisTime = redis::cmd("TIME").query_async(&mut conn).await?;
        redis_millis(now).saturating_add(millis(LEASE))
    };
    // One pipeline on a node; on a cluster one per slot, sent at once.
    ordo_runtime::redis_conn::query_each::<redis::Value>(redis, &commands(claims, settled, until)).await.map(drop)
}

/// The commands that claim `claims` until `until` and remove `settled`,
/// each with the slot of its stream.
fn commands(claims: &[(String, u64)], settled: &[(String, u64)], until: u64) -> Vec<(u16, redis::Cmd)> {
    let mut commands = Vec::new();
    for (stream, sequences) in by_stream(claims) {
        let slot = ordo_core::keys::stream_slot(stream);
        let key = ordo_core::keys::claims(stream);
        // HSET with many fields (not HMSET: the documented ACL rule allows HSET only).
        let fields: Vec<(u64, u64)> = sequences.iter().map(|&sequence| (sequence, until)).collect();
        let mut hset = redis::cmd("HSET");
        hset.arg(&key).arg(&fields);
        let mut pexpire = redis::cmd("PEXPIRE");
        pexpire.arg(&key).arg(i64::try_from(millis(LEASE)).unwrap_or(i64::MAX));
        commands.push((slot, hset));
        commands.push((slot, pexpire));
    }
    for (stream, sequences) in by_stream(settled) {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(ordo_core::keys::claims(stream)).arg(sequences);
        commands.push((ordo_core::keys::stream_slot(stream), hdel));
    }
    commands
}

/// Whether another harmonizer (or this one) holds a live claim on any of
/// `from..to` of `stream`. When Redis cannot tell, the answer is yes: a gap
/// is never declared on a guess.
pub async fn claimed(redis: &RedisConn, stream: &str, from: u64, to: u64) -> bool {
    if from >= to {
        return false;
    }
    let mut conn = redis.clone();
    let sequences: Vec<u64> = (from..to).collect();
    let key = ordo_core::keys::claims(stream);
    let answer: redis::RedisResult<(RedisTime, Vec<Option<u64>>)> =
        redis::pipe().cmd("TIME").cmd("HMGET").arg(&key).arg(&sequences).query_async(&mut conn).await;
    match answer {
        Ok((now, until)) => {
            let now = redis_millis(now);
            let live = until.into_iter().flatten().any(|until| until > now);
            if live {
                tracing::debug!(stream, from, to, "another harmonizer holds an event of the gap in flight; it waits");
            }
            live
        }
        Err(error) => {
            tracing::warn!(%error, stream, from, to, "cannot read in-flight claims; the gap waits");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_live_in_the_stream_slot() {
        assert_eq!(ordo_core::keys::claims("orders-1"), "ordo:{orders-1}:claims");
        assert_eq!(ordo_core::keys::claims("orders-1").replace(":claims", ":meta"), ordo_core::keys::meta("orders-1"));
    }

    #[test]
    fn redis_time_is_read_as_milliseconds() {
        assert_eq!(redis_millis((1_700_000_000, 123_456)), 1_700_000_000_123);
        assert_eq!(redis_millis((u64::MAX, 999_999)), u64::MAX, "saturates");
    }

    #[test]
    fn a_harmonizer_first_on_its_redis_is_alone_and_trusts_gaps_at_once() {
        let presence = Presence::new();
        let t0 = Instant::now();
        assert!(!presence.alone() && presence.wary(t0), "before its first renewal it knows nothing");
        presence.renewed(t0, Some(0));
        assert!(presence.alone() && !presence.wary(t0));
        // Another joins: this one claims again, and need not wait (the joiner claims from its start).
        presence.renewed(t0 + Duration::from_millis(100), Some(1));
        assert!(!presence.alone() && !presence.wary(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn a_joiner_waits_a_lease_before_it_trusts_a_gap() {
        let presence = Presence::new();
        let t0 = Instant::now();
        presence.renewed(t0, Some(1));
        assert!(!presence.alone());
        let mut at = t0;
        while at < t0 + LEASE {
            assert!(presence.wary(at), "{:?} after joining", at - t0);
            at += Duration::from_secs(1);
            presence.renewed(at, Some(1));
        }
        assert!(!presence.wary(at), "once every other harmonizer has seen it");
    }

    #[test]
    fn a_stale_presence_distrusts_gaps_and_coming_back_to_others_waits_a_lease() {
        let presence = Presence::new();
        let t0 = Instant::now();
        presence.renewed(t0, Some(0));
        assert!(presence.wary(t0 + LEASE / 2), "not renewed for half a lease: the others may not see it");
        presence.renewed(t0 + LEASE, None);
        assert!(presence.wary(t0 + LEASE), "a failed renewal renews nothing");
        let back = t0 + LEASE + Duration::from_millis(10);
        presence.renewed(back, Some(1));
        assert!(presence.wary(back + Duration::from_millis(10)), "the others may have stopped claiming meanwhile");
        for quarter in 1..=4 {
            presence.renewed(back + LEASE / 4 * quarter, Some(1));
        }
        assert!(!presence.wary(back + LEASE));
        // Back alone after a stale spell: nobody else can hold an unclaimed event.
        let alone_again = back + 2 * LEASE;
        presence.renewed(alone_again, Some(0));
        assert!(!presence.wary(alone_again));
    }

    #[test]
    fn pairs_are_grouped_per_stream() {
        let pairs = vec![("b".to_owned(), 2), ("a".to_owned(), 1), ("b".to_owned(), 5)];
        let grouped = by_stream(&pairs);
        assert_eq!(grouped.get("a"), Some(&vec![1]));
        assert_eq!(grouped.get("b"), Some(&vec![2, 5]));
    }
}
