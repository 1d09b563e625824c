//! A round: planned from the live workers, fed by their updates, closed over the complete
//! ones (whatever their arrival order), committed and published.

use std::sync::Arc;
use std::time::Instant;

use capsnet_core::checkpoint::DataPosition;
use capsnet_core::optim::Adam;
use capsnet_proto::wire::{EncodedChunk, encode_chunks};
use capsnet_proto::{Encoding, SyncMode, WorkerState, pb};

use super::membership::{PROBATION_EVERY, WAITING_LOG_EVERY};

/// An update whose norm is over this many times the median of the recent accepted ones is
/// rejected (or clipped).
pub(super) const NORM_FACTOR: f64 = 100.0;
/// Accepted norms kept, and how many make a history to judge by.
pub(super) const NORM_HISTORY: usize = 32;
pub(super) const NORM_MIN_HISTORY: usize = 8;
use super::{Actor, Progress, Published, PullReply};
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::plan::{EpochCursor, RoundPlan};
use crate::reduce::Source;

impl Actor {
    /// Serves the current parameters (encoded here: at start, on resume and at the end).
    pub(super) fn publish(&self) {
        if self.shards.is_some() {
            // The reducers serve the parameters of a sharded run.
            return self.publish_chunks(vec![], vec![]);
        }
        let chunks = encode_chunks(&self.params.data, self.cfg.wire, self.cfg.chunk_bytes);
        let generations = vec![0; chunks.len()];
        self.publish_chunks(chunks, generations);
    }

    /// Publishes the parameters of the current round, and opens its progress.
    pub(super) fn publish_chunks(&self, chunks: Vec<EncodedChunk>, generations: Vec<u64>) {
        let n = chunks.len();
        self.published.send_replace(Arc::new(Published {
            round: self.round,
            span: 0..self.reducer.grid().len(),
            finished: self.finished,
            total_len: self.params.data.len() as u64,
            encoding: self.cfg.wire,
            chunks: Arc::new(chunks),
            generations: Arc::new(generations),
            layout: 0,
        }));
        self.progress.send_replace(Progress::empty(self.round, n));
    }

    /// Shows pulls what range `index` of the open round is now (None: forgotten).
    pub(super) fn show_progress(&self, index: usize) {
        let now = self.reducer.reduced(index).map(|(g, c)| (g, c.clone()));
        let round = self.round;
        self.progress.send_if_modified(|p| {
            if p.round != round || index >= p.chunks.len() {
                return false;
            }
            p.chunks[index] = now;
            true
        });
    }

