//! The round state machine. One thread owns all mutable state (members, the round, the
//! updates, parameters and optimizer) and handles one message at a time, so no lock is ever
//! held across an `.await` and the order of events is the order of messages. gRPC handlers
//! stream and check chunks themselves and send the actor each checked chunk, which the
//! [`Reducer`] averages and steps range by range as soon as every expected worker sent it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capsnet_core::checkpoint::{Checkpoint, Checkpointer, DataPosition};
use capsnet_core::data::Dataset;
use capsnet_core::model::Workspace;
use capsnet_core::optim::{Adam, AdamStep};
use capsnet_core::run::{Resume, Run, RunState, eval_record};
use capsnet_core::train::{self, EvalReport, MetricsLog};
use capsnet_core::{CapsNet, Params};
use capsnet_proto::wire::{EncodedChunk, chunk_ranges, encode_chunks};
use capsnet_proto::{Encoding, RunSettings, SyncMode, WorkerState, pb};
use tokio::sync::{oneshot, watch};

use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::liveness::Liveness;
use crate::plan::{EpochCursor, RoundPlan};
use crate::reduce::{Reducer, Source};

/// The parameters of a round as served to workers: encoded once, in the run's wire encoding,
/// on the run's chunk grid.
pub(crate) struct Published {
    pub round: u64,
    pub finished: bool,
    pub total_len: u64,
    pub encoding: Encoding,
    pub chunks: Arc<Vec<EncodedChunk>>,
    /// The reduction that produced each chunk (0: encoded from the state, not reduced).
    pub generations: Arc<Vec<u64>>,
}

/// The next round's parameters as far as the open round has reduced them, for pulls that
/// stream them early (full duplex). Provisional: a range is final only once the round closes
/// with the same generation.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// The open round: these are the parameters of `round + 1`.
    pub round: u64,
    pub chunks: Vec<Option<(u64, EncodedChunk)>>,
}

impl Progress {
    pub fn empty(round: u64, n: usize) -> Self {
        Progress {
            round,
            chunks: vec![None; n],
        }
    }
}

impl Published {
    /// Before the actor has loaded anything.
    pub fn placeholder() -> Self {
        Published {
            round: 0,
            finished: false,
            total_len: 0,
            encoding: Encoding::F32,
            chunks: Arc::new(vec![]),
            generations: Arc::new(vec![]),
        }
    }
}

pub(crate) enum PullReply {
    Ready(pb::WorkOrder, Arc<Published>),
    Wait,
}

