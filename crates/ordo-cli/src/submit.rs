//! `ordo submit`: one event through the unary `Submit` call. A stateful
//! operation slower than the harmonizer's unary threshold answers PROCESSING;
//! its result is then read with `ordo subscribe`.

use std::{collections::HashMap, process::ExitCode, time::Duration};

use ordo_proto::{Event, OrderingMode, ResultStatus, v1::harmonizer_client::HarmonizerClient};

use crate::{channel, display};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Harmonizer address (host:port).
    #[arg(long, env = "ORDO_HARMONIZER", default_value = "localhost:50051")]
    addr: String,
    /// Stream id.
    #[arg(long, env = "ORDO_STREAM")]
    stream: String,
    /// Position of the event in its stream (0 for the first).
    #[arg(long)]
    seq: u64,
    /// Operation name, e.g. echo, upper, sha256, async-echo, callback.
    #[arg(long, env = "ORDO_OP")]
    op: String,
    /// Payload, as UTF-8 text.
    #[arg(long, default_value = "")]
    payload: String,
    /// An attribute `key=value`, e.g. `latency=exp:10ms` or `call=upper`; repeatable.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
    /// Release the stream's results in completion order (honoured on its first event).
    #[arg(long)]
    unordered: bool,
    /// Give up (exit 1) after this long.
    #[arg(long, env = "ORDO_TIMEOUT", default_value = "30s", value_parser = ordo_core::duration::parse)]
    timeout: Duration,
    #[command(flatten)]
    token: crate::token::TokenFlag,
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("attribute {text:?} is not KEY=VALUE with a non-empty key")),
    }
}

/// Exit 0 for OK and PROCESSING (the result will be pushed), 1 otherwise.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let channel = channel::connect(&args.addr, Some(args.timeout)).await?;
    let mut client = HarmonizerClient::new(channel).max_decoding_message_size(channel::MAX_MESSAGE_BYTES);
    let mode = if args.unordered { OrderingMode::Unordered } else { OrderingMode::Ordered };
    let event = Event {
        stream_id: args.stream,
        sequence: args.seq,
        operation: args.op,
        payload: args.payload.into_bytes().into(),
        attributes: args.attributes.into_iter().collect::<HashMap<_, _>>(),
        mode: mode as i32,
        ..Default::default()
    };
    let result = client
        .submit(args.token.request(event)?)
        .await
        .map_err(|status| anyhow::anyhow!("Submit to {} failed: {}", args.addr, display::rpc_error(&status)))?
        .into_inner();
    println!("{}", display::result_line(&result));
    Ok(match ResultStatus::try_from(result.status) {
        Ok(ResultStatus::Ok | ResultStatus::Processing) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_attribute;

    #[test]
    fn attributes_split_at_the_first_equals_sign() {
        assert_eq!(parse_attribute("latency=exp:10ms"), Ok(("latency".into(), "exp:10ms".into())));
        assert_eq!(parse_attribute("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert_eq!(parse_attribute("k="), Ok(("k".into(), String::new())));
        assert!(parse_attribute("=v").is_err());
        assert!(parse_attribute("novalue").is_err());
    }
}