    pub(super) fn published_now(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// A pull (`work_only` None) or a GetWork (Some(the layout the worker knows)).
    pub(super) fn pull(
        &mut self,
        id: &str,
        mut after_round: Option<u64>,
        work_only: Option<Option<u64>>,
        cannot_reach: Option<String>,
    ) -> Result<PullReply> {
        self.worker_mut(id)?;
        if work_only.is_some() {
            let name = self.members.names.get(id).cloned().unwrap_or_default();
            self.cannot_reach(&name, cannot_reach);
        }
        let (round, finished) = (self.round, self.finished);
        if let Some(sh) = self.shards() {
            let Some(known) = work_only else {
                return Err(CoordinatorError::InvalidArgument(
                    "this run's parameters are served by its reducers: ask for the work order \
                     (GetWork) and pull each span where it says"
                        .into(),
                ));
            };
            // The run rolled back (a reducer was lost) since this worker's last order: it
            // gets the open round's order at once.
            if known.is_some_and(|l| l != sh.layout_id()) || after_round.is_some_and(|a| a > round)
            {
                after_round = None;
            }
        } else if work_only.is_some() {
            return Err(CoordinatorError::InvalidArgument(
                "this run has no reducers: pull the parameters and work order (PullParams)".into(),
            ));
        }
        // The round a client last saw is never past the open one (and `after + 1` must not
        // overflow anywhere).
        if let Some(a) = after_round.filter(|&a| a > round) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "after_round {a} is past the open round {round}"
            )));
        }
        let name = self.members.names.get(id).cloned().unwrap_or_default();
        if finished {
            let order = pb::WorkOrder {
                round,
                finished: true,
                ..Default::default()
            };
            return Ok(PullReply::Ready(order, self.published_now()));
        }
        let Some(plan) = &self.plan else {
            return Ok(PullReply::Wait);
        };
        if after_round.is_some_and(|a| a >= round) {
            return Ok(PullReply::Wait);
        }
        // A worker that is not a member of this round gets work from the next one.
        let member = plan.member_index(&name);
        let range = member.map(|k| plan.work(k)).unwrap_or(0..0);
        let (done, reducers, layout) = match self.shards() {
            Some(sh) => (
                member.is_some_and(|k| sh.accepted(k)),
                sh.owners(),
                sh.layout_id(),
            ),
            None => (member.is_some_and(|k| self.reducer.complete(k)), vec![], 0),
        };
        let order = pb::WorkOrder {
            round,
            epoch: plan.epoch,
            start: range.start as u64,
            end: range.end as u64,
            participate: !range.is_empty() && !done,
            finished: false,
            reducers,
            layout,
        };
        Ok(PullReply::Ready(order, self.published_now()))
    }

    /// What this round's ranges are reduced from (a function of the fields, not of `self`, so
    /// that the reducer can be borrowed beside it).
    pub(super) fn source<'a>(
        cfg: &CoordinatorConfig,
        params: &'a [f32],
        adam: &'a Adam,
        outer_m: &'a [f32],
    ) -> Source<'a> {
        let outer = cfg.outer.map(|o| (o.lr, o.momentum));
        Source::of(cfg.sync_mode, outer, params, adam, outer_m)
    }

    pub(super) fn begin(
        &mut self,
        id: &str,
        round: u64,
        samples: u64,
        loss: f64,
        encoding: Encoding,
    ) -> Result<usize> {
        let current = self.round;
        self.worker_mut(id)?;
        if self.finished {
            return Err(CoordinatorError::Finished);
        }
        if self.shards.is_some() {
            return Err(CoordinatorError::InvalidArgument(
                "this run reduces on its reducers: push each span of the update where the work \
                 order says"
                    .into(),
            ));
        }
        if round != current {
            return Err(CoordinatorError::StaleRound {
                got: round,
                current,
            });
        }
        let name = self.members.names.get(id).cloned().unwrap_or_default();
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| CoordinatorError::NotMember { name: name.clone() })?;
        let k = plan
            .member_index(&name)
            .ok_or_else(|| CoordinatorError::NotMember { name: name.clone() })?;
        if self.reducer.has(k) {
            return Err(CoordinatorError::Duplicate { name, round });
        }
        if !loss.is_finite() || loss < 0.0 {
            return Err(CoordinatorError::BadUpdate(format!(
                "update's loss {loss} is not a finite non-negative number"
            )));
        }
        let want = plan.work(k).len() as u64;
        if samples != want || samples == 0 {
            return Err(CoordinatorError::BadUpdate(format!(
                "update covers {samples} samples, this round's work order has {want}"
            )));
        }
        // Its state stays: an update from a worker marked unhealthy is still good work, but
        // only signs of life received after the marking bring the worker back (see tick).
        if let Some(w) = self.members.workers.get_mut(&name) {
            w.last_round = round;
        }
        self.first_update.get_or_insert_with(Instant::now);
        self.reducer.begin(k, samples, loss, encoding);
        Ok(k)
    }

    /// Accepts member `k`'s update norm (params mode: distance from the round's parameters),
    /// or rejects it, or with `--clip-updates` scales the update down to the limit: NORM_FACTOR
    /// times the median of the last accepted norms (once there are NORM_MIN_HISTORY of them).
    pub(super) fn judge_norm(&mut self, k: usize, norm: f64) -> Result<()> {
        let mut recent: Vec<f64> = self.norms.iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        let median = recent.get(recent.len() / 2).copied().unwrap_or(0.0);
        let limit =
            (recent.len() >= NORM_MIN_HISTORY && median > 0.0).then_some(NORM_FACTOR * median);
        let mut kept = norm;
        if let Some(limit) = limit.filter(|&l| norm > l) {
            let what = if self.cfg.sync_mode == SyncMode::Params {
                "distance from the round's parameters"
            } else {
                "norm"
            };
            if !self.cfg.clip_updates {
                self.metrics.updates_rejected.inc();
                tracing::warn!(
                    round = self.round,
                    member = k,
                    norm,
                    limit,
                    "update rejected: {what} too large"
                );
                return Err(CoordinatorError::BadUpdate(format!(
                    "update's {what} {norm:.3e} is over {NORM_FACTOR} x the median of the last \
                     {} accepted ({median:.3e}); rejected (--clip-updates would scale it down)",
                    recent.len()
                )));
            }
            self.metrics.updates_clipped.inc();
            tracing::warn!(
                round = self.round,
                member = k,
                norm,
                limit,
                "update clipped: {what} too large"
            );
            if self.shards.is_some() {
                self.rescale_sharded(k, (limit / norm) as f32);
            } else {
                for i in self.reducer.rescale(k, (limit / norm) as f32) {
                    self.show_progress(i);
                }
            }
            kept = limit;
        }
        self.norms.push_back(kept);
        if self.norms.len() > NORM_HISTORY {
            self.norms.pop_front();
        }
        Ok(())
    }

    /// Plan members this round waits for: healthy, with work this round.
    pub(super) fn expected(&self) -> Vec<usize> {
        let Some(plan) = &self.plan else {
            return vec![];
        };
        let healthy: Vec<usize> = (plan.members.iter().enumerate())
            .filter(|(k, name)| {
                self.members
                    .workers
                    .get(*name)
                    .is_some_and(|w| w.state == WorkerState::Healthy)
                    && !plan.work(*k).is_empty()
            })
            .map(|(k, _)| k)
            .collect();
        // A member that cannot reach a reducer is not waited for, as long as one that can is.
        let reaches = |k: &usize| self.reaches_every_reducer(&plan.members[*k]);
        if healthy.iter().any(reaches) {
            healthy.into_iter().filter(reaches).collect()
        } else {
            healthy
        }
    }

    /// Opens, plans again or closes the round as members arrive, die or miss the deadline.
    pub(super) fn advance(&mut self, now: Instant) {
        if self.shards().is_some_and(|sh| !sh.ready()) {
            if self
                .waiting_since_log
                .is_none_or(|t| now - t >= WAITING_LOG_EVERY)
            {
                tracing::warn!(round = self.round, "waiting for the reducers");
                self.waiting_since_log = Some(now);
            }
            return;
        }
        if self.plan.is_some() && self.shards.is_some() {
            let expected = self.expected();
            self.tell_expected(&expected);
        }
        let Some(plan) = &self.plan else {
            self.open_round();
            if self.plan.is_none()
                && self
                    .waiting_since_log
                    .is_none_or(|t| now - t >= WAITING_LOG_EVERY)
            {
                tracing::warn!(
                    round = self.round,
                    epoch = self.cursor.epoch,
                    "no live worker: waiting for one to join or come back"
                );
                self.waiting_since_log = Some(now);
            }
            return;
        };
        let expected = self.expected();
        let (done, any_update) = match self.shards() {
            Some(sh) => {
                if sh.busy() {
                    return;
                }
                (sh.completed(), (0..plan.members.len()).any(|k| sh.has(k)))
            }
            None => (
                self.reducer.completed(),
                (0..plan.members.len()).any(|k| self.reducer.has(k)),
            ),
        };
        if expected.is_empty() && !any_update {
            // Every member of the round was lost before sending anything: hand its work to
            // whoever is live now (or wait for someone to be).
            tracing::warn!(round = self.round, members = ?plan.members, "every member of the round was lost: planning it again");
            self.replan();
            return;
        }
        let all_in = !done.is_empty() && expected.iter().all(|k| done.contains(k));
        let deadline = now - self.round_started >= self.cfg.round_timeout;
        if all_in && done.len() >= self.cfg.min_workers.min(expected.len().max(1)) {
            self.close_round();
        } else if deadline && done.len() >= self.cfg.min_workers {
            let missing: Vec<String> = expected
                .iter()
                .filter(|k| !done.contains(k))
                .map(|&k| plan.members[k].clone())
                .collect();
            for name in &missing {
                if let Some(w) = self.members.workers.get_mut(name) {
                    tracing::warn!(worker = %w.id, %name, round = self.round, "missed the round deadline: unhealthy");
                    w.mark_unhealthy(now);
                }
            }
            self.close_round();
        } else if deadline
            && self
                .waiting_since_log
                .is_none_or(|t| now - t >= WAITING_LOG_EVERY)
        {
            tracing::warn!(
                round = self.round,
                updates = done.len(),
                min_workers = self.cfg.min_workers,
                "round deadline passed with too few updates; waiting for workers"
            );
            self.waiting_since_log = Some(now);
        }
    }

    /// Plans the current round with every live worker, in rank order: each gets its share of
    /// what is left of the epoch. No plan while no worker is live.
    pub(super) fn open_round(&mut self) {
        let mut members = self.live();
        // A sharded run's last round is committed and gathered before the run finishes: no
        // round opens meanwhile.
        if self.shards().is_some_and(|sh| !sh.ready()) || self.plan_done() {
            // Opened once every reducer has its span.
            self.plan = None;
            return;
        }
        if members.is_empty() {
            self.plan = None;
            // A sharded run still commits the round closed last.
            self.open_sharded();
            return;
        }
        // Workers that cannot reach a reducer of the layout get no work while others can.
        let reaches = |n: &String| self.reaches_every_reducer(n);
        if members.iter().any(reaches) {
            members.retain(reaches);
        }
        if self.cfg.drop_stragglers && self.round % PROBATION_EVERY != 0 {
            let is_straggler =
                |n: &String| self.members.workers.get(n).is_some_and(|w| w.straggler);
            if members.iter().any(|n| !is_straggler(n)) {
                members.retain(|n| !is_straggler(n));
            }
        }
        let per_round = self.cfg.train.batch_size * self.cfg.sync_every;
        let work = self.cursor.hand_out(members.len(), per_round);
        for n in &members {
            if let Some(w) = self.members.workers.get_mut(n) {
                w.state = WorkerState::Healthy;
            }
        }
        tracing::debug!(
            round = self.round,
            epoch = self.cursor.epoch,
            ?members,
            "round planned"
        );
        self.update_done = vec![None; members.len()];
        self.plan = Some(RoundPlan {
            round: self.round,
            epoch: self.cursor.epoch,
            members,
            work,
        });
        self.open_sharded();
        // Pulls that arrived before there was a plan wait on the published round: wake them.
        self.published.send_modify(|_| {});
        self.round_started = Instant::now();
        self.waiting_since_log = None;
    }

    /// Gives the open round's work back and plans the round again with who is live now.
    pub(super) fn replan(&mut self) {
        if let Some(plan) = self.plan.take() {
            for w in plan.work {
                self.cursor.give_back(w);
            }
        }
        self.reducer.clear();
        let n = self.reducer.grid().len();
        self.progress.send_replace(Progress::empty(self.round, n));
        self.open_round();
    }

    /// Finishes the reduction over the complete updates (weighted by samples, in member order,
    /// so the result does not depend on arrival order), commits it and opens the next round.
    /// A sharded run closes on its reducers instead ([`Actor::close_sharded`]).
    pub(super) fn close_round(&mut self) {
        if self.shards.is_some() {
            self.close_sharded();
            return;
        }
        let t0 = Instant::now();
        let src = Self::source(&self.cfg, &self.params.data, &self.adam, &self.outer_m);
        let Some(plan) = self.plan.take() else {
            return;
        };
        let Some(closed) = self.reducer.close(&src) else {
            self.plan = Some(plan);
            // Nothing completed: the round stays open, with nothing reduced.
            let n = self.reducer.grid().len();
            self.progress.send_replace(Progress::empty(self.round, n));
            return;
        };
        if !closed.finite {
            self.discard_round(plan, &closed.members);
            return;
        }
        // Commit: the stepped buffers become the state; the old ones are next round's buffers.
        std::mem::swap(&mut self.params.data, &mut self.reducer.next_params);
        if self.cfg.sync_mode == SyncMode::Grad {
            std::mem::swap(&mut self.adam.m, &mut self.reducer.next_m);
            std::mem::swap(&mut self.adam.v, &mut self.reducer.next_v);
            self.adam.step += 1;
        } else if self.cfg.outer.is_some() {
            std::mem::swap(&mut self.outer_m, &mut self.reducer.next_m);
        }
        if let (Some(e), Some(d)) = (&mut self.ema, self.cfg.train.ema_decay) {
            capsnet_core::optim::ema_update(e, &self.params.data, d, self.round + 1);
        }
        self.after_close(
            plan,
            closed.members,
            closed.samples,
            closed.loss,
            t0,
            Some((closed.chunks, closed.generations)),
        );
    }

    /// A round whose new parameters are not all finite: never committed (nor served), its
    /// work is redone.
    pub(super) fn discard_round(&mut self, plan: RoundPlan, members: &[usize]) {
        self.metrics.rounds_discarded.inc();
        tracing::error!(
            round = self.round,
            ?members,
            "the round's new parameters are not all finite: discarded, the round is redone"
        );
        for w in plan.work {
            self.cursor.give_back(w);
        }
        self.update_done = vec![];
        self.first_update = None;
        let n = self.reducer.grid().len();
        self.progress.send_replace(Progress::empty(self.round, n));
        self.open_round();
    }

    /// A committed round of `plan` over `members` (`samples` in all, mean `loss`; its
    /// reduction began at `t0`): metrics, the data cursor, the next round, the new parameters
    /// (`chunks`: the encoded ones when this process reduced them), evaluation and checkpoints.
    pub(super) fn after_close(
        &mut self,
        plan: RoundPlan,
        members: Vec<usize>,
        total: u64,
        loss: f64,
        t0: Instant,
        chunks: Option<(Vec<EncodedChunk>, Vec<u64>)>,
    ) {
        let reduce_s = t0.elapsed().as_secs_f64();
        let round_s = (t0 - self.round_started).as_secs_f64();
        let sync_s = self.first_update.map_or(0.0, |f| (t0 - f).as_secs_f64()) + reduce_s;
        self.samples_seen += total;
        let workers = members.len();
        let m = &self.metrics;
        m.rounds.inc();
        m.round_seconds.observe(round_s);
        m.sync_seconds.observe(sync_s);
        m.images_per_second.set(total as f64 / round_s.max(1e-9));
        m.last_round_timestamp.set(crate::metrics::unix_now());
        let done = std::mem::take(&mut self.update_done);
        let stragglers = self.note_paces(&plan, &done);
        // The work of members whose update is not in the round goes back to be redone.
        let mut trained = vec![];
        for (k, w) in plan.work.into_iter().enumerate() {
            if members.contains(&k) {
                trained.push([w.start, w.end]);
            } else {
                self.cursor.give_back(w);
            }
        }
        let closed = self.round;
        self.round += 1;
        let lr = self.adam.config.lr_at(self.adam.step.saturating_sub(1));
        if let Ok(mut m) = self.bg.metrics.lock() {
            m.write(serde_json::json!({
                "kind": "round", "round": closed, "epoch": plan.epoch, "samples_seen": self.samples_seen,
                "train_loss": loss, "workers": workers, "images_per_s": total as f64 / round_s.max(1e-9),
                "round_s": round_s, "sync_s": sync_s, "lr": lr, "positions": trained,
                "stragglers": stragglers, "committed_at": crate::metrics::unix_now(),
            }));
        }
        // Every round is in metrics.jsonl; the log gets one line per --log-every rounds.
        if (closed + 1) % self.cfg.train.log_every == 0 {
            tracing::info!(
                round = closed,
                epoch = plan.epoch,
                loss,
                workers,
                round_s,
                sync_s,
                "round closed"
            );
        }
        let epoch_end = self.cursor.exhausted();
        if epoch_end {
            self.cursor = EpochCursor::new(self.cursor.epoch + 1, self.n_train);
        }
        let every = self.cfg.eval_every;
        let eval = epoch_end || (every > 0 && self.round % every == 0);
        let checkpoint = eval
            || (self.cfg.train.checkpoint_every > 0
                && self.round % self.cfg.train.checkpoint_every == 0);
        if self.shards.is_some() {
            // The reducers serve the new parameters; the state is gathered when needed.
            self.first_update = None;
            let finish = self.plan_done();
            if finish {
                // Commit on the reducers, then gather the final state.
                self.open_sharded();
            } else {
                self.open_round();
            }
            self.publish_chunks(vec![], vec![]);
            let due = self
                .shards
                .as_ref()
                .is_some_and(|sh| sh.gather_due(self.cfg.gather_every));
            let relayout = self.spare_waits_for_close();
            if finish || eval || checkpoint || due || relayout {
                self.gather(super::sharded::AfterGather {
                    eval,
                    checkpoint,
                    finish,
                    relayout,
                });
            }
            return;
        }
        if self.plan_done() {
            self.finish();
            return;
        }
        self.first_update = None;
        self.open_round();
        // Workers get the new parameters before any snapshot is taken for evaluation.
        let (chunks, generations) = chunks.unwrap_or_default();
        self.publish_chunks(chunks, generations);
        if eval {
            self.spawn_eval();
            let _ = self.checkpoint_now(false);
        } else if checkpoint {
            let _ = self.checkpoint_now(false);
        }
    }

    /// Where the run is in the data after the last closed round: the open round's work counts
    /// as not handed out, so a resume redoes it.
    pub(super) fn position(&self) -> DataPosition {
        let mut c = self.cursor.clone();
        if let Some(plan) = &self.plan {
            for w in &plan.work {
                c.give_back(w.clone());
            }
        }
        c.position()
    }
}
