//! The single-process trainer (`capsnet train`), evaluation (`capsnet eval`) and the one-batch
//! gradient dump (`capsnet grad`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::canvas;
use crate::checkpoint::{Checkpoint, DataPosition, Tensor, TensorFile};
use crate::config::{CapsNetConfig, CnnConfig};
use crate::data::{self, Dataset, Split};
use crate::error::{CoreError, Result};
use crate::model::{BatchStats, CapsNet, Mask, PassOptions, Workspace};
use crate::multi;
use crate::net::{self, Net, NetWorkspace};
use crate::optim::{AdamConfig, LrSchedule};
use crate::params::Params;
use crate::rng::Rng;
use crate::run::{Resume, Run};

/// Everything `capsnet train` needs; written to `config.json` in the run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: CapsNetConfig,
    pub adam: AdamConfig,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub batch_size: usize,
    pub epochs: u64,
    /// Stop after this many optimizer steps in total (across resumes).
    pub max_steps: Option<u64>,
    pub seed: u64,
    pub threads: usize,
    /// Steps between `train` lines in metrics.jsonl.
    pub log_every: u64,
    /// Steps between checkpoints (0: only at the end of each epoch and of training).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Largest random shift of the training augmentation, in pixels (0 disables it).
    pub max_shift: usize,
    /// Use only the first N training / test images (quick runs).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub eval_batch_size: usize,
    /// Keep an exponential moving average of the weights with this decay (Polyak averaging,
    /// warmed up as `min(decay, (1 + t) / (10 + t))` like TensorFlow's
    /// `ExponentialMovingAverage`); evaluations then also report the averaged weights.
    #[serde(default)]
    pub ema_decay: Option<f32>,
    /// Train on images placed at random on a black canvas of this side (the paper's 40x40
    /// expanded MNIST, section 5.2), in place of the shift augmentation; the model's input is
    /// the canvas, and evaluation uses the translated test set ([`crate::canvas::translated`]).
    #[serde(default)]
    pub canvas: Option<usize>,
    /// Train the paper's CNN baseline with this config instead of the capsule network
    /// (`--model cnn-baseline`); its input side and classes are `model`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<CnnConfig>,
    /// Train and test on overlapping pairs of images of two classes, each shifted by up to
    /// this many pixels (the paper's MultiMNIST, section 6; `--multi`, 4 there): the model's
    /// input is the images' side plus twice the shift, and each object is reconstructed from
    /// its own capsule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi: Option<usize>,
}

/// How a run turns the images of its data set into network inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// As they are, shifted at random by up to this many pixels (0: not shifted).
    Shifted(usize),
    /// At random places on a black canvas of this side (`--canvas`, section 5.2).
    Canvas(usize),
    /// Overlapping pairs, each image shifted by up to this many pixels (`--multi`, section 6).
    Pairs(usize),
}

impl Inputs {
    /// From a run's settings: `canvas` and `multi` exclude each other (validated before).
    pub fn new(max_shift: usize, canvas: Option<usize>, multi: Option<usize>) -> Self {
        match (canvas, multi) {
            (Some(c), _) => Inputs::Canvas(c),
            (None, Some(s)) => Inputs::Pairs(s),
            (None, None) => Inputs::Shifted(max_shift),
        }
    }

    /// The image size a data set must have for a model of input side `side`.
    pub fn data_size(self, side: usize) -> data::ImageSize {
        match self {
            Inputs::Shifted(_) => data::ImageSize::Exactly(side),
            Inputs::Canvas(c) => data::ImageSize::AtMost(c),
            Inputs::Pairs(s) => data::ImageSize::Exactly(side.saturating_sub(2 * s)),
        }
    }

    /// A training batch of the samples `indices` of `epoch`: shifted at random (randomness
    /// from `rng`), placed on the canvas at random (from `rng`), or the epoch's pairs of those
    /// samples (drawn from `seed`, the epoch and each sample's index alone).
    pub fn training_batch(
        self,
        ds: &Dataset,
        indices: &[usize],
        rng: &mut Rng,
        seed: u64,
        epoch: u64,
    ) -> data::Batch {
        match self {
            Inputs::Canvas(c) => canvas::make_canvas_batch(ds, indices, rng, c),
            Inputs::Pairs(s) => multi::make_pair_batch(ds, indices, seed, epoch, s),
            Inputs::Shifted(m) => data::make_batch(ds, indices, (m > 0).then_some((rng, m))),
        }
    }
}

/// A test set: images as the model sees them (for a canvas, the translated test set), or the
/// overlapping pairs of a split (epoch 0 of [`multi::TEST_PAIR_SEED`], the same for every run).
#[derive(Clone, Debug)]
pub enum TestSet {
    Images(Dataset),
    Pairs { split: Dataset, shift: usize },
}

