//! Which offsets may be committed: a record counts as done once every endpoint that takes
//! it has delivered it or given it up (dead-lettered), and a partition's committed offset
//! never passes a record that is not done. Pure.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
struct Part {
    /// Offsets taken and the deliveries each still waits for.
    pending: BTreeMap<i64, usize>,
    /// One past the highest offset taken.
    next: Option<i64>,
}

/// In-flight records per partition.
#[derive(Debug, Default)]
pub struct Tracker {
    parts: BTreeMap<i32, Part>,
    in_flight: usize,
}

impl Tracker {
    /// A record taken in, waiting for `deliveries` deliveries (0: done at once).
    pub fn take(&mut self, partition: i32, offset: i64, deliveries: usize) {
        let part = self.parts.entry(partition).or_default();
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if deliveries > 0 {
            part.pending.insert(offset, deliveries);
            self.in_flight += 1;
        }
    }

    /// One delivery of a record is over (delivered or given up).
    pub fn done(&mut self, partition: i32, offset: i64) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        if let Some(left) = part.pending.get_mut(&offset) {
            *left -= 1;
            if *left == 0 {
                part.pending.remove(&offset);
                self.in_flight -= 1;
            }
        }
    }

    /// Records taken and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The offset to commit per partition: the first record not done, or one past the last
    /// taken when all are.
    pub fn committable(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .filter_map(|(p, part)| {
                let next = part.next?;
                Some((*p, part.pending.keys().next().copied().unwrap_or(next)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_stop_at_the_first_record_not_delivered_everywhere() {
        let mut t = Tracker::default();
        t.take(0, 10, 2);
        t.take(0, 11, 0); // no endpoint takes it
        t.take(0, 12, 1);
        t.take(3, 5, 1);
        assert_eq!(t.committable(), [(0, 10), (3, 5)]);
        assert_eq!(t.in_flight(), 3);
        t.done(0, 12);
        t.done(0, 10);
        assert_eq!(
            t.committable(),
            [(0, 10), (3, 5)],
            "one endpoint still owes 10"
        );
        t.done(0, 10);
        assert_eq!(t.committable(), [(0, 13), (3, 5)]);
        t.done(3, 5);
        t.done(3, 5); // a stray second completion changes nothing
        assert_eq!(t.committable(), [(0, 13), (3, 6)]);
        assert_eq!(t.in_flight(), 0);
    }

    proptest! {
        #[test]
        fn the_commit_never_passes_an_undelivered_record(
            deliveries in proptest::collection::vec(0usize..4, 1..60),
            order in proptest::collection::vec(any::<u16>(), 0..200),
        ) {
            let mut t = Tracker::default();
            let mut owed: Vec<usize> = deliveries.clone();
            for (o, d) in deliveries.iter().enumerate() {
                t.take(1, o as i64, *d);
            }
            for pick in order {
                let open: Vec<usize> = (0..owed.len()).filter(|i| owed[*i] > 0).collect();
                if open.is_empty() {
                    break;
                }
                let i = open[pick as usize % open.len()];
                owed[i] -= 1;
                t.done(1, i as i64);
                let committed = t.committable()[0].1 as usize;
                prop_assert!(owed[..committed].iter().all(|o| *o == 0));
                prop_assert!(committed == owed.len() || owed[committed] > 0);
            }
        }
    }
}
