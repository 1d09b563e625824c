//! Off the round thread: evaluation on a snapshot, checkpoints, metrics.jsonl.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsnet_core::checkpoint::{Checkpoint, Checkpointer};
use capsnet_core::net::NetWorkspace;
use capsnet_core::optim::Adam;
use capsnet_core::run::eval_record;
use capsnet_core::train::{self, EvalReport, MetricsLog};
use capsnet_proto::SyncMode;

use super::Actor;
use crate::error::{CoordinatorError, Result};

/// metrics.jsonl, shared with evaluation threads.
pub(crate) struct Metrics(pub(super) MetricsLog);

/// What the evaluation and checkpoint threads share with the round thread.
pub(super) struct Background {
    pub(super) metrics: Arc<Mutex<Metrics>>,
    /// The newest evaluation and the round it was taken after.
    pub(super) last_eval: Arc<Mutex<Option<(u64, EvalReport)>>>,
    /// Evaluation and checkpoint threads not joined yet.
    pub(super) jobs: Vec<JoinHandle<()>>,
    pub(super) checkpointer: Arc<Mutex<Checkpointer>>,
    pub(super) last_checkpoint: Arc<Mutex<Option<PathBuf>>>,
    /// A background checkpoint write, or evaluation, is running.
    pub(super) writing: Arc<AtomicBool>,
    pub(super) evaluating: Arc<AtomicBool>,
    /// The error of a final or shutdown checkpoint that could not be written.
    pub(super) failed: Option<String>,
}

/// Tries of a checkpoint write before it counts as failed (1 s, then 2 s apart).
const CHECKPOINT_TRIES: u64 = 3;

impl Metrics {
    pub(super) fn write(&mut self, v: serde_json::Value) {
        if let Err(e) = self.0.write(&v) {
            tracing::warn!(error = %e, "cannot write metrics.jsonl");
        }
    }
}

impl Actor {
    /// Writes a checkpoint of the state after the last closed round; in the background unless
    /// `wait`. One background write at a time: while one is still running, a periodic
    /// checkpoint is skipped (before any copy of the state is made). Each write is tried
    /// [`CHECKPOINT_TRIES`] times; a write that still fails is logged and counted
    /// (`capsnet_checkpoint_failures_total`), and returned when waited for.
    pub(super) fn checkpoint_now(&mut self, wait: bool) -> Result<Option<PathBuf>> {
        self.bg.jobs.retain(|h| !h.is_finished());
        if !wait && self.bg.writing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                round = self.round,
                "the last checkpoint is still being written: skipping this one"
            );
            return Ok(None);
        }
        // A sharded run's state here is the one last gathered from its reducers, with the round
        // and data position it was gathered at.
        let (step, position, adam_step) = match self.shards() {
            Some(sh) => sh.known_good(),
            None => (self.round, self.position(), self.adam.step),
        };
        // The one copy of the state a checkpoint makes (training goes on meanwhile).
        let ck = Checkpoint {
            config: self.cfg.train.model.clone(),
            baseline: self.cfg.train.baseline.clone(),
            params: self.params.clone(),
            // Params mode steps no Adam here: its moments would mean nothing on resume.
            adam: (self.cfg.sync_mode == SyncMode::Grad).then(|| Adam {
                step: adam_step,
                ..self.adam.clone()
            }),
            ema: self.ema.clone(),
            outer: (!self.outer_m.is_empty()).then(|| self.outer_m.clone()),
            step,
            position,
        };
        let (ckpt, last, metrics) = (
            self.bg.checkpointer.clone(),
            self.bg.last_checkpoint.clone(),
            self.metrics.clone(),
        );
        let write = move || -> Result<Option<PathBuf>> {
            let guard = ckpt
                .lock()
                .map_err(|_| CoordinatorError::Panicked("an earlier checkpoint write"))?;
            let mut tries = 0;
            let path = loop {
                tries += 1;
                match guard.save(&ck) {
                    Ok(p) => break p,
                    Err(e) if tries < CHECKPOINT_TRIES => {
                        tracing::warn!(error = %e, tries, "checkpoint write failed: trying again");
                        std::thread::sleep(Duration::from_secs(tries));
                    }
                    Err(e) => {
                        metrics.checkpoint_failures.inc();
                        tracing::error!(error = %e, step = ck.step, "checkpoint failed {tries} times");
                        return Err(e.into());
                    }
                }
            };
            tracing::info!(path = %path.display(), "checkpoint written");
            metrics
                .last_checkpoint_timestamp
                .set(crate::metrics::unix_now());
            if let Ok(mut l) = last.lock() {
                *l = Some(path.clone());
            }
            Ok(Some(path))
        };
        if wait {
            write()
        } else {
            let writing = self.bg.writing.clone();
            self.bg.jobs.push(std::thread::spawn(move || {
                let _ = write();
                writing.store(false, Ordering::Release);
            }));
            Ok(None)
        }
    }

    pub(super) fn eval_job(&self) -> impl FnOnce() + Send + 'static {
        let (model, mut params, test) =
            (self.model.clone(), self.params.clone(), self.test.clone());
        let mut ema = self.ema.clone();
        let (metrics, last) = (self.bg.metrics.clone(), self.bg.last_eval.clone());
        let prometheus = self.metrics.clone();
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
            let mut ws = NetWorkspace::new();
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
                            prometheus.test_accuracy.set(e.accuracy);
                            prometheus.test_margin_loss.set(e.margin_loss);
                            prometheus
                                .test_reconstruction_loss
                                .set(e.reconstruction_loss);
                            *l = Some((round, e));
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "evaluation failed"),
            }
        }
    }

    /// Evaluates on a snapshot in a background thread: rounds go on meanwhile. One at a
    /// time: while one runs, the next is skipped (before its snapshot is taken).
    pub(super) fn spawn_eval(&mut self) {
        self.bg.jobs.retain(|h| !h.is_finished());
        if self.bg.evaluating.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                round = self.round,
                "the last evaluation is still running: skipping this one"
            );
            return;
        }
        let job = self.eval_job();
        let evaluating = self.bg.evaluating.clone();
        self.bg.jobs.push(std::thread::spawn(move || {
            job();
            evaluating.store(false, Ordering::Release);
        }));
    }

    pub(super) fn finish(&mut self) {
        for h in self.bg.jobs.drain(..) {
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
            self.bg.failed = Some(e.to_string());
        }
        self.finished = true;
        self.finish_reducers();
        self.publish();
    }
}
