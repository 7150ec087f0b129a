//! `ordo dlq`: the dead letters the reassembler recorded for FAILED and GAP
//! results — list them, show one, or replay one (resubmit its event as a new
//! event on a stream you name, through the harmonizer's unary `Submit`).
//!
//! Human output is one line per dead letter (`list`) or one field per line
//! (`show`); `--json` prints one JSON document instead, payloads in base64
//! plus `payload_utf8` when they are text (as the push-gateway's JSON does).

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use base64::Engine as _;
use ordo_proto::{
    Event, EventResult, ResultStatus,
    v1::{
        DeadLetter, GetDeadLetterRequest, ListDeadLettersRequest, harmonizer_client::HarmonizerClient,
        reassembler_client::ReassemblerClient,
    },
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    channel,
    display::{self, utc},
};

/// Most dead letters the server returns per page.
const SERVER_PAGE: u32 = 1000;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List dead letters, oldest first: `id stream#sequence STATUS attempts=N op=… at=… error="…"`.
    ///
    /// When more remain than `--limit`, a last line on stderr says how to
    /// continue (`--after <id>`).
    List(ListArgs),
    /// Show one dead letter: its event (operation, payload, attributes), status, attempts, last error, time.
    Show(ShowArgs),
    /// Resubmit a dead letter's event (operation, payload, attributes, mode) as a new event on
    /// `--stream` at `--sequence`, and print its result (`sequence STATUS payload`).
    ///
    /// Exits 0 for OK and PROCESSING (the result will be pushed; read it with
    /// `ordo subscribe`), 1 otherwise.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Reassembler address (host:port): it serves the dead letters.
    #[arg(long, env = "ORDO_REASSEMBLER", default_value = "localhost:50054")]
    reassembler: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Give up (exit 1) after this long per call.
    #[arg(long, env = "ORDO_TIMEOUT", default_value = "30s", value_parser = ordo_core::duration::parse)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only this stream's dead letters.
    #[arg(long, env = "ORDO_STREAM")]
    stream: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Start after this dead letter id (from a previous page).
    #[arg(long)]
    after: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// The dead letter's id, as `ordo dlq list` prints it.
    id: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// The dead letter's id, as `ordo dlq list` prints it.
    id: String,
    /// The stream to submit the event on.
    #[arg(long)]
    stream: String,
    /// The event's sequence on that stream.
    #[arg(long)]
    sequence: u64,
    /// Harmonizer address (host:port).
    #[arg(long, env = "ORDO_HARMONIZER", default_value = "localhost:50051")]
    harmonizer: String,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    token: crate::token::TokenFlag,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::List(args) => list(args).await,
        Command::Show(args) => show(args).await,
        Command::Replay(args) => replay(args).await,
    }
}

async fn reassembler(common: &Common) -> anyhow::Result<ReassemblerClient<Channel>> {
    let channel = channel::connect(&common.reassembler, Some(common.timeout)).await?;
    Ok(ReassemblerClient::new(channel).max_decoding_message_size(channel::MAX_MESSAGE_BYTES))
}