impl TestSet {
    /// Samples in the set.
    pub fn len(&self) -> usize {
        match self {
            TestSet::Images(ds) | TestSet::Pairs { split: ds, .. } => ds.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples `indices`, as the model sees them.
    pub fn batch(&self, indices: &[usize]) -> data::Batch {
        match self {
            TestSet::Images(ds) => data::make_batch(ds, indices, None),
            TestSet::Pairs { split, shift } => {
                multi::make_pair_batch(split, indices, multi::TEST_PAIR_SEED, 0, *shift)
            }
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: CapsNetConfig::default(),
            adam: AdamConfig::default(),
            data_dir: PathBuf::from(data::FASHION_MNIST_DIR),
            run_dir: PathBuf::from("runs/latest"),
            batch_size: 32,
            epochs: 1,
            max_steps: None,
            seed: 0,
            threads: default_threads(),
            log_every: 50,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            max_shift: 2,
            train_limit: None,
            test_limit: None,
            eval_batch_size: 128,
            ema_decay: None,
            canvas: None,
            baseline: None,
            multi: None,
        }
    }
}

/// Values given on the command line (or in the environment) to lay over a [`TrainConfig`]:
/// `None` keeps the config's value. `capsnet train` lays them over the defaults (or, with
/// `--resume`, over the run's `config.json`); `capsnet coordinator` over the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainOverrides {
    pub data_dir: Option<PathBuf>,
    /// A whole network config; the config's routing iterations are kept unless
    /// `routing_iters` is given too.
    pub model: Option<CapsNetConfig>,
    pub epochs: Option<u64>,
    pub max_steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub lr: Option<f32>,
    pub lr_schedule: Option<LrSchedule>,
    pub lr_decay: Option<f32>,
    pub lr_decay_steps: Option<u64>,
    pub routing_iters: Option<usize>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    pub log_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub keep_checkpoints: Option<usize>,
    pub max_shift: Option<usize>,
    pub ema_decay: Option<f32>,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// `--canvas N`: also makes N the model's input size and, unless `max_shift` is given,
    /// turns the shift augmentation off.
    pub canvas: Option<usize>,
    /// With `model`: the CNN baseline to train instead of that capsule network (`model` then
    /// gives the input side and classes).
    pub baseline: Option<CnnConfig>,
    /// `--multi`: overlapping pairs with shifts up to this many pixels; the model's input grows
    /// by twice the shift and, unless `max_shift` is given, the shift augmentation is off.
    pub multi: Option<usize>,
}

impl TrainOverrides {
    /// Lays every given value over `cfg`.
    pub fn apply(&self, cfg: &mut TrainConfig) {
        fn set<T: Clone>(field: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *field = v.clone();
            }
        }
        fn set_some<T: Clone>(field: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                field.clone_from(value);
            }
        }
        set(&mut cfg.data_dir, &self.data_dir);
        if let Some(m) = &self.model {
            let routing_iters = cfg.model.routing_iters;
            cfg.model = CapsNetConfig {
                routing_iters,
                ..m.clone()
            };
            cfg.baseline.clone_from(&self.baseline);
        }
        set(&mut cfg.epochs, &self.epochs);
        set_some(&mut cfg.max_steps, &self.max_steps);
        set(&mut cfg.batch_size, &self.batch_size);
        set(&mut cfg.adam.lr, &self.lr);
        set(&mut cfg.adam.schedule, &self.lr_schedule);
        set(&mut cfg.adam.decay_rate, &self.lr_decay);
        set(&mut cfg.adam.decay_steps, &self.lr_decay_steps);
        set(&mut cfg.model.routing_iters, &self.routing_iters);
        set(&mut cfg.seed, &self.seed);
        set(&mut cfg.threads, &self.threads);
        set(&mut cfg.log_every, &self.log_every);
        set(&mut cfg.checkpoint_every, &self.checkpoint_every);
        set(&mut cfg.keep_checkpoints, &self.keep_checkpoints);
        set(&mut cfg.max_shift, &self.max_shift);
        if let Some(c) = self.canvas {
            cfg.canvas = Some(c);
            cfg.model.image_size = c;
            if self.max_shift.is_none() {
                cfg.max_shift = 0;
            }
        }
        if let Some(shift) = self.multi {
            // The images' side: the model's given here, or the old run's less its pairs' margin.
            let images = match &self.model {
                Some(m) => m.image_size,
                None => cfg
                    .model
                    .image_size
                    .saturating_sub(2 * cfg.multi.unwrap_or(0)),
            };
            cfg.multi = Some(shift);
            cfg.model.image_size = images + 2 * shift;
            if self.max_shift.is_none() {
                cfg.max_shift = 0;
            }
        }
        // The CNN takes the run's input side and classes.
        if let Some(b) = &mut cfg.baseline {
            b.image_size = cfg.model.image_size;
            b.classes = cfg.model.classes;
        }
        set_some(&mut cfg.ema_decay, &self.ema_decay);
        set_some(&mut cfg.train_limit, &self.train_limit);
        set_some(&mut cfg.test_limit, &self.test_limit);
    }
}

