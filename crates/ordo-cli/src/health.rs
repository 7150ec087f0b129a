//! `ordo health`: one grpc.health.v1 Check. Meant for container healthchecks,
//! so it never waits long and answers with its exit code.

use std::{process::ExitCode, time::Duration};

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{channel, display};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address of the service to check (host:port).
    #[arg(long, env = "ORDO_HEALTH_ADDR")]
    addr: String,
    /// Service name to check, e.g. `ordo.v1.Harmonizer`; empty means the whole server.
    #[arg(long, env = "ORDO_HEALTH_SERVICE", default_value = "")]
    service: String,
    /// Give up (and exit 1) after this long, connection included.
    #[arg(long, env = "ORDO_TIMEOUT", default_value = "2s", value_parser = ordo_core::duration::parse)]
    timeout: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let check = async {
        let channel = channel::connect(&args.addr, Some(args.timeout)).await?;
        let response =
            HealthClient::new(channel).check(HealthCheckRequest { service: args.service.clone() }).await.map_err(
                |status| anyhow::anyhow!("health check of {} failed: {}", args.addr, display::rpc_error(&status)),
            )?;
        anyhow::Ok(response.into_inner().status())
    };
    // The channel's own timeouts do not cover name resolution; this does.
    let status = match tokio::time::timeout(args.timeout, check).await {
        Ok(status) => status?,
        Err(_) => anyhow::bail!("no answer from {} within {:?}", args.addr, args.timeout),
    };
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