pub(crate) enum Msg {
    Join {
        name: String,
        rank_hint: Option<u32>,
        reply: oneshot::Sender<Result<pb::JoinResponse>>,
    },
    Pull {
        worker_id: String,
        after_round: Option<u64>,
        reply: oneshot::Sender<Result<PullReply>>,
    },
    /// The first chunk of an update arrived: checks the round, membership and sample count
    /// before the rest is read; replies with the member index the chunks go to.
    Begin {
        worker_id: String,
        round: u64,
        samples: u64,
        loss: f64,
        encoding: Encoding,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// A checked chunk `index` of the run's grid.
    Chunk {
        member: usize,
        round: u64,
        index: usize,
        payload: Bytes,
    },
    /// Every chunk arrived and the whole checked out.
    End {
        member: usize,
        round: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// The update failed or its stream was dropped: forget it.
    Abort { member: usize, round: u64 },
    Touch {
        worker_id: String,
        reply: oneshot::Sender<Result<(u64, WorkerState)>>,
    },
    Leave {
        worker_id: String,
        reply: oneshot::Sender<Result<()>>,
    },
    Status {
        reply: oneshot::Sender<pb::StatusResponse>,
    },
    /// Checkpoint now and stop (SIGTERM).
    Shutdown {
        reply: oneshot::Sender<Result<Option<PathBuf>>>,
    },
}

struct Worker {
    id: String,
    rank: u32,
    state: WorkerState,
    /// The last time it was heard from (a heartbeat, a join, a pull or an update).
    last_seen: Instant,
    last_round: u64,
    /// When it was last marked unhealthy: only a sign of life received after that brings it
    /// back (a request it sent before it died may still be in the queue).
    unhealthy_since: Option<Instant>,
}

impl Worker {
    fn mark_unhealthy(&mut self, now: Instant) {
        self.state = WorkerState::Unhealthy;
        self.unhealthy_since = Some(now);
    }
}

/// How often "waiting for workers" is logged while a run cannot go on.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);

/// metrics.jsonl, shared with evaluation threads.
pub(crate) struct Metrics(MetricsLog);

impl Metrics {
    fn write(&mut self, v: serde_json::Value) {
        if let Err(e) = self.0.write(&v) {
            tracing::warn!(error = %e, "cannot write metrics.jsonl");
        }
    }
}

/// What the run ended with.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub rounds: u64,
    pub finished: bool,
    pub last_eval: Option<EvalReport>,
    pub checkpoint: Option<PathBuf>,
}

pub(crate) struct Actor {
    cfg: CoordinatorConfig,
    run_msg: pb::RunConfig,
    model: CapsNet,
    test: Arc<Dataset>,
    n_train: usize,
    params: Params,
    adam: Adam,
    /// The moving average of the weights (`--ema-decay`), updated as each round commits.
    ema: Option<Vec<f32>>,
    round: u64,
    /// What of the current epoch is left to hand out.
    cursor: EpochCursor,
    /// The open round's members and their work; None before the first round and while no
    /// worker is live.
    plan: Option<RoundPlan>,
    /// A round was opened: the start conditions (--expect-workers) were met once.
    started: bool,
    /// When the last "waiting for workers" line was logged.
    waiting_since_log: Option<Instant>,
    workers: BTreeMap<String, Worker>,
    names: HashMap<String, String>,
    reducer: Reducer,
    round_started: Instant,
    first_update: Option<Instant>,
    first_join: Option<Instant>,
    samples_seen: u64,
    finished: bool,
    published: watch::Sender<Arc<Published>>,
    progress: watch::Sender<Progress>,
    metrics: Arc<Mutex<Metrics>>,
    last_eval: Arc<Mutex<Option<(u64, EvalReport)>>>,
    background: Vec<JoinHandle<()>>,
    checkpointer: Arc<Mutex<Checkpointer>>,
    last_checkpoint: Arc<Mutex<Option<PathBuf>>>,
    id_prefix: String,
    next_id: u64,
    stop: bool,
    /// Heartbeat stamps and closed connections, recorded outside the actor's queue.
    liveness: Liveness,
}

impl Actor {
    /// Loads the data, the model and (with `resume`) the newest checkpoint.
    pub(crate) fn new(
        cfg: CoordinatorConfig,
        published: watch::Sender<Arc<Published>>,
        progress: watch::Sender<Progress>,
        liveness: Liveness,
    ) -> Result<Self> {
        cfg.validate()?;
        let t = &cfg.train;
        let (train_ds, test_ds) = train::load_data(t)?;
        let model = CapsNet::new(t.model.clone())?;
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
            step: round,
            position: pos,
        } = state;
        let settings = RunSettings {
            model: t.model.clone(),
            adam: t.adam.clone(),
            batch_size: t.batch_size,
            seed: t.seed,
            sync_mode: cfg.sync_mode,
            sync_every: cfg.sync_every,
            max_shift: t.max_shift,
            layout_hash: capsnet_proto::layout_hash(model.layout()),
            wire: cfg.wire,
            chunk_bytes: cfg.chunk_bytes,
            // Checked against u32 by validate().
            heartbeat_ms: u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX),
            train_len: train_ds.len() as u64,
            train_limit: t.train_limit.map(|n| n as u64),
        };
        let run_msg = settings.to_message()?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n_floats = params.data.len();
        let actor = Actor {
            checkpointer: Arc::new(Mutex::new(checkpointer)),
            cfg: cfg.clone(),
            run_msg,
            model,
            test: Arc::new(test_ds),
            n_train: train_ds.len(),
            params,
            adam,
            ema,
            round,
            cursor: EpochCursor::from_position(&pos, train_ds.len()),
            plan: None,
            started: false,
            waiting_since_log: None,
            workers: BTreeMap::new(),
            names: HashMap::new(),
            reducer: Reducer::new(
                Arc::new(chunk_ranges(n_floats, cfg.wire, cfg.chunk_bytes).collect()),
                cfg.wire,
                n_floats,
                cfg.sync_mode == SyncMode::Grad,
                cfg.train.threads,
            )?,
            round_started: Instant::now(),
            first_update: None,
            first_join: None,
            samples_seen: 0,
            finished: false,
            published,
            progress,
            metrics: Arc::new(Mutex::new(Metrics(metrics))),
            last_eval: Arc::new(Mutex::new(None)),
            background: vec![],
            last_checkpoint: Arc::new(Mutex::new(None)),
            id_prefix: format!("{:x}", (nonce as u64) & 0xffff_ffff),
            next_id: 0,
            stop: false,
            liveness,
        };
        actor.publish();
        Ok(actor)
    }

    /// The run's chunk grid, which the service checks update chunks against.
    pub(crate) fn grid(&self) -> Arc<Vec<std::ops::Range<usize>>> {
        self.reducer.grid()
    }

    /// Serves the current parameters (encoded here: at start, on resume and at the end).
    fn publish(&self) {
        let chunks = encode_chunks(&self.params.data, self.cfg.wire, self.cfg.chunk_bytes);
        let generations = vec![0; chunks.len()];
        self.publish_chunks(chunks, generations);
    }

    /// Publishes the parameters of the current round, and opens its progress.
    fn publish_chunks(&self, chunks: Vec<EncodedChunk>, generations: Vec<u64>) {
        let n = chunks.len();
        self.published.send_replace(Arc::new(Published {
            round: self.round,
            finished: self.finished,
            total_len: self.params.data.len() as u64,
            encoding: self.cfg.wire,
            chunks: Arc::new(chunks),
            generations: Arc::new(generations),
        }));
        self.progress.send_replace(Progress::empty(self.round, n));
    }

    /// Shows pulls what range `index` of the open round is now (None: forgotten).
    fn show_progress(&self, index: usize) {
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
        for h in self.background.drain(..) {
            let _ = h.join();
        }
        Outcome {
            rounds: self.round,
            finished: self.finished,
            last_eval: self
                .last_eval
                .lock()
                .ok()
                .and_then(|e| e.as_ref().map(|(_, r)| r.clone())),
            checkpoint: self.last_checkpoint.lock().ok().and_then(|c| c.clone()),
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
                reply,
            } => {
                let _ = reply.send(self.pull(&worker_id, after_round));
            }
            Msg::Begin {
                worker_id,
                round,
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
                    let src = Source {
                        params: &self.params.data,
                        m: &self.adam.m,
                        v: &self.adam.v,
                        step: self.step(),
                    };
                    if self.reducer.chunk(member, index, payload, &expected, &src) {
                        self.show_progress(index);
                    }
                }
            }
            Msg::End {
                member,
                round,
                reply,
            } => {
                let r = if round != self.round || self.finished {
                    Err(CoordinatorError::StaleRound {
                        got: round,
                        current: self.round,
                    })
                } else {
                    self.reducer.end(member).map(|()| round)
                };
                let _ = reply.send(r);
            }
            Msg::Abort { member, round } => {
                if round == self.round && !self.reducer.complete(member) {
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
                });
                self.liveness.forget(&worker_id);
                if r.is_ok() {
                    tracing::info!(worker = %worker_id, "worker left");
                }
                let _ = reply.send(r);
            }
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Msg::Shutdown { reply } => {
                tracing::info!(round = self.round, "shutting down: writing a checkpoint");
                let r = self.checkpoint_now(true);
                for h in self.background.drain(..) {
                    let _ = h.join();
                }
                self.stop = true;
                let _ = reply.send(r);
            }
        }
    }

    fn worker_mut(&mut self, id: &str) -> Result<&mut Worker> {
        let name = self
            .names
            .get(id)
            .ok_or_else(|| CoordinatorError::UnknownWorker(id.into()))?;
        match self.workers.get_mut(name) {
            Some(w) if w.id == id => Ok(w),
            // The name rejoined under a new id: this one is gone.
            _ => Err(CoordinatorError::UnknownWorker(id.into())),
        }
    }

    fn join(&mut self, name: String, rank_hint: Option<u32>) -> Result<pb::JoinResponse> {
        if name.is_empty() || name.len() > 253 {
            // Echo at most the start of a long name into the status and the log.
            let shown: String = name.chars().take(64).collect();
            return Err(CoordinatorError::InvalidName {
                name: shown,
                reason: "a worker name has 1 to 253 characters",
            });
        }
        self.next_id += 1;
        let id = format!("{}-{}", self.id_prefix, self.next_id);
        let in_plan = self
            .plan
            .as_ref()
            .is_some_and(|p| p.member_index(&name).is_some());
        let state = if in_plan && !self.finished {
            WorkerState::Healthy
        } else {
            WorkerState::Joining
        };
        let rank = match self.workers.get(&name) {
            Some(w) => {
                self.names.remove(&w.id);
                self.liveness.forget(&w.id);
                w.rank
            }
            None => {
                let taken: Vec<u32> = self.workers.values().map(|w| w.rank).collect();
                match rank_hint {
                    Some(r) if !taken.contains(&r) => r,
                    _ => (0..).find(|r| !taken.contains(r)).unwrap_or(0),
                }
            }
        };
        tracing::info!(worker = %id, %name, rank, state = ?state, "worker joined");
        self.names.insert(id.clone(), name.clone());
        self.liveness.track(&id);
        self.workers.insert(
            name,
            Worker {
                id: id.clone(),
                rank,
                state,
                last_seen: Instant::now(),
                unhealthy_since: None,
                last_round: self.round,
            },
        );
        self.first_join.get_or_insert_with(Instant::now);
        Ok(pb::JoinResponse {
            worker_id: id,
            rank,
            config: Some(self.run_msg.clone()),
            round: self.round,
        })
    }

    fn published_now(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    fn pull(&mut self, id: &str, after_round: Option<u64>) -> Result<PullReply> {
        let (round, finished) = (self.round, self.finished);
        self.worker_mut(id)?;
        let name = self.names.get(id).cloned().unwrap_or_default();
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
        let done = member.is_some_and(|k| self.reducer.complete(k));
        let order = pb::WorkOrder {
            round,
            epoch: plan.epoch,
            start: range.start as u64,
            end: range.end as u64,
            participate: !range.is_empty() && !done,
            finished: false,
        };
        Ok(PullReply::Ready(order, self.published_now()))
    }

    /// This round's Adam step (none in params mode).
    fn step(&self) -> Option<AdamStep> {
        (self.cfg.sync_mode == SyncMode::Grad).then(|| self.adam.next_step())
    }

    fn begin(
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
        if round != current {
            return Err(CoordinatorError::StaleRound {
                got: round,
                current,
            });
        }
        let name = self.names.get(id).cloned().unwrap_or_default();
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
        let want = plan.work(k).len() as u64;
        if samples != want || samples == 0 {
            return Err(CoordinatorError::BadUpdate(format!(
                "update covers {samples} samples, this round's work order has {want}"
            )));
        }
        // Its state stays: an update from a worker marked unhealthy is still good work, but
        // only signs of life received after the marking bring the worker back (see tick).
        if let Some(w) = self.workers.get_mut(&name) {
            w.last_round = round;
        }
        self.first_update.get_or_insert_with(Instant::now);
        self.reducer.begin(k, samples, loss, encoding);
        Ok(k)
    }

    fn status(&self) -> pb::StatusResponse {
        pb::StatusResponse {
            round: self.round,
            epoch: self.cursor.epoch,
            waiting_for_workers: self.waiting_for_workers(),
            workers: self
                .workers
                .iter()
                .map(|(name, w)| pb::WorkerStatus {
                    worker_id: w.id.clone(),
                    name: name.clone(),
                    rank: w.rank,
                    state: w.state as i32,
                    last_round: w.last_round,
                })
                .collect(),
            finished: self.finished,
            last_eval: self.last_eval.lock().ok().and_then(|e| {
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

    /// Plan members this round waits for: healthy, with work this round.
    fn expected(&self) -> Vec<usize> {
        let Some(plan) = &self.plan else {
            return vec![];
        };
        plan.members
            .iter()
            .enumerate()
            .filter(|(k, name)| {
                self.workers
                    .get(*name)
                    .is_some_and(|w| w.state == WorkerState::Healthy)
                    && !plan.work(*k).is_empty()
            })
            .map(|(k, _)| k)
            .collect()
    }

    /// True while the run has started but no worker is live to take the open round's work.
    fn waiting_for_workers(&self) -> bool {
        self.started && self.plan.is_none() && !self.finished
    }

    fn tick(&mut self) {
        if self.finished || self.stop {
            return;
        }
        let now = Instant::now();
        // Workers whose process died (their heartbeat connection closed), then those whose
        // heartbeats stopped.
        let (stamps, lost) = self.liveness.take();
        for (name, w) in self.workers.iter_mut() {
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
        for (name, w) in self.workers.iter_mut() {
            if matches!(w.state, WorkerState::Healthy | WorkerState::Joining)
                && now - w.last_seen > limit
            {
                tracing::warn!(worker = %w.id, %name, "no heartbeat for {:?}: unhealthy", now - w.last_seen);
                w.mark_unhealthy(now);
            }
        }
        if !self.started {
            self.maybe_start(now);
            return;
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
        let done = self.reducer.completed();
        let any_update = (0..plan.members.len()).any(|k| self.reducer.has(k));
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
                if let Some(w) = self.workers.get_mut(name) {
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

    /// Opens the first round once --expect-workers joined, or after --start-timeout with at
    /// least --min-workers.
    fn maybe_start(&mut self, now: Instant) {
        let ready = self.live().len();
        let waited = self
            .first_join
            .is_some_and(|t| now - t >= self.cfg.start_timeout);
        if ready >= self.cfg.expect_workers || (waited && ready >= self.cfg.min_workers) {
            self.started = true;
            self.open_round();
        }
    }

    /// Live workers (joining or healthy) in rank order.
    fn live(&self) -> Vec<String> {
        let mut live: Vec<(u32, &String)> = self
            .workers
            .iter()
            .filter(|(_, w)| matches!(w.state, WorkerState::Joining | WorkerState::Healthy))
            .map(|(n, w)| (w.rank, n))
            .collect();
        live.sort();
        live.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// Plans the current round with every live worker, in rank order: each gets its share of
    /// what is left of the epoch. No plan while no worker is live.
    fn open_round(&mut self) {
        let members = self.live();
        if members.is_empty() {
            self.plan = None;
            return;
        }
        let per_round = self.cfg.train.batch_size * self.cfg.sync_every;
        let work = self.cursor.hand_out(members.len(), per_round);
        for n in &members {
            if let Some(w) = self.workers.get_mut(n) {
                w.state = WorkerState::Healthy;
            }
        }
        tracing::debug!(
            round = self.round,
            epoch = self.cursor.epoch,
            ?members,
            "round planned"
        );
        self.plan = Some(RoundPlan {
            round: self.round,
            epoch: self.cursor.epoch,
            members,
            work,
        });
        // Pulls that arrived before there was a plan wait on the published round: wake them.
        self.published.send_modify(|_| {});
        self.round_started = Instant::now();
        self.waiting_since_log = None;
    }

    /// Gives the open round's work back and plans the round again with who is live now.
    fn replan(&mut self) {
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
    fn close_round(&mut self) {
        let t0 = Instant::now();
        let src = Source {
            params: &self.params.data,
            m: &self.adam.m,
            v: &self.adam.v,
            step: self.step(),
        };
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
        // Commit: the stepped buffers become the state; the old ones are next round's buffers.
        std::mem::swap(&mut self.params.data, &mut self.reducer.next_params);
        if self.cfg.sync_mode == SyncMode::Grad {
            std::mem::swap(&mut self.adam.m, &mut self.reducer.next_m);
            std::mem::swap(&mut self.adam.v, &mut self.reducer.next_v);
            self.adam.step += 1;
        }
        if let (Some(e), Some(d)) = (&mut self.ema, self.cfg.train.ema_decay) {
            capsnet_core::optim::ema_update(e, &self.params.data, d, self.round + 1);
        }
        let (total, loss, chunks, generations) = (
            closed.samples,
            closed.loss,
            closed.chunks,
            closed.generations,
        );
        let reduce_s = t0.elapsed().as_secs_f64();
        let round_s = (t0 - self.round_started).as_secs_f64();
        let sync_s = self.first_update.map_or(0.0, |f| (t0 - f).as_secs_f64()) + reduce_s;
        self.samples_seen += total;
        let workers = closed.members.len();
        // The work of members whose update is not in the round goes back to be redone.
        let mut trained = vec![];
        for (k, w) in plan.work.into_iter().enumerate() {
            if closed.members.contains(&k) {
                trained.push([w.start, w.end]);
            } else {
                self.cursor.give_back(w);
            }
        }
        let closed = self.round;
        self.round += 1;
        let lr = self.adam.config.lr_at(self.adam.step.saturating_sub(1));
        if let Ok(mut m) = self.metrics.lock() {
            m.write(serde_json::json!({
                "kind": "round", "round": closed, "epoch": plan.epoch, "samples_seen": self.samples_seen,
                "train_loss": loss, "workers": workers, "images_per_s": total as f64 / round_s.max(1e-9),
                "round_s": round_s, "sync_s": sync_s, "lr": lr, "positions": trained,
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
        if self.plan_done() {
            self.finish();
            return;
        }
        self.first_update = None;
        self.open_round();
        // Workers get the new parameters before any snapshot is taken for evaluation.
        self.publish_chunks(chunks, generations);
        let every = self.cfg.eval_every;
        if epoch_end || (every > 0 && self.round % every == 0) {
            self.spawn_eval();
            let _ = self.checkpoint_now(false);
        } else if self.cfg.train.checkpoint_every > 0
            && self.round % self.cfg.train.checkpoint_every == 0
        {
            let _ = self.checkpoint_now(false);
        }
    }

    /// Where the run is in the data after the last closed round: the open round's work counts
    /// as not handed out, so a resume redoes it.
    fn position(&self) -> DataPosition {
        let mut c = self.cursor.clone();
        if let Some(plan) = &self.plan {
            for w in &plan.work {
                c.give_back(w.clone());
            }
        }
        c.position()
    }

    /// Writes a checkpoint of the state after the last closed round; in the background unless
    /// `wait`.
    fn checkpoint_now(&mut self, wait: bool) -> Result<Option<PathBuf>> {
        let ck = Checkpoint {
            config: self.cfg.train.model.clone(),
            params: self.params.clone(),
            // Params mode steps no Adam here: its moments would mean nothing on resume.
            adam: (self.cfg.sync_mode == SyncMode::Grad).then(|| self.adam.clone()),
            ema: self.ema.clone(),
            step: self.round,
            position: self.position(),
        };
        let (ckpt, last) = (self.checkpointer.clone(), self.last_checkpoint.clone());
        let write = move || -> Result<Option<PathBuf>> {
            let guard = ckpt
                .lock()
                .map_err(|_| CoordinatorError::Panicked("an earlier checkpoint write"))?;
            let path = guard.save(&ck)?;
            tracing::info!(path = %path.display(), "checkpoint written");
            if let Ok(mut l) = last.lock() {
                *l = Some(path.clone());
            }
            Ok(Some(path))
        };
        if wait {
            write()
        } else {
            self.background.push(std::thread::spawn(move || {
                if let Err(e) = write() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }));
            Ok(None)
        }
    }

    fn eval_job(&self) -> impl FnOnce() + Send + 'static {
        let (model, mut params, test) =
            (self.model.clone(), self.params.clone(), self.test.clone());
        let mut ema = self.ema.clone();
        let (metrics, last) = (self.metrics.clone(), self.last_eval.clone());
        let (round, epoch, bs, threads) = (
            self.round,
            self.cursor.epoch,
            self.cfg.train.eval_batch_size,
            self.cfg.train.threads,
        );
        move || {
            let t = Instant::now();
            let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                Ok(p) => p,
                Err(e) => return tracing::error!(error = %e, "evaluation pool"),
            };
            let mut ws = Workspace::new();
            let both = pool.install(|| {
                let avg = ema.as_mut();
                train::evaluate_with_average(&model, &mut params, avg, &test, bs, &mut ws)
            });
            match both {
                Ok((e, avg)) => {
                    tracing::info!(
                        round,
                        accuracy = e.accuracy,
                        margin = e.margin_loss,
                        "evaluated"
                    );
                    let eval_s = Some(t.elapsed().as_secs_f64());
                    let mut line = eval_record(round, epoch, &e, avg.as_ref(), eval_s);
                    // The coordinator's other lines count rounds: name it so here too.
                    line["round"] = round.into();
                    if let Some(a) = &avg {
                        tracing::info!(
                            round,
                            accuracy = a.accuracy,
                            "evaluated the weight average"
                        );
                    }
                    if let Ok(mut m) = metrics.lock() {
                        m.write(line);
                    }
                    if let Ok(mut l) = last.lock() {
                        if l.as_ref().is_none_or(|(r, _)| *r <= round) {
                            *l = Some((round, e));
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "evaluation failed"),
            }
        }
    }

    /// Evaluates on a snapshot in a background thread: rounds go on meanwhile.
    fn spawn_eval(&mut self) {
        let job = self.eval_job();
        self.background.push(std::thread::spawn(job));
    }

    fn finish(&mut self) {
        for h in self.background.drain(..) {
            let _ = h.join();
        }
        tracing::info!(
            round = self.round,
            epoch = self.cursor.epoch,
            "training finished: final evaluation"
        );
        (self.eval_job())();
        if let Err(e) = self.checkpoint_now(true) {
            tracing::error!(error = %e, "final checkpoint failed");
        }
        self.finished = true;
        self.publish();
    }
}
