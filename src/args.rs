//! Flag groups and value types shared by several commands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use capsnet_core::data;
use capsnet_core::train::TrainOverrides;
use capsnet_core::{CapsNetConfig, CnnConfig};
use clap::{Args, ValueEnum};

use crate::exit::ConfigError;

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration: `500ms`, `30s`, `2m`, `1h 30m` (humantime's syntax), or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} must be a positive duration of at most 2^64 seconds"))?,
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m): {e}"))?,
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(d)
}

/// A size in bytes: `65536`, `64KiB`, `1MiB` (also `k`/`KB`/`M`/`MB` as powers of 1024).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 65536, 64KiB, 1MiB)"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        other => return Err(format!("{s:?}: unknown unit {other:?} (B, KiB or MiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A duration as [`parse_duration`] reads it, or 0 (off).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub enum SyncArg {
    /// Average gradients every round; the coordinator applies Adam.
    Grad,
    /// Local SGD: average parameters every --sync-every local steps.
    Params,
}

/// What the coordinator does with each round's average in `--sync params`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub enum OuterArg {
    /// The average is the new parameters.
    None,
    /// DiLoCo: the averaged change is a pseudo-gradient for Nesterov momentum.
    Nesterov,
}

impl SyncArg {
    pub fn mode(self) -> capsnet_proto::SyncMode {
        match self {
            SyncArg::Grad => capsnet_proto::SyncMode::Grad,
            SyncArg::Params => capsnet_proto::SyncMode::Params,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub enum WireArg {
    F32,
    Bf16,
}

impl WireArg {
    pub fn encoding(self) -> capsnet_proto::Encoding {
        match self {
            WireArg::F32 => capsnet_proto::Encoding::F32,
            WireArg::Bf16 => capsnet_proto::Encoding::Bf16,
        }
    }
}

/// Where the shared token comes from: `--token-file`, or the CAPSNET_TOKEN variable.
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// File holding the bearer token every RPC must carry (or set CAPSNET_TOKEN).
    #[arg(long, env = "CAPSNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token; every problem with it is a configuration error (exit 2).
    pub fn token(&self) -> Result<String> {
        let t = match &self.token_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError(format!("--token-file {}: {e}", p.display())))?,
            None => std::env::var("CAPSNET_TOKEN").map_err(|_| {
                ConfigError(
                    "no token: pass --token-file FILE or set CAPSNET_TOKEN (at least 16 characters)"
                        .into(),
                )
            })?,
        };
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(ConfigError("the token must be at least 16 characters".into()).into());
        }
        Ok(t)
    }
}

#[derive(Args, Clone)]
pub struct DataArgs {
    /// A data set installed on this machine: fashion-mnist (Debian package dataset-fashion-mnist).
    /// The default when --data-dir is not given.
    #[arg(long, env = "CAPSNET_DATASET")]
    pub dataset: Option<String>,
    /// A folder with IDX files under the standard names (train-images-idx3-ubyte[.gz], ...).
    #[arg(long, env = "CAPSNET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// The data folder: --data-dir, or the --dataset preset (fashion-mnist by default).
    pub fn resolve(&self) -> Result<PathBuf> {
        let preset = self.dataset.as_deref().or(if self.data_dir.is_none() {
            Some("fashion-mnist")
        } else {
            None
        });
        Ok(data::resolve_data_dir(preset, self.data_dir.as_deref())?)
    }

