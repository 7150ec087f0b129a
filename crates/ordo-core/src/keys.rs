//! Redis layout of the reorder state. Only the reassembler writes it (through
//! one Lua script); the push-gateway and harmonizer only read it.
//!
//! Per stream `s` (the `{s}` hash tag keeps a stream's keys in one cluster slot):
//! - `ordo:{s}:meta` — hash: `next` (lowest unreleased sequence), `released`
//!   (next release position), `mode` (1 ordered, 2 unordered), `x` (when
//!   the stream's keys expire, Redis milliseconds; absent without
//!   `--stream-ttl`), `p` (how many fields `pend` holds: the script skips
//!   `pend` when 0; absent in metas of versions before it, which fall back
//!   to `HLEN`);
//! - `ordo:{s}:pend` — hash: sequence → encoded result, completed but waiting
//!   for a predecessor (ORDERED), or sequence → "" marker (UNORDERED);
//! - `ordo:{s}:log` — stream: the released results, entry id `0-(position+1)`,
//!   field `r` = encoded `EventResult` (with `position` set);
//! - `ordo:{s}:claims` — hash: in-flight claims of harmonizers ([`claims`]).
//!
//! Every release is also published, for live tailing, on a release channel
//! [`released_channel`] (SPUBLISH, sharded pub/sub), on a single node and on a
//! Redis Cluster alike: a reader subscribes only the channels of the streams
//! it follows. A stream's channel is that of its [`release_channel_slot`]: on
//! a cluster its own slot (the channel is then in the slot of the script call
//! that publishes it), on a single node the first slot of its group of
//! [`SINGLE_NODE_SLOTS_PER_CHANNEL`], so that one script call, whose streams
//! spread over many slots, publishes a few messages rather than one per
//! stream. A message is an encoded `ReleasedBatches`: the batch of every
//! stream of that call and channel (one script call publishes once per
//! channel). A reader also takes a bare `ReleasedBatch` (what versions before
//! `ReleasedBatches` published): the two are told apart by the first byte
//! (`ordo_proto::v1::ReleasedBatches::decode_message`).
//!
//! Across streams, [`DEAD_LETTERS`] is a stream of every stored FAILED and
//! GAP result's dead letter (written by the same script, atomically with the
//! result), entry id assigned by Redis, fields `stream` (stream id),
//! `sequence` and `letter` (encoded `DeadLetter`, its `id` unset: the entry
//! id is the dead letter's id). Trimmed by count. On a Redis Cluster there is
//! one such log per slot, [`dead_letters`], holding the dead letters of the
//! streams in that slot.
//!
//! # Slots
//!
//! Redis Cluster places a key by the CRC16 of its hash tag (the text between
//! the first `{` and the next `}`, when not empty; else the whole key) modulo
//! [`SLOTS`]: [`key_slot`]. Per-slot keys and channels need a hash tag that
//! lands on a given slot: [`slot_tag`] is a precomputed shortest such tag for
//! every slot (built once, on first use).

/// The operation registry (crate `ordo-registry`), all in one cluster slot
/// (`{registry}` hash tag): `ordo:{registry}:seq` (last version number),
/// `ordo:{registry}:v:<n>` (version n, JSON, never changed once written),
/// `ordo:{registry}:active` (the version services follow) and
/// `ordo:{registry}:pin` (when set, the version every service uses instead).
pub const REGISTRY_SEQ: &str = "ordo:{registry}:seq";
pub const REGISTRY_ACTIVE: &str = "ordo:{registry}:active";
pub const REGISTRY_PIN: &str = "ordo:{registry}:pin";
/// Prefix of version keys: `ordo:{registry}:v:<n>`.
pub const REGISTRY_VERSION_PREFIX: &str = "ordo:{registry}:v:";

pub fn registry_version(version: u64) -> String {
    format!("{REGISTRY_VERSION_PREFIX}{version}")
}

/// Prefix of the per-slot release channels ([`released_channel`]); nothing
/// is published on this name itself.
pub const RELEASED_CHANNEL: &str = "ordo:released";

