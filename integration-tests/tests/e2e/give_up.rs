//! An event whose every attempt times out must not stall its stream: after
//! `--max-attempts` the harmonizer releases a FAILED result in its place, the
//! stream goes on in order, and the late results of the abandoned attempts are
//! dropped (the reassembler keeps the first result of each sequence).

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    Cluster, ProcessCall,
    client::{LINGER, check_in_order_exactly_once, event, with_attr},
};
use ordo_proto::{ResultStatus, v1::GetStreamRequest};

use crate::DEADLINE;

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_event_is_released_as_failed_in_its_place_and_late_results_are_dropped() {
    const N: u64 = 20;
    const STUCK: u64 = 5;
    let cluster = Cluster::builder()
        .workers(2)
        .harmonizer_args(["--event-timeout", "300ms", "--max-attempts", "2"])
        .start()
        .await;
    let stream = "give-up";
    let events = (0..N)
        .map(|seq| {
            // Every attempt of STUCK outlives the event timeout (2 × 300 ms).
            let latency = if seq == STUCK { "fixed:2s" } else { "fixed:1ms" };
            with_attr(event(stream, seq, "async-echo", format!("{seq}").into_bytes()), "latency", latency)
        })
        .collect();
    let mut call = ProcessCall::open(&cluster.harmonizer());
    call.feed(events, None);
    call.wait_for_counts(&BTreeMap::from([(stream.to_owned(), N as usize)]), DEADLINE)
        .await
        .expect("the stream completes although one event never does");
    let results = call.finish(LINGER).await.expect("the call ends cleanly");

    if let Err(e) = check_in_order_exactly_once(&results, N) {
        panic!("{e}");
    }
    for result in &results {
        if result.sequence == STUCK {
            assert_eq!(result.status(), ResultStatus::Failed, "the stuck event is FAILED: {result:?}");
            assert!(result.error.contains("2 attempts"), "the error says why: {:?}", result.error);
        } else {
            assert_eq!(result.status(), ResultStatus::Ok, "{result:?}");
            assert_eq!(result.payload, format!("{}", result.sequence).into_bytes());
        }
    }

    // Both abandoned attempts finish ~2 s after they started; their results
    // must not be released a second time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let state = cluster
        .reassembler(0)
        .get_stream(GetStreamRequest { stream_id: stream.to_owned() })
        .await
        .expect("stream state")
        .into_inner();
    assert_eq!((state.released, state.next_sequence, state.pending), (N, N, 0), "{state:?}");
}
