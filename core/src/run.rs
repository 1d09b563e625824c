//! One run's lifecycle, shared by the single-process trainer ([`crate::train::train`]) and the
//! distributed coordinator: open the run directory, start fresh or resume from its newest
//! checkpoint, record the config, and open the metrics log and the checkpointer. A fix to
//! resume lands here once for both.
//!
//! The two `--resume` policies, side by side:
//!
//! | | `capsnet train --resume DIR` ([`Resume::Required`]) | `capsnet coordinator --resume` ([`Resume::IfAny`]) |
//! |---|---|---|
//! | no checkpoint in the directory | error: nothing to resume | start fresh (a restarted pod before its first checkpoint) |
//! | checkpoint without Adam state | error: cannot resume | fresh Adam moments (`--sync params` checkpoints keep none) |
//! | checkpoint of another network | error (configuration) | error (configuration) |
//! | weight average asked for, none stored | started from the checkpoint's weights | the same |
//!
//! Without `--resume` ([`Resume::No`]) a directory that holds checkpoints is refused: a new run
//! would interleave with them and delete the older run's as it keeps the last N.

use std::path::{Path, PathBuf};

use crate::checkpoint::{
    Checkpoint, Checkpointer, DataPosition, latest_checkpoint, list_checkpoints,
};
use crate::error::{CoreError, Result};
use crate::net::Net;
use crate::optim::Adam;
use crate::params::Params;
use crate::train::{EvalReport, MetricsLog, TrainConfig};

/// How a run treats the checkpoints already in its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// A new run; the directory must hold no checkpoints. `how` names the flag that would
    /// continue the run that is there (for the error message).
    No { how: String },
    /// Continue from the newest checkpoint, which must exist and hold optimizer state.
    Required,
    /// Continue from the newest checkpoint when there is one, else start fresh.
    IfAny,
}

/// The state a run carries from step to step, and what a checkpoint stores.
#[derive(Clone, Debug)]
pub struct RunState {
    pub params: Params,
    pub adam: Adam,
    /// The moving average of the weights (`--ema-decay`).
    pub ema: Option<Vec<f32>>,
    /// The outer optimizer's momentum of `--sync params` (the coordinator's, if it keeps one).
    pub outer: Option<Vec<f32>>,
    /// Optimizer steps (rounds, for the coordinator) taken so far.
    pub step: u64,
    pub position: DataPosition,
}

impl RunState {
    /// A fresh start: initial weights from the seed, zero moments, the average at the weights.
    pub fn fresh(model: &Net, cfg: &TrainConfig) -> Self {
        let params = model.init_params(cfg.seed);
        let n = params.data.len();
        RunState {
            ema: cfg.ema_decay.map(|_| params.data.clone()),
            adam: Adam::new(cfg.adam.clone(), n),
            params,
            outer: None,
            step: 0,
            position: DataPosition::default(),
        }
    }

    /// The state stored in `path`, checked against this run's network; the run's Adam settings
    /// (learning rate, schedule) replace the stored ones.
    fn resumed(path: &Path, cfg: &TrainConfig, require_adam: bool) -> Result<Self> {
        let ck = Checkpoint::load(path, None)?;
        if ck.config != cfg.model || ck.baseline != cfg.baseline {
            return Err(CoreError::Config(format!(
                "{} was written by a different network config than this run's",
                path.display()
            )));
        }
        let adam = match ck.adam {
            Some(a) => Adam {
                config: cfg.adam.clone(),
                ..a
            },
            None if require_adam => {
                return Err(CoreError::checkpoint(
                    path,
                    "holds no optimizer state; cannot resume",
                ));
            }
            None => Adam::new(cfg.adam.clone(), ck.params.data.len()),
        };
        let ema = match (cfg.ema_decay, ck.ema) {
            (None, _) => None,
            (Some(_), Some(e)) => Some(e),
            (Some(_), None) => {
                tracing::warn!(
                    checkpoint = %path.display(),
                    "the checkpoint holds no weight average; starting it from its weights"
                );
                Some(ck.params.data.clone())
            }
        };
        Ok(RunState {
            params: ck.params,
            adam,
            ema,
            outer: ck.outer,
            step: ck.step,
            position: ck.position,
        })
    }

    /// A checkpoint of this state (a copy: the caller may write it in the background while
    /// training goes on). `with_adam: false` leaves the moments out (`--sync params`, where
    /// the coordinator keeps none that mean anything).
    pub fn checkpoint(&self, cfg: &TrainConfig, with_adam: bool) -> Checkpoint {
        Checkpoint {
            config: cfg.model.clone(),
            baseline: cfg.baseline.clone(),
            params: self.params.clone(),
            adam: with_adam.then(|| self.adam.clone()),
            ema: self.ema.clone(),
            outer: self.outer.clone(),
            step: self.step,
            position: self.position.clone(),
        }
    }
}

