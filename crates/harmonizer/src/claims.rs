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
//! Only claims are written here; they are not reorder state (the release
//! script neither reads nor writes them), and losing them (a Redis restart)
//! only makes a gap possible again as it is with one harmonizer.
//!
//! A stream's claims share its `{stream}` hash tag, so on a cluster
//! [`claimed`] (TIME and HMGET in one pipeline) runs on the master of the
//! stream's slot, and a failover loses at most the claims the replica had
//! not received (as losing them to a restart).

use std::{collections::BTreeMap, time::Duration};

use ordo_runtime::redis_conn::RedisConn;

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
/// every `claim_after / 2`, events held `claim_after` or longer are claimed
/// (or claimed again every [`RENEW`]), settled ones released.
pub async fn run(pool: Pool, redis: RedisConn, claim_after: Duration) {
    tracing::info!(claim_after = %ordo_core::duration::format(claim_after), "claiming events in flight for other harmonizers");
    let period = (claim_after / 2).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Claims first, then releases: an event claimed and settled within
        // one period is released after it was claimed.
        let claims = pool.claims_due(std::time::Instant::now(), claim_after, RENEW);
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
    fn pairs_are_grouped_per_stream() {
        let pairs = vec![("b".to_owned(), 2), ("a".to_owned(), 1), ("b".to_owned(), 5)];
        let grouped = by_stream(&pairs);
        assert_eq!(grouped.get("a"), Some(&vec![1]));
        assert_eq!(grouped.get("b"), Some(&vec![2, 5]));
    }
}
