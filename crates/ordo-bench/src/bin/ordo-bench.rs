//! `ordo-bench`: ordered streams against baselines (see `ordo_bench::bench`).

use std::process::ExitCode;

use clap::Parser as _;
use ordo_bench::cli::{BenchArgs, bench_main};

#[tokio::main]
async fn main() -> ExitCode {
    bench_main(BenchArgs::parse()).await
}
