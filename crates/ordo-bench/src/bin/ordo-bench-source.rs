//! `ordo-bench-source`: Ordo via ordo-source against a plain JetStream
//! consumer on a private nats-server (see `ordo_bench::source_bench`).

use std::process::ExitCode;

use clap::Parser as _;
use ordo_bench::source_bench::cli::{SourceBenchArgs, source_bench_main};

#[tokio::main]
async fn main() -> ExitCode {
    source_bench_main(SourceBenchArgs::parse()).await
}
