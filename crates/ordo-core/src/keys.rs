//! Redis layout of the reorder state. Only the reassembler writes it (through
//! one Lua script); the push-gateway and harmonizer only read it.
//!
//! Per stream `s` (the `{s}` hash tag keeps a stream's keys in one cluster slot):
//! - `ordo:{s}:meta` — hash: `next` (lowest unreleased sequence), `released`
//!   (next release position), `mode` (1 ordered, 2 unordered);
//! - `ordo:{s}:pend` — hash: sequence → encoded result, completed but waiting
//!   for a predecessor (ORDERED), or sequence → "" marker (UNORDERED);
//! - `ordo:{s}:log` — stream: the released results, entry id `0-(position+1)`,
//!   field `r` = encoded `EventResult` (with `position` set).
//!
//! Every release is also published on [`RELEASED_CHANNEL`] as an encoded
//! `ReleasedBatch`, for live tailing.
//!
//! Across streams, [`DEAD_LETTERS`] is a stream of every stored FAILED and
//! GAP result's dead letter (written by the same script, atomically with the
//! result), entry id assigned by Redis, fields `stream` (stream id),
//! `sequence` and `letter` (encoded `DeadLetter`, its `id` unset: the entry
//! id is the dead letter's id). Trimmed by count.

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

/// Pub/sub channel of released batches.
pub const RELEASED_CHANNEL: &str = "ordo:released";

/// The dead-letter log (a Redis stream), see the module docs.
pub const DEAD_LETTERS: &str = "ordo:dlq";

pub fn meta(stream: &str) -> String {
    format!("ordo:{{{stream}}}:meta")
}

pub fn pending(stream: &str) -> String {
    format!("ordo:{{{stream}}}:pend")
}

pub fn log(stream: &str) -> String {
    format!("ordo:{{{stream}}}:log")
}

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
}
