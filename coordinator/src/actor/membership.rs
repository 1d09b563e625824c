//! Membership: workers join, leave, die (a closed connection, silent heartbeats, a missed
//! deadline) and come back; the table of states is in the parent module's doc.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use capsnet_proto::{WorkerState, pb};

use super::Actor;
use crate::error::{CoordinatorError, Result};
use crate::liveness::Liveness;
use crate::plan::RoundPlan;

/// The registry of workers: by name (a restarted process rejoins under its name), and session
/// id to name (every RPC after the join names its session).
pub(super) struct Members {
    pub(super) workers: BTreeMap<String, Worker>,
    pub(super) names: HashMap<String, String>,
    /// Session ids are `<prefix>-<n>`: the prefix changes with every coordinator process, so a
    /// session of an earlier process is never taken for one of this.
    pub(super) id_prefix: String,
    pub(super) next_id: u64,
    /// When the first worker joined (for --start-timeout).
    pub(super) first_join: Option<Instant>,
    /// Heartbeat stamps and closed connections, recorded outside the actor's queue.
    pub(super) liveness: Liveness,
    pub(super) ranks: Ranks,
}

/// Unhealthy or departed workers are forgotten this long after they went.
pub(super) const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Ranks in use, and the free ones below the highest ever given: a join takes its hint or the
/// smallest free rank in O(log n).
#[derive(Default)]
pub(super) struct Ranks {
    taken: BTreeSet<u32>,
    free: BTreeSet<u32>,
    next: u32,
}

impl Ranks {
    /// Takes `hint` when it is free (and below `limit`, the registry's bound), else the
    /// smallest free rank.
    pub(super) fn take(&mut self, hint: Option<u32>, limit: usize) -> u32 {
        let r = match hint {
            Some(h) if (h as usize) < limit && !self.taken.contains(&h) => h,
            _ => match self.free.pop_first() {
                Some(r) => r,
                None => self.next,
            },
        };
        self.free.remove(&r);
        if r >= self.next {
            self.free.extend(self.next..r);
            self.next = r + 1;
        }
        self.taken.insert(r);
        r
    }

    pub(super) fn release(&mut self, r: u32) {
        if self.taken.remove(&r) {
            self.free.insert(r);
        }
    }
}

pub(super) struct Worker {
    pub(super) id: String,
    pub(super) rank: u32,
    pub(super) state: WorkerState,
    /// The last time it was heard from (a heartbeat, a join, a pull or an update).
    pub(super) last_seen: Instant,
    pub(super) last_round: u64,
    /// Its update time over the median of the round's, a moving average; rounds it counts.
    pub(super) pace: f64,
    pub(super) paced: u32,
    /// Rounds in a row it had work in and did not deliver.
    pub(super) missed: u32,
    pub(super) straggler: bool,
    /// When it was last marked unhealthy (or left): only a sign of life received after that
    /// brings it back (a request it sent before it died may still be in the queue).
    pub(super) unhealthy_since: Option<Instant>,
    /// The reducer it said it cannot reach, and the layout that named it: it gets no work
    /// while that layout stands and other workers reach the reducer.
    pub(super) cut_off: Option<(String, u64)>,
}

impl Worker {
    pub(super) fn mark_unhealthy(&mut self, now: Instant) {
        self.state = WorkerState::Unhealthy;
        self.unhealthy_since = Some(now);
    }
}

/// How often "waiting for workers" is logged while a run cannot go on.
/// A worker whose updates take this many times the round's median, on average, is a
/// straggler; so is one that missed this many rounds in a row.
const STRAGGLER_PACE: f64 = 2.0;
const STRAGGLER_MISSES: u32 = 3;
/// Rounds a worker's pace is measured over before it can count as a straggler (its first
/// round after a join includes loading the data).
const PACE_WARMUP: u32 = 3;
/// With --drop-stragglers, every this many rounds stragglers get work again, to be measured.
pub(super) const PROBATION_EVERY: u64 = 10;

pub(super) const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);

