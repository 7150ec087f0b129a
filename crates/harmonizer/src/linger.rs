//! Which settled streams a `Process` call forgets, and when.
//!
//! A call stops following a stream once everything it accepted there is
//! settled, so its memory (and the push-gateway's) is bounded by the streams
//! in use, not by every stream it has seen. Forgetting at the very moment a
//! stream settles is too eager for streams used in turns (one event each
//! over many streams, then the next round: many-streams workload (d)): every
//! event would then read its stream's state from Redis again and open a new
//! follow session on the gateway, about five times the CPU per event at
//! 32,768 streams. So a settled stream lingers for [`LINGER`] and is forgotten
//! only if it stayed settled that long; at most [`MAX_LINGERING`] streams
//! linger at once (beyond it the longest-settled one goes at once), which is
//! the memory bound.

use std::{collections::VecDeque, time::Duration};

use ordo_core::hash::Map;
use tokio::time::Instant;

/// How long a settled stream stays followed before the call forgets it.
pub const LINGER: Duration = Duration::from_secs(2);
/// Most settled streams kept at once per call.
pub const MAX_LINGERING: usize = 16_384;

/// Settled streams in the order they settled.
#[derive(Debug, Default)]
pub struct Lingering {
    /// Stream → when it last settled (the only entry of `order` that counts).
    since: Map<String, Instant>,
    /// (stream, settled at), oldest first; entries older than `since` are stale.
    order: VecDeque<(String, Instant)>,
}

impl Lingering {
    /// `stream` is settled at `now` (again: the latest time counts).
    pub fn settled(&mut self, stream: &str, now: Instant) {
        match self.since.get_mut(stream) {
            Some(at) => *at = now,
            None => {
                self.since.insert(stream.to_owned(), now);
            }
        }
        self.order.push_back((stream.to_owned(), now));
    }

    /// The streams whose linger is over at `now`, or that exceed
    /// [`MAX_LINGERING`], oldest first. The caller forgets each one that is
    /// still settled (one used again meanwhile is not, and settles again later).
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while let Some((stream, at)) = self.order.front() {
            if self.since.get(stream) != Some(at) {
                self.order.pop_front();
                continue;
            }
            if *at + LINGER > now && self.since.len() <= MAX_LINGERING {
                break;
            }
            if let Some((stream, _)) = self.order.pop_front() {
                self.since.remove(&stream);
                due.push(stream);
            }
        }
        due
    }

    /// When [`Self::due`] next has something to say (a stale entry may make
    /// it earlier than needed: then it returns nothing).
    pub fn next_due(&self) -> Option<Instant> {
        self.order.front().map(|(_, at)| *at + LINGER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_due_once_it_stayed_settled_for_the_linger() {
        let start = Instant::now();
        let mut lingering = Lingering::default();
        lingering.settled("a", start);
        lingering.settled("b", start + Duration::from_millis(500));
        assert!(lingering.due(start + LINGER - Duration::from_millis(1)).is_empty());
        assert_eq!(lingering.next_due(), Some(start + LINGER));
        assert_eq!(lingering.due(start + LINGER), vec!["a".to_owned()]);
        assert_eq!(lingering.due(start + LINGER + Duration::from_millis(500)), vec!["b".to_owned()]);
        assert_eq!(lingering.next_due(), None);
    }

    #[test]
    fn settling_again_restarts_the_linger() {
        let start = Instant::now();
        let mut lingering = Lingering::default();
        lingering.settled("a", start);
        lingering.settled("a", start + Duration::from_secs(1));
        assert!(lingering.due(start + LINGER).is_empty(), "the first settlement is stale");
        assert_eq!(lingering.due(start + Duration::from_secs(1) + LINGER), vec!["a".to_owned()]);
        assert!(lingering.due(start + Duration::from_secs(60)).is_empty(), "due once");
    }

    #[test]
    fn beyond_the_cap_the_longest_settled_go_at_once() {
        let now = Instant::now();
        let mut lingering = Lingering::default();
        for i in 0..MAX_LINGERING + 3 {
            lingering.settled(&format!("s{i}"), now);
        }
        assert_eq!(lingering.due(now), vec!["s0".to_owned(), "s1".to_owned(), "s2".to_owned()]);
        assert!(lingering.due(now).is_empty());
    }
}