/// The dead-letter log (a Redis stream, single node), see the module docs.
pub const DEAD_LETTERS: &str = "ordo:dlq";

/// On a single node, the slots that share one release channel: 64 channels
/// in all. Fewer channels mean fewer messages per script call (a call of
/// 256 streams publishes about 63 messages here, 256 with a channel per
/// slot); more mean less traffic for a reader following a few streams.
pub const SINGLE_NODE_SLOTS_PER_CHANNEL: u16 = 256;

/// How many consecutive slots share a release channel: 1 on a Redis
/// Cluster (a channel must be in the slot of the call that publishes it),
/// [`SINGLE_NODE_SLOTS_PER_CHANNEL`] on a single node.
pub const fn release_channel_stride(cluster: bool) -> u16 {
    if cluster { 1 } else { SINGLE_NODE_SLOTS_PER_CHANNEL }
}

/// The slot whose [`released_channel`] carries the releases of the streams
/// in `slot`, with `stride` from [`release_channel_stride`].
pub const fn release_channel_slot(slot: u16, stride: u16) -> u16 {
    if stride <= 1 { slot } else { slot - slot % stride }
}

/// The release channel of `stream` on a cluster or on a single node.
pub fn stream_release_channel(stream: &str, cluster: bool) -> String {
    released_channel(release_channel_slot(stream_slot(stream), release_channel_stride(cluster)))
}

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The sharded pub/sub channel of the released batches of every stream in
/// `slot`: `ordo:released:{<tag>}`, in that slot.
pub fn released_channel(slot: u16) -> String {
    format!("{RELEASED_CHANNEL}:{{{}}}", slot_tag(slot))
}

/// The dead-letter log of the streams in `slot` (Redis Cluster):
/// `ordo:dlq:{<tag>}`, in that slot.
pub fn dead_letters(slot: u16) -> String {
    format!("{DEAD_LETTERS}:{{{}}}", slot_tag(slot))
}

/// The slot of every key of `stream` (its meta, pending and log keys share
/// the `{stream}` hash tag; an id with a `}` is cut there, for all three
/// alike, and an empty id has no tag, so its keys spread).
pub fn stream_slot(stream: &str) -> u16 {
    // The tag of `ordo:{<stream>}:meta` without building the key (this runs
    // per stream per batch): the id up to its first `}`, or all of it.
    let tag = stream.split_once('}').map_or(stream, |(tag, _)| tag);
    if tag.is_empty() { key_slot(meta(stream).as_bytes()) } else { crc16(tag.as_bytes()) % SLOTS }
}

/// The cluster slot of `key`, as Redis computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XModem: polynomial 0x1021, initial 0), Redis Cluster's key hash.
const fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    let mut i = 0;
    while i < bytes.len() {
        crc ^= (bytes[i] as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        i += 1;
    }
    crc
}

/// A shortest alphanumeric hash tag whose slot is `slot` (`slot` modulo
/// [`SLOTS`]).
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(build_slot_tags);
    &tags[usize::from(slot % SLOTS)]
}

/// Every slot's tag: strings of 1, 2, then 3 alphanumerics in order, the
/// first one to land on each slot kept. Three characters (238,328 strings)
/// reach all 16,384 slots (the unit test checks it).
fn build_slot_tags() -> Vec<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut tags: Vec<String> = vec![String::new(); usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut keep = |candidate: &[u8]| {
        let slot = usize::from(crc16(candidate) % SLOTS);
        if tags[slot].is_empty() {
            // Alphanumeric, hence UTF-8.
            tags[slot] = String::from_utf8_lossy(candidate).into_owned();
            missing -= 1;
        }
        missing == 0
    };
    'search: for len in 1..=3usize {
        let mut digits = vec![0usize; len];
        loop {
            let candidate: Vec<u8> = digits.iter().map(|&d| ALPHABET[d]).collect();
            if keep(&candidate) {
                break 'search;
            }
            // Next string of this length (odometer).
            let mut i = len;
            loop {
                if i == 0 {
                    continue 'search;
                }
                i -= 1;
                digits[i] += 1;
                if digits[i] < ALPHABET.len() {
                    break;
                }
                digits[i] = 0;
            }
        }
    }
    tags
}

