//! Redis memory per finished stream (issue 12, item 4): a finished stream's
//! pending hash and release log expire after the reassembler's
//! `--stream-ttl`; its meta lives `--tombstone-ttl` longer as the stream's
//! dedup tombstone. What a late resend gets, as docs/configuration.md
//! ("Stream expiry") says:
//! - while the log lives: the stored result (once per resend);
//! - after the log expired, while the tombstone lives: REJECTED with
//!   OUT_OF_RANGE (on `Process` and `Submit`), never processed again;
//! - after the tombstone expired: the stream is new, so the sequence is
//!   processed and released again.

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, event},
    eventually,
};
use ordo_proto::{ResultStatus, v1::EventResult};

use crate::DEADLINE;

const STREAM_TTL: &str = "1s";
const TOMBSTONE_TTL: &str = "4s";

/// Sends `events` on a new call and returns every result once the call ended.
async fn process(cluster: &Cluster, events: Vec<ordo_proto::v1::Event>) -> Vec<EventResult> {
    let n = events.len();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    for e in events {
        call.send(e).await.expect("sent");
    }
    call.wait_for_total(n, DEADLINE).await.expect("every event answered");
    call.finish(LINGER).await.expect("the call ends cleanly")
}

async fn exist(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> (bool, bool, bool) {
    // The key layout of ordo_core::keys.
    let key = |kind: &str| format!("ordo:{{{stream}}}:{kind}");
    let (meta, pend, log) = (key("meta"), key("pend"), key("log"));
    redis::pipe().exists(meta).exists(pend).exists(log).query_async(conn).await.expect("EXISTS")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_resend_is_refused_while_the_tombstone_lives_then_processed_as_new() {
    let cluster = Cluster::builder()
        .workers(1)
        .reassembler_args(["--stream-ttl", STREAM_TTL, "--tombstone-ttl", TOMBSTONE_TTL])
        .start()
        .await;
    let client = redis::Client::open(cluster.redis_url()).expect("url");
    let mut redis = client.get_multiplexed_async_connection().await.expect("connects");
    let s = "finished-then-late";
    let first =
        process(&cluster, vec![event(s, 0, "async-echo", b"a".to_vec()), event(s, 1, "async-echo", b"b".to_vec())])
            .await;
    assert_eq!(
        first.iter().map(|r| (r.sequence, r.status())).collect::<Vec<_>>(),
        vec![(0, ResultStatus::Ok), (1, ResultStatus::Ok)]
    );

    // What it keeps in Redis (the log expires within a second: read at once).
    let mut usage = Vec::new();
    for kind in ["meta", "pend", "log"] {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("ordo:{{{s}}}:{kind}"))
            .query_async(&mut redis)
            .await
            .expect("MEMORY USAGE");
        usage.push(format!("{kind} {} B", bytes.unwrap_or(0)));
    }
    println!("a finished 2-event stream (async-echo, 1-byte payloads) keeps: {}", usage.join(", "));

    // The log expires, the meta stays.
    eventually(DEADLINE, || {
        let mut redis = redis.clone();
        async move {
            let got = exist(&mut redis, s).await;
            anyhow::ensure!(got == (true, false, false), "(meta, pend, log) exist: {got:?}");
            Ok(())
        }
    })
    .await;
    let late = process(&cluster, vec![event(s, 0, "async-echo", b"again".to_vec())]).await;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].status(), ResultStatus::Rejected, "{late:?}");
    assert_eq!(late[0].code, tonic::Code::OutOfRange as i32, "{late:?}");
    let mut submit = cluster.harmonizer();
    let refused = submit.submit(event(s, 1, "async-echo", b"again".to_vec())).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("no longer kept"), "{refused:?}");
    assert!(exist(&mut redis, s).await.0, "the tombstone is still there: the resends were not stored");

    // The tombstone expires: the stream is new.
    eventually(DEADLINE, || {
        let mut redis = redis.clone();
        async move {
            let got = exist(&mut redis, s).await;
            anyhow::ensure!(got == (false, false, false), "(meta, pend, log) exist: {got:?}");
            Ok(())
        }
    })
    .await;
    let new = process(&cluster, vec![event(s, 0, "async-echo", b"new".to_vec())]).await;
    let got: Vec<(u64, u64, ResultStatus, &[u8])> =
        new.iter().map(|r| (r.sequence, r.position, r.status(), r.payload.as_ref())).collect();
    assert_eq!(got, vec![(0, 0, ResultStatus::Ok, b"new".as_slice())], "processed and released again, as new");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_tombstone_the_stream_is_new_once_its_log_expired() {
    let cluster = Cluster::builder()
        .workers(1)
        .reassembler_args(["--stream-ttl", STREAM_TTL, "--tombstone-ttl", "0"])
        .start()
        .await;
    let client = redis::Client::open(cluster.redis_url()).expect("url");
    let redis = client.get_multiplexed_async_connection().await.expect("connects");
    let s = "no-tombstone";
    let first = process(&cluster, vec![event(s, 0, "async-echo", b"a".to_vec())]).await;
    assert_eq!(first.iter().map(|r| r.status()).collect::<Vec<_>>(), vec![ResultStatus::Ok]);
    eventually(DEADLINE, || {
        let mut redis = redis.clone();
        async move {
            let got = exist(&mut redis, s).await;
            anyhow::ensure!(got == (false, false, false), "(meta, pend, log) exist: {got:?}");
            Ok(())
        }
    })
    .await;
    let again = process(&cluster, vec![event(s, 0, "async-echo", b"again".to_vec())]).await;
    let got: Vec<(u64, ResultStatus, &[u8])> =
        again.iter().map(|r| (r.sequence, r.status(), r.payload.as_ref())).collect();
    assert_eq!(got, vec![(0, ResultStatus::Ok, b"again".as_slice())], "processed again");
}
