//! `capsnet`: the command line. Thin: parses flags (each also a `CAPSNET_*` environment
//! variable), installs logging, and calls the libraries.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod bench_sync;
mod launch;

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
    /// Serve a distributed training run: workers join, send gradients, get parameters.
    Coordinator(CoordinatorArgs),
    /// Join a coordinator and train on a shard of the data.
    Worker(WorkerArgs),
    /// A coordinator and N workers on this machine, logs interleaved; stops them all at the end.
    Launch(LaunchArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

/// A duration: `500ms`, `30s`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum SyncArg {
    /// Average gradients every round; the coordinator applies Adam.
    Grad,
    /// Local SGD: average parameters every --sync-every local steps.
    Params,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum WireArg {
    F32,
    Bf16,
}

impl WireArg {
    fn encoding(self) -> capsnet_proto::Encoding {
        match self {
            WireArg::F32 => capsnet_proto::Encoding::F32,
            WireArg::Bf16 => capsnet_proto::Encoding::Bf16,
        }
    }
}

/// Where the shared token comes from: `--token-file`, or the CAPSNET_TOKEN variable.
#[derive(Args, Clone)]
struct TokenArgs {
    /// File holding the bearer token every RPC must carry (or set CAPSNET_TOKEN).
    #[arg(long, env = "CAPSNET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token; every problem with it is a configuration error (exit 2).
    fn token(&self) -> Result<String> {
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
struct CoordinatorArgs {
    #[command(flatten)]
    flags: TrainFlags,
    /// Where config.json, metrics.jsonl and checkpoints go.
    #[arg(long, env = "CAPSNET_RUN_DIR", default_value = "runs/coordinator")]
    run_dir: PathBuf,
    /// Continue from the newest checkpoint in --run-dir (fresh start if there is none).
    #[arg(long, env = "CAPSNET_RESUME")]
    resume: bool,
    /// Address to listen on; port 0 picks a free port (the address is logged).
    #[arg(long, env = "CAPSNET_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// What workers send: gradients (default) or parameters after local steps.
    #[arg(long, env = "CAPSNET_SYNC", value_enum, default_value = "grad")]
    sync: SyncArg,
    /// Local steps per round with --sync params.
    #[arg(long, env = "CAPSNET_SYNC_EVERY", default_value_t = 1)]
    sync_every: usize,
    /// A round closes at this deadline with --min-workers updates; the rest are marked unhealthy.
    #[arg(long, env = "CAPSNET_ROUND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    round_timeout: Duration,
    #[arg(long, env = "CAPSNET_MIN_WORKERS", default_value_t = 1)]
    min_workers: usize,
    /// Start training when this many workers joined [default: --min-workers].
    #[arg(long, env = "CAPSNET_EXPECT_WORKERS")]
    expect_workers: Option<usize>,
    /// Start anyway after this long with at least --min-workers.
    #[arg(long, env = "CAPSNET_START_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    start_timeout: Duration,
    /// Evaluate on the test set (and checkpoint) every N rounds; 0: at the end of each epoch.
    #[arg(long, env = "CAPSNET_EVAL_EVERY", default_value_t = 0)]
    eval_every: u64,
    /// Worker heartbeat interval; three missed ones mark a worker unhealthy.
    #[arg(long, env = "CAPSNET_HEARTBEAT", default_value = "1s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Encoding of updates on the wire (the coordinator keeps fp32 master weights).
    #[arg(long, env = "CAPSNET_WIRE", value_enum, default_value = "f32")]
    wire: WireArg,
    /// Bytes per streamed chunk.
    #[arg(long, env = "CAPSNET_CHUNK_BYTES", default_value_t = 1 << 20)]
    chunk_bytes: usize,
    #[command(flatten)]
    token: TokenArgs,
    /// TLS certificate (PEM); with --tls-key, the coordinator serves TLS.
    #[arg(long, env = "CAPSNET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must be signed by (mutual TLS).
    #[arg(long, env = "CAPSNET_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Exit once training is finished and workers were told; false keeps serving (status,
    /// health) until SIGTERM, as a Kubernetes Deployment expects.
    #[arg(long, env = "CAPSNET_EXIT_WHEN_DONE", default_value_t = true, action = clap::ArgAction::Set)]
    exit_when_done: bool,
    /// Write the bound address to this file once listening (used by `capsnet launch`).
    #[arg(long, hide = true)]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct WorkerArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "CAPSNET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    #[command(flatten)]
    data: DataArgs,
    /// Stable name; a worker restarted under the same name gets its shard back
    /// [default: worker-<rank>, or the host name].
    #[arg(long, env = "CAPSNET_WORKER_NAME")]
    name: Option<String>,
    /// Preferred rank (Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX is used when unset).
    #[arg(long, env = "CAPSNET_RANK")]
    rank: Option<u32>,
    /// Threads [default: the cores available].
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Exit with an error when the coordinator stays unreachable this long.
    #[arg(long, env = "CAPSNET_GIVE_UP_AFTER", default_value = "5m", value_parser = parse_duration)]
    give_up_after: Duration,
    #[command(flatten)]
    token: TokenArgs,
    /// CA (PEM) of the coordinator's certificate: connect with TLS.
    #[arg(long, env = "CAPSNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[arg(
        long,
        env = "CAPSNET_TLS_CERT",
        requires = "tls_ca",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Server name to verify in the coordinator's certificate [default: the URL's host].
    #[arg(long, env = "CAPSNET_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
}

#[derive(Args)]
struct LaunchArgs {
    /// Worker processes to start.
    #[arg(long, env = "CAPSNET_WORKERS", default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    coordinator: CoordinatorArgs,
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
        data::resolve_data_dir(preset, self.data_dir.as_deref())
            .map_err(|e| ConfigError(e.to_string()).into())
    }
}

/// The training flags shared by `train` and `coordinator`.
#[derive(Args, Clone)]
struct TrainFlags {
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
    #[arg(long, env = "CAPSNET_LR", allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Learning-rate schedule: `exponential` (x --lr-decay every --lr-decay-steps, forever) or
    /// `cosine` (half a cosine down to lr x --lr-decay at --lr-decay-steps, then flat)
    /// [default: exponential].
    #[arg(long, env = "CAPSNET_LR_SCHEDULE")]
    lr_schedule: Option<capsnet_core::optim::LrSchedule>,
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
    /// Also keep an exponential moving average of the weights with this decay (e.g. 0.999);
    /// evaluations then report it too (`ema_test_*`) and checkpoints store it (`ema.<name>`)
    /// [default: off].
    #[arg(long, env = "CAPSNET_EMA_DECAY")]
    ema_decay: Option<f32>,
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

#[derive(Args)]
struct TrainArgs {
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
    /// Evaluate the checkpoint's moving average of the weights (`ema.<name>`, written by
    /// `--ema-decay`) instead of the weights.
    #[arg(long)]
    ema: bool,
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
    /// Gradient-sync rounds through a coordinator with synthetic workers (no model compute).
    Sync(bench_sync::BenchSyncArgs),
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Batch sizes of the training rows ("none" for none).
    #[arg(long, default_value = "32,128", value_parser = parse_sizes)]
    batch_sizes: Sizes,
    /// Batch sizes of the inference rows ("none" for none).
    #[arg(long, default_value = "128", value_parser = parse_sizes)]
    infer_batch_sizes: Sizes,
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
    /// The --json output of ../shared/reference/torch_capsnet_bench.py measured on this machine:
    /// its numbers are printed beside ours, with the speed-up and memory ratio.
    #[arg(long)]
    torch_json: Option<PathBuf>,
    /// Internal: run one setting in this process and print its row as JSON.
    #[arg(long, hide = true, value_name = "MODE:BATCH")]
    single: Option<String>,
}

/// A comma-separated list of batch sizes, or "none".
#[derive(Clone, Debug)]
struct Sizes(Vec<usize>);

fn parse_sizes(s: &str) -> Result<Sizes, String> {
    if s == "none" || s.is_empty() {
        return Ok(Sizes(vec![]));
    }
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("{x:?} is not a batch size (a positive integer)")),
            Ok(n) => Ok(n),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Sizes)
}

