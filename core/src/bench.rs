//! Throughput benchmark of the model (`capsnet bench train`): time per step, images/s, GFLOP/s,
//! peak memory, time per layer, and the machine's sgemm rate for context.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::blas::{init_blas, par_gemm, view2, view2_mut};
use crate::config::{CapsNetConfig, CnnConfig};
use crate::data::Batch;
use crate::error::{CoreError, Result};
use crate::net::Net;
use crate::net::NetWorkspace;
use crate::optim::{Adam, AdamConfig};
use crate::params::Params;
use crate::rng::Rng;

/// What one benchmark setting times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Forward + backward + Adam, routing r, with the decoder.
    Train,
    /// Forward to the capsule lengths (no decoder), as the PyTorch benchmark's inference.
    Infer,
}

/// One benchmark setting; [`run_isolated`] hands it to a child process as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchSettings {
    pub mode: BenchMode,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    pub model: CapsNetConfig,
    pub primary_chunk: Option<usize>,
    /// Measure the CNN baseline with this config instead (its input side and classes are
    /// `model`'s); inference is then the forward pass to the class probabilities.
    #[serde(default)]
    pub baseline: Option<CnnConfig>,
}

/// One row of results; the keys match `torch_capsnet_bench.py --json` where they overlap.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchRow {
    pub mode: BenchMode,
    pub batch: usize,
    pub threads: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub images_per_s: f64,
    pub gflop_per_s: f64,
    pub peak_rss_mib: f64,
    /// Seconds per step by part of the network, in network order.
    pub parts: Vec<(String, f64)>,
}

impl BenchMode {
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Train => "train",
            BenchMode::Infer => "infer",
        }
    }
}

/// The environment variable that carries a setting to the child process that runs it.
pub const SETTING_ENV: &str = "CAPSNET_BENCH_SETTING";

/// Runs one setting in a child process, so that its peak memory is that setting's alone.
/// `command` starts this program in the mode that calls [`setting_from_env`] and prints
/// [`run_setting`]'s row as JSON on stdout.
pub fn run_isolated(mut command: std::process::Command, s: &BenchSettings) -> Result<BenchRow> {
    let what = format!("benchmark {} batch {}", s.mode.name(), s.batch);
    let json = serde_json::to_string(s).map_err(|source| CoreError::Json {
        what: what.clone(),
        source,
    })?;
    let out = command
        .env(SETTING_ENV, json)
        .output()
        .map_err(|e| CoreError::Subprocess {
            what: what.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(CoreError::Subprocess {
            what,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|source| CoreError::Json {
        what: format!("the row of the {what}"),
        source,
    })
}

/// The setting this process was started to run by [`run_isolated`], if any.
pub fn setting_from_env() -> Option<Result<BenchSettings>> {
    let json = std::env::var(SETTING_ENV).ok()?;
    Some(
        serde_json::from_str(&json).map_err(|source| CoreError::Json {
            what: SETTING_ENV.into(),
            source,
        }),
    )
}

/// The rows as JSON objects with the keys of `torch_capsnet_bench.py --json`.
pub fn rows_json(rows: &[BenchRow]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            let parts: serde_json::Map<String, serde_json::Value> = r
                .parts
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            serde_json::json!({
                "impl": "capsnet", "mode": r.mode, "batch": r.batch, "threads": r.threads,
                "median_s": r.median_s, "min_s": r.min_s, "max_s": r.max_s,
                "images_per_s": r.images_per_s, "gflop_per_s": r.gflop_per_s,
                "peak_rss_mib": r.peak_rss_mib, "parts_s": parts,
            })
        })
        .collect()
}

/// PyTorch's best result for one setting, from `torch_capsnet_bench.py --json`.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchRow {
    pub mode: String,
    pub batch: usize,
    pub images_per_s: f64,
    pub peak_rss_mib: f64,
}

