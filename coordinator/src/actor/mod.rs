//! The round state machine. One thread owns all mutable state (members, the round, the
//! updates, parameters and optimizer) and handles one message at a time, so no lock is ever
//! held across an `.await` and the order of events is the order of messages. gRPC handlers
//! stream and check chunks themselves and send the actor each checked chunk, which the
//! [`Reducer`] averages and steps range by range as soon as every expected worker sent it.
//!
//! # Layout
//! - [`msg`]: the actor's API: the messages it handles and what it publishes.
//! - [`membership`]: workers joining, leaving, dying and coming back.
//! - [`round`]: planning a round, taking updates, closing it, publishing the parameters.
//! - [`background`]: evaluation, checkpoints and metrics, off the round thread.
//!
//! # A worker's states
//!
//! | from | event | to |
//! |---|---|---|
//! | (none) | `Join` under a new name | Joining |
//! | any | `Join` under a known name (a restarted process) | Healthy if the name is a member of the open round (it gets the round's work again; a half-sent update of the former id is forgotten), else Joining |
//! | Joining | a round opens (it is live) | Healthy: a member of the round, with work |
//! | Healthy | a round opens | Healthy (a member again) |
//! | Joining, Healthy | its heartbeat connection closes | Unhealthy |
//! | Joining, Healthy | no heartbeat for 3 x `--heartbeat` | Unhealthy |
//! | Healthy | misses the round deadline when the round closes without it | Unhealthy |
//! | Unhealthy | heard from (heartbeat, pull) after it was marked | Joining |
//! | any | `Leave` | Left |
//!
//! A round's members are the workers that were Joining or Healthy when it opened. The round
//! waits for the members that are still Healthy; the work of a member that is not in the round
//! when it closes goes back to be redone ([`crate::plan`]). A round opens right after the last
//! one closes, or (when no worker was live) as soon as one is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use capsnet_core::Params;
use capsnet_core::net::Net;
use capsnet_core::optim::Adam;
use capsnet_core::run::{Resume, Run, RunState};
use capsnet_core::train::{self, TestSet};
use capsnet_proto::{RunSettings, WorkerState, pb};
use tokio::sync::watch;

use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::liveness::Liveness;
use crate::plan::{EpochCursor, RoundPlan};
use crate::reduce::{Kept, Reducer};

mod background;
mod membership;
mod msg;
mod round;
mod sharded;

use background::{Background, Metrics};
use membership::Members;
pub use msg::Outcome;
pub(crate) use msg::{Msg, Progress, Published, PullReply, Readiness};

/// How often liveness is checked and the members are shown as metrics (both walk the whole
/// registry, so not after every message).
const SURVEY_EVERY: Duration = Duration::from_millis(20);

pub(crate) struct Actor {
    cfg: CoordinatorConfig,
    run_msg: pb::RunConfig,
    model: Net,
    test: Arc<TestSet>,
    n_train: usize,
    params: Params,
    adam: Adam,
    /// The moving average of the weights (`--ema-decay`), updated as each round commits.
    ema: Option<Vec<f32>>,
    /// The outer optimizer's momentum (`--outer-optimizer nesterov`; empty without).
    outer_m: Vec<f32>,
    round: u64,
    /// What of the current epoch is left to hand out.
    cursor: EpochCursor,
    /// The open round's members and their work; None before the first round and while no
    /// worker is live.
    plan: Option<RoundPlan>,
    /// When each member of the open round completed its update (for its pace).
    update_done: Vec<Option<Instant>>,
    /// A round was opened: the start conditions (--expect-workers) were met once.
    started: bool,
    /// When the last "waiting for workers" line was logged.
    waiting_since_log: Option<Instant>,
    /// Who the workers are and whether they are alive.
    members: Members,
    /// The reduction of an unsharded run (and the run's chunk grid in any run).
    reducer: Reducer,
    /// For each chunk of the grid, the floats of the flat vector it holds
    /// ([`RunSettings::placement`]).
    place: Arc<Vec<std::ops::Range<usize>>>,
    /// A sharded run's reducers (`--reducers`).
    shards: Option<sharded::Shards>,
    round_started: Instant,
    first_update: Option<Instant>,
    samples_seen: u64,
    finished: bool,
    published: watch::Sender<Arc<Published>>,
    progress: watch::Sender<Progress>,
    /// Evaluation and checkpoint threads and what they share with the round thread.
    bg: Background,
    stop: bool,
    /// What Prometheus scrapes (`--metrics-listen`).
    metrics: Arc<crate::metrics::Metrics>,
    /// Norms of the last accepted updates (params mode: distances), newest last.
    norms: std::collections::VecDeque<f64>,
    /// When gone workers were last pruned from the registry.
    last_prune: Option<Instant>,
    /// When liveness was last checked and the members last shown as metrics.
    last_survey: Option<Instant>,
}

