//! `ordo-experiment`: the paper's figures 6-7 on the real services (see `ordo_bench::experiment`).

use std::process::ExitCode;

use clap::Parser as _;
use ordo_bench::cli::{ExperimentArgs, experiment_main};

#[tokio::main]
async fn main() -> ExitCode {
    experiment_main(ExperimentArgs::parse()).await
}