/// Resumes from the newest checkpoint of `dir` that loads and verifies (checksum, finite
/// values, the run's network); a damaged newer one is skipped with a warning that names it.
/// When none loads, the newest one's error is returned.
fn resume_newest_good(
    dir: &Path,
    cfg: &TrainConfig,
    require_adam: bool,
) -> Result<(RunState, PathBuf)> {
    let mut first_error = None;
    for (_, path) in list_checkpoints(dir)?.into_iter().rev() {
        match RunState::resumed(&path, cfg, require_adam) {
            Ok(state) => {
                if let Some(e) = &first_error {
                    tracing::warn!(checkpoint = %path.display(), newest_error = %e, "the newest checkpoint is unusable: resuming from an older one");
                }
                return Ok((state, path));
            }
            // Another network config is the operator's mistake, not damage: say so at once.
            Err(e @ CoreError::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(checkpoint = %path.display(), error = %e, "skipping an unusable checkpoint");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| {
        CoreError::Config(format!("--resume: no checkpoint in {}", dir.display()))
    }))
}

/// Removes the temporary files of writes a crash interrupted (`.<name>.tmp-<pid>`, see
/// [`crate::checkpoint::write_atomic`]).
fn remove_leftover_temp_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| CoreError::io(dir, e))? {
        let entry = entry.map_err(|e| CoreError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if leftover {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| CoreError::io(&path, e))?;
            tracing::info!(file = %path.display(), "removed a temporary file an interrupted write left");
        }
    }
    Ok(())
}

/// An open run directory: its state, metrics log and checkpointer.
pub struct Run {
    pub state: RunState,
    pub metrics: MetricsLog,
    pub checkpointer: Checkpointer,
    /// The checkpoint the state was loaded from, if it was.
    pub resumed_from: Option<PathBuf>,
}

impl Run {
    /// Creates or reopens `cfg.run_dir`, loads or initialises the state as `resume` says,
    /// writes the effective `config.json` and opens `metrics.jsonl` for appending.
    pub fn open(cfg: &TrainConfig, model: &Net, resume: Resume) -> Result<Run> {
        let dir = &cfg.run_dir;
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        remove_leftover_temp_files(dir)?;
        let newest = latest_checkpoint(dir)?;
        let (state, resumed_from) = match (resume, newest) {
            (Resume::No { how }, Some(_)) => {
                return Err(CoreError::Config(format!(
                    "{} already holds checkpoints of another run; pass {how} to continue it, or choose another --run-dir",
                    dir.display()
                )));
            }
            (Resume::Required, None) => {
                return Err(CoreError::Config(format!(
                    "--resume: no checkpoint-<step>.safetensors in {}",
                    dir.display()
                )));
            }
            (Resume::No { .. }, None) => (RunState::fresh(model, cfg), None),
            (Resume::IfAny, None) => {
                tracing::info!(run_dir = %dir.display(), "--resume: no checkpoint yet, starting fresh");
                (RunState::fresh(model, cfg), None)
            }
            (r @ (Resume::Required | Resume::IfAny), Some(_)) => {
                let (state, path) = resume_newest_good(dir, cfg, r == Resume::Required)?;
                tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
                (state, Some(path))
            }
        };
        let json = serde_json::to_string_pretty(cfg).map_err(|source| CoreError::Json {
            what: "config.json".into(),
            source,
        })?;
        crate::checkpoint::write_atomic(&dir.join("config.json"), json.as_bytes())?;
        Ok(Run {
            state,
            metrics: MetricsLog::open(dir)?,
            checkpointer: Checkpointer::new(dir, cfg.keep_checkpoints),
            resumed_from,
        })
    }
}

/// One `eval` line of metrics.jsonl, the same for the trainer and the coordinator: the step
/// (round) and epoch it was taken after, the test accuracy and losses, the weight average's as
/// `ema_test_*`, and how long it took when it ran beside training.
pub fn eval_record(
    step: u64,
    epoch: u64,
    e: &EvalReport,
    average: Option<&EvalReport>,
    eval_s: Option<f64>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "kind": "eval", "step": step, "epoch": epoch, "test_accuracy": e.accuracy,
        "test_margin_loss": e.margin_loss, "test_reconstruction_loss": e.reconstruction_loss,
        "samples": e.samples,
    });
    if let Some(a) = average {
        v["ema_test_accuracy"] = a.accuracy.into();
        v["ema_test_margin_loss"] = a.margin_loss.into();
        v["ema_test_reconstruction_loss"] = a.reconstruction_loss.into();
    }
    if let Some(s) = eval_s {
        v["eval_s"] = s.into();
    }
    v
}