async fn fetch(client: &mut ReassemblerClient<Channel>, common: &Common, id: &str) -> anyhow::Result<DeadLetter> {
    let letter = client.get_dead_letter(GetDeadLetterRequest { id: id.to_owned() }).await.map_err(|status| {
        anyhow::anyhow!("GetDeadLetter from {} failed: {}", common.reassembler, display::rpc_error(&status))
    })?;
    Ok(letter.into_inner())
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut client = reassembler(&args.common).await?;
    let wanted = args.limit as usize;
    let mut letters = Vec::new();
    let mut after = args.after.unwrap_or_default();
    // A page filtered by stream may come back short with `next` set: keep
    // going until we have enough or the log ends.
    let next = loop {
        let page = client
            .list_dead_letters(ListDeadLettersRequest {
                stream_id: args.stream.clone().unwrap_or_default(),
                after: after.clone(),
                limit: (wanted - letters.len()).min(SERVER_PAGE as usize) as u32,
            })
            .await
            .map_err(|status| {
                anyhow::anyhow!(
                    "ListDeadLetters from {} failed: {}",
                    args.common.reassembler,
                    display::rpc_error(&status)
                )
            })?
            .into_inner();
        letters.extend(page.dead_letters);
        if page.next.is_empty() || letters.len() >= wanted {
            break page.next;
        }
        after = page.next;
    };
    if args.common.json {
        let all: Vec<Value> = letters.iter().map(letter_json).collect();
        println!("{}", json!({ "dead_letters": all, "next": next }));
    } else {
        if letters.is_empty() {
            // On stderr: stdout stays one line per dead letter.
            eprintln!(
                "no dead letters{}",
                args.stream.as_deref().map(|s| format!(" of stream {s:?}")).unwrap_or_default()
            );
        }
        for letter in &letters {
            println!("{}", letter_line(letter));
        }
        if !next.is_empty() {
            eprintln!("more dead letters: add --after {next}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let mut client = reassembler(&args.common).await?;
    let letter = fetch(&mut client, &args.common, &args.id).await?;
    if args.common.json {
        println!("{}", letter_json(&letter));
    } else {
        print!("{}", letter_details(&letter));
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut client = reassembler(&args.common).await?;
    let letter = fetch(&mut client, &args.common, &args.id).await?;
    let event = replayed(&letter, &args.stream, args.sequence)?;
    let channel = channel::connect(&args.harmonizer, Some(args.common.timeout)).await?;
    let mut harmonizer = HarmonizerClient::new(channel).max_decoding_message_size(channel::MAX_MESSAGE_BYTES);
    let result = harmonizer
        .submit(args.token.request(event)?)
        .await
        .map_err(|status| anyhow::anyhow!("Submit to {} failed: {}", args.harmonizer, display::rpc_error(&status)))
        .with_context(|| format!("replaying dead letter {}", letter.id))?
        .into_inner();
    if args.common.json {
        println!("{}", result_json(&result));
    } else {
        println!("{}", display::result_line(&result));
    }
    Ok(match ResultStatus::try_from(result.status) {
        Ok(ResultStatus::Ok | ResultStatus::Processing) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// The dead letter's event as a new event on `stream` at `sequence`. A GAP
/// has no event to replay (none was ever received).
fn replayed(letter: &DeadLetter, stream: &str, sequence: u64) -> anyhow::Result<Event> {
    let original = letter.event.clone().unwrap_or_default();
    if original.operation.is_empty() {
        anyhow::bail!(
            "dead letter {} ({}) records no event to replay: {}",
            letter.id,
            display::status_name(letter.status),
            if letter.status == ResultStatus::Gap as i32 {
                "no event with that sequence ever arrived"
            } else {
                "its producer did not record the event"
            }
        );
    }
    Ok(Event {
        stream_id: stream.to_owned(),
        sequence,
        // A new event starts a new trace.
        trace_context: Default::default(),
        ..original
    })
}

fn event_of(letter: &DeadLetter) -> Event {
    letter.event.clone().unwrap_or_default()
}

/// `id stream#sequence STATUS attempts=N op=… at=… error="…"`.
fn letter_line(letter: &DeadLetter) -> String {
    let event = event_of(letter);
    let mut line = format!(
        "{} {}#{} {} attempts={}",
        letter.id,
        display::one_line(event.stream_id.as_bytes()),
        event.sequence,
        display::status_name(letter.status),
        letter.attempts
    );
    if !event.operation.is_empty() {
        line.push_str(&format!(" op={}", display::one_line(event.operation.as_bytes())));
    }
    line.push_str(&format!(" at={}", utc(letter.at_unix_ms)));
    if !letter.error.is_empty() {
        line.push_str(&format!(" error={:?}", letter.error));
    }
    line
}

/// One field per line, for `show`.
fn letter_details(letter: &DeadLetter) -> String {
    let event = event_of(letter);
    let mut attributes: Vec<String> = event
        .attributes
        .iter()
        .map(|(k, v)| format!("{}={}", display::one_line(k.as_bytes()), display::one_line(v.as_bytes())))
        .collect();
    attributes.sort();
    let rows = [
        ("id", letter.id.clone()),
        ("stream", display::one_line(event.stream_id.as_bytes())),
        ("sequence", event.sequence.to_string()),
        ("status", display::status_name(letter.status)),
        ("attempts", letter.attempts.to_string()),
        ("error", format!("{:?}", letter.error)),
        ("at", format!("{} ({} unix ms)", utc(letter.at_unix_ms), letter.at_unix_ms)),
        ("operation", display::one_line(event.operation.as_bytes())),
        ("payload", display::one_line(&event.payload)),
        ("attributes", attributes.join(" ")),
        ("mode", mode_name(event.mode)),
    ];
    rows.iter().map(|(name, value)| format!("{:<12}{value}\n", format!("{name}:"))).collect()
}

fn mode_name(mode: i32) -> String {
    match ordo_proto::OrderingMode::try_from(mode) {
        Ok(ordo_proto::OrderingMode::Unordered) => "UNORDERED".into(),
        Ok(_) => "ORDERED".into(),
        Err(_) => format!("MODE_{mode}"),
    }
}

/// Bytes as base64, plus their text when they are UTF-8.
fn payload_fields(object: &mut serde_json::Map<String, Value>, bytes: &[u8]) {
    object.insert("payload".into(), base64::engine::general_purpose::STANDARD.encode(bytes).into());
    if let Ok(text) = std::str::from_utf8(bytes) {
        object.insert("payload_utf8".into(), text.into());
    }
}

fn letter_json(letter: &DeadLetter) -> Value {
    let event = event_of(letter);
    let mut event_json = serde_json::Map::new();
    event_json.insert("stream_id".into(), event.stream_id.clone().into());
    event_json.insert("sequence".into(), event.sequence.into());
    event_json.insert("operation".into(), event.operation.clone().into());
    payload_fields(&mut event_json, &event.payload);
    event_json.insert("attributes".into(), json!(event.attributes));
    event_json.insert("mode".into(), mode_name(event.mode).into());
    json!({
        "id": letter.id,
        "stream_id": event.stream_id,
        "sequence": event.sequence,
        "status": display::status_name(letter.status),
        "attempts": letter.attempts,
        "error": letter.error,
        "at_unix_ms": letter.at_unix_ms,
        "at": utc(letter.at_unix_ms),
        "event": event_json,
    })
}

fn result_json(result: &EventResult) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("stream_id".into(), result.stream_id.clone().into());
    object.insert("sequence".into(), result.sequence.into());
    object.insert("status".into(), display::status_name(result.status).into());
    payload_fields(&mut object, &result.payload);
    if !result.error.is_empty() {
        object.insert("error".into(), result.error.clone().into());
    }
    if result.status == ResultStatus::Rejected as i32 {
        object.insert("code".into(), display::code_name(result.code).into());
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> DeadLetter {
        DeadLetter {
            id: "1700000000000-0".into(),
            event: Some(Event {
                stream_id: "orders".into(),
                sequence: 5,
                operation: "async-echo".into(),
                payload: "hi\n".into(),
                attributes: [("latency".to_owned(), "fixed:2s".to_owned())].into(),
                trace_context: [("traceparent".to_owned(), "x".to_owned())].into(),
                ..Default::default()
            }),
            status: ResultStatus::Failed as i32,
            attempts: 2,
            error: "gave up after 2 attempts".into(),
            at_unix_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn a_dead_letter_is_one_line() {
        assert_eq!(
            letter_line(&letter()),
            "1700000000000-0 orders#5 FAILED attempts=2 op=async-echo at=2023-11-14T22:13:20.123Z \
             error=\"gave up after 2 attempts\""
        );
        let details = letter_details(&letter());
        assert!(details.contains("payload:    hi\\n\n"), "{details}");
        assert!(details.contains("attributes: latency=fixed:2s\n"), "{details}");
        let value = letter_json(&letter());
        assert_eq!(value["event"]["payload_utf8"], "hi\n");
        assert_eq!(value["status"], "FAILED");
    }

    #[test]
    fn replay_keeps_the_event_on_a_new_stream_and_refuses_a_gap() {
        let event = replayed(&letter(), "retry", 0).expect("an event");
        assert_eq!((event.stream_id.as_str(), event.sequence, event.operation.as_str()), ("retry", 0, "async-echo"));
        assert_eq!(event.payload.as_ref(), b"hi\n");
        assert_eq!(event.attributes["latency"], "fixed:2s");
        assert!(event.trace_context.is_empty());
        let gap = DeadLetter {
            status: ResultStatus::Gap as i32,
            event: Some(Event { stream_id: "s".into(), sequence: 1, ..Default::default() }),
            ..letter()
        };
        let error = replayed(&gap, "retry", 0).expect_err("nothing to replay").to_string();
        assert!(error.contains("no event with that sequence ever arrived"), "{error}");
    }
}
