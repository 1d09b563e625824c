//! `capsnet bench scale`: how many machines to use. Measures a training step and the sync path's
//! costs (per float, and the data plane's per byte) on this machine, then projects the round time and scaling efficiency for 1
//! to 64 workers at several link rates, for each sync layout ([`capsnet_bench::scale`] has the
//! model), as a table and a PNG plot. `--lan` checks the projection against rows of
//! `scripts/lan-bench --json`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capsnet_bench::scale::{self, Costs, Layout, Line, Scenario, WireKind};
use clap::Args;

use crate::args::ModelSize;
use crate::exit::ConfigError;

#[derive(Args)]
pub struct BenchScaleArgs {
    /// The network: the paper's or the tiny one.
    #[arg(long, value_enum, default_value = "paper")]
    model: ModelSize,
    /// Images per worker per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Threads of a worker's step (and of a reducer) [default: this machine's cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Timed training steps for the step time.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Worker counts to project.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    workers: Vec<usize>,
    /// Link rates in Gbit/s.
    #[arg(long, value_delimiter = ',', default_value = "1,10,25")]
    rates: Vec<f64>,
    /// Local steps per sync of the `--sync params` rows.
    #[arg(long, default_value_t = 8)]
    sync_every: usize,
    /// Write the efficiency plot here (PNG).
    #[arg(long)]
    png: Option<PathBuf>,
    /// The font the plot's text is drawn with.
    #[arg(long, default_value = scale::FONT)]
    font: PathBuf,
    /// Also write the costs and every projected row as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rows of `scripts/lan-bench --json`: project each (its batch, one thread per worker, every
    /// process on this machine's cores) and print the measured and projected round times.
    #[arg(long)]
    lan: Option<PathBuf>,
}

const LAYOUTS: [Layout; 3] = [
    Layout::Coordinator,
    Layout::ShardedColocated,
    Layout::ShardedSeparate,
];

