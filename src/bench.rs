//! `capsnet bench train`: the table around [`capsnet_core::bench`], which runs each setting in
//! a child process of this binary.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use capsnet_core::bench::{self, BenchMode, BenchRow, BenchSettings, TorchRow};
use capsnet_core::train;
use clap::{Args, Subcommand};

use crate::args::TrainModel;
use crate::exit::ConfigError;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Training and inference throughput of the model.
    Train(BenchTrainArgs),
    /// Gradient-sync rounds through a coordinator with synthetic workers (no model compute).
    Sync(crate::bench_sync::BenchSyncArgs),
    /// Real coordinator and worker processes trained under injected faults (kills, stops,
    /// leaves, joins, a coordinator restart) beside a fault-free run.
    Chaos(crate::bench_chaos::BenchChaosArgs),
    /// How many machines to use: the round time and scaling efficiency projected for 1 to 64
    /// workers from a step and the sync's per-float costs measured here, by sync layout and
    /// link rate (a table and a PNG plot).
    Scale(crate::bench_scale::BenchScaleArgs),
}

#[derive(Args)]
pub struct BenchTrainArgs {
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
    /// The network: the paper's capsule network, its CNN baseline, or a tiny one of either.
    #[arg(long, value_enum, default_value = "paper")]
    model: TrainModel,
    /// Input side of the network: 28 for MNIST-sized images, 40 for the --canvas 40 network of
    /// the affine-robustness experiment [default: 28].
    #[arg(long, value_name = "N")]
    image_size: Option<usize>,
    /// Also write the rows as JSON (keys as torch_capsnet_bench.py --json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the sgemm reference measurement.
    #[arg(long)]
    no_sgemm: bool,
    /// The --json output of scripts/reference/torch_capsnet_bench.py measured on this machine:
    /// its numbers are printed beside ours, with the speed-up and memory ratio.
    #[arg(long)]
    torch_json: Option<PathBuf>,
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

pub fn run(cmd: BenchCmd) -> Result<()> {
    if run_child()? {
        return Ok(());
    }
    match cmd {
        BenchCmd::Train(a) => train(a),
        BenchCmd::Sync(a) => crate::bench_sync::run(a),
        BenchCmd::Chaos(a) => crate::bench_chaos::run(a),
        BenchCmd::Scale(a) => crate::bench_scale::run(a),
    }
}

/// In the child process that [`bench::run_isolated`] started: runs its one setting and prints
/// the row as JSON. False when this process is not such a child.
fn run_child() -> Result<bool> {
    match bench::setting_from_env() {
        None => Ok(false),
        Some(s) => {
            println!("{}", serde_json::to_string(&bench::run_setting(&s?)?)?);
            Ok(true)
        }
    }
}

fn train(a: BenchTrainArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(train::default_threads);
    let (mut cfg, mut baseline) = a.model.configs();
    if let Some(side) = a.image_size {
        cfg.image_size = side;
    }
    match &mut baseline {
        Some(b) => {
            b.image_size = cfg.image_size;
            b.validate()
        }
        None => cfg.validate(),
    }
    .map_err(|e| ConfigError(format!("--image-size: {e}")))?;
    if baseline.is_some() && a.torch_json.is_some() {
        return Err(ConfigError(
            "--torch-json holds the PyTorch CapsNet's numbers; it cannot stand beside the CNN baseline"
                .into(),
        )
        .into());
    }
    let forward_flops = baseline
        .as_ref()
        .map_or_else(|| cfg.forward_flops(), |b| b.forward_flops());
    if a.steps == 0 {
        return Err(ConfigError("--steps must be at least 1".into()).into());
    }
    let settings: Vec<BenchSettings> = a
        .batch_sizes
        .0
        .iter()
        .map(|&b| (BenchMode::Train, b))
        .chain(a.infer_batch_sizes.0.iter().map(|&b| (BenchMode::Infer, b)))
        .map(|(mode, batch)| BenchSettings {
            mode,
            batch,
            steps: a.steps,
            warmup: a.warmup,
            threads,
            model: cfg.clone(),
            primary_chunk: a.primary_chunk,
            baseline: baseline.clone(),
        })
        .collect();
    if settings.is_empty() {
        bail!(ConfigError(
            "nothing to measure: --batch-sizes and --infer-batch-sizes are both none".into()
        ));
    }
    let exe = std::env::current_exe().context("cannot find the capsnet executable")?;
    println!(
        "capsnet bench train: {} threads, {} timed steps after {} warm-up, model {} at {}x{} ({:.1} MFLOP forward per image)",
        threads,
        a.steps,
        a.warmup,
        a.model.name(),
        cfg.image_size,
        cfg.image_size,
        forward_flops / 1e6
    );
    println!("machine: {}", bench::machine_summary());
    if !a.no_sgemm {
        let g = bench::sgemm_gflops(threads, 3)?;
        println!(
            "sgemm at the primary-conv shape [4608,20736]x[20736,256]: {g:.0} GFLOP/s ({threads} threads)"
        );
    }
    println!();
    let torch = a
        .torch_json
        .as_deref()
        .map(bench::read_torch_json)
        .transpose()?;
    let head = format!(
        "{:<6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "mode", "batch", "median_s", "min_s", "max_s", "images/s", "GFLOP/s", "peak_MiB"
    );
    match &torch {
        Some(_) => println!(
            "{head}   {:>11} {:>10} {:>8} {:>9}",
            "torch img/s", "torch MiB", "speed-up", "memory"
        ),
        None => println!("{head}"),
    }
    let mut rows: Vec<BenchRow> = vec![];
    for s in &settings {
        let mut child = std::process::Command::new(&exe);
        child.args(["bench", "train"]);
        let row = bench::run_isolated(child, s)?;
        println!("{}", row_line(&row, torch.as_deref()));
        rows.push(row);
    }
    if torch.is_none() {
        println!(
            "(pass --torch-json with a run of scripts/reference/torch_capsnet_bench.py on this machine to compare with PyTorch; docs/benchmarks.md has earlier comparisons)"
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
        print!("{:<6} {:>5}", r.mode.name(), r.batch);
        for (_, s) in &r.parts {
            print!(" {:>9.1}", s * 1e3);
        }
        println!();
    }
    if let Some(path) = &a.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&bench::rows_json(&rows))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One row of the table, with PyTorch's numbers for the same setting when there are some.
fn row_line(row: &BenchRow, torch: Option<&[TorchRow]>) -> String {
    let line = format!(
        "{:<6} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>8.1} {:>9.0}",
        row.mode.name(),
        row.batch,
        row.median_s,
        row.min_s,
        row.max_s,
        row.images_per_s,
        row.gflop_per_s,
        row.peak_rss_mib
    );
    let Some(torch) = torch else {
        return line;
    };
    match torch
        .iter()
        .find(|t| t.mode == row.mode.name() && t.batch == row.batch)
    {
        Some(t) => format!(
            "{line}   {:>11.1} {:>10.0} {:>7.2}x {:>8.0}%",
            t.images_per_s,
            t.peak_rss_mib,
            row.images_per_s / t.images_per_s,
            100.0 * row.peak_rss_mib / t.peak_rss_mib
        ),
        None => format!("{line}   {:>11} {:>10} {:>8} {:>9}", "-", "-", "-", "-"),
    }
}