/// The best images/s (and its peak memory) per (mode, batch) of a `torch_capsnet_bench.py
/// --json` file.
pub fn read_torch_json(path: &Path) -> Result<Vec<TorchRow>> {
    #[derive(Deserialize)]
    struct File {
        results: Vec<serde_json::Value>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let file: File = serde_json::from_str(&text).map_err(|source| CoreError::Json {
        what: format!("{} (torch_capsnet_bench.py --json)", path.display()),
        source,
    })?;
    let mut best: Vec<TorchRow> = vec![];
    for r in &file.results {
        let (Some(mode), Some(batch), Some(ips), Some(rss)) = (
            r["mode"].as_str(),
            r["batch"].as_u64(),
            r["images_per_s"].as_f64(),
            r["peak_rss_mib"].as_f64(),
        ) else {
            continue;
        };
        let row = TorchRow {
            mode: mode.into(),
            batch: batch as usize,
            images_per_s: ips,
            peak_rss_mib: rss,
        };
        match best
            .iter_mut()
            .find(|b| b.mode == mode && b.batch == row.batch)
        {
            Some(b) if b.images_per_s >= ips => {}
            Some(b) => *b = row,
            None => best.push(row),
        }
    }
    Ok(best)
}

/// One line about this machine for benchmark reports: CPU model, cores, memory, and the
/// OpenBLAS kernel override.
pub fn machine_summary() -> String {
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

/// FLOPs of one image in a mode: forward, or forward + backward (twice the forward but for
/// conv1's input gradient, which training never needs) = 1.20 GFLOP at full size.
pub fn flops_per_image(cfg: &CapsNetConfig, mode: BenchMode) -> f64 {
    let f = cfg.layer_flops();
    match mode {
        BenchMode::Train => 3.0 * f.total() - f.conv1,
        BenchMode::Infer => f.total() - f.decoder,
    }
}

/// Peak resident memory of this process (VmHWM) in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs one setting on random images in a fresh workspace: forward + backward (the CNN's
/// dropout on) + Adam, or the forward pass to the capsule lengths (the CNN's probabilities).
pub fn run_setting(s: &BenchSettings) -> Result<BenchRow> {
    if s.batch == 0 || s.steps == 0 || s.threads == 0 {
        return Err(CoreError::Config(
            "bench batch, steps and threads must be at least 1".into(),
        ));
    }
    let mut net = Net::new(&s.model, s.baseline.as_ref())?;
    if let (Net::Caps(m), Some(c)) = (&mut net, s.primary_chunk) {
        m.set_primary_chunk(c);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(s.threads)
        .build()
        .map_err(|e| CoreError::thread_pool(s.threads, e))?;
    let mut params = net.init_params(1);
    let mut rng = Rng::new(2);
    let images: Vec<f32> = (0..s.batch * net.pixels())
        .map(|_| rng.uniform(0.0, 1.0))
        .collect();
    let labels: Vec<usize> = (0..s.batch).map(|_| rng.below(net.classes())).collect();
    let side = s.model.image_size;
    let batch = Batch::single(images, labels, side, side);
    let keys: Vec<u64> = (0..s.batch as u64).collect();
    let mut grads = Params::zeros(net.layout());
    let mut adam = Adam::new(AdamConfig::default(), params.data.len());
    let mut ws = NetWorkspace::new();
    let mut times = Vec::with_capacity(s.steps);
    let mut parts: Vec<(&'static str, f64)> = vec![];
    pool.install(|| -> Result<()> {
        for i in 0..s.warmup + s.steps {
            ws.reset_timings();
            let t = Instant::now();
            let mut optimizer = Duration::ZERO;
            match s.mode {
                BenchMode::Train => {
                    net.train_batch(&params, &batch, &keys, &mut grads, &mut ws)?;
                    let o = Instant::now();
                    adam.update(&mut params.data, &grads.data)?;
                    optimizer = o.elapsed();
                }
                BenchMode::Infer => {
                    net.predict(&params, &batch.images, &mut ws)?;
                }
            }
            let dt = t.elapsed();
            if i >= s.warmup {
                times.push(dt.as_secs_f64());
                let mut step = net.timings(&ws);
                step.push(("optimizer", optimizer));
                parts.resize(step.len(), ("", 0.0));
                for (acc, (k, d)) in parts.iter_mut().zip(step) {
                    *acc = (k, acc.1 + d.as_secs_f64());
                }
            }
        }
        Ok(())
    })?;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    let med = median(&mut times);
    let n = s.steps as f64;
    let flops = match (&s.baseline, s.mode) {
        (None, mode) => flops_per_image(&s.model, mode),
        (Some(c), BenchMode::Train) => 3.0 * c.forward_flops(),
        (Some(c), BenchMode::Infer) => c.forward_flops(),
    };
    Ok(BenchRow {
        mode: s.mode,
        batch: s.batch,
        threads: s.threads,
        median_s: med,
        min_s: min,
        max_s: max,
        images_per_s: s.batch as f64 / med,
        gflop_per_s: s.batch as f64 * flops / med / 1e9,
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        parts: parts
            .into_iter()
            .map(|(k, t)| (k.to_string(), t / n))
            .collect(),
    })
}

/// GFLOP/s of sgemm at the primary-conv shape of a batch of 128 (`[4608, 20736] x [20736, 256]`)
/// through the same row-split path the model uses; best of `reps`.
pub fn sgemm_gflops(threads: usize, reps: usize) -> Result<f64> {
    init_blas();
    let (m, k, n) = (4608, 20736, 256);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| CoreError::thread_pool(threads, e))?;
    let mut rng = Rng::new(4);
    let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let b: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut c = vec![0.0f32; m * n];
    let mut best = f64::INFINITY;
    pool.install(|| {
        for _ in 0..reps.max(1) + 1 {
            let t = Instant::now();
            par_gemm(
                1.0,
                &view2(&a, m, k),
                &view2(&b, n, k).t(),
                0.0,
                &mut view2_mut(&mut c, m, n),
            );
            best = best.min(t.elapsed().as_secs_f64());
        }
    });
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_json_keeps_the_best_row_per_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.json");
        std::fs::write(
            &path,
            r#"{"results": [
                {"mode": "train", "batch": 32, "images_per_s": 100.0, "peak_rss_mib": 900},
                {"mode": "train", "batch": 32, "images_per_s": 120.0, "peak_rss_mib": 950},
                {"mode": "infer", "batch": 128, "images_per_s": 300.0, "peak_rss_mib": 700},
                {"mode": "train", "note": "a row without numbers is skipped"}
            ]}"#,
        )
        .unwrap();
        let rows = read_torch_json(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].images_per_s, rows[0].peak_rss_mib), (120.0, 950.0));
        assert_eq!((rows[1].mode.as_str(), rows[1].batch), ("infer", 128));
        std::fs::write(&path, "[1, 2]").unwrap();
        let e = read_torch_json(&path).unwrap_err().to_string();
        assert!(e.contains("torch.json"), "{e}");
    }

    /// The same counts as torch_capsnet_bench.py prints, so GFLOP/s compare directly.
    #[test]
    fn flops_match_the_pytorch_benchmark() {
        let c = CapsNetConfig::default();
        assert_eq!(c.forward_flops(), 406_405_120.0);
        assert_eq!(flops_per_image(&c, BenchMode::Train), 1_202_626_560.0);
        assert_eq!(
            flops_per_image(&c, BenchMode::Infer),
            406_405_120.0 - 2_818_048.0
        );
    }
}
