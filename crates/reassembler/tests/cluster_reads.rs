//! The reassembler's reads over the whole keyspace on a private Redis
//! Cluster (3 masters, 1 replica each; the testkit's `redis_cluster`), where
//! one SCAN reaches one node: `ListDeadLetters` / `GetDeadLetter` over the
//! per-slot dead-letter logs (found on every master, merged in id order, ids
//! carrying their slot), and the `ordo_results_pending` sample summing the
//! pending hashes of every master. The same listing on one node keeps the
//! global log's plain ids.

use std::collections::BTreeSet;

use integration_tests::{redis_cluster::RedisCluster, redis_server::RedisServer};
use ordo_core::keys;
use ordo_proto::v1::{DeadLetter, Event, EventResult, GetDeadLetterRequest, ListDeadLettersRequest, OrderingMode};
use ordo_runtime::redis_conn::{self, Master};
use prost::Message;
use reassembler::{
    dead_letters,
    service::Error,
    store::{Item, Store, StoreConfig},
};

fn config() -> StoreConfig {
    StoreConfig {
        retention: 1_000_000,
        ttl_ms: 60_000,
        tombstone_ms: 60_000,
        dead_letter_retention: 1_000_000,
        wait_replicas: 0,
        wait_timeout_ms: 0,
    }
}

fn item(stream: &str, sequence: u64, failed: bool) -> Item {
    let status = if failed { ordo_proto::ResultStatus::Failed } else { ordo_proto::ResultStatus::Ok };
    let result = EventResult {
        stream_id: stream.into(),
        sequence,
        status: status as i32,
        error: if failed { format!("{stream}#{sequence} failed") } else { String::new() },
        ..Default::default()
    };
    let dead_letter = if failed {
        DeadLetter {
            event: Some(Event { stream_id: stream.into(), sequence, operation: "op".into(), ..Default::default() }),
            status: status as i32,
            attempts: 1,
            error: result.error.clone(),
            at_unix_ms: 1,
            ..Default::default()
        }
        .encode_to_vec()
    } else {
        Vec::new()
    };
    Item { stream_id: stream.into(), sequence, mode: OrderingMode::Ordered, body: result.encode_to_vec(), dead_letter }
}

/// Every dead letter, `limit` per page, following `next`: (id, stream, sequence).
async fn list_all(store: &Store, stream: &str, limit: u32) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = dead_letters::list(store, ListDeadLettersRequest { stream_id: stream.into(), after, limit })
            .await
            .expect("a listing");
        for letter in page.dead_letters {
            let event = letter.event.expect("an event");
            out.push((letter.id, event.stream_id, event.sequence));
        }
        if page.next.is_empty() {
            return out;
        }
        after = page.next;
    }
}

