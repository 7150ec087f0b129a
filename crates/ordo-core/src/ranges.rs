//! A set of `u64` kept as sorted, disjoint, non-adjacent ranges: the
//! sequences a call has accepted, in memory proportional to its gaps rather
//! than to its length.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn contains(&self, value: u64) -> bool {
        self.ranges.range(..=value).next_back().is_some_and(|(_, &end)| value < end)
    }

    /// Inserts `value`; false if it was already present.
    pub fn insert(&mut self, value: u64) -> bool {
        if self.contains(value) {
            return false;
        }
        let end = value.saturating_add(1);
        let mut start = value;
        let mut new_end = end;
        if let Some((&s, &e)) = self.ranges.range(..value).next_back()
            && e == value
        {
            start = s;
        }
        if let Some(&e) = self.ranges.get(&end) {
            new_end = e;
            self.ranges.remove(&end);
        }
        self.ranges.insert(start, new_end);
        true
    }

    /// Number of disjoint ranges (a measure of memory use).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sequential_inserts_stay_one_range() {
        let mut set = RangeSet::new();
        for v in 0..1000 {
            assert!(set.insert(v));
        }
        assert_eq!(set.ranges(), 1);
        assert!(!set.insert(500));
        assert!(set.contains(999) && !set.contains(1000));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(values in proptest::collection::vec(0u64..200, 0..400)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for v in values {
                prop_assert_eq!(set.insert(v), model.insert(v));
            }
            for v in 0..210 {
                prop_assert_eq!(set.contains(v), model.contains(&v));
            }
            // Ranges are maximal: as many as the model has runs.
            let runs = model.iter().zip(model.iter().skip(1)).filter(|(a, b)| **b != **a + 1).count()
                + usize::from(!model.is_empty());
            prop_assert_eq!(set.ranges(), runs);
        }
    }
}