impl Actor {
    /// Loads the data, the model and (with `resume`) the newest checkpoint.
    pub(crate) fn new(
        cfg: CoordinatorConfig,
        published: watch::Sender<Arc<Published>>,
        progress: watch::Sender<Progress>,
        liveness: Liveness,
        prometheus: Arc<crate::metrics::Metrics>,
    ) -> Result<Self> {
        cfg.validate()?;
        let t = &cfg.train;
        let (train_ds, test_ds) = train::load_data(t)?;
        let model = Net::new(&t.model, t.baseline.as_ref())?;
        let policy = if cfg.resume {
            Resume::IfAny
        } else {
            Resume::No {
                how: "--resume".into(),
            }
        };
        let Run {
            state,
            metrics,
            checkpointer,
            ..
        } = Run::open(t, &model, policy)?;
        let RunState {
            params,
            adam,
            ema,
            outer,
            step: round,
            position: pos,
        } = state;
        let outer_m = match (cfg.outer, outer) {
            (None, _) => vec![],
            (Some(_), Some(m)) => m,
            (Some(_), None) => {
                if round > 0 {
                    tracing::warn!(
                        round,
                        "the checkpoint holds no outer momentum: starting it from zero"
                    );
                }
                vec![0.0; params.data.len()]
            }
        };
        let settings = RunSettings {
            model: t.model.clone(),
            baseline: t.baseline.clone(),
            adam: t.adam.clone(),
            batch_size: t.batch_size,
            seed: t.seed,
            sync_mode: cfg.sync_mode,
            sync_every: cfg.sync_every,
            max_shift: t.max_shift,
            layout_hash: capsnet_proto::run_layout_hash(model.layout(), cfg.reducers > 0),
            wire: cfg.wire,
            chunk_bytes: cfg.chunk_bytes,
            // Checked against u32 by validate().
            heartbeat_ms: u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX),
            train_len: train_ds.len() as u64,
            train_limit: t.train_limit.map(|n| n as u64),
            canvas: t.canvas,
            multi: t.multi,
            sharded: cfg.reducers > 0,
            delta_pulls: cfg.delta_pulls && cfg.sync_mode == capsnet_proto::SyncMode::Grad,
        };
        let run_msg = settings.to_message()?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A sharded run's grid holds the flat vector's chunks in stripe order: the state the
        // reducers hold and send is in grid order, this actor's in the vector's.
        let (grid, place) = settings.grids();
        let shards = (cfg.reducers > 0).then(|| {
            let position = EpochCursor::from_position(&pos, train_ds.len()).position();
            sharded::Shards::new(cfg.reducers, round, position, adam.step)
        });
        let actor = Actor {
            shards,
            place,
            cfg: cfg.clone(),
            run_msg,
            model,
            test: Arc::new(test_ds),
            n_train: train_ds.len(),
            params,
            adam,
            ema,
            outer_m,
            round,
            cursor: EpochCursor::from_position(&pos, train_ds.len()),
            plan: None,
            update_done: vec![],
            started: false,
            waiting_since_log: None,
            members: Members {
                workers: BTreeMap::new(),
                names: HashMap::new(),
                id_prefix: format!("{:x}", (nonce as u64) & 0xffff_ffff),
                next_id: 0,
                first_join: None,
                liveness,
                ranks: membership::Ranks::default(),
            },
            reducer: Reducer::new(
                grid.clone(),
                // One reducer of every chunk.
                0..grid.len(),
                cfg.wire,
                Kept::of(cfg.sync_mode, cfg.outer.is_some()),
                cfg.train.threads,
                settings.delta_pulls && cfg.reducers == 0,
            )?,
            round_started: Instant::now(),
            first_update: None,
            samples_seen: 0,
            finished: false,
            published,
            progress,
            bg: Background {
                metrics: Arc::new(Mutex::new(Metrics(metrics))),
                last_eval: Arc::new(Mutex::new(None)),
                jobs: vec![],
                checkpointer: Arc::new(Mutex::new(checkpointer)),
                last_checkpoint: Arc::new(Mutex::new(None)),
                writing: Arc::default(),
                evaluating: Arc::default(),
                failed: None,
            },
            stop: false,
            metrics: prometheus,
            norms: std::collections::VecDeque::new(),
            last_prune: None,
            last_survey: None,
        };
        actor.publish();
        Ok(actor)
    }

    /// The run's chunk grid, which the service checks update chunks against.
    pub(crate) fn grid(&self) -> Arc<Vec<std::ops::Range<usize>>> {
        self.reducer.grid()
    }

    /// Where each chunk of the grid lies in the flat vector.
    pub(crate) fn place(&self) -> Arc<Vec<std::ops::Range<usize>>> {
        self.place.clone()
    }

    fn plan_done(&self) -> bool {
        self.cursor.epoch >= self.cfg.train.epochs
            || self.cfg.train.max_steps.is_some_and(|m| self.round >= m)
    }

    /// Runs until every sender is gone or a shutdown was handled.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Msg>) -> Outcome {
        if self.plan_done() {
            if self.round > 0 && self.cfg.resume {
                // Resumed a run that had already finished: its final evaluation and checkpoint
                // exist; tell workers it is over and do not redo them.
                tracing::info!(round = self.round, "this run is already finished");
                self.finished = true;
                self.publish();
            } else {
                self.finish();
            }
        }
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(msg) => self.handle(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
            if self.stop {
                break;
            }
        }
        for h in self.bg.jobs.drain(..) {
            let _ = h.join();
        }
        Outcome {
            rounds: self.round,
            finished: self.finished,
            last_eval: self
                .bg
                .last_eval
                .lock()
                .ok()
                .and_then(|e| e.as_ref().map(|(_, r)| r.clone())),
            checkpoint: self.bg.last_checkpoint.lock().ok().and_then(|c| c.clone()),
            checkpoint_failed: self.bg.failed.take(),
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Join {
                name,
                rank_hint,
                reply,
            } => {
                let _ = reply.send(self.join(name, rank_hint));
            }
            Msg::Pull {
                worker_id,
                after_round,
                work_only,
                cannot_reach,
                reply,
            } => {
                let _ = reply.send(self.pull(&worker_id, after_round, work_only, cannot_reach));
            }
            Msg::ReducerJoined {
                hello,
                orders,
                reply,
            } => {
                let _ = reply.send(self.reducer_joined(hello, orders));
            }
            Msg::Report { session, report } => self.reducer_report(session, report),
            Msg::ReducerLost { session } => self.reducer_lost(session),
            // A reducer's messages.
            Msg::Order(_) | Msg::Session { .. } => {}
            Msg::Begin {
                worker_id,
                round,
                span: _,
                samples,
                loss,
                encoding,
                reply,
            } => {
                let _ = reply.send(self.begin(&worker_id, round, samples, loss, encoding));
            }
            Msg::Chunk {
                member,
                round,
                index,
                payload,
            } => {
                if round == self.round && !self.finished {
                    let expected = self.expected();
                    let src = Self::source(&self.cfg, &self.params.data, &self.adam, &self.outer_m);
                    if self.reducer.chunk(member, index, payload, &expected, &src) {
                        self.show_progress(index);
                    }
                }
            }
            Msg::End {
                member,
                round,
                sum_sq,
                reply,
            } => {
                let r = if round != self.round || self.finished {
                    Err(CoordinatorError::StaleRound {
                        got: round,
                        current: self.round,
                    })
                } else {
                    // Judged before it completes: a rejected update is aborted (by the
                    // stream's guard) like any failed one, and its ranges are redone.
                    self.judge_norm(member, sum_sq.sqrt())
                        .and_then(|()| self.reducer.end(member))
                        .map(|()| round)
                };
                if r.is_ok()
                    && let Some(t) = self.update_done.get_mut(member)
                {
                    *t = Some(Instant::now());
                }
                let _ = reply.send(r);
            }
            Msg::Abort {
                worker_id,
                member,
                round,
            } => {
                // A stream of a member's former id (it joined again since, and its update may
                // be under way) leaves the member's update alone.
                let current = self.members.names.contains_key(&worker_id);
                if current && round == self.round && !self.reducer.complete(member) {
                    for i in self.reducer.abort(member) {
                        self.show_progress(i);
                    }
                }
            }
            Msg::Touch { worker_id, reply } => {
                let r = self.worker_mut(&worker_id).map(|w| w.state);
                let _ = reply.send(r.map(|s| (self.round, s)));
            }
            Msg::Leave { worker_id, reply } => {
                let r = self.worker_mut(&worker_id).map(|w| {
                    w.state = WorkerState::Left;
                    w.unhealthy_since = Some(Instant::now());
                });
                self.members.liveness.forget(&worker_id);
                if r.is_ok() {
                    tracing::info!(worker = %worker_id, "worker left");
                }
                let _ = reply.send(r);
            }
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Msg::Probe { reply } => {
                let _ = reply.send(if self.finished {
                    Readiness::Finished
                } else if self.waiting_for_workers() {
                    Readiness::WaitingForWorkers
                } else if !self.started {
                    Readiness::Starting
                } else {
                    Readiness::Training
                });
            }
            Msg::Shutdown { reply } => {
                tracing::info!(round = self.round, "shutting down: writing a checkpoint");
                let r = self.checkpoint_now(true);
                if let Err(e) = &r {
                    self.bg.failed = Some(e.to_string());
                }
                for h in self.bg.jobs.drain(..) {
                    let _ = h.join();
                }
                self.stop = true;
                let _ = reply.send(r);
            }
        }
    }

    fn status(&self) -> pb::StatusResponse {
        pb::StatusResponse {
            round: self.round,
            epoch: self.cursor.epoch,
            waiting_for_workers: self.waiting_for_workers(),
            workers: self
                .members
                .workers
                .iter()
                .map(|(name, w)| pb::WorkerStatus {
                    worker_id: w.id.clone(),
                    name: name.clone(),
                    rank: w.rank,
                    state: w.state as i32,
                    last_round: w.last_round,
                    straggler: w.straggler,
                    pace: w.pace,
                })
                .collect(),
            finished: self.finished,
            last_eval: self.bg.last_eval.lock().ok().and_then(|e| {
                e.as_ref().map(|(round, r)| pb::EvalResult {
                    round: *round,
                    accuracy: r.accuracy,
                    margin_loss: r.margin_loss,
                    reconstruction_loss: r.reconstruction_loss,
                    samples: r.samples as u64,
                })
            }),
        }
    }

    fn tick(&mut self) {
        if self.finished || self.stop {
            return;
        }
        let now = Instant::now();
        // What walks the whole registry runs at most every SURVEY_EVERY, not after each
        // message: a flood of joins into a large registry must not make each one O(n).
        if self.last_survey.is_none_or(|t| now - t >= SURVEY_EVERY) {
            self.check_liveness(now);
            self.show_members(now);
            self.last_survey = Some(now);
        }
        if self
            .last_prune
            .is_none_or(|t| now - t >= Duration::from_secs(1))
        {
            self.prune(now);
            self.last_prune = Some(now);
        }
        self.check_reducers(now);
        if !self.started {
            self.maybe_start(now);
            return;
        }
        self.advance(now);
    }
}