/// 40 streams over many slots, each with dead letters at sequences 1 and 3
/// (and OK results around them) written in four batches.
async fn store_dead_letters(store: &Store) -> BTreeSet<(String, u64)> {
    let streams: Vec<String> = (0..40).map(|i| format!("dlq-{i}")).collect();
    let mut expected = BTreeSet::new();
    for sequence in 0..4u64 {
        let failed = sequence % 2 == 1;
        let batch: Vec<Item> = streams.iter().map(|s| item(s, sequence, failed)).collect();
        store.apply(&batch).await.expect("script calls");
        if failed {
            expected.extend(streams.iter().map(|s| (s.clone(), sequence)));
        }
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dead_letters_of_every_slot_are_listed_once_in_id_order_and_found_by_their_ids() {
    let cluster = RedisCluster::start().await.expect("a private redis cluster");
    let store = Store::new(ordo_runtime::redis_conn::connect(&cluster.url()).expect("url"), config());
    assert!(store.is_cluster());
    let expected = store_dead_letters(&store).await;
    let slots: BTreeSet<u16> = expected.iter().map(|(s, _)| keys::stream_slot(s)).collect();
    assert!(slots.len() > 10, "the streams spread over many slots: {slots:?}");
    // The per-master helpers the listing stands on: every master once, the
    // keyspace split between them.
    let conn = ordo_runtime::redis_conn::connect(&cluster.url()).expect("url");
    let sizes: Vec<(Master, u64)> = redis_conn::for_each_master(&conn, &redis::cmd("DBSIZE")).await.expect("DBSIZE");
    assert_eq!(sizes.len(), 3, "three masters: {sizes:?}");
    assert_eq!(sizes.iter().map(|(m, _)| m).collect::<BTreeSet<_>>().len(), 3, "{sizes:?}");
    assert!(sizes.iter().all(|(_, n)| *n > 0), "the streams spread over every master: {sizes:?}");
    let all = redis_conn::scan_keys(&conn, "*", 100).await.expect("SCAN of every master");
    assert_eq!(all.len() as u64, sizes.iter().map(|(_, n)| n).sum::<u64>(), "each key once");
    let logs = store.dead_letter_logs().await.expect("the logs");
    assert_eq!(
        logs.iter().filter_map(|(slot, _)| *slot).collect::<BTreeSet<_>>(),
        slots,
        "one log per slot, found on every master"
    );

    // Pages of 7: each dead letter once, ids unique and in (entry id, slot) order.
    let listed = list_all(&store, "", 7).await;
    let got: BTreeSet<(String, u64)> = listed.iter().map(|(_, s, q)| (s.clone(), *q)).collect();
    assert_eq!(listed.len(), expected.len(), "no dead letter listed twice");
    assert_eq!(got, expected, "every dead letter listed");
    let order: Vec<((u64, u64), u16)> = listed
        .iter()
        .map(|(id, stream, _)| {
            let (entry, slot) = id.split_once('@').expect("a cluster id names its slot");
            let slot: u16 = slot.parse().expect("a slot number");
            assert_eq!(slot, keys::stream_slot(stream), "{id} is in its stream's slot");
            let (ms, n) = entry.split_once('-').expect("<ms>-<n>");
            ((ms.parse().expect("ms"), n.parse().expect("n")), slot)
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "oldest first, strictly: {order:?}");

    // Each by its id; the entry id alone is refused on a cluster.
    for (id, stream, sequence) in listed.iter().take(12) {
        let letter = dead_letters::get(&store, GetDeadLetterRequest { id: id.clone() }).await.expect("found by id");
        let event = letter.event.expect("an event");
        assert_eq!((&letter.id, &event.stream_id, event.sequence), (id, stream, *sequence));
    }
    let (first, _, _) = &listed[0];
    let bare = first.split_once('@').expect("slot").0.to_owned();
    let refused = dead_letters::get(&store, GetDeadLetterRequest { id: bare }).await;
    assert!(matches!(refused, Err(Error::Invalid(ref m)) if m.contains("@<slot>")), "{refused:?}");
    let other_slot =
        format!("{}@{}", first.split_once('@').expect("slot").0, (keys::stream_slot(&listed[0].1) + 1) % 16384);
    let missing = dead_letters::get(&store, GetDeadLetterRequest { id: other_slot }).await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "the same entry id in another slot's log: {missing:?}");

    // One stream's listing reads its slot's log: its two, in order.
    let one = list_all(&store, "dlq-7", 1).await;
    let sequences: Vec<u64> = one
        .iter()
        .map(|(_, s, q)| {
            assert_eq!(s, "dlq-7");
            *q
        })
        .collect();
    assert_eq!(sequences, [1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pending_results_are_summed_over_every_master() {
    let cluster = RedisCluster::start().await.expect("a private redis cluster");
    let store = Store::new(ordo_runtime::redis_conn::connect(&cluster.url()).expect("url"), config());
    assert_eq!(store.pending_results().await.expect("a sample"), (0, 0));
    // 30 streams, each with 2 results waiting for sequence 0.
    let streams: Vec<String> = (0..30).map(|i| format!("pend-{i}")).collect();
    let slots: BTreeSet<u16> = streams.iter().map(|s| keys::stream_slot(s)).collect();
    assert!(slots.len() > 10, "many slots");
    let batch: Vec<Item> = streams.iter().flat_map(|s| [item(s, 1, false), item(s, 2, false)]).collect();
    store.apply(&batch).await.expect("script calls");
    assert_eq!(store.pending_results().await.expect("a sample"), (30, 60));
    let firsts: Vec<Item> = streams.iter().take(10).map(|s| item(s, 0, false)).collect();
    store.apply(&firsts).await.expect("script calls");
    assert_eq!(store.pending_results().await.expect("a sample"), (20, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_dead_letters_keep_the_global_logs_plain_ids() {
    let redis = RedisServer::start().await.expect("a private redis");
    let store = Store::new(ordo_runtime::redis_conn::connect(&redis.url()).expect("url"), config());
    assert!(!store.is_cluster());
    let expected = store_dead_letters(&store).await;
    let listed = list_all(&store, "", 7).await;
    assert_eq!(listed.iter().map(|(_, s, q)| (s.clone(), *q)).collect::<BTreeSet<_>>(), expected);
    assert_eq!(listed.len(), expected.len());
    assert!(listed.iter().all(|(id, _, _)| !id.contains('@')), "plain entry ids on one node");
    let (id, _, _) = &listed[3];
    assert!(dead_letters::get(&store, GetDeadLetterRequest { id: id.clone() }).await.is_ok());
    let refused = dead_letters::get(&store, GetDeadLetterRequest { id: format!("{id}@5") }).await;
    assert!(matches!(refused, Err(Error::Invalid(_))), "a slot on a single node: {refused:?}");
    assert_eq!(store.pending_results().await.expect("a sample"), (0, 0));
    let conn = ordo_runtime::redis_conn::connect(&redis.url()).expect("url");
    assert_eq!(redis_conn::scan_keys(&conn, "ordo:dlq*", 100).await.expect("SCAN"), ["ordo:dlq"]);
    let sizes: Vec<(Master, u64)> = redis_conn::for_each_master(&conn, &redis::cmd("DBSIZE")).await.expect("DBSIZE");
    assert_eq!(sizes.len(), 1);
    assert_eq!(sizes[0].0, Master::Single);
}

/// `redis_conn::query_each` (the harmonizer's batched open of new streams,
/// one pipeline per slot on a cluster) answers every command in the order
/// given, the same as one command at a time, on a cluster and on one node.
async fn query_each_answers_in_order(url: &str) {
    let conn = redis_conn::connect(url).expect("url");
    let store = Store::new(redis_conn::connect(url).expect("url"), config());
    // Stream i has results 0..i stored: released = next = i (0 for pend-0: no state).
    let streams: Vec<String> = (0..40).map(|i| format!("each-{i}")).collect();
    let batch: Vec<Item> =
        streams.iter().enumerate().flat_map(|(i, s)| (0..i as u64).map(move |q| item(s, q, false))).collect();
    store.apply(&batch).await.expect("script calls");
    let commands: Vec<(u16, redis::Cmd)> = streams
        .iter()
        .rev()
        .map(|s| {
            let mut command = redis::cmd("HGET");
            command.arg(keys::meta(s)).arg("released");
            (keys::stream_slot(s), command)
        })
        .collect();
    let slots: BTreeSet<u16> = commands.iter().map(|(slot, _)| *slot).collect();
    assert!(slots.len() > 10, "the streams spread over many slots");
    let answers: Vec<Option<u64>> = redis_conn::query_each(&conn, &commands).await.expect("pipelines");
    let expected: Vec<Option<u64>> = (0..40u64).rev().map(|i| (i > 0).then_some(i)).collect();
    assert_eq!(answers, expected);
    let none: Vec<Option<u64>> = redis_conn::query_each(&conn, &[]).await.expect("nothing to ask");
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_query_each_answers_in_the_order_asked() {
    let cluster = RedisCluster::start().await.expect("a private redis cluster");
    query_each_answers_in_order(&cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_query_each_answers_in_the_order_asked() {
    let redis = RedisServer::start().await.expect("a private redis");
    query_each_answers_in_order(&redis.url()).await;
}
