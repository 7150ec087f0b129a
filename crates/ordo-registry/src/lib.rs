//! Ordo's operation registry as a versioned dataset (after Netflix's
//! Gutenberg): the operations (name, kind, endpoint, timeout, concurrency,
//! attempts, default gap timeout) are written in a TOML file
//! ([`document`]), published as immutable numbered versions in Redis
//! ([`store`]), and followed live by every harmonizer and worker
//! ([`follow`]), which can be pinned to a version and rolled back.
//!
//! An event keeps the version it was accepted under until it is settled:
//! the harmonizer stamps it on every dispatch (`WorkItem.registry_version`)
//! and the worker runs each attempt with that version's definition.

pub mod diff;
pub mod document;
pub mod follow;
pub mod spec;
pub mod store;

pub use document::DocumentError;
pub use follow::{Follower, Pin};
pub use spec::{Catalog, Endpoint, Kind, OperationSpec, parse_gap_timeout};
pub use store::{Published, State, Store, StoreError, Summary};
