//! Who works on which samples. Epoch e's samples are the positions `0..n` of a permutation
//! seeded by (seed, e). Each round hands the round's members up to `per_round` positions each,
//! in rank order: first what a lost member left undone ([`EpochCursor::redo`]), then the next
//! positions from the cursor. A member's positions are trained once its update is part of the
//! round that closes; those of a member whose update was missing go back to be redone. So
//! membership can change every round, and within an epoch every position is trained exactly
//! once. Pure data structures, so a test (or a single process) can recompute any round.

use std::ops::Range;

use capsnet_core::checkpoint::DataPosition;

/// What of an epoch is left to hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochCursor {
    pub epoch: u64,
    /// Positions in the epoch.
    pub n: usize,
    /// Positions `0..cursor` were handed out (trained, in flight, or in `redo`).
    pub cursor: usize,
    /// Handed out but not trained: sorted, disjoint, below `cursor`.
    pub redo: Vec<Range<usize>>,
}

impl EpochCursor {
    pub fn new(epoch: u64, n: usize) -> Self {
        EpochCursor {
            epoch,
            n,
            cursor: 0,
            redo: vec![],
        }
    }

    /// The cursor a checkpoint's data position describes; positions outside the epoch are
    /// clamped to it (a checkpoint of a larger data set is refused earlier, by its length).
    pub fn from_position(p: &DataPosition, n: usize) -> Self {
        let mut c = EpochCursor::new(p.epoch, n);
        c.cursor = (p.offset as usize).min(n);
        for &(a, b) in &p.redo {
            let (a, b) = ((a as usize).min(c.cursor), (b as usize).min(c.cursor));
            if a < b {
                c.give_back(a..b);
            }
        }
        c
    }

    /// The data position a checkpoint stores, exact: nothing in flight is counted as trained.
    pub fn position(&self) -> DataPosition {
        DataPosition {
            epoch: self.epoch,
            offset: self.cursor as u64,
            redo: self
                .redo
                .iter()
                .map(|r| (r.start as u64, r.end as u64))
                .collect(),
        }
    }

    /// True when every position was handed out and none waits to be redone.
    pub fn exhausted(&self) -> bool {
        self.cursor >= self.n && self.redo.is_empty()
    }

    /// Hands `members` members one contiguous range of at most `per_round` positions each, in
    /// order: redo ranges first (split when longer), then the cursor. Members past the end of
    /// the epoch get empty ranges.
    pub fn hand_out(&mut self, members: usize, per_round: usize) -> Vec<Range<usize>> {
        let per_round = per_round.max(1);
        (0..members)
            .map(|_| {
                if let Some(r) = self.redo.first_mut() {
                    let take = r.start..(r.start + per_round).min(r.end);
                    r.start = take.end;
                    if r.start >= r.end {
                        self.redo.remove(0);
                    }
                    take
                } else {
                    let take = self.cursor..(self.cursor + per_round).min(self.n);
                    self.cursor = take.end;
                    take
                }
            })
            .collect()
    }

    /// Positions handed out but not trained: redone before the cursor moves on.
    pub fn give_back(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        let at = self.redo.partition_point(|x| x.start < r.start);
        self.redo.insert(at, r);
        // Merge neighbours that touch, so a range is handed out whole when it fits.
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(self.redo.len());
        for x in self.redo.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end >= x.start => last.end = last.end.max(x.end),
                _ => merged.push(x),
            }
        }
        self.redo = merged;
        // Work that ends at the cursor is simply not handed out yet.
        while let Some(last) = self.redo.last().filter(|r| r.end >= self.cursor) {
            self.cursor = last.start;
            self.redo.pop();
        }
    }
}

/// One round: its members in rank order and the positions each was handed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundPlan {
    pub round: u64,
    pub epoch: u64,
    /// Worker names in rank order; index = member slot of the round.
    pub members: Vec<String>,
    pub work: Vec<Range<usize>>,
}

impl RoundPlan {
    pub fn member_index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m == name)
    }

    /// Positions member `k` works on this round (empty past the end of the epoch).
    pub fn work(&self, k: usize) -> Range<usize> {
        self.work.get(k).cloned().unwrap_or(0..0)
    }
}

/// The positions member `k` of `members` trains in round `r` of an epoch of `n` in which no
/// member was lost or added: round `r` takes positions `r * members * per_round` onward, in
/// member order. (The same order as one process with batch `members * per_round`.)
pub fn steady_work(n: usize, members: usize, per_round: usize, k: usize, r: u64) -> Range<usize> {
    let start = ((r as usize * members + k) * per_round).min(n);
    start..(start + per_round).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks each handed-out range in `seen`, failing on a position handed out twice.
    fn mark(seen: &mut [u32], r: &Range<usize>) {
        for i in r.clone() {
            seen[i] += 1;
        }
    }

    #[test]
    fn a_steady_epoch_is_the_cursor_in_member_order() {
        let mut c = EpochCursor::new(4, 100);
        let mut seen = [0u32; 100];
        let mut r = 0;
        while !c.exhausted() {
            let work = c.hand_out(3, 8);
            for (k, w) in work.iter().enumerate() {
                assert_eq!(w, &steady_work(100, 3, 8, k, r));
                mark(&mut seen, w);
            }
            r += 1;
        }
        assert_eq!(r, 5); // 100 positions in rounds of 24
        assert!(seen.iter().all(|&s| s == 1));
    }

    /// Members come and go at random; the ranges of members "lost" in a round go back. Every
    /// position is trained exactly once.
    #[test]
    fn lost_work_is_redone_and_nothing_twice_across_changing_members() {
        let mut rng = capsnet_core::rng::Rng::new(9);
        for trial in 0..50 {
            let n = 50 + trial * 7;
            let mut c = EpochCursor::new(0, n);
            let mut trained = vec![0u32; n];
            let mut rounds = 0;
            while !c.exhausted() {
                rounds += 1;
                assert!(rounds < 10_000, "no progress");
                let members = 1 + (rng.uniform(0.0, 4.0) as usize);
                let work = c.hand_out(members, 1 + (rng.uniform(0.0, 9.0) as usize));
                for w in work {
                    if rng.uniform(0.0, 1.0) < 0.3 {
                        c.give_back(w); // the member died: its update never came
                    } else {
                        mark(&mut trained, &w);
                    }
                }
                // A checkpoint here and a resume from it lose nothing.
                let p = c.position();
                assert_eq!(EpochCursor::from_position(&p, n), c);
            }
            assert!(
                trained.iter().all(|&t| t == 1),
                "trial {trial}: {trained:?}"
            );
        }
    }

    #[test]
    fn give_back_keeps_redo_sorted_and_merged() {
        let mut c = EpochCursor::new(0, 40);
        c.hand_out(4, 10);
        c.give_back(20..30);
        c.give_back(0..5);
        c.give_back(30..32);
        assert_eq!(c.redo, vec![0..5, 20..32]);
        assert_eq!(c.hand_out(3, 4), vec![0..4, 4..5, 20..24]);
        assert_eq!(c.redo, vec![24..32]);
        assert!(!c.exhausted());
        assert_eq!(c.hand_out(3, 4), vec![24..28, 28..32, 40..40]);
        assert!(c.exhausted());
    }

    #[test]
    fn work_given_back_at_the_cursor_moves_the_cursor_back() {
        let mut c = EpochCursor::new(0, 40);
        let work = c.hand_out(2, 8);
        c.give_back(work[1].clone());
        assert_eq!((c.cursor, c.redo.clone()), (8, vec![]));
        c.give_back(work[0].clone());
        assert_eq!(c, EpochCursor::new(0, 40));
    }
}