pub fn run(a: BenchScaleArgs) -> Result<()> {
    if a.batch_size == 0
        || a.steps == 0
        || a.sync_every == 0
        || a.workers.is_empty()
        || a.workers.contains(&0)
        || a.workers.iter().any(|&n| n > 4096)
        || a.rates.is_empty()
        || a.rates.iter().any(|r| !(r.is_finite() && *r > 0.0))
    {
        return Err(ConfigError(
            "--batch-size, --steps, --sync-every, --workers (1 to 4096) and --rates must be positive"
                .into(),
        )
        .into());
    }
    let model = a.model.config();
    let cores = capsnet_core::train::default_threads();
    let threads = a.threads.unwrap_or(cores);
    println!(
        "capsnet bench scale: machine {}",
        capsnet_core::bench::machine_summary()
    );
    if let Some(lan) = &a.lan {
        return check_lan(lan, &model, cores, a.steps);
    }
    let c = scale::measure(&model, a.batch_size, threads, a.steps)?;
    print_costs(&c);
    println!();
    println!(
        "Projected scaling efficiency (step time over step time plus the sync's share), every machine like this one, every link at the rate each way:"
    );
    let mut header = format!(
        "{:>8} {:<24} {:>5} {:>7} {:>5} {:>5}",
        "Gbit/s", "layout", "wire", "overlap", "delta", "K"
    );
    for n in &a.workers {
        header += &format!(" {:>6}", format!("N={n}"));
    }
    println!("{header}");
    let mut json_rows = vec![];
    let mut lines = vec![];
    for &rate in &a.rates {
        for layout in LAYOUTS {
            let variants = [
                (WireKind::F32, false, false, 1),
                (WireKind::F32, true, false, 1),
                (WireKind::F32, true, true, 1),
                (WireKind::Bf16, false, false, 1),
                (WireKind::Bf16, true, false, 1),
                (WireKind::Bf16, true, true, 1),
                (WireKind::F32, false, false, a.sync_every),
            ];
            let yes = |b: bool| if b { "yes" } else { "no" };
            for (wire, overlap, delta, k) in variants {
                let mut row = format!(
                    "{rate:>8} {:<24} {:>5} {:>7} {:>5} {:>5}",
                    layout.name(),
                    wire.name(),
                    yes(overlap),
                    yes(delta),
                    k
                );
                let mut points = vec![];
                for &n in &a.workers {
                    let s = Scenario {
                        layout,
                        workers: n,
                        rate_bps: rate * 1e9,
                        wire,
                        overlap,
                        sync_every: k,
                        shared_cores: None,
                        delta,
                    };
                    let p = scale::project(&c, &s);
                    row += &format!(" {:>5.1}%", 100.0 * p.efficiency);
                    points.push((n, p.efficiency));
                    json_rows.push(serde_json::json!({"scenario": s, "projection": p}));
                }
                println!("{row}");
                let plotted = match (wire, overlap, delta, k) {
                    (WireKind::F32, false, false, 1) => Some(format!("{}, f32", layout.name())),
                    (WireKind::Bf16, true, false, 1) => {
                        Some(format!("{}, bf16 + overlap", layout.name()))
                    }
                    (_, _, _, k) if k > 1 && layout == Layout::ShardedSeparate => {
                        Some(format!("{}, params K={k}", layout.name()))
                    }
                    _ => None,
                };
                if let Some(label) = plotted {
                    lines.push(Line {
                        label,
                        rate_gbps: rate,
                        points,
                    });
                }
            }
        }
    }
    println!(
        "(K: local steps per sync, --sync params --sync-every K; overlap: each range sent as soon as the backward pass has made it final, the next round pulled meanwhile, as workers do unless --no-overlap; delta: parameters pulled as their changes from the last round's, --delta-pulls)"
    );
    if let Some(png) = &a.png {
        scale::plot_png(png, &a.font, &lines)?;
        println!("plot: {}", png.display());
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({"costs": c, "rows": json_rows});
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_costs(c: &Costs) {
    println!(
        "measured: a training step of batch {} on {} threads {:.1} ms ({:.1} images/s); {}",
        c.batch,
        c.cores,
        c.step_s * 1e3,
        c.batch as f64 / c.step_s,
        c.stages
            .iter()
            .map(|st| format!(
                "{:.1} ms of its backward pass are left once {:.1}% of the {} floats are final",
                st.window_s * 1e3,
                100.0 * st.share,
                c.floats
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "measured per float on one core (ns): encode f32 {:.2} bf16 {:.2}; decode f32 {:.2} bf16 {:.2}; add into a sum f32 {:.2} bf16 {:.2}; Adam step {:.2}",
        c.encode_s[0] * 1e9,
        c.encode_s[1] * 1e9,
        c.decode_s[0] * 1e9,
        c.decode_s[1] * 1e9,
        c.add_s[0] * 1e9,
        c.add_s[1] * 1e9,
        c.adam_s * 1e9
    );
    println!(
        "measured for --delta-pulls: the change a training step makes (the 4th from the initial parameters, batch 1) is {:.1}% of the f32 payload and {:.1}% of bf16's; per float on one core (ns): encode the change f32 {:.2} bf16 {:.2}, rebuild the payload f32 {:.2} bf16 {:.2}, copy the parameters {:.2}",
        100.0 * c.delta_share[0],
        100.0 * c.delta_share[1],
        c.delta_encode_s[0] * 1e9,
        c.delta_encode_s[1] * 1e9,
        c.delta_decode_s[0] * 1e9,
        c.delta_decode_s[1] * 1e9,
        c.copy_s * 1e9
    );
    println!(
        "measured for the data plane (loopback rounds of 2 workers, CPU less the work above), CPU per byte through a socket, sender and receiver together (ns): the coordinator's chunks f32 {:.2} bf16 {:.2}, the reducers' f32 {:.2} bf16 {:.2}",
        c.net_s[0][0] * 1e9,
        c.net_s[0][1] * 1e9,
        c.net_s[1][0] * 1e9,
        c.net_s[1][1] * 1e9
    );
}

/// The projection of each `scripts/lan-bench` row beside its measurement.
fn check_lan(
    path: &std::path::Path,
    model: &capsnet_core::CapsNetConfig,
    cores: usize,
    steps: usize,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not JSON lines of scripts/lan-bench", path.display()))?;
    // The LAN benchmark's workers train on one thread each, batch 1 unless the row says more;
    // a step is measured once per batch size.
    let mut costs: std::collections::BTreeMap<usize, scale::Costs> = Default::default();
    for r in &rows {
        if matches!(
            r["layout"].as_str(),
            Some("coordinator" | "colocated" | "separate")
        ) {
            let b = r["batch"].as_u64().unwrap_or(1) as usize;
            if let std::collections::btree_map::Entry::Vacant(e) = costs.entry(b) {
                let c = scale::measure(model, b, 1, steps)?;
                println!("batch {b}:");
                print_costs(&c);
                e.insert(c);
            }
        }
    }
    println!();
    println!(
        "{:>7} {:>5} {:<28} {:>5} {:>7} {:>5} {:>12} {:>13} {:>10}",
        "workers",
        "wire",
        "layout",
        "batch",
        "overlap",
        "delta",
        "measured_ms",
        "projected_ms",
        "difference"
    );
    for r in &rows {
        let layout = match r["layout"].as_str() {
            Some("coordinator") => Layout::Coordinator,
            Some("colocated") => Layout::ShardedColocated,
            Some("separate") => Layout::ShardedSeparate,
            _ => continue, // Gloo's rows are the anchor, not ours
        };
        let (Some(n), Some(measured)) = (r["workers"].as_u64(), r["median_ms"].as_f64()) else {
            continue;
        };
        let wire = match r["wire"].as_str() {
            Some("bf16") => WireKind::Bf16,
            _ => WireKind::F32,
        };
        let rate = rate_bps(r["rate"].as_str().unwrap_or("1gbit"))
            .with_context(|| format!("the rate of {r}"))?;
        let batch = r["batch"].as_u64().unwrap_or(1) as usize;
        let overlap = r["overlap"].as_bool().unwrap_or(false);
        let delta = r["delta"].as_bool().unwrap_or(false);
        let Some(c) = costs.get(&batch) else {
            continue;
        };
        let s = Scenario {
            layout,
            workers: n as usize,
            rate_bps: rate,
            wire,
            overlap,
            sync_every: 1,
            shared_cores: Some(cores),
            delta,
        };
        let p = scale::project(c, &s);
        let projected = p.round_s * 1e3;
        println!(
            "{:>7} {:>5} {:<28} {:>5} {:>7} {:>5} {:>12.1} {:>13.1} {:>9.1}%",
            n,
            wire.name(),
            layout.name(),
            batch,
            if overlap { "on" } else { "off" },
            if delta { "on" } else { "off" },
            measured,
            projected,
            100.0 * (projected - measured) / measured
        );
    }
    Ok(())
}

/// `1gbit`, `100mbit`, `10gbit` in bits per second.
fn rate_bps(s: &str) -> Result<f64> {
    let s = s.trim().to_ascii_lowercase();
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let x: f64 = digits.parse().with_context(|| format!("rate {s:?}"))?;
    let scale = match unit {
        "bit" | "" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => anyhow::bail!("rate {s:?}: the unit is bit, kbit, mbit or gbit"),
    };
    Ok(x * scale)
}
