//! Capsule operations: squash, the digit-capsule transform `u_hat = W u`, and dynamic routing,
//! each with its backward pass. Batched over the whole batch, parallel over the batch (or over
//! capsules for the weight gradient), with a fixed reduction order so results do not depend on
//! thread timing.

use rayon::prelude::*;

/// Compiles a kernel twice, for AVX2+FMA and for the baseline target, and picks one at run time,
/// so the binary stays portable and still uses 8-wide vectors where the CPU has them. Apply it
/// to the per-sample kernels that run inside rayon tasks (closures are not inlined across the
/// dispatch).
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) { body($($a),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// `f(n2) = n2 / ((1 + n2) sqrt(n2 + eps))`, so that `squash(s) = f(|s|^2) s`.
#[inline]
fn squash_factor(n2: f32, eps: f32) -> f32 {
    n2 / ((1.0 + n2) * (n2 + eps).sqrt())
}

/// `df/dn2 = (n2 + 2 eps - n2^2) / (2 (n2 + eps)^(3/2) (1 + n2)^2)`; finite at `n2 = 0`.
#[inline]
fn squash_factor_grad(n2: f32, eps: f32) -> f32 {
    let q2 = n2 + eps;
    let one = 1.0 + n2;
    (n2 + 2.0 * eps - n2 * n2) / (2.0 * q2 * q2.sqrt() * one * one)
}

/// Dot product in 8 independent lanes (a fixed order, so still deterministic) so that the
/// compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)` on every `dim`-long vector of `s`.
#[inline]
pub fn squash(s: &[f32], dim: usize, eps: f32, v: &mut [f32]) {
    for (s, v) in s.chunks_exact(dim).zip(v.chunks_exact_mut(dim)) {
        let f = squash_factor(dot(s, s), eps);
        for (v, s) in v.iter_mut().zip(s) {
            *v = f * s;
        }
    }
}

/// Gradient of [`squash`]: `gs = f gv + 2 f'(|s|^2) (s . gv) s`, per vector (overwrites `gs`).
#[inline]
pub fn squash_backward(s: &[f32], gv: &[f32], dim: usize, eps: f32, gs: &mut [f32]) {
    for ((s, gv), gs) in s
        .chunks_exact(dim)
        .zip(gv.chunks_exact(dim))
        .zip(gs.chunks_exact_mut(dim))
    {
        let n2 = dot(s, s);
        let f = squash_factor(n2, eps);
        let k = 2.0 * squash_factor_grad(n2, eps) * dot(s, gv);
        for ((gs, gv), s) in gs.iter_mut().zip(gv).zip(s) {
            *gs = f * gv + k * s;
        }
    }
}

/// Sizes of the digit-capsule layer: `batch` samples of `inputs` capsules of `in_dim`, mapped to
/// `outputs` capsules of `out_dim`, routed `iters` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigitDims {
    pub batch: usize,
    pub inputs: usize,
    pub in_dim: usize,
    pub outputs: usize,
    pub out_dim: usize,
    pub iters: usize,
}

impl DigitDims {
    fn jd(&self) -> usize {
        self.outputs * self.out_dim
    }
    /// Floats of `u_hat` per sample: inputs x outputs x out_dim.
    pub fn uhat_per_sample(&self) -> usize {
        self.inputs * self.jd()
    }
}

/// Samples per task in the `u_hat` product: enough to reuse each capsule's weights from L1.
const UHAT_SAMPLES_PER_TASK: usize = 4;

/// `W [I, J, D, E] -> Wt [I, E, J*D]`: the layout in which `u_hat = W u` and its gradients run
/// along contiguous rows of J*D.
pub fn transpose_digit_weight(w: &[f32], dims: &DigitDims, wt: &mut Vec<f32>) {
    let (e, jd) = (dims.in_dim, dims.jd());
    wt.resize(w.len(), 0.0);
    wt.par_chunks_mut(jd * e)
        .zip(w.par_chunks(jd * e))
        .for_each(|(t, w)| {
            for r in 0..jd {
                for k in 0..e {
                    t[k * jd + r] = w[r * e + k];
                }
            }
        });
}

multiversion! {
    /// `out[b, i, :] = sum_e u[b, i, e] * wt[i, e, :]` for a block of samples.
    fn uhat_block(u: &[f32], wt: &[f32], ni: usize, e: usize, jd: usize, out: &mut [f32]) {
        let nb = out.len() / (ni * jd);
        for i in 0..ni {
            let wi = &wt[i * jd * e..][..jd * e];
            for b in 0..nb {
                let ui = &u[(b * ni + i) * e..][..e];
                let o = &mut out[(b * ni + i) * jd..][..jd];
                o.fill(0.0);
                for (k, &uk) in ui.iter().enumerate() {
                    axpy(uk, &wi[k * jd..][..jd], o);
                }
            }
        }
    }
}

/// `u_hat[b,i,j,:] = W[i,j] @ u[b,i]`: `(B, I, E) x (I, J, D, E) -> (B, I, J, D)`, from the
/// transposed weights of [`transpose_digit_weight`].
pub fn uhat_forward(u: &[f32], wt: &[f32], dims: &DigitDims, uhat: &mut [f32]) {
    let (ni, e, jd) = (dims.inputs, dims.in_dim, dims.jd());
    uhat.par_chunks_mut(UHAT_SAMPLES_PER_TASK * ni * jd)
        .enumerate()
        .for_each(|(task, out)| {
            let b0 = task * UHAT_SAMPLES_PER_TASK;
            uhat_block(&u[b0 * ni * e..], wt, ni, e, jd, out);
        });
}

multiversion! {
    /// For one input capsule i: `gwt[e, :] = sum_b u[b,i,e] g[b,i,:]` and
    /// `gu[b, e] = wt[e, :] . g[b,i,:]`.
    fn uhat_backward_one(
        i: usize, u: &[f32], wt: &[f32], g: &[f32], nb: usize, ni: usize, e: usize, jd: usize,
        gwt: &mut [f32], gu: &mut [f32],
    ) {
        gwt.fill(0.0);
        let wi = &wt[i * jd * e..][..jd * e];
        for b in 0..nb {
            let ui = &u[(b * ni + i) * e..][..e];
            let gb = &g[(b * ni + i) * jd..][..jd];
            for k in 0..e {
                axpy(ui[k], gb, &mut gwt[k * jd..][..jd]);
                gu[b * e + k] = dot(&wi[k * jd..][..jd], gb);
            }
        }
    }
}

/// Backward of [`uhat_forward`]: `gw[i,j,d,e] = sum_b g[b,i,j,d] u[b,i,e]` (overwritten, in
/// the layout of W) and `gu[b,i,e] = sum_{j,d} W[i,j,d,e] g[b,i,j,d]` (overwritten).
/// `scratch` is reused between calls.
pub fn uhat_backward(
    u: &[f32],
    wt: &[f32],
    g_uhat: &[f32],
    dims: &DigitDims,
    gw: &mut [f32],
    gu: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (nb, ni, e, jd) = (dims.batch, dims.inputs, dims.in_dim, dims.jd());
    scratch.resize(ni * nb * e, 0.0);
    // Per input capsule i: its slice of gw and its [B, E] block of gu (transposed layout).
    gw.par_chunks_mut(jd * e)
        .zip(scratch.par_chunks_mut(nb * e))
        .enumerate()
        .for_each_init(
            || vec![0.0f32; jd * e],
            |gwt, (i, (gwi, gui))| {
                uhat_backward_one(i, u, wt, g_uhat, nb, ni, e, jd, gwt, gui);
                for r in 0..jd {
                    for k in 0..e {
                        gwi[r * e + k] = gwt[k * jd + r];
                    }
                }
            },
        );
    gu.par_chunks_mut(ni * e).enumerate().for_each(|(b, gub)| {
        for i in 0..ni {
            gub[i * e..][..e].copy_from_slice(&scratch[(i * nb + b) * e..][..e]);
        }
    });
}

/// What routing keeps for its backward pass, per sample: the coupling coefficients and the
/// pre-squash outputs of every iteration.
#[derive(Debug, Default)]
pub struct RoutingCache {
    /// `c[b, t, i, j]`.
    pub c: Vec<f32>,
    /// `s[b, t, j, d]`.
    pub s: Vec<f32>,
}

/// Dynamic routing (Procedure 1 of the paper), batched: `u_hat (B, I, J, D) -> v (B, J, D)`.
///
/// `b = 0; repeat r times { c = softmax_j(b); s_j = sum_i c_ij u_hat_j|i; v_j = squash(s_j);
/// if not last: b_ij += u_hat_j|i . v_j }`. Gradients flow through every iteration.
pub fn routing_forward(
    uhat: &[f32],
    dims: &DigitDims,
    eps: f32,
    cache: &mut RoutingCache,
    v: &mut [f32],
) {
    let (ni, nj, d, t) = (dims.inputs, dims.outputs, dims.out_dim, dims.iters);
    let per = dims.uhat_per_sample();
    cache.c.resize(dims.batch * t * ni * nj, 0.0);
    cache.s.resize(dims.batch * t * nj * d, 0.0);
    v.par_chunks_mut(nj * d)
        .zip(cache.c.par_chunks_mut(t * ni * nj))
        .zip(cache.s.par_chunks_mut(t * nj * d))
        .enumerate()
        .for_each_init(
            || vec![0.0f32; ni * nj],
            |logits, (b, ((v, c), s))| {
                route_one(&uhat[b * per..][..per], ni, nj, d, t, eps, logits, c, s, v);
            },
        );
}

multiversion! {
fn route_one(
    u: &[f32],
    ni: usize,
    nj: usize,
    d: usize,
    iters: usize,
    eps: f32,
    logits: &mut [f32],
    c_all: &mut [f32],
    s_all: &mut [f32],
    v: &mut [f32],
) {
    logits.fill(0.0);
    for t in 0..iters {
        let c = &mut c_all[t * ni * nj..][..ni * nj];
        if t == 0 {
            c.fill(1.0 / nj as f32);
        } else {
            for (ci, li) in c.chunks_exact_mut(nj).zip(logits.chunks_exact(nj)) {
                let m = li.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0.0;
                for (c, &l) in ci.iter_mut().zip(li) {
                    *c = (l - m).exp();
                    z += *c;
                }
                let inv = 1.0 / z;
                ci.iter_mut().for_each(|c| *c *= inv);
            }
        }
        let s = &mut s_all[t * nj * d..][..nj * d];
        s.fill(0.0);
        for (ui, ci) in u.chunks_exact(nj * d).zip(c.chunks_exact(nj)) {
            for ((sj, uij), &cij) in s.chunks_exact_mut(d).zip(ui.chunks_exact(d)).zip(ci) {
                for (s, u) in sj.iter_mut().zip(uij) {
                    *s += cij * u;
                }
            }
        }
        squash(s, d, eps, v);
        if t + 1 < iters {
            for (ui, li) in u.chunks_exact(nj * d).zip(logits.chunks_exact_mut(nj)) {
                for ((l, uij), vj) in li.iter_mut().zip(ui.chunks_exact(d)).zip(v.chunks_exact(d)) {
                    *l += dot(uij, vj);
                }
            }
        }
    }
}
}

/// Backward of [`routing_forward`]: `g_uhat` (overwritten) from `gv (B, J, D)`.
pub fn routing_backward(
    uhat: &[f32],
    dims: &DigitDims,
    eps: f32,
    cache: &RoutingCache,
    gv: &[f32],
    g_uhat: &mut [f32],
) {
    let (ni, nj, d, t) = (dims.inputs, dims.outputs, dims.out_dim, dims.iters);
    let per = dims.uhat_per_sample();
    g_uhat.par_chunks_mut(per).enumerate().for_each_init(
        || vec![0.0f32; ni * nj + 3 * nj * d + nj],
        |scratch, (b, gu)| {
            route_one_backward(
                &uhat[b * per..][..per],
                ni,
                nj,
                d,
                t,
                eps,
                &cache.c[b * t * ni * nj..][..t * ni * nj],
                &cache.s[b * t * nj * d..][..t * nj * d],
                &gv[b * nj * d..][..nj * d],
                gu,
                scratch,
            )
        },
    );
}

multiversion! {
fn route_one_backward(
    u: &[f32],
    ni: usize,
    nj: usize,
    d: usize,
    iters: usize,
    eps: f32,
    c_all: &[f32],
    s_all: &[f32],
    gv_out: &[f32],
    gu: &mut [f32],
    scratch: &mut [f32],
) {
    let (glogits, rest) = scratch.split_at_mut(ni * nj);
    let (v, rest) = rest.split_at_mut(nj * d);
    let (gv, rest) = rest.split_at_mut(nj * d);
    let (gs, rest) = rest.split_at_mut(nj * d);
    let gc = &mut rest[..nj];
    gu.fill(0.0);
    glogits.fill(0.0);
    for t in (0..iters).rev() {
        let c = &c_all[t * ni * nj..][..ni * nj];
        let s = &s_all[t * nj * d..][..nj * d];
        if t + 1 == iters {
            gv.copy_from_slice(gv_out);
        } else {
            // b_{t+1} = b_t + u_hat . v_t: glogits holds dL/db_{t+1}.
            squash(s, d, eps, v);
            gv.fill(0.0);
            for ((ui, gui), gli) in u
                .chunks_exact(nj * d)
                .zip(gu.chunks_exact_mut(nj * d))
                .zip(glogits.chunks_exact(nj))
            {
                for (((uij, guij), &g), (vj, gvj)) in ui
                    .chunks_exact(d)
                    .zip(gui.chunks_exact_mut(d))
                    .zip(gli)
                    .zip(v.chunks_exact(d).zip(gv.chunks_exact_mut(d)))
                {
                    for k in 0..d {
                        gvj[k] += g * uij[k];
                        guij[k] += g * vj[k];
                    }
                }
            }
        }
        squash_backward(s, gv, d, eps, gs);
        // s_j = sum_i c_ij u_hat_j|i; c = softmax(b_t); b_0 = 0 is a constant.
        for (((ui, gui), ci), gli) in u
            .chunks_exact(nj * d)
            .zip(gu.chunks_exact_mut(nj * d))
            .zip(c.chunks_exact(nj))
            .zip(glogits.chunks_exact_mut(nj))
        {
            for (j, ((uij, guij), &cij)) in ui
                .chunks_exact(d)
                .zip(gui.chunks_exact_mut(d))
                .zip(ci)
                .enumerate()
            {
                let gsj = &gs[j * d..][..d];
                gc[j] = dot(gsj, uij);
                for k in 0..d {
                    guij[k] += cij * gsj[k];
                }
            }
            if t > 0 {
                let mean = dot(ci, gc);
                for ((gl, &cij), &gcj) in gli.iter_mut().zip(ci).zip(gc.iter()) {
                    *gl += cij * (gcj - mean);
                }
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squash_keeps_direction_and_bounds_length() {
        let s = [3.0f32, 4.0];
        let mut v = [0.0; 2];
        squash(&s, 2, 1e-8, &mut v);
        let len = (v[0] * v[0] + v[1] * v[1]).sqrt();
        assert!((len - 25.0 / 26.0).abs() < 1e-6);
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
        let z = [0.0f32; 2];
        squash(&z, 2, 1e-8, &mut v);
        assert_eq!(v, [0.0, 0.0]);
    }

    #[test]
    fn one_iteration_routes_with_uniform_coefficients() {
        let dims = DigitDims {
            batch: 1,
            inputs: 2,
            in_dim: 1,
            outputs: 2,
            out_dim: 1,
            iters: 1,
        };
        let uhat = [1.0, 2.0, 3.0, 4.0]; // (i, j)
        let mut cache = RoutingCache::default();
        let mut v = [0.0; 2];
        routing_forward(&uhat, &dims, 0.0, &mut cache, &mut v);
        // s_0 = 0.5 (1 + 3) = 2, s_1 = 0.5 (2 + 4) = 3; squash of a scalar is s^2/(1+s^2) sign(s).
        assert!(
            (v[0] - 0.8).abs() < 1e-6 && (v[1] - 0.9).abs() < 1e-6,
            "{v:?}"
        );
    }
}
