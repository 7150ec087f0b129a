//! `ordo send`: the paper's demonstration. A text goes out one character per
//! event over the harmonizer's `Process` stream; the payloads come back and
//! are concatenated in arrival order. In ORDERED mode the text must come back
//! unchanged; in UNORDERED mode (the naive baseline) characters of slow events
//! land elsewhere, and the summary counts how many positions differ.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::{StreamExt as _, future, stream};
use ordo_proto::{Event, EventResult, OrderingMode, ResultStatus, v1::harmonizer_client::HarmonizerClient};

use crate::{channel, display};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
pub struct Args {
    /// Harmonizer address (host:port).
    #[arg(long, env = "ORDO_HARMONIZER", default_value = "localhost:50051")]
    addr: String,
    /// Stream id. Sequences start at 0, so reuse an id only to resend the same
    /// events; a fresh id is generated when omitted.
    #[arg(long, env = "ORDO_STREAM")]
    stream: Option<String>,
    /// Operation applied to every character (see `ListOperations`).
    #[arg(long, env = "ORDO_OP", default_value = "async-echo")]
    op: String,
    /// Simulated latency of each event: fixed:D, uniform:D1-D2 or exp:MEAN.
    #[arg(long, env = "ORDO_LATENCY", value_parser = parse_latency)]
    latency: Option<String>,
    /// Release results in completion order (the naive baseline) instead of in order.
    #[arg(long)]
    unordered: bool,
    /// The text to send.
    #[arg(long)]
    text: Option<String>,
    /// Read the text from this file (`-` for standard input).
    #[arg(long)]
    file: Option<PathBuf>,
    /// The text the results should spell, one character per event, when the
    /// operation changes its payload (`--op shout --expect 'HELLO'`); default:
    /// the text sent. `differ` counts the arrival positions that do not match it.
    #[arg(long)]
    expect: Option<String>,
    /// Give up (exit 1) if not every result has arrived after this long.
    #[arg(long, env = "ORDO_TIMEOUT", default_value = "60s", value_parser = ordo_core::duration::parse)]
    timeout: Duration,
    #[command(flatten)]
    token: crate::token::TokenFlag,
}

