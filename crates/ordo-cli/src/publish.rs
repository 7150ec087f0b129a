//! `ordo publish`: messages into a JetStream stream, so trying `ordo-source`
//! needs no `nats` CLI. One message per `--payload`, per line of `--file`
//! (`-` for standard input), all of standard input (`--stdin`), or `--count`
//! generated ones over `--keys` keys.
//!
//! A message's key goes where `ordo-source` reads it: in the key header
//! (`--key-header`, on by default) and, when the subject names `{key}`, as
//! that subject token. Publishes are pipelined (up to `--in-flight` awaiting
//! their acknowledgement) on one connection, so the stream keeps them in the
//! order given; a failed publish stops the run (exit 1) and says how many
//! were stored before it.

use std::{
    io::{BufRead as _, Read as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream},
};
use bytes::Bytes;
use futures::{StreamExt as _, stream::FuturesUnordered};

/// The header `ordo-source` reads a message's key from (when it is not a
/// subject token).
pub const KEY_HEADER: &str = "Ordo-Key";

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["payload", "file", "stdin", "count"])))]
pub struct Args {
    /// NATS server URL.
    #[arg(long, env = "ORDO_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject to publish to; `{key}` is replaced by the message's key (e.g.
    /// `events.{key}`), `{i}` and `{n}` as in --payload.
    #[arg(long, env = "ORDO_SUBJECT")]
    subject: String,
    /// A payload (repeatable: one message each, in order). With --count, the
    /// template of every generated payload (default `{key}:{n}`). Placeholders:
    /// {i} the message's index in this run, {key} its key, {n} its index among
    /// the messages of its key.
    #[arg(long)]
    payload: Vec<String>,
    /// One message per line of this file (`-` for standard input); empty lines are messages too.
    #[arg(long, conflicts_with_all = ["payload", "stdin", "count"])]
    file: Option<PathBuf>,
    /// All of standard input as one message.
    #[arg(long, conflicts_with_all = ["payload", "count"])]
    stdin: bool,
    /// Generate this many messages (payloads from the --payload template).
    #[arg(long)]
    count: Option<u64>,
    /// The key of every message.
    #[arg(long, conflicts_with = "keys")]
    key: Option<String>,
    /// Spread the messages over this many keys, round robin: message i has
    /// key `<key-prefix><i mod keys>`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keys: Option<u64>,
    /// Prefix of the generated keys of --keys.
    #[arg(long, default_value = "key-")]
    key_prefix: String,
    /// Header that carries the key (what ordo-source reads).
    #[arg(long, default_value = KEY_HEADER)]
    key_header: String,
    /// Do not send the key header (the key is then only in the subject).
    #[arg(long)]
    no_key_header: bool,
    /// `Nats-Msg-Id` of each message, for the stream's duplicate window;
    /// placeholders as in --payload (e.g. `order-{key}-{n}`). A constant id
    /// on several messages stores only the first.
    #[arg(long, value_name = "TEMPLATE")]
    msg_id: Option<String>,
    /// An extra header `NAME=VALUE` (repeatable; VALUE may use the placeholders).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Create this stream first if it does not exist (file storage), capturing --subjects.
    #[arg(long, value_name = "NAME")]
    create_stream: Option<String>,
    /// Subjects of the stream --create-stream creates, comma-separated
    /// (default: --subject with `{key}` as `*`).
    #[arg(long, value_delimiter = ',', requires = "create_stream")]
    subjects: Vec<String>,
    /// Publishes awaiting their acknowledgement at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    in_flight: u64,
    /// Give up on connecting, or on one acknowledgement, after this long.
    #[arg(long, env = "ORDO_TIMEOUT", default_value = "10s", value_parser = ordo_core::duration::parse)]
    timeout: Duration,
    /// Print `stream sequence subject` for every stored message.
    #[arg(long)]
    verbose: bool,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if is_header_name(name) => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("header {text:?} is not NAME=VALUE with a NAME of letters, digits, '-' or '_'")),
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The placeholders' values for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot<'a> {
    index: u64,
    key: Option<&'a str>,
    per_key: u64,
}

impl Slot<'_> {
    fn fill(&self, template: &str) -> String {
        template
            .replace("{i}", &self.index.to_string())
            .replace("{n}", &self.per_key.to_string())
            .replace("{key}", self.key.unwrap_or(""))
    }
}

/// Who gets which key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keys {
    None,
    Fixed(String),
    RoundRobin { prefix: String, keys: u64 },
}

impl Keys {
    /// The key of message `index` and its index among that key's messages.
    fn of(&self, index: u64) -> (Option<String>, u64) {
        match self {
            Self::None => (None, index),
            Self::Fixed(key) => (Some(key.clone()), index),
            Self::RoundRobin { prefix, keys } => (Some(format!("{prefix}{}", index % keys)), index / keys),
        }
    }
}

