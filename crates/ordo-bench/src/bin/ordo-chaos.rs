//! `ordo-chaos`: Ordo's fault suite on the real services (see `ordo_bench::chaos`).

use std::process::ExitCode;

use clap::Parser as _;
use ordo_bench::chaos::cli::{ChaosArgs, chaos_main};

#[tokio::main]
async fn main() -> ExitCode {
    chaos_main(ChaosArgs::parse()).await
}