/// The cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl TrainConfig {
    /// The config of an earlier run, from the `config.json` in its run directory.
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|source| CoreError::Json {
            what: format!("{} is not a capsnet config", path.display()),
            source,
        })
    }

    /// How the run's images become inputs.
    pub fn inputs(&self) -> Inputs {
        Inputs::new(self.max_shift, self.canvas, self.multi)
    }

    /// Checks every value before any work starts, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        // A CNN run uses the capsule config for its input side and classes only.
        if self.baseline.is_none() {
            self.model.validate()?;
        }
        self.adam.validate()?;
        let bad = |m: String| Err(CoreError::Config(m));
        let at_least_one = [
            ("batch size", self.batch_size as u64),
            ("eval batch size", self.eval_batch_size as u64),
            ("epochs", self.epochs),
            ("max steps", self.max_steps.unwrap_or(1)),
            ("threads", self.threads as u64),
            ("log interval (steps)", self.log_every),
            ("keep checkpoints", self.keep_checkpoints as u64),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        if self.max_shift * 2 >= self.model.image_size {
            return bad(format!(
                "max shift {} is too large for {}-pixel images",
                self.max_shift, self.model.image_size
            ));
        }
        if let Some(b) = &self.baseline {
            b.validate()?;
            if (b.image_size, b.classes) != (self.model.image_size, self.model.classes) {
                return bad(format!(
                    "the CNN baseline's input ({0}x{0}) and classes ({1}) must be the run's ({2}x{2}, {3})",
                    b.image_size, b.classes, self.model.image_size, self.model.classes
                ));
            }
        }
        if let Some(shift) = self.multi {
            if self.canvas.is_some() {
                return bad(
                    "--multi and --canvas exclude each other: pairs make their own canvas".into(),
                );
            }
            if self.max_shift != 0 {
                return bad(format!(
                    "--multi shifts each image of a pair itself; drop --max-shift {} (or give \
                     --max-shift 0)",
                    self.max_shift
                ));
            }
            if self.model.image_size <= 2 * shift {
                return bad(format!(
                    "--multi {shift} leaves no image on a {0}x{0} input",
                    self.model.image_size
                ));
            }
            if self.model.classes < 2 {
                return bad("overlapping pairs need at least two classes".into());
            }
        }
        if let Some(c) = self.canvas {
            if c != self.model.image_size {
                return bad(format!(
                    "the canvas ({c}x{c}) must be the model's input size ({})",
                    self.model.image_size
                ));
            }
            if self.max_shift != 0 {
                return bad(format!(
                    "--canvas places images at random in place of the shift augmentation; \
                     drop --max-shift {} (or give --max-shift 0)",
                    self.max_shift
                ));
            }
        }
        if let Some(d) = self.ema_decay
            && !(d > 0.0 && d < 1.0)
        {
            return bad(format!("EMA decay must be in (0, 1), got {d}"));
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return bad("train/test limits must be at least 1".into());
        }
        Ok(())
    }
}

/// One optimizer step, as reported to an [`Observer`].
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub epoch: u64,
    /// Samples of this epoch consumed so far, and the epoch's size.
    pub epoch_offset: u64,
    pub epoch_size: u64,
    pub loss: f64,
    pub margin_loss: f64,
    pub reconstruction_loss: f64,
    pub accuracy: f64,
    pub lr: f32,
    pub images_per_s: f64,
}

/// A test-set evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub accuracy: f64,
    /// The classification loss: the margin loss, or the CNN baseline's cross-entropy.
    pub margin_loss: f64,
    pub reconstruction_loss: f64,
    pub samples: usize,
    /// What the classification loss is called, for the line a person reads
    /// ([`Net::loss_name`]; not in the JSON, which keeps the field's name).
    #[serde(skip)]
    pub loss_name: &'static str,
}

/// `accuracy 88.11% (margin loss 0.0853, reconstruction loss 0.0108)`; for the CNN baseline
/// `accuracy 88.11% (cross-entropy 0.3310)`.
impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.loss_name.is_empty() {
            "margin loss"
        } else {
            self.loss_name
        };
        write!(
            f,
            "accuracy {:.2}% ({name} {:.4}",
            100.0 * self.accuracy,
            self.margin_loss
        )?;
        if name == "margin loss" {
            write!(f, ", reconstruction loss {:.4}", self.reconstruction_loss)?;
        }
        write!(f, ")")
    }
}

