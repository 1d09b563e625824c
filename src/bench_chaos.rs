//! `capsnet bench chaos`: the flags and the report around [`capsnet_bench::chaos`]: a
//! fault-free run, then the same run under a seeded schedule of faults, side by side.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use capsnet_bench::chaos::{self, ChaosReport, ChaosSettings};
use capsnet_core::data::{self, Split};
use clap::Args;

use crate::args::{DataArgs, ModelSize, parse_duration};
use crate::exit::ConfigError;

#[derive(Args)]
pub struct BenchChaosArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, value_enum, default_value = "tiny")]
    model: ModelSize,
    /// Train on N synthetic images made for the run instead of a data set.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Train on the first N images only.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long, default_value_t = 1000)]
    test_limit: usize,
    /// Rounds between checkpoints (what a coordinator kill can lose).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Workers killed with SIGKILL (each restarted after --restart-after; every other one
    /// under a new name).
    #[arg(long, default_value_t = 4)]
    kills: usize,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    restart_after: Duration,
    /// Workers stopped with SIGSTOP for --stop-for, then continued.
    #[arg(long, default_value_t = 1)]
    stragglers: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stop_for: Duration,
    /// Workers that leave (SIGTERM) and are not replaced.
    #[arg(long, default_value_t = 0)]
    leaves: usize,
    /// New workers that join mid-run.
    #[arg(long, default_value_t = 1)]
    joins: usize,
    /// Coordinator kills (SIGKILL), each followed by a restart with --resume.
    #[arg(long, default_value_t = 1)]
    coordinator_kills: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Heartbeat interval of the runs.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Skip the fault-free run.
    #[arg(long)]
    no_baseline: bool,
    /// Keep the runs (metrics, checkpoints, logs) in this folder [default: a temporary one].
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Also write both reports as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: BenchChaosArgs) -> Result<()> {
    if a.workers == 0 || a.epochs == 0 || a.batch_size == 0 {
        return Err(
            ConfigError("--workers, --epochs and --batch-size must be positive".into()).into(),
        );
    }
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let root = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let cfg = a.model.config();
    let data_dir = match a.synthetic {
        Some(n) => {
            let d = root.join("data");
            data::write_synthetic(&d, n, a.test_limit.max(16), cfg.image_size, cfg.classes, 7)?;
            d
        }
        None => a.data.resolve()?,
    };
    let mut train_len =
        data::load_split(&data_dir, Split::Train, cfg.classes, cfg.image_size)?.len();
    if let Some(l) = a.train_limit {
        train_len = train_len.min(l);
    }
    let mut train_args: Vec<String> = vec![
        "--model".into(),
        a.model.name().into(),
        "--epochs".into(),
        a.epochs.to_string(),
        "--batch-size".into(),
        a.batch_size.to_string(),
        "--test-limit".into(),
        a.test_limit.to_string(),
        "--checkpoint-every".into(),
        a.checkpoint_every.to_string(),
        "--seed".into(),
        a.seed.to_string(),
    ];
    if let Some(l) = a.train_limit {
        train_args.extend(["--train-limit".into(), l.to_string()]);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = ChaosSettings {
        exe: std::env::current_exe().context("cannot find the capsnet executable")?,
        dir: root.join("baseline"),
        data_dir,
        train_args,
        train_len,
        epochs: a.epochs,
        workers: a.workers,
        threads_per_worker: (cores / a.workers).max(1),
        kills: 0,
        restart_after: a.restart_after,
        stragglers: 0,
        stop_for: a.stop_for,
        leaves: 0,
        joins: 0,
        coordinator_kills: 0,
        seed: a.seed,
        heartbeat: a.heartbeat,
        timeout: Duration::from_secs(4 * 3600),
    };
    println!(
        "capsnet bench chaos: {} workers, model {}, {} training images, {} epoch(s), batch {} per worker",
        a.workers,
        a.model.name(),
        train_len,
        a.epochs,
        a.batch_size
    );
    println!("machine: {}", capsnet_core::bench::machine_summary());
    let baseline = if a.no_baseline {
        None
    } else {
        let r = chaos::run(&settings)?;
        print_row("fault-free", &r);
        Some(r)
    };
    let faulty = ChaosSettings {
        dir: root.join("chaos"),
        kills: a.kills,
        stragglers: a.stragglers,
        leaves: a.leaves,
        joins: a.joins,
        coordinator_kills: a.coordinator_kills,
        // A run that takes 5x the fault-free one (and 10 min more) counts as stalled.
        timeout: baseline.as_ref().map_or(settings.timeout, |b| {
            Duration::from_secs_f64(5.0 * b.wall_s + 600.0)
        }),
        ..settings
    };
    let chaos = chaos::run(&faulty)?;
    print_row("chaos", &chaos);
    println!();
    for f in &chaos.faults {
        println!("  {:>8.1} s  {:?} {}", f.at_s, f.kind, f.target);
    }
    if let Some(b) = &baseline {
        let n = chaos.faults.len().max(1) as f64;
        println!();
        println!(
            "faults {}, finished {}, samples trained twice {} / skipped {}, throughput kept {:.1}%, wall time lost {:.1} s ({:.2} s per fault), final accuracy {} vs {}",
            chaos.faults.len(),
            chaos.finished,
            chaos.samples_twice,
            chaos.samples_skipped,
            100.0 * chaos.images_per_s / b.images_per_s.max(1e-9),
            chaos.wall_s - b.wall_s,
            (chaos.wall_s - b.wall_s) / n,
            pct(chaos.final_test_accuracy),
            pct(b.final_test_accuracy),
        );
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({ "baseline": baseline, "chaos": chaos });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn pct(a: Option<f64>) -> String {
    a.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a))
}

fn print_row(what: &str, r: &ChaosReport) {
    println!(
        "{what:<10} faults {:>3}  finished {:<5}  {:>8.1} s  {:>6} rounds  {:>8.1} images/s  median round {:.3} s  twice {} skipped {}  test accuracy {}",
        r.faults.len(),
        r.finished,
        r.wall_s,
        r.rounds,
        r.images_per_s,
        r.median_round_s,
        r.samples_twice,
        r.samples_skipped,
        pct(r.final_test_accuracy)
    );
}