/// One message as it goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outgoing {
    subject: String,
    headers: Vec<(String, String)>,
    msg_id: Option<String>,
    payload: Bytes,
}

/// Turns payloads into messages: subject, key header, id and extra headers
/// filled in, every subject checked.
#[derive(Debug)]
struct Shaper {
    subject: String,
    keys: Keys,
    key_header: Option<String>,
    msg_id: Option<String>,
    headers: Vec<(String, String)>,
    /// The generator's payload template (--count).
    template: Option<String>,
}

impl Shaper {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let keys = match (&args.key, args.keys) {
            (Some(key), _) => Keys::Fixed(key.clone()),
            (None, Some(keys)) => Keys::RoundRobin { prefix: args.key_prefix.clone(), keys },
            (None, None) => Keys::None,
        };
        if keys == Keys::None && args.subject.contains("{key}") {
            bail!("--subject {:?} names {{key}}: give --key or --keys", args.subject);
        }
        if !args.no_key_header && !is_header_name(&args.key_header) {
            bail!("--key-header {:?} is not a header name (letters, digits, '-' or '_')", args.key_header);
        }
        let template = match (args.count, args.payload.as_slice()) {
            (None, _) => None,
            (Some(_), []) => Some("{key}:{n}".to_owned()),
            (Some(_), [one]) => Some(one.clone()),
            (Some(_), _) => bail!("--count takes at most one --payload (the template of every message)"),
        };
        Ok(Self {
            subject: args.subject.clone(),
            keys,
            key_header: (!args.no_key_header).then(|| args.key_header.clone()),
            msg_id: args.msg_id.clone(),
            headers: args.headers.clone(),
            template,
        })
    }

    /// Message `index`; `payload` is `None` for a generated one.
    fn message(&self, index: u64, payload: Option<Bytes>) -> anyhow::Result<Outgoing> {
        let (key, per_key) = self.keys.of(index);
        let slot = Slot { index, key: key.as_deref(), per_key };
        if let Some(key) = key.as_deref()
            && self.subject.contains("{key}")
        {
            check_token(key).with_context(|| format!("key {key:?} cannot be a subject token"))?;
        }
        let subject = slot.fill(&self.subject);
        check_subject(&subject)?;
        let mut headers: Vec<(String, String)> = Vec::new();
        if let (Some(name), Some(key)) = (&self.key_header, key.as_deref()) {
            headers.push((name.clone(), key.to_owned()));
        }
        headers.extend(self.headers.iter().map(|(name, value)| (name.clone(), slot.fill(value))));
        let payload = match (payload, &self.template) {
            (Some(payload), _) => payload,
            (None, Some(template)) => Bytes::from(slot.fill(template)),
            (None, None) => Bytes::new(),
        };
        Ok(Outgoing { subject, headers, msg_id: self.msg_id.as_deref().map(|t| slot.fill(t)), payload })
    }
}

/// A subject one may publish to: dot-separated non-empty tokens without
/// wildcards or whitespace.
fn check_subject(subject: &str) -> anyhow::Result<()> {
    for token in subject.split('.') {
        check_token(token).with_context(|| format!("cannot publish to subject {subject:?}"))?;
    }
    Ok(())
}

fn check_token(token: &str) -> anyhow::Result<()> {
    if token.is_empty() {
        bail!("an empty subject token");
    }
    if let Some(c) = token.chars().find(|c| c.is_whitespace() || matches!(c, '*' | '>' | '.')) {
        bail!("token {token:?} holds {c:?} (no whitespace, '.', '*' or '>')");
    }
    Ok(())
}

/// The payloads given on the command line or read from a file or stdin;
/// `None` in generator mode.
fn read_payloads(args: &Args) -> anyhow::Result<Option<Vec<Bytes>>> {
    if args.count.is_some() {
        return Ok(None);
    }
    if args.stdin {
        let mut all = Vec::new();
        std::io::stdin().read_to_end(&mut all).context("cannot read standard input")?;
        return Ok(Some(vec![Bytes::from(all)]));
    }
    if let Some(path) = &args.file {
        let lines: Vec<String> = if path.as_os_str() == "-" {
            std::io::stdin().lock().lines().collect::<Result<_, _>>().context("cannot read standard input")?
        } else {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            std::io::BufReader::new(file)
                .lines()
                .collect::<Result<_, _>>()
                .with_context(|| format!("cannot read {} (as UTF-8 lines)", path.display()))?
        };
        return Ok(Some(lines.into_iter().map(Bytes::from).collect()));
    }
    Ok(Some(args.payload.iter().map(|p| Bytes::from(p.clone())).collect()))
}

