//! Reads every stream of a run back from its release log, through the
//! push-gateway's `Subscribe` from position 0 (the path any late subscriber
//! takes), and checks it independently of what the client received: each
//! sequence released once, at position = sequence (ORDERED), with its own
//! payload. A broken subscription is resumed from the next position.

use std::{collections::HashMap, time::Duration};

use ordo_proto::v1::{ResultStatus, StreamCursor, SubscribeRequest, push_gateway_client::PushGatewayClient};
use ordo_runtime::backoff::Backoff;
use serde::Serialize;
use tokio::time::{Instant, timeout_at};
use tonic::transport::Channel;

/// What the release logs of one run hold.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogOutcome {
    /// Results read back.
    pub read: usize,
    /// Sequences missing from the log (not released by the deadline).
    pub lost: usize,
    /// Sequences released more than once.
    pub duplicated: usize,
    /// Results whose position is not the next one, or whose sequence is
    /// not their position (ORDERED).
    pub reordered: usize,
    pub wrong_payload: usize,
    pub failed: usize,
    pub gap: usize,
    /// Subscriptions that broke and were resumed.
    pub resubscribed: usize,
    pub examples: Vec<String>,
}

impl LogOutcome {
    fn example(&mut self, text: String) {
        if self.examples.len() < 10 {
            self.examples.push(text);
        }
    }
}

struct Tally {
    next_position: u64,
    seen: Vec<u32>,
}

/// Reads `n` released results of each stream (at most `deadline`) and checks them.
pub async fn check(client: PushGatewayClient<Channel>, streams: &[String], n: u64, deadline: Duration) -> LogOutcome {
    let mut out = LogOutcome::default();
    let mut tallies: HashMap<String, Tally> =
        streams.iter().map(|s| (s.clone(), Tally { next_position: 0, seen: vec![0; n as usize] })).collect();
    let until = Instant::now() + deadline;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let complete = |t: &HashMap<String, Tally>| t.values().all(|t| t.next_position >= n);

    'subscribe: while !complete(&tallies) && Instant::now() < until {
        // Resume each stream where the last subscription stopped; complete
        // ones are not asked for again.
        let cursors: Vec<StreamCursor> = tallies
            .iter()
            .filter(|(_, t)| t.next_position < n)
            .map(|(s, t)| StreamCursor { stream_id: s.clone(), from_sequence: t.next_position })
            .collect();
        let mut client = client.clone();
        let request = SubscribeRequest { streams: cursors, ..Default::default() };
        let mut inbound = match timeout_at(until, client.subscribe(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                out.resubscribed += 1;
                out.example(format!("Subscribe failed: {:?} {}", status.code(), status.message()));
                backoff.wait().await;
                continue;
            }
            Err(_) => break,
        };
        loop {
            if complete(&tallies) {
                break 'subscribe;
            }
            let message = match timeout_at(until, inbound.message()).await {
                Ok(Ok(Some(result))) => result,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    out.resubscribed += 1;
                    backoff.wait().await;
                    continue 'subscribe;
                }
                Err(_) => break 'subscribe,
            };
            backoff.reset();
            let Some(tally) = tallies.get_mut(&message.stream_id) else { continue };
            if message.position < tally.next_position {
                // Re-served after a resubscription overlap: not a release.
                continue;
            }
            out.read += 1;
            let status = message.status();
            if message.position != tally.next_position || message.sequence != message.position {
                out.reordered += 1;
                out.example(format!(
                    "log of {}: position {} holds #{} where position {} was next",
                    message.stream_id, message.position, message.sequence, tally.next_position
                ));
            }
            tally.next_position = message.position + 1;
            match usize::try_from(message.sequence).ok().and_then(|s| tally.seen.get_mut(s)) {
                Some(count) => *count += 1,
                None => out.example(format!("log of {}: unexpected sequence {}", message.stream_id, message.sequence)),
            }
            match status {
                ResultStatus::Ok
                    if message.payload.as_ref() != format!("{}:{}", message.stream_id, message.sequence).as_bytes() =>
                {
                    out.wrong_payload += 1;
                    out.example(format!("log of {}: wrong payload at #{}", message.stream_id, message.sequence));
                }
                ResultStatus::Failed => out.failed += 1,
                ResultStatus::Gap => out.gap += 1,
                _ => {}
            }
        }
    }

    for (stream, tally) in &tallies {
        for (seq, &count) in tally.seen.iter().enumerate() {
            match count {
                0 => {
                    out.lost += 1;
                    if out.lost <= 3 {
                        out.example(format!("log of {stream}: #{seq} never released"));
                    }
                }
                1 => {}
                more => {
                    out.duplicated += more as usize - 1;
                    out.example(format!("log of {stream}: #{seq} released {more} times"));
                }
            }
        }
    }
    out
}