impl Actor {
    pub(super) fn worker_mut(&mut self, id: &str) -> Result<&mut Worker> {
        let name = self
            .members
            .names
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownWorker(id.into()))?;
        match self.members.workers.get_mut(name) {
            Some(w) if w.id == id => Ok(w),
            // The name rejoined under a new id: this one is gone.
            _ => Err(CoordinatorError::UnknownWorker(id.into())),
        }
    }

    pub(super) fn join(
        &mut self,
        name: String,
        rank_hint: Option<u32>,
    ) -> Result<pb::JoinResponse> {
        if name.is_empty() || name.len() > 253 {
            // Echo at most the start of a long name into the status and the log.
            let shown: String = name.chars().take(64).collect();
            return Err(CoordinatorError::InvalidName {
                name: shown,
                reason: "a worker name has 1 to 253 characters",
            });
        }
        // The registry holds at most --max-workers: a join beyond it takes the place of the
        // longest-gone unhealthy or departed worker, or is refused when every one is live.
        if !self.members.workers.contains_key(&name)
            && self.members.workers.len() >= self.cfg.max_workers
        {
            self.evict_one()?;
        }
        self.members.next_id += 1;
        let id = format!("{}-{}", self.members.id_prefix, self.members.next_id);
        let member = self.plan.as_ref().and_then(|p| p.member_index(&name));
        let in_plan = member.is_some();
        let state = if in_plan && !self.finished {
            WorkerState::Healthy
        } else {
            WorkerState::Joining
        };
        let rank = match self.members.workers.get(&name) {
            Some(w) => {
                self.members.names.remove(&w.id);
                self.members.liveness.forget(&w.id);
                w.rank
            }
            None => self.members.ranks.take(rank_hint, self.cfg.max_workers),
        };
        tracing::info!(worker = %id, %name, rank, state = ?state, "worker joined");
        self.members.names.insert(id.clone(), name.clone());
        self.members.liveness.track(&id);
        self.members.workers.insert(
            name,
            Worker {
                id: id.clone(),
                rank,
                state,
                last_seen: Instant::now(),
                unhealthy_since: None,
                pace: 1.0,
                paced: 0,
                missed: 0,
                straggler: false,
                cut_off: None,
                last_round: self.round,
            },
        );
        self.members.first_join.get_or_insert_with(Instant::now);
        // A member of a sharded run's open round came back under a new id: its reducers take
        // its update from that id now.
        if state == WorkerState::Healthy
            && let (Some(k), Some(sh)) = (member, &self.shards)
            && !sh.accepted(k)
        {
            sh.all(pb::reducer_order::Order::Rejoin(pb::MemberRejoined {
                round: self.round,
                member: k as u32,
                worker_id: id.clone(),
            }));
        }
        // The same without reducers: an update the former process left half-sent (its stream
        // may stay open until --stall-timeout) is forgotten, so the new id's is taken instead
        // of refused as a duplicate; one it completed stays (the same order gives the same
        // update). The former stream's late abort names the former id and is ignored.
        if state == WorkerState::Healthy
            && self.shards.is_none()
            && let Some(k) = member
            && self.reducer.has(k)
            && !self.reducer.complete(k)
        {
            for i in self.reducer.abort(k) {
                self.show_progress(i);
            }
        }
        Ok(pb::JoinResponse {
            worker_id: id,
            rank,
            config: Some(self.run_msg.clone()),
            round: self.round,
        })
    }

    /// Forgets `name`: its session, rank and metric labels.
    fn forget(&mut self, name: &str) {
        let Some(w) = self.members.workers.remove(name) else {
            return;
        };
        self.members.names.remove(&w.id);
        self.members.liveness.forget(&w.id);
        self.members.ranks.release(w.rank);
        let label = crate::metrics::WorkerLabel {
            worker: name.to_string(),
        };
        let m = &self.metrics;
        m.heartbeat_age_seconds.remove(&label);
        m.pace.remove(&label);
        m.straggler.remove(&label);
        m.cut_off.remove(&label);
        m.update_seconds.remove(&label);
    }

    /// Names of workers that are gone (unhealthy or left) and not in the open round, the
    /// longest gone first.
    fn gone(&self) -> Vec<(Instant, String)> {
        let mut gone: Vec<(Instant, String)> = (self.members.workers.iter())
            .filter(|(n, w)| {
                matches!(w.state, WorkerState::Unhealthy | WorkerState::Left)
                    && self
                        .plan
                        .as_ref()
                        .is_none_or(|p| p.member_index(n).is_none())
            })
            .map(|(n, w)| (w.unhealthy_since.unwrap_or(w.last_seen), n.clone()))
            .collect();
        gone.sort();
        gone
    }

    /// Makes room in a full registry for a new name, or refuses the join.
    fn evict_one(&mut self) -> Result<()> {
        match self.gone().into_iter().next() {
            Some((_, name)) => {
                tracing::info!(%name, "registry full: forgetting the longest-gone worker");
                self.forget(&name);
                Ok(())
            }
            None => Err(CoordinatorError::Overloaded(format!(
                "{} workers are live (--max-workers); no room for another",
                self.cfg.max_workers
            ))),
        }
    }

    /// Forgets the workers gone for longer than [`FORGET_AFTER`].
    pub(super) fn prune(&mut self, now: Instant) {
        for (since, name) in self.gone() {
            if now - since < FORGET_AFTER {
                break;
            }
            tracing::debug!(%name, "forgetting a worker gone for {:?}", now - since);
            self.forget(&name);
        }
    }

    /// Live workers (joining or healthy) in rank order.
    pub(super) fn live(&self) -> Vec<String> {
        let mut live: Vec<(u32, &String)> = self
            .members
            .workers
            .iter()
            .filter(|(_, w)| matches!(w.state, WorkerState::Joining | WorkerState::Healthy))
            .map(|(n, w)| (w.rank, n))
            .collect();
        live.sort();
        live.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// Opens the first round once --expect-workers joined, or after --start-timeout with at
    /// least --min-workers.
    pub(super) fn maybe_start(&mut self, now: Instant) {
        let ready = self.live().len();
        let waited = self
            .members
            .first_join
            .is_some_and(|t| now - t >= self.cfg.start_timeout);
        if ready >= self.cfg.expect_workers || (waited && ready >= self.cfg.min_workers) {
            self.started = true;
            self.open_round();
        }
    }

    /// True while the run has started but no worker is live to take the open round's work.
    pub(super) fn waiting_for_workers(&self) -> bool {
        self.started && self.plan.is_none() && !self.finished
    }

    /// After round `plan` closed (`done[k]`: when member k completed its update): each
    /// member's time to its update against the round's median, as a moving average, and the
    /// rounds it missed in a row; marks and clears stragglers. Returns the stragglers' names.
    pub(super) fn note_paces(&mut self, plan: &RoundPlan, done: &[Option<Instant>]) -> Vec<String> {
        let started = self.round_started;
        let mut times: Vec<f64> = done
            .iter()
            .flatten()
            .map(|t| (*t - started).as_secs_f64())
            .collect();
        times.sort_by(f64::total_cmp);
        // The lower median: with two members, the faster one is the measure of the other.
        let median = times
            .get(times.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0.0);
        for (k, name) in plan.members.iter().enumerate() {
            let Some(w) = self.members.workers.get_mut(name) else {
                continue;
            };
            if let Some(t) = done.get(k).copied().flatten() {
                self.metrics
                    .update_seconds
                    .get_or_create(&crate::metrics::WorkerLabel {
                        worker: name.clone(),
                    })
                    .observe((t - started).as_secs_f64());
            }
            match done.get(k).copied().flatten() {
                // A pace needs others to compare with.
                Some(t) if times.len() >= 2 && median > 0.0 => {
                    let ratio = (t - started).as_secs_f64() / median;
                    w.pace = if w.paced == 0 {
                        ratio
                    } else {
                        0.7 * w.pace + 0.3 * ratio
                    };
                    w.paced += 1;
                    w.missed = 0;
                }
                Some(_) => w.missed = 0,
                None if !plan.work(k).is_empty() => w.missed += 1,
                None => {}
            }
            let straggler =
                w.missed >= STRAGGLER_MISSES || (w.paced >= PACE_WARMUP && w.pace > STRAGGLER_PACE);
            if straggler != w.straggler {
                if straggler {
                    tracing::warn!(worker = %w.id, %name, pace = w.pace, missed = w.missed, "straggler");
                } else {
                    tracing::info!(worker = %w.id, %name, pace = w.pace, "no longer a straggler");
                }
                w.straggler = straggler;
            }
        }
        (self.members.workers.iter())
            .filter(|(_, w)| w.straggler)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The members by state, each worker's heartbeat age, pace and straggler mark, and
    /// whether the run waits for workers, as metrics.
    pub(super) fn show_members(&self, now: Instant) {
        use crate::metrics::{StateLabel, WorkerLabel};
        let m = &self.metrics;
        for (state, name) in [
            (WorkerState::Joining, "joining"),
            (WorkerState::Healthy, "healthy"),
            (WorkerState::Unhealthy, "unhealthy"),
            (WorkerState::Left, "left"),
        ] {
            let n = (self.members.workers.values())
                .filter(|w| w.state == state)
                .count();
            m.members
                .get_or_create(&StateLabel { state: name.into() })
                .set(n as i64);
        }
        for (name, w) in &self.members.workers {
            let label = WorkerLabel {
                worker: name.clone(),
            };
            m.heartbeat_age_seconds
                .get_or_create(&label)
                .set((now - w.last_seen).as_secs_f64());
            m.pace.get_or_create(&label).set(w.pace);
            m.straggler
                .get_or_create(&label)
                .set(i64::from(w.straggler));
            m.cut_off
                .get_or_create(&label)
                .set(i64::from(self.is_cut_off(w)));
        }
        m.waiting_for_workers
            .set(i64::from(self.waiting_for_workers()));
    }

    /// Marks unhealthy the workers whose heartbeat connection closed or whose heartbeats
    /// stopped, and brings back those heard from since they were marked.
    pub(super) fn check_liveness(&mut self, now: Instant) {
        // Workers whose process died (their heartbeat connection closed), then those whose
        // heartbeats stopped.
        let (stamps, lost) = self.members.liveness.take();
        for (name, w) in self.members.workers.iter_mut() {
            if let Some(&t) = stamps.get(&w.id) {
                w.last_seen = w.last_seen.max(t);
            }
            // Heard from since it was marked unhealthy: back, with work from the next round.
            if w.state == WorkerState::Unhealthy
                && w.unhealthy_since.is_some_and(|u| w.last_seen > u)
            {
                tracing::info!(worker = %w.id, %name, "worker is back");
                w.state = WorkerState::Joining;
            }
            if lost.contains(&w.id)
                && matches!(w.state, WorkerState::Healthy | WorkerState::Joining)
            {
                tracing::warn!(worker = %w.id, %name, "connection closed: unhealthy");
                w.mark_unhealthy(now);
            }
        }
        let limit = 3 * self.cfg.heartbeat;
        for (name, w) in self.members.workers.iter_mut() {
            if matches!(w.state, WorkerState::Healthy | WorkerState::Joining)
                && now - w.last_seen > limit
            {
                tracing::warn!(worker = %w.id, %name, "no heartbeat for {:?}: unhealthy", now - w.last_seen);
                w.mark_unhealthy(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hints are honoured when free and below the registry's bound; otherwise the smallest free
    /// rank is given, released ranks are reused first.
    #[test]
    fn ranks_take_hints_or_the_smallest_free_one() {
        let mut r = Ranks::default();
        assert_eq!(r.take(None, 4096), 0);
        assert_eq!(r.take(Some(3), 4096), 3);
        assert_eq!(
            r.take(Some(3), 4096),
            1,
            "a taken hint gets the smallest free rank"
        );
        assert_eq!(r.take(None, 4096), 2);
        assert_eq!(r.take(None, 4096), 4);
        assert_eq!(
            r.take(Some(u32::MAX), 4096),
            5,
            "hints past the bound are ignored"
        );
        r.release(1);
        r.release(4);
        assert_eq!(r.take(None, 4096), 1);
        assert_eq!(r.take(Some(4), 4096), 4);
        assert_eq!(r.take(None, 4096), 6);
        // Many joins and leaves stay within the ranks in use.
        for _ in 0..10_000 {
            let k = r.take(None, 4096);
            r.release(k);
        }
        assert_eq!(r.take(None, 4096), 7);
    }
}
