//! `capsnet bench sync`: the flags and the table around [`capsnet_bench::sync`], which runs
//! gradient-sync rounds through a real coordinator with synthetic workers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capsnet_bench::sync::{SyncSettings, measure, memcpy_mb_per_s};
use clap::Args;

use crate::args::{ModelSize, WireArg};
use crate::exit::ConfigError;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncLayout {
    /// The coordinator reduces every range, reached over loopback TCP.
    Coordinator,
    /// The same over a unix socket (as `capsnet launch` serves it).
    CoordinatorUnix,
    /// Each worker serves a reducer of its share of the ranges, on a loopback TCP port.
    Colocated,
    /// The same on unix sockets (as `capsnet launch --reducers N` serves them).
    ColocatedUnix,
}

#[derive(Args)]
pub struct BenchSyncArgs {
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Wire encodings to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "f32,bf16")]
    wire: Vec<WireArg>,
    /// Timed rounds per setting.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Tensor size: the paper's model (8,215,568 floats) or the tiny one.
    #[arg(long, value_enum, default_value = "paper")]
    model: ModelSize,
    /// Who reduces: the coordinator, or a reducer served in each worker (co-located; each
    /// worker's own span in process); reached over loopback TCP, or over unix sockets (-unix,
    /// as `capsnet launch` runs them).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "coordinator,coordinator-unix,colocated,colocated-unix"
    )]
    layout: Vec<SyncLayout>,
    /// Chunk size in bytes (default: 1 MiB through the coordinator, 256 KiB with reducers, as
    /// `capsnet coordinator` chooses).
    #[arg(long)]
    chunk_bytes: Option<usize>,
    /// Pull parameters as their changes from the last round's (the coordinator's
    /// --delta-pulls).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    delta_pulls: bool,
    /// Also write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: BenchSyncArgs) -> Result<()> {
    if a.rounds == 0
        || a.workers.is_empty()
        || a.workers.contains(&0)
        || a.wire.is_empty()
        || a.layout.is_empty()
    {
        return Err(ConfigError(
            "--rounds, --workers, --wire and --layout must be non-empty and positive".into(),
        )
        .into());
    }
    if a.chunk_bytes == Some(0) {
        return Err(ConfigError("--chunk-bytes must be positive".into()).into());
    }
    let model = a.model.config();
    println!(
        "capsnet bench sync: {} floats per update ({:.1} MB fp32), {} timed rounds after {} warm-up, loopback",
        capsnet_core::ParamLayout::for_config(&model).total(),
        capsnet_core::ParamLayout::for_config(&model).total() as f64 * 4.0 / 1e6,
        a.rounds,
        a.warmup
    );
    if a.delta_pulls {
        println!(
            "parameters pulled as their changes from the last round's (--delta-pulls): the synthetic update is the same every round, so the changes are Adam steps of about the learning rate, as in training"
        );
    }
    println!(
        "round = every worker pushes its update, the coordinator (or the reducer of each span) averages and applies Adam, every worker pulls the result"
    );
    println!(
        "cpu_ms = CPU time per round of the whole setting (coordinator, reducers and workers are threads of this one process), from the end of the last warm-up round"
    );
    println!(
        "layouts: coordinator = every byte through the coordinator; colocated = a reducer in each worker, each worker's own span in process; over loopback TCP, or over unix sockets (-unix; the reducers' payloads then pass in shared memory)"
    );
    let floats = capsnet_core::ParamLayout::for_config(&model).total();
    println!("machine: {}", capsnet_core::bench::machine_summary());
    println!(
        "memcpy of {:.1} MB, one core: {:.0} MB/s (each byte of a round passes through memory at least 4 times: encode, kernel send, kernel receive, reduce or decode)",
        floats as f64 * 4.0 / 1e6,
        memcpy_mb_per_s(floats)
    );
    println!();
    println!(
        "{:>7} {:>14} {:>5} {:>10} {:>9} {:>9} {:>13} {:>14} {:>9} {:>10}",
        "workers",
        "layout",
        "wire",
        "median_ms",
        "min_ms",
        "max_ms",
        "MB/s/worker",
        "MB/s coord.",
        "peak_MiB",
        "cpu_ms",
    );
    let mut rows = vec![];
    for &n in &a.workers {
        for &layout in &a.layout {
            for &w in &a.wire {
                let (reducers, unix) = match layout {
                    SyncLayout::Coordinator => (0, false),
                    SyncLayout::CoordinatorUnix => (0, true),
                    SyncLayout::Colocated => (n, false),
                    SyncLayout::ColocatedUnix => (n, true),
                };
                let chunk_bytes = a.chunk_bytes.unwrap_or(if reducers > 0 {
                    capsnet_proto::wire::SHARDED_CHUNK_BYTES
                } else {
                    1 << 20
                });
                let r = measure(&SyncSettings {
                    workers: n,
                    wire: w.encoding(),
                    rounds: a.rounds,
                    warmup: a.warmup,
                    model: model.clone(),
                    chunk_bytes,
                    reducers,
                    unix,
                    delta: a.delta_pulls,
                })?;
                let label = match r.transport {
                    "unix" => format!("{}-unix", r.layout),
                    _ => r.layout.to_string(),
                };
                println!(
                    "{:>7} {:>14} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>13.0} {:>14} {:>9.0} {:>10}",
                    r.workers,
                    label,
                    r.wire,
                    r.median_ms,
                    r.min_ms,
                    r.max_ms,
                    r.mb_per_s_per_worker,
                    r.mb_per_s_coordinator
                        .map_or_else(|| "-".to_string(), |m| format!("{m:.0}")),
                    r.peak_rss_mib,
                    r.cpu_ms_per_round
                        .map_or_else(|| "-".to_string(), |m| format!("{m:.1}")),
                );
                rows.push(r);
            }
        }
    }
    println!(
        "(the anchor: PyTorch's Gloo all-reduce of the same floats, scripts/reference/gloo_allreduce_bench.py on this machine; docs/benchmarks.md has earlier comparisons)"
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