/// Callbacks of the training loop; the binary draws a progress bar or log lines from them.
pub trait Observer: Send {
    fn on_start(&mut self, _cfg: &TrainConfig, _start_step: u64, _total_steps: u64) {}
    fn on_step(&mut self, _report: &StepReport) {}
    /// A test-set evaluation of the weights, and of their moving average when one is kept.
    fn on_eval(
        &mut self,
        _step: u64,
        _epoch: u64,
        _report: &EvalReport,
        _ema: Option<&EvalReport>,
    ) {
    }
    fn on_checkpoint(&mut self, _path: &Path) {}
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

/// What a training run ends with.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub steps: u64,
    pub last_eval: Option<EvalReport>,
    /// The last evaluation of the weight average (`--ema-decay`).
    pub last_ema_eval: Option<EvalReport>,
    pub checkpoint: Option<PathBuf>,
    pub params: Params,
    pub wall_s: f64,
}

pub fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("capsnet-{i}"))
        .build()
        .map_err(|e| CoreError::thread_pool(threads, e))
}

/// Loads both splits of a data folder for a model config, honouring the limits.
/// With a canvas, the training images stay as they are (each batch places them at random) and
/// the test images are the translated test set of [`canvas::TEST_PLACEMENT_SEED`]; with pairs,
/// the test set is the test split's pairs.
pub fn load_data(cfg: &TrainConfig) -> Result<(Dataset, TestSet)> {
    let inputs = cfg.inputs();
    let size = inputs.data_size(cfg.model.image_size);
    let load = |split| data::load_split_for(&cfg.data_dir, split, cfg.model.classes, size);
    let mut train = load(Split::Train)?;
    let mut test = load(Split::Test)?;
    if let Some(n) = cfg.train_limit {
        train.truncate(n);
    }
    if let Some(n) = cfg.test_limit {
        test.truncate(n);
    }
    let test = match inputs {
        Inputs::Canvas(c) => {
            TestSet::Images(canvas::translated(&test, c, canvas::TEST_PLACEMENT_SEED)?)
        }
        Inputs::Pairs(shift) => {
            multi::check_pairs_possible(&train)?;
            multi::check_pairs_possible(&test)?;
            TestSet::Pairs { split: test, shift }
        }
        Inputs::Shifted(_) => TestSet::Images(test),
    };
    Ok((train, test))
}

/// Test accuracy and losses over a whole test set (the decoder sees the predicted classes).
pub fn evaluate(
    model: &Net,
    params: &Params,
    set: &TestSet,
    batch_size: usize,
    ws: &mut NetWorkspace,
) -> Result<EvalReport> {
    let mut total = BatchStats::default();
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let s = model.evaluate_batch(params, &set.batch(chunk), ws)?;
        total.margin_loss += s.margin_loss * s.samples as f64;
        total.reconstruction_loss += s.reconstruction_loss * s.samples as f64;
        total.correct += s.correct;
        total.samples += s.samples;
    }
    let n = total.samples.max(1) as f64;
    Ok(EvalReport {
        accuracy: total.correct as f64 / n,
        margin_loss: total.margin_loss / n,
        reconstruction_loss: total.reconstruction_loss / n,
        samples: total.samples,
        loss_name: model.loss_name(),
    })
}

/// The data set through the weights, and through their moving average (`--ema-decay`) when
/// one is kept.
///
/// The average is evaluated in place of the weights (their buffers swapped, then swapped
/// back), so no copy of the parameters is made; both are as they were when this returns.
pub fn evaluate_with_average(
    model: &Net,
    params: &mut Params,
    average: Option<&mut Vec<f32>>,
    ds: &TestSet,
    batch_size: usize,
    ws: &mut NetWorkspace,
) -> Result<(EvalReport, Option<EvalReport>)> {
    let e = evaluate(model, params, ds, batch_size, ws)?;
    let avg = match average {
        Some(a) if a.len() == params.data.len() => {
            std::mem::swap(&mut params.data, a);
            let r = evaluate(model, params, ds, batch_size, ws);
            std::mem::swap(&mut params.data, a);
            Some(r?)
        }
        Some(_) => {
            return Err(CoreError::LayoutMismatch {
                what: "weight average",
            });
        }
        None => None,
    };
    Ok((e, avg))
}

/// Appends JSON lines to `metrics.jsonl`, each in a single `write` so that a process killed
/// mid-line cannot tear it; a line torn before (by a crash) is closed when the file is opened,
/// so a resumed run's lines stay readable.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn open(run_dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let path = run_dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| CoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| CoreError::io(&path, e))?.len();
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::End(-1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(|e| CoreError::io(&path, e))?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(|e| CoreError::io(&path, e))?;
            }
        }
        Ok(MetricsLog { file, path })
    }

    /// Appends `v` as a line; an object gets `unix_s`, the Unix time it was written (seconds,
    /// to the millisecond), unless it has one: what `capsnet plot` puts runs on wall time with.
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut()
            && !o.contains_key("unix_s")
        {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_millis() as f64) / 1e3);
            o.insert("unix_s".into(), now.into());
        }
        let line = format!("{v}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| CoreError::io(&self.path, e))
    }
}