/// The stream's subjects: --subjects, else --subject with `{key}` as `*`.
fn stream_subjects(args: &Args) -> Vec<String> {
    if args.subjects.is_empty() {
        vec![args.subject.replace("{key}", "*").replace("{i}", "*").replace("{n}", "*")]
    } else {
        args.subjects.clone()
    }
}

async fn ensure_stream(js: &jetstream::Context, name: &str, subjects: Vec<String>) -> anyhow::Result<()> {
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let info = existing.info().await.with_context(|| format!("cannot read stream {name:?}"))?;
            eprintln!("ordo publish: stream {name} exists (subjects {})", info.config.subjects.join(", "));
            Ok(())
        }
        Err(error) => {
            let missing = matches!(error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
            if !missing {
                bail!("cannot look up stream {name:?}: {error}");
            }
            let config = stream::Config { name: name.to_owned(), subjects: subjects.clone(), ..Default::default() };
            js.create_stream(config).await.with_context(|| format!("cannot create stream {name:?}"))?;
            eprintln!("ordo publish: created stream {name} (subjects {})", subjects.join(", "));
            Ok(())
        }
    }
}

/// What the run stored.
#[derive(Debug, Default)]
struct Tally {
    stored: u64,
    duplicates: u64,
    stream: String,
    first_sequence: Option<u64>,
    last_sequence: Option<u64>,
}

