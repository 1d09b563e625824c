//! `capsnet`: the command line. Thin: parses flags (each also a `CAPSNET_*` environment
//! variable), installs logging, and calls the libraries.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use capsnet_core::CapsNetConfig;
use capsnet_core::bench::{self, BenchMode, BenchRow, BenchSettings};
use capsnet_core::checkpoint::latest_checkpoint;
use capsnet_core::data;
use capsnet_core::train::{self, EvalReport, Observer, StepReport, TrainConfig};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "capsnet",
    version,
    about = "Capsule networks (Sabour et al. 2017), trained fast on CPUs"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line (for clusters).
    #[arg(
        long,
        global = true,
        env = "CAPSNET_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train on one machine; writes config.json, metrics.jsonl and checkpoints to the run dir.
    Train(TrainArgs),
    /// Accuracy and losses of a checkpoint on a test split.
    Eval(EvalArgs),
    /// One forward and backward pass on a batch file; writes losses and every gradient.
    Grad(GradArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args, Clone)]
struct DataArgs {
    /// A data set installed on this machine: fashion-mnist (Debian package dataset-fashion-mnist).
    /// The default when --data-dir is not given.
    #[arg(long, env = "CAPSNET_DATASET")]
    dataset: Option<String>,
    /// A folder with IDX files under the standard names (train-images-idx3-ubyte[.gz], ...).
    #[arg(long, env = "CAPSNET_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DataArgs {
    fn resolve(&self) -> Result<PathBuf> {
        let preset = self.dataset.as_deref().or(if self.data_dir.is_none() {
            Some("fashion-mnist")
        } else {
            None
        });
        Ok(data::resolve_data_dir(preset, self.data_dir.as_deref())?)
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Passes over the training set.
    #[arg(long, env = "CAPSNET_EPOCHS")]
    epochs: Option<u64>,
    /// Stop after this many optimizer steps in total.
    #[arg(long, env = "CAPSNET_MAX_STEPS")]
    max_steps: Option<u64>,
    /// Images per step [default: 32].
    #[arg(long, env = "CAPSNET_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Adam learning rate [default: 0.001].
    #[arg(long, env = "CAPSNET_LR")]
    lr: Option<f32>,
    /// Learning-rate decay factor per --lr-decay-steps [default: 0.96].
    #[arg(long, env = "CAPSNET_LR_DECAY")]
    lr_decay: Option<f32>,
    /// Steps over which the learning rate decays by --lr-decay [default: 2000].
    #[arg(long, env = "CAPSNET_LR_DECAY_STEPS")]
    lr_decay_steps: Option<u64>,
    /// Routing iterations r [default: 3].
    #[arg(long, env = "CAPSNET_ROUTING_ITERS")]
    routing_iters: Option<usize>,
    /// Seed of every random choice (initialisation, shuffling, augmentation) [default: 0].
    #[arg(long, env = "CAPSNET_SEED")]
    seed: Option<u64>,
    /// Threads [default: the cores available].
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
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
    /// Steps between train lines in metrics.jsonl (and log lines off a terminal) [default: 50].
    #[arg(long, env = "CAPSNET_LOG_EVERY")]
    log_every: Option<u64>,
    /// Steps between checkpoints; 0 = at the end of each epoch only [default: 0].
    #[arg(long, env = "CAPSNET_CHECKPOINT_EVERY")]
    checkpoint_every: Option<u64>,
    /// Checkpoints to keep [default: 3].
    #[arg(long, env = "CAPSNET_KEEP_CHECKPOINTS")]
    keep_checkpoints: Option<usize>,
    /// Largest random shift of the augmentation in pixels; 0 turns it off [default: 2].
    #[arg(long, env = "CAPSNET_MAX_SHIFT")]
    max_shift: Option<usize>,
    /// Train on the first N images only (quick runs).
    #[arg(long, env = "CAPSNET_TRAIN_LIMIT")]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long, env = "CAPSNET_TEST_LIMIT")]
    test_limit: Option<usize>,
    /// Network size: the paper's, or a tiny one for smoke tests [default: paper].
    #[arg(long, env = "CAPSNET_MODEL", value_enum)]
    model: Option<ModelSize>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ModelSize {
    Paper,
    Tiny,
}

impl ModelSize {
    fn config(self) -> CapsNetConfig {
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
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint file (capsnet's or a parameters-only safetensors file).
    #[arg(long, env = "CAPSNET_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, env = "CAPSNET_BATCH_SIZE", default_value_t = 128)]
    batch_size: usize,
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GradArgs {
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

#[derive(Subcommand)]
enum BenchCmd {
    /// Training and inference throughput of the model.
    Train(BenchTrainArgs),
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Batch sizes of the training rows.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    batch_sizes: Vec<usize>,
    /// Batch sizes of the inference rows (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    infer_batch_sizes: Vec<usize>,
    /// Timed steps per setting.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Images per block of the primary-capsule im2col.
    #[arg(long)]
    primary_chunk: Option<usize>,
    #[arg(long, value_enum, default_value = "paper")]
    model: ModelSize,
    /// Also write the rows as JSON (keys as torch_capsnet_bench.py --json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the sgemm reference measurement.
    #[arg(long)]
    no_sgemm: bool,
    /// Internal: run one setting in this process and print its row as JSON.
    #[arg(long, hide = true, value_name = "MODE:BATCH")]
    single: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Grad(a) => cmd_grad(a),
        Cmd::Bench(BenchCmd::Train(a)) => cmd_bench_train(a),
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let resume = a.resume.is_some();
    let mut cfg = match &a.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("--resume: cannot read {}", path.display()))?;
            serde_json::from_str::<TrainConfig>(&text)
                .with_context(|| format!("--resume: {} is not a capsnet config", path.display()))?
        }
        None => TrainConfig {
            run_dir: default_run_dir(),
            ..TrainConfig::default()
        },
    };
    if !resume || a.data.dataset.is_some() || a.data.data_dir.is_some() {
        cfg.data_dir = a.data.resolve()?;
    }
    if let Some(m) = a.model {
        let mut model = m.config();
        model.routing_iters = cfg.model.routing_iters;
        cfg.model = model;
    }
    macro_rules! set {
        ($($field:expr => $value:expr),* $(,)?) => { $( if let Some(v) = $value { $field = v; } )* };
    }
    set!(
        cfg.epochs => a.epochs, cfg.batch_size => a.batch_size, cfg.adam.lr => a.lr,
        cfg.adam.decay_rate => a.lr_decay, cfg.adam.decay_steps => a.lr_decay_steps,
        cfg.model.routing_iters => a.routing_iters, cfg.seed => a.seed, cfg.threads => a.threads,
        cfg.log_every => a.log_every, cfg.checkpoint_every => a.checkpoint_every,
        cfg.keep_checkpoints => a.keep_checkpoints, cfg.max_shift => a.max_shift,
        cfg.run_dir => a.run_dir.clone().or(a.resume.clone()),
    );
    if a.max_steps.is_some() {
        cfg.max_steps = a.max_steps;
    }
    if a.train_limit.is_some() {
        cfg.train_limit = a.train_limit;
    }
    if a.test_limit.is_some() {
        cfg.test_limit = a.test_limit;
    }
    cfg.validate()?;
    if !resume && latest_checkpoint(&cfg.run_dir).ok().flatten().is_some() {
        bail!(
            "{} already holds checkpoints of another run; pass --resume {} to continue it, or choose another --run-dir",
            cfg.run_dir.display(),
            cfg.run_dir.display()
        );
    }
    tracing::info!(
        data = %cfg.data_dir.display(), run_dir = %cfg.run_dir.display(), batch = cfg.batch_size,
        epochs = cfg.epochs, threads = cfg.threads, routing = cfg.model.routing_iters, "training"
    );
    let mut progress = Progress::new(cfg.log_every);
    let out = train::train(&cfg, resume, &mut progress)?;
    progress.finish();
    if let Some(e) = &out.last_eval {
        println!(
            "done: {} steps in {:.1} s; test accuracy {:.2}% (margin loss {:.4}, reconstruction loss {:.4}, {} images)",
            out.steps,
            out.wall_s,
            100.0 * e.accuracy,
            e.margin_loss,
            e.reconstruction_loss,
            e.samples
        );
    }
    if let Some(p) = &out.checkpoint {
        println!("checkpoint: {}", p.display());
    }
    Ok(())
}

/// `runs/<UTC date-time>`, unique per second.
fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from(format!(
        "runs/{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
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
    fn on_eval(&mut self, step: u64, epoch: u64, e: &EvalReport) {
        let line = format!(
            "eval after step {step} (epoch {epoch}): test accuracy {:.2}%, margin loss {:.4}, reconstruction loss {:.4}",
            100.0 * e.accuracy,
            e.margin_loss,
            e.reconstruction_loss
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        }
    }
    fn on_checkpoint(&mut self, path: &Path) {
        tracing::debug!(path = %path.display(), "checkpoint written");
    }
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let dir = a.data.resolve()?;
    let threads = a.threads.unwrap_or_else(train::default_threads);
    let e = train::evaluate_checkpoint(&a.checkpoint, &dir, a.batch_size, threads)?;
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        println!(
            "{}: accuracy {:.2}% on {} images; margin loss {:.4}, reconstruction loss {:.4}",
            a.checkpoint.display(),
            100.0 * e.accuracy,
            e.samples,
            e.margin_loss,
            e.reconstruction_loss
        );
    }
    Ok(())
}

fn cmd_grad(a: GradArgs) -> Result<()> {
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

/// PyTorch 2.15 on the same 2 cores (../shared/reference/README.md): images/s range, peak GiB.
fn torch_reference(mode: BenchMode, batch: usize) -> Option<(&'static str, &'static str)> {
    match (mode, batch) {
        (BenchMode::Train, 32) => Some(("124-149", "1.0")),
        (BenchMode::Train, 64) => Some(("104-125", "1.1")),
        (BenchMode::Train, 128) => Some(("100-111", "1.3")),
        (BenchMode::Infer, 128) => Some(("331-370", "0.8")),
        _ => None,
    }
}

fn cmd_bench_train(a: BenchTrainArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(train::default_threads);
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(spec) = &a.single {
        let (mode, batch) = spec.split_once(':').context("--single takes MODE:BATCH")?;
        let mode = match mode {
            "train" => BenchMode::Train,
            "infer" => BenchMode::Infer,
            m => bail!("unknown mode {m}"),
        };
        let s = BenchSettings {
            mode,
            batch: batch.parse().context("--single batch")?,
            steps: a.steps,
            warmup: a.warmup,
            threads,
            model: a.model.config(),
            primary_chunk: a.primary_chunk,
        };
        println!("{}", serde_json::to_string(&bench::run_setting(&s)?)?);
        return Ok(());
    }
    let settings: Vec<(BenchMode, usize)> = a
        .batch_sizes
        .iter()
        .map(|&b| (BenchMode::Train, b))
        .chain(a.infer_batch_sizes.iter().map(|&b| (BenchMode::Infer, b)))
        .collect();
    if let Some(&(_, 0)) = settings.iter().find(|(_, b)| *b == 0) {
        bail!("batch sizes must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find the capsnet executable")?;
    let cfg = a.model.config();
    println!(
        "capsnet bench train: {} threads, {} timed steps after {} warm-up, model {} ({:.1} MFLOP forward per image)",
        threads,
        a.steps,
        a.warmup,
        if a.model == ModelSize::Paper {
            "paper"
        } else {
            "tiny"
        },
        cfg.forward_flops() / 1e6
    );
    println!("machine: {}", machine_summary());
    if !a.no_sgemm {
        let g = bench::sgemm_gflops(threads, 3)?;
        println!(
            "sgemm at the primary-conv shape [4608,20736]x[20736,256]: {g:.0} GFLOP/s ({threads} threads)"
        );
    }
    println!();
    println!(
        "{:<6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}   {:<13} {:>9}",
        "mode",
        "batch",
        "median_s",
        "min_s",
        "max_s",
        "images/s",
        "GFLOP/s",
        "peak_MiB",
        "torch img/s",
        "torch GiB"
    );
    let mut rows: Vec<BenchRow> = vec![];
    for (mode, batch) in settings {
        // Each setting in its own process, so peak memory is that setting's alone.
        let mode_s = if mode == BenchMode::Train {
            "train"
        } else {
            "infer"
        };
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "train", "--single", &format!("{mode_s}:{batch}")])
            .args([
                "--steps",
                &a.steps.to_string(),
                "--warmup",
                &a.warmup.to_string(),
            ])
            .args(["--threads", &threads.to_string()])
            .args([
                "--model",
                if a.model == ModelSize::Paper {
                    "paper"
                } else {
                    "tiny"
                },
            ]);
        if let Some(c) = a.primary_chunk {
            cmd.args(["--primary-chunk", &c.to_string()]);
        }
        let out = cmd.output().context("running a benchmark setting")?;
        if !out.status.success() {
            bail!(
                "benchmark {mode_s} batch {batch} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let row: BenchRow =
            serde_json::from_slice(&out.stdout).context("reading a benchmark row")?;
        let (ti, tg) = torch_reference(mode, batch).unwrap_or(("-", "-"));
        println!(
            "{:<6} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>8.1} {:>9.0}   {:<13} {:>9}",
            mode_s,
            batch,
            row.median_s,
            row.min_s,
            row.max_s,
            row.images_per_s,
            row.gflop_per_s,
            row.peak_rss_mib,
            ti,
            tg
        );
        rows.push(row);
    }
    println!();
    println!("time per step by part (ms):");
    let names: Vec<&str> = rows
        .first()
        .map(|r| r.parts.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    print!("{:<6} {:>5}", "mode", "batch");
    for n in &names {
        print!(" {n:>9}");
    }
    println!();
    for r in &rows {
        print!(
            "{:<6} {:>5}",
            if r.mode == BenchMode::Train {
                "train"
            } else {
                "infer"
            },
            r.batch
        );
        for (_, s) in &r.parts {
            print!(" {:>9.1}", s * 1e3);
        }
        println!();
    }
    if let Some(path) = &a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "impl": "capsnet", "mode": r.mode, "batch": r.batch, "threads": r.threads,
                    "median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s,
                    "images_per_s": r.images_per_s, "gflop_per_s": r.gflop_per_s,
                    "peak_rss_mib": r.peak_rss_mib, "parts_s": r.parts.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb / 1048576.0))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let blas = std::env::var("OPENBLAS_CORETYPE")
        .map(|v| format!("OPENBLAS_CORETYPE={v}"))
        .unwrap_or_else(|_| "OPENBLAS_CORETYPE unset".into());
    format!("{cpu}, {cores} cores, {mem} memory, {blas}")
}
