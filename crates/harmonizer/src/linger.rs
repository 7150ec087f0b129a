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
//! only if it stayed settled that long (between [`LINGER`] and twice that
//! after it last settled, see [`Lingering`]); at most [`MAX_LINGERING`]
//! streams linger at once (beyond it the one queued longest goes at once),
//! which is the memory bound.

use std::{collections::VecDeque, time::Duration};

use ordo_core::hash::Map;
use tokio::time::Instant;

/// How long a settled stream stays followed before the call forgets it.
pub const LINGER: Duration = Duration::from_secs(2);
/// Most settled streams kept at once per call.
pub const MAX_LINGERING: usize = 16_384;

/// Settled streams, roughly in the order they settled.
///
/// A stream settles again and again while it is used in turns (after each
/// of its results), so settling again only moves its time in `since`: no
/// allocation and no queue entry per settlement. Each lingering stream has
/// one entry in `order`, with the time it had when queued; one that settled
/// again since is queued again at its latest time when it reaches the front.
/// So `order` is sorted only roughly, and a stream is forgotten between
/// [`LINGER`] and twice that after it last settled.
#[derive(Debug, Default)]
pub struct Lingering {
    /// Stream → when it last settled.
    since: Map<String, Instant>,
    /// One (stream, settled at) per stream of `since`, queued in the order
    /// they first settled; a time older than `since` is out of date.
    order: VecDeque<(String, Instant)>,
}

impl Lingering {
    /// `stream` is settled at `now` (again: the latest time counts).
    pub fn settled(&mut self, stream: &str, now: Instant) {
        match self.since.get_mut(stream) {
            Some(at) => *at = now,
            None => {
                self.since.insert(stream.to_owned(), now);
                self.order.push_back((stream.to_owned(), now));
            }
        }
    }

    /// The streams whose linger is over at `now`, or that exceed
    /// [`MAX_LINGERING`], in queue order. The caller forgets each one that is
    /// still settled (one used again meanwhile is not, and settles again later).
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        // An entry is queued again at most once per call: after that its
        // time is its latest (nothing settles meanwhile).
        while let Some((stream, at)) = self.order.front() {
            let Some(&latest) = self.since.get(stream) else {
                self.order.pop_front(); // not lingering any more (cannot happen: one entry per stream)
                continue;
            };
            let capped = self.since.len() > MAX_LINGERING;
            if latest != *at && !capped {
                if let Some((stream, _)) = self.order.pop_front() {
                    self.order.push_back((stream, latest));
                }
                continue;
            }
            if latest + LINGER > now && !capped {
                break;
            }
            if let Some((stream, _)) = self.order.pop_front() {
                self.since.remove(&stream);
                due.push(stream);
            }
        }
        due
    }

    /// When [`Self::due`] next has something to say (an out-of-date entry
    /// may make it earlier than needed: then it returns nothing).
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
    fn settling_again_queues_nothing_and_a_requeued_stream_is_still_forgotten() {
        let start = Instant::now();
        let mut lingering = Lingering::default();
        for i in 0..100 {
            lingering.settled("a", start + Duration::from_millis(i));
        }
        lingering.settled("b", start + Duration::from_millis(200));
        assert_eq!(lingering.order.len(), 2, "one entry per stream, however often it settled");
        // a's queued time is out of date: it goes behind b, at its latest time.
        assert!(lingering.due(start + LINGER).is_empty());
        assert_eq!(lingering.order.len(), 2);
        // b is due first now (queued first), a right after its own linger.
        assert_eq!(lingering.due(start + LINGER + Duration::from_millis(200)), vec!["b".to_owned(), "a".to_owned()]);
        assert!(lingering.order.is_empty() && lingering.since.is_empty());
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
