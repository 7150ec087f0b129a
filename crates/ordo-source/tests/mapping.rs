//! The source's Redis scripts against a private redis-server: dense
//! numbering per key, a redelivery's numbers back, the floor, late arrivals,
//! trimming, and the sink cursor's compare-and-set.

use integration_tests::RedisServer;
use ordo_source::mapping::{Assigned, Mapping};

async fn mapping(redis: &RedisServer, source: &str) -> Mapping {
    let conn = ordo_runtime::redis_conn::connect(&redis.url()).expect("a valid URL");
    Mapping::new(conn, source)
}

fn batch(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
    pairs.iter().map(|(position, key)| (*position, (*key).to_owned())).collect()
}

#[tokio::test]
async fn positions_are_numbered_densely_per_key_and_a_redelivery_gets_its_numbers_back() {
    let redis = RedisServer::start().await.expect("redis-server");
    let map = mapping(&redis, "s").await;
    let first = map.assign(&batch(&[(1, "a"), (2, "b"), (3, "a"), (5, "a")])).await.expect("assign");
    assert_eq!(first, [Assigned::Sequence(0), Assigned::Sequence(0), Assigned::Sequence(1), Assigned::Sequence(2)]);
    // Redelivered (in any order), mixed with new positions.
    let again = map.assign(&batch(&[(3, "a"), (1, "a"), (6, "b"), (5, "a")])).await.expect("assign");
    assert_eq!(again, [Assigned::Sequence(1), Assigned::Sequence(0), Assigned::Sequence(1), Assigned::Sequence(2)]);
    let mut keys = map.keys().await.expect("keys");
    keys.sort();
    assert_eq!(keys, [("a".to_owned(), 3), ("b".to_owned(), 2)]);
    // Another source numbers its own keys from 0.
    let other = mapping(&redis, "t").await;
    assert_eq!(other.assign(&batch(&[(1, "a")])).await.expect("assign"), [Assigned::Sequence(0)]);
}

#[tokio::test]
async fn a_position_behind_its_keys_latest_is_late_and_below_the_floor_is_done() {
    let redis = RedisServer::start().await.expect("redis-server");
    let map = mapping(&redis, "s").await;
    map.assign(&batch(&[(10, "a"), (11, "b")])).await.expect("assign");
    // Position 9 of key a was never numbered, but 10 was: numbering it would reorder a.
    assert_eq!(
        map.assign(&batch(&[(9, "a"), (9, "c")])).await.expect("assign"),
        [Assigned::Late, Assigned::Sequence(0)]
    );
    assert_eq!(map.raise_floor(10).await.expect("floor"), 10);
    assert_eq!(map.raise_floor(4).await.expect("floor"), 10, "the floor never goes down");
    assert_eq!(map.floor().await.expect("floor"), 10);
    // Trimmed at or below the floor: only 11 is kept.
    assert_eq!(map.mapped().await.expect("mapped"), 1);
    assert_eq!(
        map.assign(&batch(&[(8, "d"), (11, "b")])).await.expect("assign"),
        [Assigned::Done, Assigned::Sequence(0)]
    );
    // Numbering goes on after the trim.
    assert_eq!(map.assign(&batch(&[(12, "a")])).await.expect("assign"), [Assigned::Sequence(1)]);
}

#[tokio::test]
async fn the_sink_cursor_moves_only_from_the_value_it_was_read_at() {
    let redis = RedisServer::start().await.expect("redis-server");
    let map = mapping(&redis, "s").await;
    assert_eq!(map.cursor("a").await.expect("cursor"), None);
    assert!(map.advance("a", None, 3).await.expect("cas"));
    assert!(!map.advance("a", None, 5).await.expect("cas"), "a stale reader does not move it");
    assert!(!map.advance("a", Some(2), 5).await.expect("cas"));
    assert!(map.advance("a", Some(3), 5).await.expect("cas"));
    assert_eq!(map.cursor("a").await.expect("cursor"), Some(5));
}