/// mimalloc keeps freed pages for reuse: the sync path moves 33 MB per message in 1 MiB chunks,
/// and with glibc's allocator every round page-faulted its buffers in afresh.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = run(cli) {
        eprintln!("error: {}", report(&e));
        std::process::exit(exit_code(&e));
    }
}

/// The error and its causes on one line, leaving out causes whose text the line already holds
/// (our errors name their source in their own message).
fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Exit status: 2 for a configuration error (a bad flag or value, missing data: retrying will
/// not help, and Kubernetes' pod failure policy fails the job at once), 1 for anything else.
/// clap's own usage errors also exit with 2.
fn exit_code(e: &anyhow::Error) -> i32 {
    use capsnet_coordinator::CoordinatorError as C;
    use capsnet_core::CoreError;
    use capsnet_worker::WorkerError as W;
    let core = |e: &CoreError| {
        matches!(
            e,
            CoreError::Config(_) | CoreError::DatasetMissing { .. } | CoreError::Data { .. }
        )
    };
    for cause in e.chain() {
        let config = cause.downcast_ref::<CoreError>().is_some_and(core)
            || match cause.downcast_ref::<C>() {
                Some(C::Config(_)) => true,
                Some(C::Core(c)) => core(c),
                _ => false,
            }
            || match cause.downcast_ref::<W>() {
                Some(W::Config(_)) => true,
                Some(W::Core(c)) => core(c),
                _ => false,
            }
            || cause.downcast_ref::<ConfigError>().is_some();
        if config {
            return 2;
        }
    }
    1
}

/// A configuration problem found by the binary itself (flags that do not fit together).
#[derive(Debug)]
struct ConfigError(String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
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
        Cmd::Coordinator(a) => cmd_coordinator(a),
        Cmd::Worker(a) => cmd_worker(a),
        Cmd::Launch(a) => launch::run(a.workers, &a.coordinator),
        Cmd::Bench(BenchCmd::Train(a)) => cmd_bench_train(a),
        Cmd::Bench(BenchCmd::Sync(a)) => bench_sync::run(a),
    }
}