    fn given(&self) -> bool {
        self.dataset.is_some() || self.data_dir.is_some()
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum ModelSize {
    Paper,
    Tiny,
}

impl ModelSize {
    pub fn config(self) -> CapsNetConfig {
        match self {
            ModelSize::Paper => CapsNetConfig::default(),
            ModelSize::Tiny => CapsNetConfig {
                image_size: 28,
                conv1_kernel: 9,
                primary_kernel: 9,
                classes: 10,
                ..CapsNetConfig::tiny()
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelSize::Paper => "paper",
            ModelSize::Tiny => "tiny",
        }
    }
}

/// The network a run trains (`--model`).
#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum TrainModel {
    /// The paper's capsule network.
    Paper,
    /// A tiny capsule network, for smoke tests.
    Tiny,
    /// The paper's CNN baseline: three 5x5 convolutions (256, 256, 128 channels; 2x2 max
    /// pooling after the first two), fully connected 328 and 192, dropout 0.5, softmax.
    CnnBaseline,
    /// A tiny CNN of the same shape, for smoke tests.
    CnnTiny,
}

impl TrainModel {
    /// The name of `--model`.
    pub fn name(self) -> &'static str {
        match self {
            TrainModel::Paper => "paper",
            TrainModel::Tiny => "tiny",
            TrainModel::CnnBaseline => "cnn-baseline",
            TrainModel::CnnTiny => "cnn-tiny",
        }
    }

    /// The capsule config (the input side and classes, for the CNN) and the CNN's config.
    pub fn configs(self) -> (CapsNetConfig, Option<CnnConfig>) {
        match self {
            TrainModel::Paper => (ModelSize::Paper.config(), None),
            TrainModel::Tiny => (ModelSize::Tiny.config(), None),
            TrainModel::CnnBaseline => (CapsNetConfig::default(), Some(CnnConfig::default())),
            TrainModel::CnnTiny => (CapsNetConfig::default(), Some(CnnConfig::tiny())),
        }
    }
}

/// The training flags shared by `train` and `coordinator`.
#[derive(Args, Clone)]
pub struct TrainFlags {
    #[command(flatten)]
    pub data: DataArgs,
    /// Passes over the training set.
    #[arg(long, env = "CAPSNET_EPOCHS")]
    pub epochs: Option<u64>,
    /// Stop after this many optimizer steps in total.
    #[arg(long, env = "CAPSNET_MAX_STEPS")]
    pub max_steps: Option<u64>,
    /// Images per step [default: 32].
    #[arg(long, env = "CAPSNET_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Adam learning rate [default: 0.001].
    #[arg(long, env = "CAPSNET_LR", allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Learning-rate schedule: `exponential` (x --lr-decay every --lr-decay-steps, forever) or
    /// `cosine` (half a cosine down to lr x --lr-decay at --lr-decay-steps, then flat)
    /// [default: exponential].
    #[arg(long, env = "CAPSNET_LR_SCHEDULE")]
    pub lr_schedule: Option<capsnet_core::optim::LrSchedule>,
    /// Learning-rate decay factor per --lr-decay-steps [default: 0.96].
    #[arg(long, env = "CAPSNET_LR_DECAY")]
    pub lr_decay: Option<f32>,
    /// Steps over which the learning rate decays by --lr-decay [default: 2000].
    #[arg(long, env = "CAPSNET_LR_DECAY_STEPS")]
    pub lr_decay_steps: Option<u64>,
    /// Routing iterations r [default: 3].
    #[arg(long, env = "CAPSNET_ROUTING_ITERS")]
    pub routing_iters: Option<usize>,
    /// Seed of every random choice (initialisation, shuffling, augmentation) [default: 0].
    #[arg(long, env = "CAPSNET_SEED")]
    pub seed: Option<u64>,
    /// Threads [default: the cores available].
    #[arg(long, env = "CAPSNET_THREADS")]
    pub threads: Option<usize>,
    /// Steps between train lines in metrics.jsonl (and log lines off a terminal) [default: 50].
    #[arg(long, env = "CAPSNET_LOG_EVERY")]
    pub log_every: Option<u64>,
    /// Steps between checkpoints; 0 = at the end of each epoch only [default: 0].
    #[arg(long, env = "CAPSNET_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep [default: 3].
    #[arg(long, env = "CAPSNET_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<usize>,
    /// Largest random shift of the augmentation in pixels; 0 turns it off [default: 2].
    #[arg(long, env = "CAPSNET_MAX_SHIFT")]
    pub max_shift: Option<usize>,
    /// Also keep an exponential moving average of the weights with this decay (e.g. 0.999);
    /// evaluations then report it too (`ema_test_*`) and checkpoints store it (`ema.<name>`)
    /// [default: off].
    #[arg(long, env = "CAPSNET_EMA_DECAY")]
    pub ema_decay: Option<f32>,
    /// Train on the first N images only (quick runs).
    #[arg(long, env = "CAPSNET_TRAIN_LIMIT")]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long, env = "CAPSNET_TEST_LIMIT")]
    pub test_limit: Option<usize>,
    /// The network: the paper's capsule network, its CNN baseline, or a tiny one of either for
    /// smoke tests [default: paper].
    #[arg(long, env = "CAPSNET_MODEL", value_enum)]
    pub model: Option<TrainModel>,
    /// Place each training image at a random position on a black canvas of N x N pixels (the
    /// paper's 40x40 translated MNIST, section 5.2) in place of the shift augmentation; the
    /// network takes N x N inputs and is evaluated on the translated test set [default: off].
    #[arg(long, env = "CAPSNET_CANVAS", value_name = "N")]
    pub canvas: Option<usize>,
    /// Train and test on overlapping pairs of images of two classes (the paper's MultiMNIST,
    /// section 6): each image shifted by up to SHIFT pixels (4 when no value is given) on a
    /// canvas of the images' side plus 2 x SHIFT (36x36 for 28x28 images), overlaid; the two
    /// labels score the loss and each image is reconstructed from its own capsule. The pairs
    /// are seeded, so an epoch is reproducible [default: off].
    #[arg(long, env = "CAPSNET_MULTI", value_name = "SHIFT", num_args = 0..=1,
          default_missing_value = "4")]
    pub multi: Option<usize>,
}

impl TrainFlags {
    /// The flags that were given, to lay over a config. The data folder is resolved when given,
    /// or when `data_default` (a new run defaults to the fashion-mnist preset; a resumed run
    /// keeps its own).
    pub fn overrides(&self, data_default: bool) -> Result<TrainOverrides> {
        Ok(TrainOverrides {
            data_dir: if data_default || self.data.given() {
                Some(self.data.resolve()?)
            } else {
                None
            },
            model: self.model.map(|m| m.configs().0),
            baseline: self.model.and_then(|m| m.configs().1),
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            lr: self.lr,
            lr_schedule: self.lr_schedule,
            lr_decay: self.lr_decay,
            lr_decay_steps: self.lr_decay_steps,
            routing_iters: self.routing_iters,
            seed: self.seed,
            threads: self.threads,
            log_every: self.log_every,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            max_shift: self.max_shift,
            ema_decay: self.ema_decay,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            canvas: self.canvas,
            multi: self.multi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_duration};
    use std::time::Duration;

    #[test]
    fn sizes_take_binary_units_or_plain_bytes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes(" 64k "), Ok(65536));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        for (bad, says) in [
            ("", "not a size"),
            ("KiB", "not a size"),
            ("-1", "not a size"),
            ("64GiB", "unknown unit"),
            ("99999999999999999999999MiB", "not a size"),
            ("18446744073709551615MiB", "too large"),
        ] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        for bad in [
            "0",
            "0s",
            "-1",
            "soon",
            "5 parsecs",
            "inf",
            "1e20",
            "1e30",
            "NaN",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