pub fn meta(stream: &str) -> String {
    format!("ordo:{{{stream}}}:meta")
}

pub fn pending(stream: &str) -> String {
    format!("ordo:{{{stream}}}:pend")
}

pub fn log(stream: &str) -> String {
    format!("ordo:{{{stream}}}:log")
}

/// `ordo:{s}:claims` — hash: sequence → Unix ms (Redis time) until which
/// some harmonizer holds that event of stream `s` in flight. Written only by
/// harmonizers (`claims.rs`), never by the release script: not reorder state.
pub fn claims(stream: &str) -> String {
    format!("ordo:{{{stream}}}:claims")
}

/// `ordo:{harmonizers}:presence` — hash: harmonizer instance id → Unix ms
/// (Redis time) until which that harmonizer is present. Every harmonizer
/// writing claims renews its field on each claim period and counts the
/// others' live fields; while none is live it writes no claims
/// (`harmonizer/src/claims.rs`).
pub const HARMONIZERS: &str = "ordo:{harmonizers}:presence";

/// Stream entry id of release position `position`.
pub fn log_id(position: u64) -> String {
    format!("0-{}", position + 1)
}

/// Release position of a stream entry id, if it is one of ours.
pub fn position_of(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse::<u64>().ok()?.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids_round_trip() {
        for p in [0, 1, 41, u64::MAX - 1] {
            assert_eq!(position_of(&log_id(p)), Some(p));
        }
        assert_eq!(position_of("0-0"), None);
        assert_eq!(position_of("12-3"), None);
    }

    #[test]
    fn slots_are_redis_cluster_slots() {
        // The CRC16 check value, and slots Redis answers to CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        // A stream's three keys share its slot, whatever its id.
        for stream in ["s1", "a}b", "x{y}", "dev-42", "{", "{}", "a{b}c}d"] {
            let slot = stream_slot(stream);
            assert_eq!(key_slot(meta(stream).as_bytes()), slot, "{stream}");
            assert_eq!(key_slot(pending(stream).as_bytes()), slot, "{stream}");
            assert_eq!(key_slot(log(stream).as_bytes()), slot, "{stream}");
        }
        // An empty tag (an id that is empty or starts with `}`): the slot of
        // its meta key (its other keys spread).
        for stream in ["", "}", "}x"] {
            assert_eq!(key_slot(meta(stream).as_bytes()), stream_slot(stream), "{stream:?}");
        }
    }

    #[test]
    fn every_slot_has_a_short_tag_that_maps_to_it() {
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert!((1..=3).contains(&tag.len()), "slot {slot}: {tag:?}");
            assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric()), "slot {slot}: {tag:?}");
            assert_eq!(crc16(tag.as_bytes()) % SLOTS, slot, "tag {tag:?}");
            assert_eq!(key_slot(released_channel(slot).as_bytes()), slot);
            assert_eq!(key_slot(dead_letters(slot).as_bytes()), slot);
        }
    }

    #[test]
    fn release_channels_are_per_slot_on_a_cluster_and_grouped_on_a_single_node() {
        let cluster = release_channel_stride(true);
        let single = release_channel_stride(false);
        let mut grouped = std::collections::BTreeSet::new();
        for slot in 0..SLOTS {
            assert_eq!(release_channel_slot(slot, cluster), slot);
            let first = release_channel_slot(slot, single);
            assert!(first <= slot && slot - first < SINGLE_NODE_SLOTS_PER_CHANNEL, "slot {slot}: {first}");
            assert_eq!(first % SINGLE_NODE_SLOTS_PER_CHANNEL, 0);
            grouped.insert(first);
        }
        assert_eq!(grouped.len(), usize::from(SLOTS / SINGLE_NODE_SLOTS_PER_CHANNEL));
    }
}
