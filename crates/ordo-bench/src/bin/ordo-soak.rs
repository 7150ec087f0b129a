//! `ordo-soak`: Ordo at a steady rate for minutes, sampling memory and descriptors (see `ordo_bench::soak`).

use std::process::ExitCode;

use clap::Parser as _;
use ordo_bench::soak::cli::{SoakArgs, soak_main};

#[tokio::main]
async fn main() -> ExitCode {
    soak_main(SoakArgs::parse()).await
}
