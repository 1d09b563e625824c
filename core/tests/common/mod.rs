//! What the gradient checks share: the tolerance, relative errors and test tensors.
#![allow(dead_code)] // each check uses its own part

use capsnet_core::rng::Rng;

pub const TOL: f64 = 2e-2;

pub fn rel_err(fd: &[f64], an: &[f64]) -> f64 {
    let num: f64 = fd
        .iter()
        .zip(an)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = an.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-6);
    num / den
}

pub fn assert_close(what: &str, fd: &[f64], an: &[f64]) {
    let e = rel_err(fd, an);
    let norm: f64 = an.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        norm > 1e-5,
        "{what}: analytic gradient is ~0 ({norm}); the check would prove nothing"
    );
    assert!(
        e < TOL,
        "{what}: relative error {e:.3e}\n  fd {fd:?}\n  an {an:?}"
    );
}

pub fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| std * rng.normal()).collect()
}

pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

pub fn to64(g: &[f32]) -> Vec<f64> {
    g.iter().map(|&x| f64::from(x)).collect()
}

/// Indices of the `k` largest-magnitude entries: the coordinates whose finite difference stands
/// far above float32 rounding noise.
pub fn top_k(g: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..g.len()).collect();
    idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    idx.truncate(k);
    idx
}
