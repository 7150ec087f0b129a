//! `ordo subscribe`: tails a stream's released results from the push-gateway,
//! one line per result, from a cursor. It runs until interrupted, until
//! `--count` results were printed, or until the gateway ends the call.

use std::{
    io::{ErrorKind, Write as _},
    process::ExitCode,
};

use ordo_proto::v1::{SubscribeRequest, push_gateway_client::PushGatewayClient};

use crate::{channel, display};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Push-gateway address (host:port).
    #[arg(long, env = "ORDO_PUSH_GATEWAY", default_value = "localhost:50055")]
    addr: String,
    /// Stream id.
    #[arg(long, env = "ORDO_STREAM")]
    stream: String,
    /// First release position wanted (the sequence, in ORDERED mode). To
    /// resume, pass the last position seen + 1.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Stop after printing this many results.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    token: crate::token::TokenFlag,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    let channel = channel::connect(&args.addr, None).await?;
    let mut client = PushGatewayClient::new(channel).max_decoding_message_size(channel::MAX_MESSAGE_BYTES);
    let request = SubscribeRequest { stream_id: args.stream.clone(), from_sequence: args.from, streams: Vec::new() };
    let mut results = client
        .subscribe(args.token.request(request)?)
        .await
        .map_err(|status| anyhow::anyhow!("Subscribe to {} failed: {}", args.addr, display::rpc_error(&status)))?
        .into_inner();
    let mut printed = 0u64;
    let mut stdout = std::io::stdout().lock();
    while let Some(result) = results
        .message()
        .await
        .map_err(|status| anyhow::anyhow!("subscription failed: {}", display::rpc_error(&status)))?
    {
        match writeln!(stdout, "{}", display::result_line(&result)).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // `ordo subscribe | head` is a normal way to stop.
            Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(error) => return Err(error.into()),
        }
        printed += 1;
        if args.count.is_some_and(|count| printed >= count) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    eprintln!("ordo: the push-gateway ended the subscription after {printed} results");
    Ok(ExitCode::SUCCESS)
}