fn parse_latency(text: &str) -> Result<String, String> {
    ordo_core::latency::Latency::parse(text).map(|_| text.to_owned()).map_err(|e| e.to_string())
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = read_input(&args)?;
    let chars: Vec<char> = text.chars().collect();
    let stream_id = args.stream.clone().unwrap_or_else(fresh_stream_id);
    let mode = if args.unordered { OrderingMode::Unordered } else { OrderingMode::Ordered };
    let expected: Vec<char> = match &args.expect {
        Some(expect) => expect.chars().collect(),
        None => chars.clone(),
    };
    if expected.len() != chars.len() {
        anyhow::bail!(
            "--expect has {} characters but the text has {}: one character per event",
            expected.len(),
            chars.len()
        );
    }
    let mut tally = Tally::new(&chars).expecting(&expected);
    if chars.is_empty() {
        println!("{}", tally.summary(Duration::ZERO, &stream_id, mode));
        return Ok(ExitCode::SUCCESS);
    }

    let channel = channel::connect(&args.addr, None).await?;
    let mut client = HarmonizerClient::new(channel).max_decoding_message_size(channel::MAX_MESSAGE_BYTES);

    let mut attributes = HashMap::new();
    if let Some(latency) = &args.latency {
        attributes.insert("latency".to_owned(), latency.clone());
    }
    let (event_stream_id, operation) = (stream_id.clone(), args.op.clone());
    let events = chars.clone().into_iter().enumerate().map(move |(sequence, c)| Event {
        stream_id: event_stream_id.clone(),
        sequence: sequence as u64,
        operation: operation.clone(),
        payload: c.to_string().into_bytes().into(),
        attributes: attributes.clone(),
        mode: mode as i32,
        ..Default::default()
    });
    // The request side stays open until every result is in: a half-close would
    // tell the harmonizer we are done, and it might end the call before the
    // slow results arrive.
    let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let requests = stream::iter(events).chain(stream::once(finished_rx).filter_map(|_| future::ready(None)));

    let started = Instant::now();
    let mut responses = client
        .process(args.token.request(requests)?)
        .await
        .map_err(|status| anyhow::anyhow!("Process call to {} failed: {}", args.addr, display::rpc_error(&status)))?
        .into_inner();
    let deadline = tokio::time::sleep(args.timeout);
    tokio::pin!(deadline);
    let mut failure = None;
    while !tally.complete() {
        tokio::select! {
            () = &mut deadline => {
                failure = Some(format!(
                    "timed out after {:?} with {} of {} results (first missing sequence: {})",
                    args.timeout, tally.received, chars.len(), tally.first_missing().unwrap_or_default()
                ));
                break;
            }
            message = responses.message() => match message {
                Ok(Some(result)) => {
                    if let Some(rejected) = tally.record(&stream_id, result) {
                        failure = Some(format!("event rejected: {}", display::result_line(&rejected)));
                        break;
                    }
                }
                Ok(None) => {
                    failure = Some(format!(
                        "the harmonizer ended the call with {} of {} results", tally.received, chars.len()
                    ));
                    break;
                }
                Err(status) => {
                    failure = Some(format!("Process stream failed: {}", display::rpc_error(&status)));
                    break;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    drop(finished);
    // Let the harmonizer close the call itself rather than resetting it; a
    // slow or missing close is not our problem any more.
    let _ =
        tokio::time::timeout(Duration::from_secs(1), async { while let Ok(Some(_)) = responses.message().await {} })
            .await;

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&tally.output)?;
    writeln!(stdout)?;
    writeln!(stdout, "{}", tally.summary(elapsed, &stream_id, mode))?;
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some(reason) => {
            eprintln!("ordo: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn read_input(args: &Args) -> anyhow::Result<String> {
    if let Some(text) = &args.text {
        return Ok(text.clone());
    }
    let Some(path) = &args.file else {
        anyhow::bail!("give --text or --file");
    };
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).context("cannot read standard input as UTF-8")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8", path.display()))?;
    }
    Ok(text)
}

/// Unique enough for a person at a terminal: the process id and the clock.
fn fresh_stream_id() -> String {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
    format!("ordo-cli-{millis}-{}", std::process::id())
}

/// What came back so far, compared with what was sent.
#[derive(Debug)]
struct Tally<'a> {
    input: &'a [char],
    /// What each arrival position should carry (the input, unless told).
    expected: &'a [char],
    seen: Vec<bool>,
    /// Distinct sequences with a final (OK or FAILED) result.
    received: usize,
    /// Payloads concatenated in arrival order.
    output: Vec<u8>,
    /// Arrival positions whose payload is not the expected character there.
    differ: usize,
    /// Arrival positions that did not receive their own sequence.
    out_of_order: usize,
    failed: usize,
    /// Second results for an already answered sequence: Ordo promises none.
    duplicates: usize,
    /// Results for another stream, out-of-range sequences or non-final statuses.
    ignored: usize,
}

impl<'a> Tally<'a> {
    fn new(input: &'a [char]) -> Self {
        Self {
            input,
            expected: input,
            seen: vec![false; input.len()],
            received: 0,
            output: Vec::new(),
            differ: 0,
            out_of_order: 0,
            failed: 0,
            duplicates: 0,
            ignored: 0,
        }
    }

    /// Compares arrivals with `expected` (as long as the input) instead of the input.
    fn expecting(mut self, expected: &'a [char]) -> Self {
        if expected.len() == self.input.len() {
            self.expected = expected;
        }
        self
    }

    fn complete(&self) -> bool {
        self.received == self.input.len()
    }

    fn first_missing(&self) -> Option<usize> {
        self.seen.iter().position(|seen| !seen)
    }

    /// Counts one result; returns it back if it is a rejection, which ends the run.
    fn record(&mut self, stream_id: &str, result: EventResult) -> Option<EventResult> {
        // A rejection may lack the stream id (that is one reason to reject).
        let ours = result.stream_id == stream_id || result.stream_id.is_empty();
        let Some(index) = usize::try_from(result.sequence).ok().filter(|&i| ours && i < self.input.len()) else {
            self.ignored += 1;
            return None;
        };
        match ResultStatus::try_from(result.status) {
            Ok(ResultStatus::Rejected) => return Some(result),
            Ok(ResultStatus::Ok) => {}
            Ok(ResultStatus::Failed) => self.failed += 1,
            _ => {
                self.ignored += 1;
                return None;
            }
        }
        if std::mem::replace(&mut self.seen[index], true) {
            self.duplicates += 1;
            return None;
        }
        let position = self.received;
        self.received += 1;
        if index != position {
            self.out_of_order += 1;
        }
        let mut expected = [0u8; 4];
        if result.payload.as_ref() != self.expected[position].encode_utf8(&mut expected).as_bytes() {
            self.differ += 1;
        }
        self.output.extend_from_slice(&result.payload);
        None
    }

    fn summary(&self, elapsed: Duration, stream_id: &str, mode: OrderingMode) -> String {
        let events = self.input.len();
        let percent = |n: usize| {
            if events == 0 { 0.0 } else { 100.0 * n as f64 / events as f64 }
        };
        let rate = if elapsed.is_zero() { 0.0 } else { self.received as f64 / elapsed.as_secs_f64() };
        format!(
            "events={events} results={} failed={} duplicates={} elapsed={:.3}s rate={rate:.1}/s \
             differ={} error_rate={:.2}% out_of_order={} stream={stream_id} mode={}",
            self.received,
            self.failed,
            self.duplicates,
            elapsed.as_secs_f64(),
            self.differ,
            percent(self.differ),
            self.out_of_order,
            mode.as_str_name().trim_start_matches("ORDERING_MODE_"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(stream: &str, sequence: u64, payload: &str) -> EventResult {
        EventResult {
            stream_id: stream.into(),
            sequence,
            status: ResultStatus::Ok as i32,
            payload: payload.to_owned().into_bytes().into(),
            ..Default::default()
        }
    }

    #[test]
    fn in_order_results_reproduce_the_text() {
        let input: Vec<char> = "héllo".chars().collect();
        let mut tally = Tally::new(&input);
        for (i, c) in input.iter().enumerate() {
            assert!(tally.record("s", ok("s", i as u64, &c.to_string())).is_none());
        }
        assert!(tally.complete());
        assert_eq!(tally.output, "héllo".as_bytes());
        assert_eq!((tally.differ, tally.out_of_order, tally.duplicates), (0, 0, 0));
    }

    #[test]
    fn counts_swaps_duplicates_and_foreign_results() {
        let input: Vec<char> = "abc".chars().collect();
        let mut tally = Tally::new(&input);
        tally.record("s", ok("s", 1, "b"));
        tally.record("s", ok("other", 0, "a"));
        tally.record("s", ok("s", 9, "z"));
        tally.record("s", ok("s", 0, "a"));
        tally.record("s", ok("s", 0, "a"));
        assert!(!tally.complete());
        assert_eq!(tally.first_missing(), Some(2));
        tally.record("s", ok("s", 2, "c"));
        assert!(tally.complete());
        assert_eq!(tally.output, b"bac");
        assert_eq!((tally.differ, tally.out_of_order, tally.duplicates, tally.ignored), (2, 2, 1, 2));
        assert!(tally.summary(Duration::from_secs(1), "s", OrderingMode::Unordered).contains("error_rate=66.67%"));
    }

    #[test]
    fn results_are_compared_with_the_expected_text() {
        let input: Vec<char> = "ab".chars().collect();
        let expected: Vec<char> = "AB".chars().collect();
        let mut tally = Tally::new(&input).expecting(&expected);
        tally.record("s", ok("s", 0, "A"));
        tally.record("s", ok("s", 1, "b"));
        assert_eq!((tally.differ, tally.out_of_order), (1, 0));
    }

    #[test]
    fn a_rejection_ends_the_run() {
        let input: Vec<char> = "ab".chars().collect();
        let mut tally = Tally::new(&input);
        let rejected =
            EventResult { sequence: 0, status: ResultStatus::Rejected as i32, code: 3, ..Default::default() };
        assert!(tally.record("s", rejected).is_some());
    }
}
