//! Throughput benchmark of the model (`capsnet bench train`): time per step, images/s, GFLOP/s,
//! peak memory, time per layer, and the machine's sgemm rate for context.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::blas::{init_blas, par_gemm, view2, view2_mut};
use crate::config::CapsNetConfig;
use crate::error::{CoreError, Result};
use crate::model::{CapsNet, Mask, PassOptions, Timings, Workspace};
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

#[derive(Clone, Debug)]
pub struct BenchSettings {
    pub mode: BenchMode,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    pub model: CapsNetConfig,
    pub primary_chunk: Option<usize>,
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

/// Runs one setting on random images in a fresh workspace.
pub fn run_setting(s: &BenchSettings) -> Result<BenchRow> {
    if s.batch == 0 || s.steps == 0 || s.threads == 0 {
        return Err(CoreError::Config(
            "bench batch, steps and threads must be at least 1".into(),
        ));
    }
    let mut model = CapsNet::new(s.model.clone())?;
    if let Some(c) = s.primary_chunk {
        model.set_primary_chunk(c);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(s.threads)
        .build()
        .map_err(|e| CoreError::Config(format!("cannot start {} threads: {e}", s.threads)))?;
    let mut params = model.init_params(1);
    let mut rng = Rng::new(2);
    let images: Vec<f32> = (0..s.batch * s.model.pixels())
        .map(|_| rng.uniform(0.0, 1.0))
        .collect();
    let labels: Vec<usize> = (0..s.batch).map(|_| rng.below(s.model.classes)).collect();
    let mut grads = Params::zeros(model.layout());
    let mut adam = Adam::new(AdamConfig::default(), params.data.len());
    let mut ws = Workspace::new();
    let mut times = Vec::with_capacity(s.steps);
    let mut timed = Timings::default();
    pool.install(|| -> Result<()> {
        for i in 0..s.warmup + s.steps {
            ws.timings = Timings::default();
            let t = Instant::now();
            match s.mode {
                BenchMode::Train => {
                    let opts = PassOptions {
                        mask: Mask::Label,
                        input_grad: false,
                    };
                    model.forward_backward(&params, &images, &labels, opts, &mut grads, &mut ws)?;
                    let o = Instant::now();
                    adam.update(&mut params.data, &grads.data)?;
                    ws.timings.optimizer += o.elapsed();
                }
                BenchMode::Infer => {
                    model.predict(&params, &images, &mut ws)?;
                }
            }
            let dt = t.elapsed();
            if i >= s.warmup {
                times.push(dt.as_secs_f64());
                add(&mut timed, &ws.timings);
            }
        }
        Ok(())
    })?;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    let med = median(&mut times);
    let n = s.steps as f64;
    Ok(BenchRow {
        mode: s.mode,
        batch: s.batch,
        threads: s.threads,
        median_s: med,
        min_s: min,
        max_s: max,
        images_per_s: s.batch as f64 / med,
        gflop_per_s: s.batch as f64 * flops_per_image(&s.model, s.mode) / med / 1e9,
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        parts: timed
            .parts()
            .iter()
            .map(|(k, d)| (k.to_string(), d.as_secs_f64() / n))
            .collect(),
    })
}

fn add(acc: &mut Timings, t: &Timings) {
    let sum = |a: &mut Duration, b: Duration| *a += b;
    sum(&mut acc.conv1, t.conv1);
    sum(&mut acc.primary, t.primary);
    sum(&mut acc.u_hat, t.u_hat);
    sum(&mut acc.routing, t.routing);
    sum(&mut acc.decoder, t.decoder);
    sum(&mut acc.loss, t.loss);
    sum(&mut acc.optimizer, t.optimizer);
}

/// GFLOP/s of sgemm at the primary-conv shape of a batch of 128 (`[4608, 20736] x [20736, 256]`)
/// through the same row-split path the model uses; best of `reps`.
pub fn sgemm_gflops(threads: usize, reps: usize) -> Result<f64> {
    init_blas();
    let (m, k, n) = (4608, 20736, 256);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| CoreError::Config(format!("cannot start {threads} threads: {e}")))?;
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
