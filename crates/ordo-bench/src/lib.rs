//! Ordo's numbers: the paper's experiment and the benchmark against
//! baselines, both run on the real services (the testkit starts the release
//! binaries on free ports next to a private redis-server).
//!
//! - [`experiment`]: section IV of Kim et al. (2017), figures 6 and 7 — the
//!   error rate of a character stream through asynchronous callbacks, naive
//!   (UNORDERED) versus re-assembled (ORDERED). Binary `ordo-experiment`.
//! - [`bench`]: throughput, latency, reorder overhead, CPU and memory of
//!   ordered streams next to UNORDERED, in-process `futures` and a
//!   sequential consumer. Binary `ordo-bench`.
//! - [`driver`]: a timestamping `Harmonizer.Process` client with a bound on
//!   outstanding events; [`inprocess`]: the in-process baselines;
//!   [`procstat`]: CPU time and peak RSS from `/proc`; [`stats`]:
//!   histograms and confidence intervals; [`chart`]: the PNG;
//!   [`many_streams`]: workload (d), the same events over ever more streams;
//!   [`scale_out`]: workload (e), (b) on one Redis node, a Redis Cluster and
//!   two workers and reassemblers;
//!   [`redis_probe`]: `INFO memory` and `MEMORY USAGE` of the private Redis.
//! - [`chaos`]: the fault suite (`ordo-chaos`, `just chaos`); [`soak`]:
//!   a long run at a fixed rate sampling memory and descriptors
//!   (`ordo-soak`, `just soak`). See `docs/reliability.md`.
//! - [`source_bench`]: ordered throughput through a real JetStream broker,
//!   Ordo via `ordo-source` against a plain per-key sequential consumer
//!   (`ordo-bench-source`, `just bench-source`).
//!
//! See `docs/benchmarks.md` for the method and the measured numbers.

pub mod bench;
pub mod chaos;
pub mod chart;
pub mod cli;
pub mod driver;
pub mod experiment;
pub mod inprocess;
pub mod many_streams;
pub mod procstat;
pub mod redis_probe;
pub mod results;
pub mod scale_out;
pub mod soak;
pub mod source_bench;
pub mod stats;
