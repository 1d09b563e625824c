//! Who works on which samples: per epoch, a permutation seeded by (seed, epoch) cut into one
//! contiguous slice per member; each round a member takes the next `batch x steps` positions of
//! its slice. Pure functions, so a test (or a single process) can recompute any round's samples.

use std::ops::Range;

/// Positions `[start, end)` of the epoch permutation that member `k` of `members` owns.
pub fn slice(n: usize, members: usize, k: usize) -> Range<usize> {
    (k * n / members)..((k + 1) * n / members)
}

/// The membership of one epoch and the rounds it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    pub epoch: u64,
    /// Worker names in rank order; index = member slot.
    pub members: Vec<String>,
    /// Samples per member per round (batch size x local steps).
    pub per_round: usize,
    pub n: usize,
    /// Rounds in this epoch: enough for the longest slice.
    pub rounds: u64,
}

impl EpochPlan {
    pub fn new(epoch: u64, members: Vec<String>, n: usize, per_round: usize) -> Self {
        let m = members.len().max(1);
        let longest = (0..m).map(|k| slice(n, m, k).len()).max().unwrap_or(0);
        let rounds = longest.div_ceil(per_round.max(1)).max(1) as u64;
        EpochPlan {
            epoch,
            members,
            per_round,
            n,
            rounds,
        }
    }

    pub fn member_index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m == name)
    }

    /// Positions of the permutation member `k` works on in round `r` of the epoch (may be
    /// empty when its slice is shorter than the longest).
    pub fn work(&self, k: usize, r: u64) -> Range<usize> {
        let s = slice(self.n, self.members.len().max(1), k);
        let start = (s.start + r as usize * self.per_round).min(s.end);
        start..(start + self.per_round).min(s.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_tile_the_epoch_and_rounds_cover_them() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = EpochPlan::new(4, names, 100, 8);
        assert_eq!(p.rounds, 5); // slices of 33, 33, 34 samples in rounds of 8
        let mut seen = [false; 100];
        for k in 0..3 {
            for r in 0..p.rounds {
                for i in p.work(k, r) {
                    assert!(!seen[i], "position {i} twice");
                    seen[i] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(p.work(0, 4), 32..33);
        assert_eq!(p.member_index("c"), Some(2));
    }
}
