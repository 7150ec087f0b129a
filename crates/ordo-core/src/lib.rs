//! Ordo's domain pieces that several services share and that need no I/O:
//! hash maps for the hot per-stream and per-event tables, human durations,
//! the simulated-latency model of the paper's experiment, and the Redis key
//! layout of the reorder state (owned by the reassembler; read by the
//! push-gateway and the harmonizer).

pub mod duration;
pub mod hash;
pub mod keys;
pub mod latency;
pub mod limits;
pub mod ranges;
