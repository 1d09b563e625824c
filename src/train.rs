//! `capsnet train`, `capsnet eval` and `capsnet grad`: one machine, the core library alone.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsnet_core::train::{self, EvalReport, Observer, StepReport, TrainConfig};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{DataArgs, TrainFlags};
use crate::exit::ConfigError;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    flags: TrainFlags,
    /// Where config.json, metrics.jsonl and checkpoints go [default: runs/<UTC time>].
    #[arg(long, env = "CAPSNET_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint, with its config.json; flags given
    /// here override it.
    #[arg(
        long,
        env = "CAPSNET_RESUME",
        value_name = "RUN_DIR",
        conflicts_with = "run_dir"
    )]
    resume: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint file (capsnet's or a parameters-only safetensors file).
    #[arg(long, env = "CAPSNET_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, env = "CAPSNET_BATCH_SIZE", default_value_t = 128)]
    batch_size: usize,
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Evaluate the checkpoint's moving average of the weights (`ema.<name>`, written by
    /// `--ema-decay`) instead of the weights.
    #[arg(long)]
    ema: bool,
    /// Also evaluate on the affine test set (section 5.2 of the paper): each test image under a
    /// seeded random rotation (up to 20 degrees), shear (up to 0.2), scale (0.8-1.2 per axis)
    /// and translation inside the model's input canvas.
    #[arg(long)]
    affine: bool,
    /// Seed of the affine test set, and of the translated test set when the images are smaller
    /// than the model's input.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also evaluate on the test split's overlapping pairs (section 6 of the paper; for a model
    /// trained with --multi): a pair is right when its two classes are the two longest capsules
    /// (the two largest outputs of the CNN). The shift is half the margin between the model's
    /// input and the images.
    #[arg(long)]
    multi: bool,
    /// Evaluate on the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GradArgs {
    #[arg(long, env = "CAPSNET_CHECKPOINT")]
    checkpoint: PathBuf,
    /// safetensors with images f32 [B,1,28,28] and labels i64 [B].
    #[arg(long)]
    batch: PathBuf,
    /// Output safetensors: loss.*, lengths, digit.v, decoder.recon and <param>.grad.
    #[arg(long)]
    out: PathBuf,
    /// Routing iterations (default: the checkpoint's).
    #[arg(long, env = "CAPSNET_ROUTING_ITERS")]
    routing_iters: Option<usize>,
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let resume = a.resume.is_some();
    let mut cfg = match &a.resume {
        Some(dir) => TrainConfig::load(dir).context("--resume")?,
        None => TrainConfig {
            run_dir: default_run_dir(),
            ..TrainConfig::default()
        },
    };
    a.flags.overrides(!resume)?.apply(&mut cfg);
    if let Some(d) = a.run_dir.or(a.resume) {
        cfg.run_dir = d;
    }
    cfg.validate()?;
    let side = cfg.model.image_size;
    let mut model = match &cfg.baseline {
        Some(_) => format!("cnn-baseline {side}x{side}"),
        None => format!("capsnet {side}x{side}, routing {}", cfg.model.routing_iters),
    };
    if let Some(shift) = cfg.multi {
        model.push_str(&format!(", overlapping pairs shifted up to {shift}"));
    }
    tracing::info!(
        data = %cfg.data_dir.display(), run_dir = %cfg.run_dir.display(), batch = cfg.batch_size,
        epochs = cfg.epochs, threads = cfg.threads, model, "training"
    );
    let mut progress = Progress::new(cfg.log_every);
    let out = train::train(&cfg, resume, &mut progress)?;
    progress.finish();
    if let Some(e) = &out.last_eval {
        let what = if cfg.multi.is_some() {
            "pairs"
        } else {
            "images"
        };
        println!(
            "done: {} steps in {:.1} s; test {e} on {} {what}",
            out.steps, out.wall_s, e.samples
        );
    }
    if let Some(e) = &out.last_ema_eval {
        println!("weight average (--ema-decay): test {e}");
    }
    if let Some(p) = &out.checkpoint {
        println!("checkpoint: {}", p.display());
    }
    Ok(())
}

/// `runs/<UTC date>-<time>`, unique per second.
fn default_run_dir() -> PathBuf {
    // "2026-12-02T07:04:56Z" -> "20261202-070456"
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    PathBuf::from(format!("runs/{date}-{time}"))
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let dir = a.data.resolve()?;
    let threads = a.threads.unwrap_or_else(train::default_threads);
    if a.test_limit == Some(0) {
        return Err(ConfigError("--test-limit must be at least 1".into()).into());
    }
    let sets = train::EvalSets {
        affine: a.affine.then_some(a.seed),
        placement_seed: a.seed,
        limit: a.test_limit,
        multi: a.multi,
    };
    let e = train::evaluate_checkpoint(&a.checkpoint, &dir, a.batch_size, threads, a.ema, sets)?;
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        let what = if a.ema { " (weight average)" } else { "" };
        let side = e.image_size;
        let set = if e.test_set == "translated" {
            format!(
                " of the translated test set ({side}x{side}, seed {})",
                a.seed
            )
        } else {
            String::new()
        };
        println!(
            "{}{what}: {} on {} images{set}",
            a.checkpoint.display(),
            e.test,
            e.test.samples
        );
        if let Some(af) = &e.affine {
            println!(
                "affine test set ({side}x{side}, seed {}): {af} on {} images",
                a.seed, af.samples
            );
        }
        if let (Some(p), Some(shift)) = (&e.pairs, e.pair_shift) {
            println!(
                "overlapping pairs ({side}x{side}, shifts up to {shift}, both classes right): {p} \
                 on {} pairs",
                p.samples
            );
        }
    }
    Ok(())
}

pub fn grad(a: GradArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(train::default_threads);
    let s = train::gradient_file(&a.checkpoint, &a.batch, &a.out, a.routing_iters, threads)?;
    println!(
        "{} images: margin loss {:.6}, reconstruction loss {:.6}, total {:.6}; gradients in {}",
        s.samples,
        s.margin_loss,
        s.reconstruction_loss,
        s.total_loss(),
        a.out.display()
    );
    Ok(())
}

/// A progress bar on a terminal; plain log lines every `log_every` steps otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
}

impl Progress {
    fn new(log_every: u64) -> Self {
        Progress {
            bar: None,
            log_every,
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, _cfg: &TrainConfig, start: u64, total: u64) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}, ETA {eta}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(start);
            self.bar = Some(bar);
        }
    }
    fn on_step(&mut self, r: &StepReport) {
        let msg = format!(
            "epoch {} loss {:.4} acc {:.1}% {:.1} img/s",
            r.epoch + 1,
            r.loss,
            100.0 * r.accuracy,
            r.images_per_s
        );
        match &self.bar {
            Some(b) => {
                b.set_position(r.step);
                b.set_message(msg);
            }
            None if r.step % self.log_every == 0 => tracing::info!(
                step = r.step,
                epoch = r.epoch + 1,
                loss = r.loss,
                accuracy = r.accuracy,
                images_per_s = r.images_per_s,
                lr = r.lr,
                "train"
            ),
            None => {}
        }
    }
    fn on_eval(&mut self, step: u64, epoch: u64, e: &EvalReport, ema: Option<&EvalReport>) {
        let mut line = format!("eval after step {step} (epoch {epoch}): test {e}");
        if let Some(a) = ema {
            line += &format!("; weight average: {a}");
        }
        match &self.bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        }
    }
    fn on_checkpoint(&mut self, path: &Path) {
        tracing::debug!(path = %path.display(), "checkpoint written");
    }
}