/// Trains as configured; resumes from the newest checkpoint of `run_dir` when `resume`.
pub fn train(cfg: &TrainConfig, resume: bool, observer: &mut dyn Observer) -> Result<TrainOutcome> {
    cfg.validate()?;
    let started = Instant::now();
    let (train_ds, test_ds) = load_data(cfg)?;
    let model = Net::new(&cfg.model, cfg.baseline.as_ref())?;
    let pool = build_pool(cfg.threads)?;
    let policy = if resume {
        Resume::Required
    } else {
        Resume::No {
            how: format!("--resume {}", cfg.run_dir.display()),
        }
    };
    let run = Run::open(cfg, &model, policy)?;
    let mut t = Trainer {
        grads: Params::zeros(model.layout()),
        cfg,
        model,
        train: train_ds,
        test: test_ds,
        run,
        ws: NetWorkspace::new(),
        last_eval: None,
        last_ema_eval: None,
        evaluated_at: None,
        last_checkpoint: None,
        window: (Instant::now(), 0),
    };
    let total_steps = t.total_steps();
    observer.on_start(cfg, t.run.state.adam.step, total_steps);
    pool.install(|| t.run_to(total_steps, observer))?;
    let Trainer {
        run,
        last_eval,
        last_ema_eval,
        last_checkpoint,
        ..
    } = t;
    Ok(TrainOutcome {
        steps: run.state.adam.step,
        last_eval,
        last_ema_eval,
        checkpoint: last_checkpoint,
        params: run.state.params,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The single-process training loop, stage by stage: [`Trainer::step`] one batch,
/// [`Trainer::end_epoch`], [`Trainer::evaluate`] and [`Trainer::save`].
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    model: Net,
    train: Dataset,
    test: TestSet,
    run: Run,
    grads: Params,
    ws: NetWorkspace,
    last_eval: Option<EvalReport>,
    last_ema_eval: Option<EvalReport>,
    /// The step of the last evaluation, so that the end of training does not repeat the end
    /// of an epoch's; `last_checkpoint` does the same for checkpoints (--checkpoint-every too).
    evaluated_at: Option<u64>,
    last_checkpoint: Option<PathBuf>,
    /// Start and images of the window behind the next images/s figure.
    window: (Instant, usize),
}

impl Trainer<'_> {
    /// Steps in the whole run: every epoch, or fewer with --max-steps.
    fn total_steps(&self) -> u64 {
        let planned = self.train.len().div_ceil(self.cfg.batch_size) as u64 * self.cfg.epochs;
        self.cfg.max_steps.map_or(planned, |m| m.min(planned))
    }

    /// Trains until `total_steps` or the last epoch; evaluates and checkpoints at every epoch's
    /// end and where it stops.
    fn run_to(&mut self, total_steps: u64, observer: &mut dyn Observer) -> Result<()> {
        let (n, seed) = (self.train.len(), self.cfg.seed);
        'epochs: while self.run.state.position.epoch < self.cfg.epochs {
            let perm = data::epoch_permutation(n, seed, self.run.state.position.epoch);
            while (self.run.state.position.offset as usize) < n {
                if self.run.state.adam.step >= total_steps {
                    break 'epochs;
                }
                let start = self.run.state.position.offset as usize;
                let report = self.step(&perm[start..(start + self.cfg.batch_size).min(n)])?;
                observer.on_step(&report);
                if report.step % self.cfg.log_every == 0 {
                    self.log_step(&report)?;
                }
                let every = self.cfg.checkpoint_every;
                if every > 0 && report.step % every == 0 {
                    self.save(observer)?;
                }
            }
            self.end_epoch(observer)?;
        }
        // Stopped by --max-steps inside an epoch: evaluate and checkpoint where it stands.
        let step = self.run.state.adam.step;
        if self.evaluated_at != Some(step) {
            self.evaluate(observer)?;
        }
        if self.last_checkpoint.as_ref() != Some(&self.run.checkpointer.path_for(step)) {
            self.save(observer)?;
        }
        Ok(())
    }

    /// One optimizer step on the samples at `indices`.
    fn step(&mut self, indices: &[usize]) -> Result<StepReport> {
        let cfg = self.cfg;
        let state = &mut self.run.state;
        // Augmentation randomness is keyed by the step, so a resumed run draws the same.
        let mut rng = Rng::derive(cfg.seed, "augment", state.adam.step);
        let epoch = state.position.epoch;
        let batch = cfg
            .inputs()
            .training_batch(&self.train, indices, &mut rng, cfg.seed, epoch);
        let keys = net::sample_keys(cfg.seed, epoch, indices);
        let stats =
            self.model
                .train_batch(&state.params, &batch, &keys, &mut self.grads, &mut self.ws)?;
        if !stats.total_loss().is_finite() {
            return Err(CoreError::Diverged {
                step: state.adam.step,
                loss: stats.total_loss(),
            });
        }
        let lr = state.adam.config.lr_at(state.adam.step);
        let t = Instant::now();
        state
            .adam
            .update(&mut state.params.data, &self.grads.data)?;
        if let (Some(e), Some(d)) = (&mut state.ema, cfg.ema_decay) {
            crate::optim::ema_update(e, &state.params.data, d, state.adam.step);
        }
        self.ws.caps.timings.optimizer += t.elapsed();
        state.step = state.adam.step;
        state.position.offset += indices.len() as u64;
        self.window.1 += indices.len();
        Ok(StepReport {
            step: state.adam.step,
            epoch: state.position.epoch,
            epoch_offset: state.position.offset,
            epoch_size: self.train.len() as u64,
            loss: stats.total_loss(),
            margin_loss: stats.margin_loss,
            reconstruction_loss: stats.reconstruction_loss,
            accuracy: stats.accuracy(),
            lr,
            images_per_s: self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// A `train` line of metrics.jsonl; starts the next images/s window.
    fn log_step(&mut self, report: &StepReport) -> Result<()> {
        let mut v = serde_json::to_value(report).map_err(|source| CoreError::Json {
            what: "metrics".into(),
            source,
        })?;
        v["kind"] = "train".into();
        self.run.metrics.write(&v)?;
        self.window = (Instant::now(), 0);
        Ok(())
    }

    /// The end of an epoch: move to the next, evaluate and checkpoint.
    fn end_epoch(&mut self, observer: &mut dyn Observer) -> Result<()> {
        let pos = &mut self.run.state.position;
        *pos = DataPosition {
            epoch: pos.epoch + 1,
            ..DataPosition::default()
        };
        self.evaluate(observer)?;
        self.save(observer)?;
        self.window = (Instant::now(), 0);
        Ok(())
    }

    /// The weights (and their average) on the test set; an `eval` line of metrics.jsonl.
    fn evaluate(&mut self, observer: &mut dyn Observer) -> Result<()> {
        let state = &mut self.run.state;
        let (step, epoch) = (state.adam.step, state.position.epoch);
        let (e, ee) = evaluate_with_average(
            &self.model,
            &mut state.params,
            state.ema.as_mut(),
            &self.test,
            self.cfg.eval_batch_size,
            &mut self.ws,
        )?;
        self.run
            .metrics
            .write(&crate::run::eval_record(step, epoch, &e, ee.as_ref(), None))?;
        observer.on_eval(step, epoch, &e, ee.as_ref());
        (self.last_eval, self.last_ema_eval) = (Some(e), ee);
        self.evaluated_at = Some(step);
        Ok(())
    }

    /// A checkpoint of the state as it stands.
    fn save(&mut self, observer: &mut dyn Observer) -> Result<()> {
        let path = self
            .run
            .checkpointer
            .save(&self.run.state.checkpoint(self.cfg, true))?;
        observer.on_checkpoint(&path);
        self.last_checkpoint = Some(path);
        Ok(())
    }
}

/// What `capsnet eval` measures beyond the plain test split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalSets {
    /// Also the affine test set of this seed (section 5.2).
    pub affine: Option<u64>,
    /// The seed of the translated test set, for a model whose input is larger than the images.
    pub placement_seed: u64,
    /// Only the first N test images.
    pub limit: Option<usize>,
    /// Also the test split's overlapping pairs (section 6), shifted by up to half the margin
    /// between the model's input and the images.
    pub multi: bool,
}

/// A checkpoint's evaluation by `capsnet eval`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CheckpointEval {
    /// On the test split as it is, or (`translated`) placed on the model's input canvas.
    #[serde(flatten)]
    pub test: EvalReport,
    /// `"as is"`, or `"translated"` when the images were smaller than the model's input.
    pub test_set: &'static str,
    /// The side of the model's input.
    pub image_size: usize,
    /// On the affine test set, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affine: Option<EvalReport>,
    /// On the test pairs, when asked for: correct when both classes are the two longest
    /// capsules (or largest logits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pairs: Option<EvalReport>,
    /// The largest shift of each image of a pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair_shift: Option<usize>,
}

/// The test split of a data folder for a model: images of the model's input size, or any that
/// fit on it (to be placed on it); the first `limit` only when given.
pub fn load_test_split(
    model: &CapsNetConfig,
    data_dir: &Path,
    limit: Option<usize>,
) -> Result<Dataset> {
    let side = model.image_size;
    let size = data::ImageSize::AtMost(side);
    let mut test = data::load_split_for(data_dir, Split::Test, model.classes, size)?;
    if let Some(n) = limit {
        test.truncate(n);
    }
    Ok(test)
}

/// A test split as a model of input side `side` sees it: as it is when its images have that
/// size, else the translated test set of `seed`. The flag says which.
pub fn model_test_set(
    test: &Dataset,
    side: usize,
    seed: u64,
) -> Result<(std::borrow::Cow<'_, Dataset>, bool)> {
    if test.rows == side && test.cols == side {
        Ok((std::borrow::Cow::Borrowed(test), false))
    } else {
        Ok((
            std::borrow::Cow::Owned(canvas::translated(test, side, seed)?),
            true,
        ))
    }
}

/// `capsnet eval`: a checkpoint's accuracy and losses on a data folder's test split, through its
/// weights or (`ema`) their moving average. Images smaller than the model's input are evaluated
/// as the translated test set (placed on the canvas); `sets.affine` adds the affine test set.
pub fn evaluate_checkpoint(
    checkpoint: &Path,
    data_dir: &Path,
    batch_size: usize,
    threads: usize,
    ema: bool,
    sets: EvalSets,
) -> Result<CheckpointEval> {
    let mut ck = Checkpoint::load(checkpoint, None)?;
    if ema {
        let avg = ck.ema.take().ok_or_else(|| {
            CoreError::checkpoint(
                checkpoint,
                "holds no weight average (ema.<name>); it was trained without --ema-decay",
            )
        })?;
        ck.params.data = avg;
    }
    let model = Net::new(&ck.config, ck.baseline.as_ref())?;
    let side = ck.config.image_size;
    let test = load_test_split(&ck.config, data_dir, sets.limit)?;
    let (on_input, translated) = model_test_set(&test, side, sets.placement_seed)?;
    let raw = !translated;
    let pair_shift = match sets.multi {
        true => Some(pair_shift_for(&test, side)?),
        false => None,
    };
    let pool = build_pool(threads)?;
    let mut ws = NetWorkspace::new();
    let eval = |set: &TestSet, ws: &mut NetWorkspace| {
        pool.install(|| evaluate(&model, &ck.params, set, batch_size, ws))
    };
    let plain = eval(&TestSet::Images(on_input.into_owned()), &mut ws)?;
    let affine = match sets.affine {
        Some(seed) => Some(eval(
            &TestSet::Images(canvas::affine(&test, side, seed)?),
            &mut ws,
        )?),
        None => None,
    };
    let pairs = match pair_shift {
        Some(shift) => Some(eval(&TestSet::Pairs { split: test, shift }, &mut ws)?),
        None => None,
    };
    Ok(CheckpointEval {
        test: plain,
        test_set: if raw { "as is" } else { "translated" },
        image_size: side,
        affine,
        pairs,
        pair_shift,
    })
}

/// The largest shift of overlapping pairs of `test`'s images on a model input of side `side`:
/// half the margin between them. Checks that pairs can be made.
pub fn pair_shift_for(test: &Dataset, side: usize) -> Result<usize> {
    let image = test.rows.max(test.cols);
    if image == side || (side - image) % 2 != 0 {
        return Err(CoreError::Config(format!(
            "overlapping pairs of {0}x{1} images need a model input larger by an even number of \
             pixels (twice the shift); this model's is {side}x{side}",
            test.rows, test.cols
        )));
    }
    multi::check_pairs_possible(test)?;
    Ok((side - image) / 2)
}

/// `capsnet grad`: one forward and backward pass of a checkpoint on a batch file (`images` f32
/// `[B,1,H,W]`, `labels` i64 `[B]`), written in the PyTorch oracle's format.
pub fn gradient_file(
    checkpoint: &Path,
    batch: &Path,
    out: &Path,
    routing_iters: Option<usize>,
    threads: usize,
) -> Result<BatchStats> {
    let mut ck = Checkpoint::load(checkpoint, None)?;
    if ck.baseline.is_some() {
        return Err(CoreError::checkpoint(
            checkpoint,
            "holds the CNN baseline; capsnet grad writes capsule-network gradients only",
        ));
    }
    if let Some(r) = routing_iters {
        ck.config.routing_iters = r;
    }
    let cfg = ck.config.clone();
    let model = CapsNet::new(cfg.clone())?;
    let file = TensorFile::read(batch)?;
    let images = match file.tensors.get("images") {
        Some(Tensor::F32 { shape, data }) => {
            let want = [cfg.in_channels, cfg.image_size, cfg.image_size];
            if shape.len() != 4 || shape[1..] != want {
                return Err(CoreError::checkpoint(
                    batch,
                    format!(
                        "images has shape {shape:?}, expected [B, {}, {}, {}]",
                        want[0], want[1], want[2]
                    ),
                ));
            }
            data.clone()
        }
        Some(_) => return Err(CoreError::checkpoint(batch, "images must be F32")),
        None => return Err(CoreError::checkpoint(batch, "no tensor named images")),
    };
    let labels: Vec<usize> = match file.tensors.get("labels") {
        Some(Tensor::I64 { shape, data }) if shape.len() == 1 => data
            .iter()
            .map(|&l| {
                usize::try_from(l)
                    .ok()
                    .filter(|&l| l < cfg.classes)
                    .ok_or_else(|| {
                        CoreError::checkpoint(
                            batch,
                            format!("label {l} out of range for {} classes", cfg.classes),
                        )
                    })
            })
            .collect::<Result<_>>()?,
        Some(t) => {
            return Err(CoreError::checkpoint(
                batch,
                format!("labels must be I64 [B], got shape {:?}", t.shape()),
            ));
        }
        None => return Err(CoreError::checkpoint(batch, "no tensor named labels")),
    };
    let b = labels.len();
    if images.len() != b * cfg.pixels() {
        return Err(CoreError::checkpoint(
            batch,
            format!("{} labels but {} images", b, images.len() / cfg.pixels()),
        ));
    }
    let pool = build_pool(threads)?;
    let mut ws = Workspace::new();
    let mut grads = Params::zeros(model.layout());
    let opts = PassOptions {
        mask: Mask::Label,
        input_grad: false,
    };
    let stats = pool.install(|| {
        model.forward_backward(&ck.params, &images, &labels, opts, &mut grads, &mut ws)
    })?;
    let mut outf = TensorFile::default();
    let scalar = |v: f64| Tensor::f32(vec![], vec![v as f32]);
    outf.tensors
        .insert("loss.margin".into(), scalar(stats.margin_loss));
    outf.tensors.insert(
        "loss.reconstruction".into(),
        scalar(stats.reconstruction_loss),
    );
    outf.tensors
        .insert("loss.total".into(), scalar(stats.total_loss()));
    outf.tensors.insert(
        "lengths".into(),
        Tensor::f32(vec![b, cfg.classes], ws.lengths().to_vec()),
    );
    outf.tensors.insert(
        "digit.v".into(),
        Tensor::f32(
            vec![b, cfg.classes, cfg.digit_dim],
            ws.digit_caps().to_vec(),
        ),
    );
    outf.tensors.insert(
        "decoder.recon".into(),
        Tensor::f32(vec![b, cfg.pixels()], ws.reconstruction().to_vec()),
    );
    for (spec, g) in grads.iter() {
        outf.tensors.insert(
            format!("{}.grad", spec.name),
            Tensor::f32(spec.shape.clone(), g.to_vec()),
        );
    }
    outf.write(out)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An evaluation line names the loss of its network: the CNN's is a cross-entropy, with no
    /// reconstruction; the JSON keeps its fields whatever the network.
    #[test]
    fn an_evaluation_line_names_its_network_loss() {
        let caps = Net::new(&CapsNetConfig::tiny(), None).unwrap();
        let cnn = Net::new(&CapsNetConfig::tiny(), Some(&CnnConfig::tiny())).unwrap();
        let report = |net: &Net| EvalReport {
            accuracy: 0.5,
            margin_loss: 0.25,
            reconstruction_loss: 0.125,
            samples: 4,
            loss_name: net.loss_name(),
        };
        assert_eq!(
            report(&caps).to_string(),
            "accuracy 50.00% (margin loss 0.2500, reconstruction loss 0.1250)"
        );
        assert_eq!(
            report(&cnn).to_string(),
            "accuracy 50.00% (cross-entropy 0.2500)"
        );
        let json = serde_json::to_string(&report(&cnn)).unwrap();
        assert!(
            json.contains("\"margin_loss\":0.25") && !json.contains("loss_name"),
            "{json}"
        );
    }

    #[test]
    fn overrides_replace_only_what_is_given() {
        let mut cfg = TrainConfig {
            model: CapsNetConfig {
                routing_iters: 2,
                ..CapsNetConfig::default()
            },
            ema_decay: Some(0.99),
            ..TrainConfig::default()
        };
        let before = cfg.clone();
        TrainOverrides::default().apply(&mut cfg);
        assert_eq!(cfg, before);

        TrainOverrides {
            model: Some(CapsNetConfig::tiny()),
            batch_size: Some(7),
            lr: Some(0.5),
            lr_schedule: Some(LrSchedule::Cosine),
            max_steps: Some(9),
            test_limit: Some(5),
            ..TrainOverrides::default()
        }
        .apply(&mut cfg);
        // A new network keeps the run's routing iterations unless they are given too.
        assert_eq!(cfg.model.image_size, CapsNetConfig::tiny().image_size);
        assert_eq!(cfg.model.routing_iters, 2);
        assert_eq!(
            (cfg.batch_size, cfg.adam.lr, cfg.adam.schedule),
            (7, 0.5, LrSchedule::Cosine)
        );
        assert_eq!((cfg.max_steps, cfg.test_limit), (Some(9), Some(5)));
        assert_eq!((cfg.ema_decay, cfg.epochs), (Some(0.99), before.epochs));

        TrainOverrides {
            routing_iters: Some(4),
            ..TrainOverrides::default()
        }
        .apply(&mut cfg);
        assert_eq!(cfg.model.routing_iters, 4);
    }
}
