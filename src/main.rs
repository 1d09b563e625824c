//! `capsnet`: the command line. Each command's flags and glue live in one module; the work is
//! done by the libraries.
//!
//! # Layout
//! - [`args`]: flag groups shared by several commands (data, training flags, token, enums).
//! - [`train`]: `train`, `eval`, `grad` (one machine).
//! - [`distributed`]: `coordinator`, `worker`, `reducer`, the async runtime and the stop signal.
//! - [`launch`]: `launch`, a coordinator and N worker processes on this machine.
//! - [`bench`], [`bench_sync`], [`bench_chaos`]: `bench train`, `bench sync`, `bench chaos`.
//! - [`logging`]: the tracing subscriber; [`exit`]: error line and exit status.

mod args;
mod bench;
mod bench_chaos;
mod bench_scale;
mod bench_sync;
mod distributed;
mod exit;
mod figures;
mod health;
mod launch;
mod logging;
mod plot;
mod train;

use clap::{Parser, Subcommand};

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
    log_format: args::LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train on one machine; writes config.json, metrics.jsonl and checkpoints to the run dir.
    Train(train::TrainArgs),
    /// Accuracy and losses of a checkpoint on a test split.
    Eval(train::EvalArgs),
    /// One forward and backward pass on a batch file; writes losses and every gradient.
    Grad(train::GradArgs),
    /// Serve a distributed training run: workers join, send gradients, get parameters.
    Coordinator(distributed::CoordinatorArgs),
    /// Join a coordinator and train on a shard of the data.
    Worker(distributed::WorkerArgs),
    /// Reduce and serve one span of the parameters of a sharded run (coordinator --reducers).
    Reducer(distributed::ReducerArgs),
    /// A coordinator and N workers on this machine, logs interleaved; stops them all at the end.
    Launch(launch::LaunchArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Training loss, test accuracy and images/s of runs against step and wall time (PNG, SVG).
    Plot(plot::PlotArgs),
    /// The paper's figures for a checkpoint: reconstructions, what each capsule dimension
    /// encodes, the confusion matrix (PNG).
    Figures(figures::FiguresArgs),
    /// Asks a coordinator's health service whether it is SERVING (exit 0) or not (exit 1).
    Health(health::HealthArgs),
}

/// mimalloc keeps freed pages for reuse: the sync path moves 33 MB per message in 1 MiB chunks,
/// and with glibc's allocator every round page-faulted its buffers in afresh.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set by a process that starts `capsnet` children (`launch`, `bench chaos`) to its own pid: the
/// child dies with it, even when it is killed with SIGKILL and cannot stop them itself.
pub const PARENT_PID_ENV: &str = "CAPSNET_PARENT_PID";

/// Asks the kernel for SIGKILL when the process named by [`PARENT_PID_ENV`] is gone (the
/// signal, not SIGTERM: a child its parent had SIGSTOPped must go too), and exits at once if it
/// is gone already.
fn die_with_parent() {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<libc::pid_t>().ok())
    else {
        return;
    };
    // SAFETY: PR_SET_PDEATHSIG with a signal number only sets this process's parent-death
    // signal; getppid has no preconditions.
    let gone = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::getppid() != parent
    };
    if gone {
        eprintln!("error: the process that started this one ({parent}) is gone");
        std::process::exit(1);
    }
}

/// Turns transparent huge pages off for a process that only moves and reduces tensors (a
/// coordinator, a reducer, `bench sync`), unless `MIMALLOC_ALLOW_THP` says what to do (mimalloc
/// reads it). Such a process frees and allocates tens of MB per round, and each fault on a huge
/// page zeroes 2 MiB afresh (and may compact memory first): in steady state that was 23% of a
/// loopback round's CPU samples, and `bench sync` took half the CPU time without huge pages
/// (docs/benchmarks.md). Processes that train keep them: a batch-1 step was up to 30% slower
/// without. The flag is inherited by children, so `launch` (whose children train) is left out.
fn no_transparent_huge_pages(cmd: &Cmd) {
    let sync_only = matches!(
        cmd,
        Cmd::Coordinator(_) | Cmd::Reducer(_) | Cmd::Bench(bench::BenchCmd::Sync(_))
    );
    if !sync_only || std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE with these arguments only sets a flag of this process (its
    // later page faults use small pages); it touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        // An old kernel or a sandbox that refuses it: only slower.
        eprintln!(
            "warning: could not turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() {
    die_with_parent();
    let cli = Cli::parse();
    no_transparent_huge_pages(&cli.command);
    let prefix = matches!(cli.command, Cmd::Launch(_)).then_some(launch::COORDINATOR_PREFIX);
    logging::init(cli.log_format, prefix);
    if let Err(e) = run(cli.command) {
        eprintln!("error: {}", exit::report(&e));
        std::process::exit(exit::code(&e));
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Train(a) => train::train(a),
        Cmd::Eval(a) => train::eval(a),
        Cmd::Grad(a) => train::grad(a),
        Cmd::Coordinator(a) => distributed::coordinator(a),
        Cmd::Worker(a) => distributed::worker(a),
        Cmd::Reducer(a) => distributed::reducer(a),
        Cmd::Launch(a) => launch::run(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Health(a) => health::run(a),
        Cmd::Plot(a) => plot::run(a),
        Cmd::Figures(a) => figures::run(a),
    }
}