impl Tally {
    fn add(&mut self, ack: &jetstream::publish::PublishAck, subject: &str, verbose: bool) {
        if ack.duplicate {
            self.duplicates += 1;
        } else {
            self.stored += 1;
        }
        if verbose {
            println!("{} {} {}{}", ack.stream, ack.sequence, subject, if ack.duplicate { " duplicate" } else { "" });
        }
        self.stream.clone_from(&ack.stream);
        self.first_sequence = Some(self.first_sequence.map_or(ack.sequence, |s| s.min(ack.sequence)));
        self.last_sequence = Some(self.last_sequence.map_or(ack.sequence, |s| s.max(ack.sequence)));
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let shaper = Shaper::new(&args)?;
    let payloads = read_payloads(&args)?;
    let total = payloads.as_ref().map_or(args.count.unwrap_or(0), |p| p.len() as u64);
    let client = async_nats::ConnectOptions::new()
        .name("ordo publish")
        .connection_timeout(args.timeout)
        .connect(args.nats.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", args.nats))?;
    let in_flight = usize::try_from(args.in_flight).unwrap_or(usize::MAX);
    let js = jetstream::ContextBuilder::new()
        .timeout(args.timeout)
        .ack_timeout(args.timeout)
        .max_ack_inflight(in_flight)
        .backpressure_on_inflight(true)
        .build(client.clone());
    if let Some(name) = &args.create_stream {
        ensure_stream(&js, name, stream_subjects(&args)).await?;
    }

    let started = Instant::now();
    let mut tally = Tally::default();
    let mut pending: FuturesUnordered<_> = FuturesUnordered::new();
    let mut payloads = payloads.map(Vec::into_iter);
    for index in 0..total {
        let payload = payloads.as_mut().and_then(Iterator::next);
        let message = shaper.message(index, payload).with_context(|| format!("message {index}"))?;
        while pending.len() >= in_flight {
            settle(pending.next().await, &mut tally, args.verbose)?;
        }
        let ack = publish(&js, &message).await.with_context(|| {
            format!("publish of message {index} to {:?} failed ({} stored before)", message.subject, tally.stored)
        })?;
        let subject = message.subject;
        pending.push(async move { (index, subject, ack.await) });
    }
    while let Some(done) = pending.next().await {
        settle(Some(done), &mut tally, args.verbose)?;
    }
    client.flush().await.context("cannot flush the connection")?;
    let elapsed = started.elapsed().as_secs_f64();
    let range = match (tally.first_sequence, tally.last_sequence) {
        (Some(first), Some(last)) => format!(" stream={} seq={first}..{last}", tally.stream),
        _ => String::new(),
    };
    println!(
        "published={total} stored={} duplicates={}{range} elapsed={elapsed:.3}s rate={:.0}/s",
        tally.stored,
        tally.duplicates,
        if elapsed > 0.0 { total as f64 / elapsed } else { 0.0 },
    );
    Ok(ExitCode::SUCCESS)
}

async fn publish(js: &jetstream::Context, message: &Outgoing) -> anyhow::Result<PublishAckFuture> {
    let mut publish = PublishMessage::build().payload(message.payload.clone());
    if !message.headers.is_empty() {
        let mut headers = HeaderMap::new();
        for (name, value) in &message.headers {
            headers.append(name.as_str(), value.as_str());
        }
        publish = publish.headers(headers);
    }
    if let Some(id) = &message.msg_id {
        publish = publish.message_id(id);
    }
    Ok(js.send_publish(message.subject.clone(), publish).await?)
}

type Settled = (u64, String, Result<jetstream::publish::PublishAck, jetstream::context::PublishError>);

fn settle(done: Option<Settled>, tally: &mut Tally, verbose: bool) -> anyhow::Result<()> {
    let Some((index, subject, ack)) = done else { return Ok(()) };
    match ack {
        Ok(ack) => {
            tally.add(&ack, &subject, verbose);
            Ok(())
        }
        Err(error) => bail!(
            "message {index} to {subject:?} was not acknowledged: {error} ({} stored before; \
             is a stream capturing {subject:?}? --create-stream NAME makes one)",
            tally.stored
        ),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(line: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("publish").chain(line.iter().copied())).expect("valid flags").args
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn generated_messages_go_round_robin_over_the_keys() {
        let a = args(&["--subject", "events.{key}", "--count", "5", "--keys", "2", "--msg-id", "m-{key}-{n}"]);
        let shaper = Shaper::new(&a).expect("valid");
        let out: Vec<Outgoing> = (0..5).map(|i| shaper.message(i, None).expect("message")).collect();
        let subjects: Vec<&str> = out.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(subjects, ["events.key-0", "events.key-1", "events.key-0", "events.key-1", "events.key-0"]);
        assert_eq!(out[3].payload, Bytes::from("key-1:1"));
        assert_eq!(out[4].msg_id.as_deref(), Some("m-key-0-2"));
        assert_eq!(out[3].headers, headers(&[(KEY_HEADER, "key-1")]));
    }

    #[test]
    fn given_payloads_keep_their_bytes_and_fill_headers() {
        let a = args(&[
            "--subject",
            "orders",
            "--key",
            "c1",
            "--payload",
            "x",
            "--header",
            "Ordo-Attr-latency=fixed:{n}ms",
            "--key-header",
            "K",
        ]);
        let shaper = Shaper::new(&a).expect("valid");
        let m = shaper.message(3, Some(Bytes::from("{i} stays"))).expect("message");
        assert_eq!(m.subject, "orders");
        assert_eq!(m.payload, Bytes::from("{i} stays"));
        assert_eq!(m.headers, headers(&[("K", "c1"), ("Ordo-Attr-latency", "fixed:3ms")]));
        assert_eq!(m.msg_id, None);
        let no_header =
            Shaper::new(&args(&["--subject", "o", "--key", "c1", "--payload", "x", "--no-key-header"])).expect("valid");
        assert!(no_header.message(0, Some(Bytes::new())).expect("message").headers.is_empty());
    }

    #[test]
    fn bad_subjects_keys_and_flags_are_refused() {
        assert!(Shaper::new(&args(&["--subject", "events.{key}", "--payload", "x"])).is_err(), "{{key}} without a key");
        let spaced =
            Shaper::new(&args(&["--subject", "events.{key}", "--key", "a b", "--payload", "x"])).expect("flags");
        assert!(spaced.message(0, None).is_err());
        let dotted =
            Shaper::new(&args(&["--subject", "events.{key}", "--key", "a.b", "--payload", "x"])).expect("flags");
        assert!(dotted.message(0, None).is_err(), "a key with '.' would be two tokens");
        for subject in ["events.>", "events.*", "events..x", "", "a b"] {
            let s = Shaper::new(&args(&["--subject", subject, "--payload", "x"])).expect("flags");
            assert!(s.message(0, None).is_err(), "{subject:?} must be refused");
        }
        assert!(Shaper::new(&args(&["--subject", "s", "--count", "2", "--payload", "a", "--payload", "b"])).is_err());
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("bad name=v").is_err());
        assert_eq!(parse_header("A=b=c"), Ok(("A".into(), "b=c".into())));
        let parse = |line: &[&str]| Cli::try_parse_from(std::iter::once("publish").chain(line.iter().copied()));
        assert!(parse(&["--subject", "s"]).is_err(), "an input is required");
        assert!(parse(&["--subject", "s", "--count", "1", "--keys", "0"]).is_err());
        assert!(
            parse(&["--subject", "s", "--payload", "x", "--subjects", "s"]).is_err(),
            "--subjects needs --create-stream"
        );
    }

    #[test]
    fn stream_subjects_default_to_the_subject_pattern() {
        let a = args(&["--subject", "events.{key}", "--key", "k", "--payload", "x", "--create-stream", "EV"]);
        assert_eq!(stream_subjects(&a), ["events.*"]);
        let b = args(&["--subject", "e.x", "--payload", "x", "--create-stream", "EV", "--subjects", "e.>,f.>"]);
        assert_eq!(stream_subjects(&b), ["e.>", "f.>"]);
    }
}
