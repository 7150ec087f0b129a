//! The events in flight, without I/O: each (key, sequence) sent to the
//! harmonizer and not yet settled, with the JetStream deliveries to ack once
//! its result is back. Kept in (key, sequence) order, so a new `Process` call
//! resends every key's events in sequence order. Bounded by the consumer's
//! `max_ack_pending`: a message is here until it is acked.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ordo_proto::Event;

/// One event in flight.
#[derive(Debug)]
pub struct Entry<M> {
    pub event: Event,
    /// (stream sequence, delivery) — one per position; a redelivery of the
    /// same position replaces the older handle.
    pub deliveries: Vec<(u64, M)>,
    /// When the last in-progress ack (or the delivery) told JetStream to wait.
    progressed: Instant,
}

/// The table of events in flight.
#[derive(Debug)]
pub struct Flight<M> {
    entries: BTreeMap<(String, u64), Entry<M>>,
}

impl<M> Default for Flight<M> {
    fn default() -> Self {
        Self { entries: BTreeMap::new() }
    }
}

impl<M: Clone> Flight<M> {
    /// Records a delivery of `position` as event (`key`, `sequence`); true if
    /// the event is new (then it must be sent), false if it is already in
    /// flight (the delivery joins it and is acked with it).
    pub fn insert(
        &mut self,
        key: &str,
        sequence: u64,
        position: u64,
        delivery: M,
        event: impl FnOnce() -> Event,
        now: Instant,
    ) -> bool {
        match self.entries.get_mut(&(key.to_owned(), sequence)) {
            Some(entry) => {
                match entry.deliveries.iter_mut().find(|(p, _)| *p == position) {
                    Some(slot) => slot.1 = delivery,
                    None => entry.deliveries.push((position, delivery)),
                }
                entry.progressed = now;
                false
            }
            None => {
                self.entries.insert(
                    (key.to_owned(), sequence),
                    Entry { event: event(), deliveries: vec![(position, delivery)], progressed: now },
                );
                true
            }
        }
    }

    /// The event (`key`, `sequence`) if it is in flight.
    pub fn event(&self, key: &str, sequence: u64) -> Option<Event> {
        self.entries.get(&(key.to_owned(), sequence)).map(|entry| entry.event.clone())
    }

    /// Removes (`key`, `sequence`): its result is back.
    pub fn settle(&mut self, key: &str, sequence: u64) -> Option<Entry<M>> {
        self.entries.remove(&(key.to_owned(), sequence))
    }

    /// Every event in flight, per key in sequence order.
    pub fn events(&self) -> Vec<Event> {
        self.entries.values().map(|entry| entry.event.clone()).collect()
    }

    /// Deliveries whose last word to JetStream is `every` old: they get an
    /// in-progress ack now (and are marked so).
    pub fn due_progress(&mut self, now: Instant, every: Duration) -> Vec<M> {
        let mut due = Vec::new();
        for entry in self.entries.values_mut() {
            if now.saturating_duration_since(entry.progressed) >= every {
                entry.progressed = now;
                due.extend(entry.deliveries.iter().map(|(_, delivery)| delivery.clone()));
            }
        }
        due
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, sequence: u64) -> Event {
        Event { stream_id: format!("src:{key}"), sequence, ..Default::default() }
    }

    #[test]
    fn a_redelivery_joins_its_event_and_a_new_call_resends_in_order() {
        let now = Instant::now();
        let mut flight = Flight::default();
        assert!(flight.insert("b", 1, 12, "d12", || event("b", 1), now));
        assert!(flight.insert("a", 0, 10, "d10", || event("a", 0), now));
        assert!(flight.insert("b", 0, 11, "d11", || event("b", 0), now));
        assert!(!flight.insert("b", 0, 11, "d11-again", || panic!("not rebuilt"), now), "a redelivery is no new event");
        assert_eq!(flight.len(), 3);
        let order: Vec<(String, u64)> = flight.events().into_iter().map(|e| (e.stream_id, e.sequence)).collect();
        assert_eq!(order, [("src:a".into(), 0), ("src:b".into(), 0), ("src:b".into(), 1)]);
        let settled = flight.settle("b", 0).expect("in flight");
        assert_eq!(settled.deliveries, vec![(11, "d11-again")], "the newest handle of the position is acked");
        assert!(flight.settle("b", 0).is_none(), "a second result settles nothing");
        assert_eq!(flight.event("a", 0).map(|e| e.sequence), Some(0));
    }

    #[test]
    fn in_progress_acks_go_to_deliveries_that_waited_long_enough_once_per_period() {
        let start = Instant::now();
        let mut flight = Flight::default();
        flight.insert("a", 0, 1, 1, || event("a", 0), start);
        flight.insert("b", 0, 2, 2, || event("b", 0), start + Duration::from_secs(5));
        let every = Duration::from_secs(10);
        assert!(flight.due_progress(start + Duration::from_secs(9), every).is_empty());
        assert_eq!(flight.due_progress(start + Duration::from_secs(10), every), vec![1]);
        assert!(flight.due_progress(start + Duration::from_secs(12), every).is_empty(), "not again at once");
        assert_eq!(flight.due_progress(start + Duration::from_secs(15), every), vec![2]);
    }
}