impl TrainFlags {
    /// Applies the flags that were given to `cfg` (data only when given or `data_default`).
    fn apply(&self, cfg: &mut TrainConfig, data_default: bool) -> Result<()> {
        if data_default || self.data.dataset.is_some() || self.data.data_dir.is_some() {
            cfg.data_dir = self.data.resolve()?;
        }
        if let Some(m) = self.model {
            let mut model = m.config();
            model.routing_iters = cfg.model.routing_iters;
            cfg.model = model;
        }
        macro_rules! set {
            ($($field:expr => $value:expr),* $(,)?) => { $( if let Some(v) = $value { $field = v; } )* };
        }
        set!(
            cfg.epochs => self.epochs, cfg.batch_size => self.batch_size, cfg.adam.lr => self.lr,
            cfg.adam.schedule => self.lr_schedule,
            cfg.adam.decay_rate => self.lr_decay, cfg.adam.decay_steps => self.lr_decay_steps,
            cfg.model.routing_iters => self.routing_iters, cfg.seed => self.seed, cfg.threads => self.threads,
            cfg.log_every => self.log_every, cfg.checkpoint_every => self.checkpoint_every,
            cfg.keep_checkpoints => self.keep_checkpoints, cfg.max_shift => self.max_shift,
        );
        if self.max_steps.is_some() {
            cfg.max_steps = self.max_steps;
        }
        if self.ema_decay.is_some() {
            cfg.ema_decay = self.ema_decay;
        }
        if self.train_limit.is_some() {
            cfg.train_limit = self.train_limit;
        }
        if self.test_limit.is_some() {
            cfg.test_limit = self.test_limit;
        }
        Ok(())
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
    a.flags.apply(&mut cfg, !resume)?;
    if let Some(d) = a.run_dir.clone().or(a.resume.clone()) {
        cfg.run_dir = d;
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
            "done: {} steps in {:.1} s; test {e} on {} images",
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

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let dir = a.data.resolve()?;
    let threads = a.threads.unwrap_or_else(train::default_threads);
    let e = train::evaluate_checkpoint(&a.checkpoint, &dir, a.batch_size, threads, a.ema)?;
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        let what = if a.ema { " (weight average)" } else { "" };
        println!(
            "{}{what}: {e} on {} images",
            a.checkpoint.display(),
            e.samples
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

/// PyTorch 2.15 on a 2-core AVX-512 machine (../shared/reference/README.md), for when no
/// measurement of this machine is given: images/s range, peak GiB.
fn torch_reference(mode: BenchMode, batch: usize) -> Option<(&'static str, &'static str)> {
    match (mode, batch) {
        (BenchMode::Train, 32) => Some(("124-149", "1.0")),
        (BenchMode::Train, 64) => Some(("104-125", "1.1")),
        (BenchMode::Train, 128) => Some(("100-111", "1.3")),
        (BenchMode::Infer, 128) => Some(("331-370", "0.8")),
        _ => None,
    }
}

/// Best images/s and its peak RSS per (mode, batch) from torch_capsnet_bench.py --json.
fn read_torch_json(path: &Path) -> Result<Vec<(String, usize, f64, f64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--torch-json {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--torch-json {}", path.display()))?;
    let rows = v["results"]
        .as_array()
        .with_context(|| format!("{}: no \"results\" list", path.display()))?;
    let mut best: Vec<(String, usize, f64, f64)> = vec![];
    for r in rows {
        let (Some(mode), Some(batch), Some(ips), Some(rss)) = (
            r["mode"].as_str(),
            r["batch"].as_u64(),
            r["images_per_s"].as_f64(),
            r["peak_rss_mib"].as_f64(),
        ) else {
            continue;
        };
        match best
            .iter_mut()
            .find(|b| b.0 == mode && b.1 == batch as usize)
        {
            Some(b) if b.2 >= ips => {}
            Some(b) => *b = (mode.into(), batch as usize, ips, rss),
            None => best.push((mode.into(), batch as usize, ips, rss)),
        }
    }
    Ok(best)
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
        .0
        .iter()
        .map(|&b| (BenchMode::Train, b))
        .chain(a.infer_batch_sizes.0.iter().map(|&b| (BenchMode::Infer, b)))
        .collect();
    if settings.is_empty() {
        bail!("nothing to measure: --batch-sizes and --infer-batch-sizes are both none");
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
    let torch = a.torch_json.as_deref().map(read_torch_json).transpose()?;
    let head = format!(
        "{:<6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "mode", "batch", "median_s", "min_s", "max_s", "images/s", "GFLOP/s", "peak_MiB"
    );
    match &torch {
        Some(_) => println!(
            "{head}   {:>11} {:>10} {:>8} {:>9}",
            "torch img/s", "torch MiB", "speed-up", "memory"
        ),
        None => println!("{head}   {:<13} {:>9}", "torch img/s", "torch GiB"),
    }
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
        let line = format!(
            "{:<6} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>8.1} {:>9.0}",
            mode_s,
            batch,
            row.median_s,
            row.min_s,
            row.max_s,
            row.images_per_s,
            row.gflop_per_s,
            row.peak_rss_mib
        );
        match &torch {
            Some(t) => match t.iter().find(|r| r.0 == mode_s && r.1 == batch) {
                Some(r) => println!(
                    "{line}   {:>11.1} {:>10.0} {:>7.2}x {:>8.0}%",
                    r.2,
                    r.3,
                    row.images_per_s / r.2,
                    100.0 * row.peak_rss_mib / r.3
                ),
                None => println!("{line}   {:>11} {:>10} {:>8} {:>9}", "-", "-", "-", "-"),
            },
            None => {
                let (ti, tg) = torch_reference(mode, batch).unwrap_or(("-", "-"));
                println!("{line}   {ti:<13} {tg:>9}");
            }
        }
        rows.push(row);
    }
    if torch.is_none() {
        println!(
            "(torch columns: PyTorch 2.15 on a 2-core AVX-512 machine, from the issue; pass --torch-json to compare with a run on this machine)"
        );
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

pub(crate) fn machine_summary() -> String {
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or ctrl-c.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    tracing::info!("stop signal received");
}

impl CoordinatorArgs {
    fn config(&self) -> Result<capsnet_coordinator::CoordinatorConfig> {
        let mut train = TrainConfig {
            run_dir: self.run_dir.clone(),
            ..TrainConfig::default()
        };
        self.flags.apply(&mut train, true)?;
        let mut c = capsnet_coordinator::CoordinatorConfig::new(train, self.token.token()?);
        c.sync_mode = match self.sync {
            SyncArg::Grad => capsnet_proto::SyncMode::Grad,
            SyncArg::Params => capsnet_proto::SyncMode::Params,
        };
        c.sync_every = self.sync_every;
        c.round_timeout = self.round_timeout;
        c.min_workers = self.min_workers;
        c.expect_workers = self.expect_workers.unwrap_or(self.min_workers);
        c.start_timeout = self.start_timeout;
        c.eval_every = self.eval_every;
        c.heartbeat = self.heartbeat;
        c.wire = self.wire.encoding();
        c.chunk_bytes = self.chunk_bytes;
        c.resume = self.resume;
        c.exit_when_done = self.exit_when_done;
        c.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(capsnet_coordinator::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        c.validate()?;
        Ok(c)
    }
}

fn cmd_coordinator(a: CoordinatorArgs) -> Result<()> {
    let cfg = a.config()?;
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("--listen {}", a.listen))?;
        let addr = listener.local_addr()?;
        if let Some(f) = &a.ready_file {
            capsnet_core::checkpoint::write_atomic(f, addr.to_string().as_bytes())?;
        }
        Ok::<_, anyhow::Error>(capsnet_coordinator::serve(listener, cfg, shutdown_signal()).await?)
    })?;
    match &outcome.last_eval {
        Some(e) => println!(
            "coordinator: {} rounds{}; test {e}",
            outcome.rounds,
            if outcome.finished {
                ", finished"
            } else {
                ", stopped"
            },
        ),
        None => println!("coordinator: {} rounds, stopped", outcome.rounds),
    }
    if let Some(p) = &outcome.checkpoint {
        println!("checkpoint: {}", p.display());
    }
    Ok(())
}

fn cmd_worker(a: WorkerArgs) -> Result<()> {
    let rank = a.rank.or_else(|| {
        std::env::var("JOB_COMPLETION_INDEX")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let name = match (&a.name, rank) {
        (Some(n), _) => n.clone(),
        (None, Some(r)) => format!("worker-{r}"),
        (None, None) => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| format!("{}-{}", h.trim(), std::process::id()))
            .unwrap_or_else(|_| format!("worker-{}", std::process::id())),
    };
    let tls = a.tls_ca.as_ref().map(|ca| capsnet_worker::ClientTls {
        ca: ca.clone(),
        cert: a.tls_cert.clone(),
        key: a.tls_key.clone(),
        domain: a.tls_domain.clone(),
    });
    let threads = a.threads.unwrap_or_else(train::default_threads);
    if threads == 0 {
        bail!("threads must be at least 1");
    }
    let cfg = capsnet_worker::WorkerConfig {
        coordinator: a.coordinator.clone(),
        token: a.token.token()?,
        data_dir: a.data.resolve()?,
        name,
        rank_hint: rank,
        threads,
        give_up_after: a.give_up_after,
        tls,
    };
    let rt = runtime()?;
    let out = rt.block_on(capsnet_worker::run(cfg, shutdown_signal()))?;
    println!(
        "worker: {} updates sent{}",
        out.rounds,
        if out.finished {
            ", training finished"
        } else {
            ", stopped"
        }
    );
    Ok(())
}
