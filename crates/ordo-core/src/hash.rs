//! Hash maps for the per-event and per-stream tables on the hot path (the
//! harmonizer's held events and streams, the push-gateway's subscribers).
//!
//! std's SipHash-1-3 was 3–4 % of the harmonizer's CPU on workload (b), for
//! a few short keys per event. These use foldhash, hashbrown's default: much
//! cheaper on short keys, and seeded per map from a random per-process seed,
//! so stream ids chosen by a client cannot be precomputed to collide (an
//! unseeded hash such as FxHash could be flooded that way). Not
//! cryptographic; none of these tables needs that.

/// A `HashMap` with a per-map random seed and a fast hash.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with a per-map random seed and a fast hash.
pub type Set<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn maps_are_seeded_per_map() {
        let (a, b): (Map<String, u64>, Map<String, u64>) = (Map::default(), Map::default());
        let key = "orders-1";
        assert_ne!(a.hasher().hash_one(key), b.hasher().hash_one(key), "each map has its own seed");
        let mut m: Map<String, u64> = Map::default();
        m.insert(key.to_owned(), 1);
        assert_eq!(m.get(key), Some(&1));
    }
}
