//! `ordo`: a small command-line client for a running Ordo deployment.
//!
//! Each subcommand lives in its own module; this file only parses the command
//! line and turns the outcome into an exit code (0 success, 1 failure, 2 bad
//! usage, as clap reports it).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod channel;
mod display;
mod dlq;
mod health;
mod publish;
mod registry;
mod send;
mod submit;
mod subscribe;
mod token;

const EXAMPLES: &str = "\
Examples:
  ordo health --addr 127.0.0.1:50051
  ordo send --text 'hello, ordered world' --latency exp:10ms
  ordo send --text 'hello, ordered world' --latency exp:10ms --unordered
  ordo send --text 'hello, ordered world' --op shout --expect 'HELLO, ORDERED WORLD'
  ordo submit --stream s1 --seq 0 --op upper --payload hi
  ordo subscribe --stream s1 --from 0
  ordo token --hs256-secret-file secret --sub alice --write 'orders-*' --read 'orders-*' --ttl 1h
  ORDO_TOKEN=$(ordo token ...) ordo submit --stream orders-1 --seq 0 --op upper --payload hi
  ordo dlq list --stream s1
  ordo dlq show 1700000000000-0
  ordo dlq replay 1700000000000-0 --stream s1-retry --sequence 0
  ordo registry publish examples/registry.toml
  ordo registry list
  ordo registry diff 1 2
  ordo registry pin 1
  ordo publish --nats nats://127.0.0.1:4222 --create-stream EVENTS --subjects 'events.>' \
    --subject 'events.{key}' --count 1000 --keys 10 --msg-id 'm-{i}'
  seq 5 | ordo publish --subject events.k1 --key k1 --file -

Every flag can also be set through the environment variable shown in the
subcommand's --help (e.g. ORDO_HARMONIZER=host:50051).";

/// Client for Ordo: send events to the harmonizer, read released results from
/// the push-gateway, inspect and replay dead letters, publish and manage the
/// operation registry, and check any service's gRPC health.
#[derive(Debug, Parser)]
#[command(name = "ordo", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    tls: channel::TlsFlags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a service's grpc.health.v1 status; exit 0 only if SERVING.
    Health(health::Args),
    /// Send a text one character per event over Process and print what comes back.
    ///
    /// Prints the payloads concatenated in arrival order, then one summary line
    /// (`events=… results=… failed=… elapsed=… differ=… error_rate=…% …`):
    /// `differ` counts arrival positions whose character is not the one sent
    /// there (or the one of `--expect` there), `out_of_order` those that did
    /// not receive their own sequence.
    /// Exits 1 on a transport error, a REJECTED event or a timeout.
    Send(send::Args),
    /// Send one event with the unary Submit call and print its result.
    Submit(submit::Args),
    /// Print the released results of a stream from the push-gateway, one per line.
    ///
    /// Each line is `sequence STATUS payload` (payload as UTF-8, control
    /// characters escaped), plus `error="…"` when the result has one. Runs
    /// until interrupted, `--count` results, or the end of the subscription.
    Subscribe(subscribe::Args),
    /// Dead letters (FAILED and GAP results): list, show, replay one as a new event.
    Dlq(dlq::Args),
    /// The operation registry in Redis: publish a file as a new version, list, show, diff, pin, unpin, roll back.
    Registry(registry::Args),
    /// Mint a bearer token (JWT) for services with authorization on, and print it.
    ///
    /// The token may send events to the streams matching a --write glob and
    /// read the results of those matching a --read glob. Pass it to the
    /// client subcommands with --token or ORDO_TOKEN.
    Token(token::Args),
    /// Publish messages to a JetStream subject (for ordo-source), creating the stream if asked.
    ///
    /// One message per --payload, per line of --file (`-` for stdin), all of
    /// stdin (--stdin), or --count generated ones over --keys keys. The key
    /// goes in the Ordo-Key header and, with `{key}` in --subject, in the
    /// subject. Prints `published=… stored=… duplicates=… stream=… seq=…`;
    /// exits 1 if a publish is not acknowledged.
    Publish(publish::Args),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = channel::install_tls(&cli.tls) {
        eprintln!("ordo: error: {error:#}");
        return ExitCode::from(2);
    }
    let outcome = match cli.command {
        Command::Health(args) => health::run(args).await,
        Command::Send(args) => send::run(args).await,
        Command::Submit(args) => submit::run(args).await,
        Command::Subscribe(args) => subscribe::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Registry(args) => registry::run(args).await,
        Command::Token(args) => token::run(args),
        Command::Publish(args) => publish::run(args).await,
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ordo: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
