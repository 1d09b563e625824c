//! The CNN baseline's layers, each a small struct with a `forward` and a `backward`.
//!
//! Convolutions and pools work on channel-major activations `[C, B, H, W]` (the layout of
//! [`crate::conv`]: one weight product covers the whole batch and its output is the next layer's
//! input as is); fully connected layers on row-major `[B, features]`. Backward passes overwrite
//! the gradients they are given.

use ndarray::s;
use rayon::prelude::*;

use crate::blas::{par_gemm, view2, view2_mut};
use crate::conv::ConvGeom;
use crate::rng::Rng;

/// Gradients a layer's backward writes (overwrites): its weight, its bias and, when asked, its
/// input.
#[derive(Debug)]
pub struct LayerGrads<'a> {
    pub weight: &'a mut [f32],
    pub bias: &'a mut [f32],
    pub input: Option<&'a mut [f32]>,
}

/// Reusable im2col buffers of [`Conv2d`].
#[derive(Debug, Default)]
pub struct ConvScratch {
    col: Vec<f32>,
    gcol: Vec<f32>,
}

/// A convolution with bias, `y = W @ im2col(x) + b`:
/// `x [cin, B, h, h] -> y [cout, B, h_out, h_out]` with `W [cout, cin, k, k]`.
///
/// Images go through im2col in blocks, so the column buffer holds at most `col_budget` floats
/// (or one image's columns, if more): the default network's second convolution has 1.25 M
/// floats of columns per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub geom: ConvGeom,
    block: usize,
}

impl Conv2d {
    pub fn new(geom: ConvGeom, col_budget: usize) -> Self {
        let per_image = geom.k() * geom.positions();
        Conv2d {
            geom,
            block: (col_budget / per_image.max(1)).max(1),
        }
    }
    /// Images per im2col block.
    pub fn images_per_block(&self) -> usize {
        self.block
    }

    /// `y[cout, (b, oy, ox)] = sum_k W[cout, k] col[k, (b, oy, ox)] + bias[cout]`.
    pub fn forward(
        &self,
        weight: &[f32],
        bias: &[f32],
        x: &[f32],
        batch: usize,
        scratch: &mut ConvScratch,
        y: &mut [f32],
    ) {
        let g = &self.geom;
        let (kk, p) = (g.k(), g.positions());
        let n = batch * p;
        let w = view2(weight, g.cout, kk);
        let mut out = view2_mut(y, g.cout, n);
        let block = self.block.min(batch);
        scratch.col.resize(kk * block * p, 0.0);
        for b0 in (0..batch).step_by(block) {
            let nb = block.min(batch - b0);
            let col = &mut scratch.col[..kk * nb * p];
            g.im2col_k_major(x, batch, b0, nb, col);
            par_gemm(
                1.0,
                &w,
                &view2(col, kk, nb * p),
                0.0,
                &mut out.slice_mut(s![.., b0 * p..(b0 + nb) * p]),
            );
        }
        y.par_chunks_mut(n)
            .zip(bias.par_iter())
            .for_each(|(row, &b)| row.iter_mut().for_each(|v| *v += b));
    }

    /// From `gy = dL/dy`: `dL/dW = gy @ col^T`, `dL/db = sum of gy over (b, oy, ox)` and, into
    /// `grads.input`, `dL/dx = col2im(W^T @ gy)`. The columns are rebuilt from `x` block by block.
    pub fn backward(
        &self,
        weight: &[f32],
        x: &[f32],
        gy: &[f32],
        batch: usize,
        scratch: &mut ConvScratch,
        grads: LayerGrads<'_>,
    ) {
        let g = &self.geom;
        let (kk, p) = (g.k(), g.positions());
        let n = batch * p;
        grads
            .bias
            .par_iter_mut()
            .zip(gy.par_chunks(n))
            .for_each(|(gb, row)| *gb = row.iter().map(|&v| f64::from(v)).sum::<f64>() as f32);
        let w = view2(weight, g.cout, kk);
        let gy_all = view2(gy, g.cout, n);
        let mut gw = view2_mut(grads.weight, g.cout, kk);
        let mut gx = grads.input;
        if let Some(gx) = gx.as_deref_mut() {
            gx.fill(0.0);
        }
        let block = self.block.min(batch);
        scratch.col.resize(kk * block * p, 0.0);
        if gx.is_some() {
            scratch.gcol.resize(kk * block * p, 0.0);
        }
        for b0 in (0..batch).step_by(block) {
            let nb = block.min(batch - b0);
            let col = &mut scratch.col[..kk * nb * p];
            g.im2col_k_major(x, batch, b0, nb, col);
            let gyb = gy_all.slice(s![.., b0 * p..(b0 + nb) * p]);
            let beta = if b0 == 0 { 0.0 } else { 1.0 };
            par_gemm(1.0, &gyb, &view2(col, kk, nb * p).t(), beta, &mut gw);
            if let Some(gx) = gx.as_deref_mut() {
                let gcol = &mut scratch.gcol[..kk * nb * p];
                par_gemm(1.0, &w.t(), &gyb, 0.0, &mut view2_mut(gcol, kk, nb * p));
                g.col2im_k_major(gcol, batch, b0, nb, gx);
            }
        }
    }
}

/// 2x2 max pooling of stride 2 on square planes, `[planes, h, h] -> [planes, h/2, h/2]` (an odd
/// last row and column are dropped, as PyTorch's `MaxPool2d(2)`). Channel-major activations are
/// `C x B` planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2 {
    pub h_in: usize,
    pub h_out: usize,
}

impl MaxPool2 {
    pub fn new(h_in: usize) -> Self {
        MaxPool2 {
            h_in,
            h_out: h_in / 2,
        }
    }

    /// `y = max` of each 2x2 window; `argmax` records the winner as `2 dy + dx` (the first of
    /// equal values), all the backward needs.
    pub fn forward(&self, x: &[f32], y: &mut [f32], argmax: &mut [u8]) {
        let (h, ho) = (self.h_in, self.h_out);
        y.par_chunks_mut(ho * ho)
            .zip(argmax.par_chunks_mut(ho * ho))
            .zip(x.par_chunks(h * h))
            .for_each(|((y, am), x)| {
                for oy in 0..ho {
                    for ox in 0..ho {
                        let at = |d: usize| x[(2 * oy + d / 2) * h + 2 * ox + d % 2];
                        let (mut best, mut arg) = (at(0), 0u8);
                        for d in 1..4 {
                            if at(d) > best {
                                (best, arg) = (at(d), d as u8);
                            }
                        }
                        y[oy * ho + ox] = best;
                        am[oy * ho + ox] = arg;
                    }
                }
            });
    }

    /// `gx` (overwritten) is `gy` at each window's maximum and zero elsewhere.
    pub fn backward(&self, gy: &[f32], argmax: &[u8], gx: &mut [f32]) {
        let (h, ho) = (self.h_in, self.h_out);
        gx.par_chunks_mut(h * h)
            .zip(gy.par_chunks(ho * ho))
            .zip(argmax.par_chunks(ho * ho))
            .for_each(|((gx, gy), am)| {
                gx.fill(0.0);
                for oy in 0..ho {
                    for ox in 0..ho {
                        let d = usize::from(am[oy * ho + ox]);
                        gx[(2 * oy + d / 2) * h + 2 * ox + d % 2] = gy[oy * ho + ox];
                    }
                }
            });
    }
}

/// A fully connected layer, `y = x @ W^T + b`: `x [B, inputs] -> y [B, outputs]` with
/// `W [outputs, inputs]` (PyTorch's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
}

impl Linear {
    pub fn new(inputs: usize, outputs: usize) -> Self {
        Linear { inputs, outputs }
    }

    pub fn forward(&self, weight: &[f32], bias: &[f32], x: &[f32], y: &mut [f32]) {
        let b = x.len() / self.inputs;
        par_gemm(
            1.0,
            &view2(x, b, self.inputs),
            &view2(weight, self.outputs, self.inputs).t(),
            0.0,
            &mut view2_mut(y, b, self.outputs),
        );
        y.par_chunks_mut(self.outputs).for_each(|row| {
            row.iter_mut().zip(bias).for_each(|(v, &bb)| *v += bb);
        });
    }

    /// From `gy = dL/dy`: `dL/dW = gy^T @ x`, `dL/db = sum of gy's rows` and, into
    /// `grads.input`, `dL/dx = gy @ W`.
    pub fn backward(&self, weight: &[f32], x: &[f32], gy: &[f32], grads: LayerGrads<'_>) {
        let b = x.len() / self.inputs;
        let gyv = view2(gy, b, self.outputs);
        par_gemm(
            1.0,
            &gyv.t(),
            &view2(x, b, self.inputs),
            0.0,
            &mut view2_mut(grads.weight, self.outputs, self.inputs),
        );
        let mut sums = vec![0.0f64; self.outputs];
        for row in gy.chunks_exact(self.outputs) {
            sums.iter_mut()
                .zip(row)
                .for_each(|(s, &g)| *s += f64::from(g));
        }
        grads
            .bias
            .iter_mut()
            .zip(&sums)
            .for_each(|(gb, &s)| *gb = s as f32);
        if let Some(gx) = grads.input {
            par_gemm(
                1.0,
                &gyv,
                &view2(weight, self.outputs, self.inputs),
                0.0,
                &mut view2_mut(gx, b, self.inputs),
            );
        }
    }
}

/// `x = max(x, 0)` in place.
pub fn relu(x: &mut [f32]) {
    x.par_chunks_mut(4096)
        .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
}

/// ReLU's backward from its output `y`: `g = 0` where `y <= 0`.
pub fn relu_backward(g: &mut [f32], y: &[f32]) {
    g.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(g, y)| {
            for (g, &y) in g.iter_mut().zip(y) {
                if y <= 0.0 {
                    *g = 0.0;
                }
            }
        });
}

/// One sample's inverted-dropout multipliers: each unit is kept with probability `1 - p` and
/// then scaled by `1 / (1 - p)`, else 0. The draws come from a stream keyed by `key` alone, so a
/// sample's mask does not depend on which batch or worker it lands in.
pub fn dropout_mask(key: u64, p: f32, mask: &mut [f32]) {
    let mut rng = Rng::derive(key, "dropout", 0);
    let keep = 1.0 / (1.0 - p);
    for m in mask {
        *m = if rng.next_f64() >= f64::from(p) {
            keep
        } else {
            0.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_picks_the_window_maximum_and_drops_an_odd_edge() {
        let pool = MaxPool2::new(5);
        assert_eq!(pool.h_out, 2);
        #[rustfmt::skip]
        let x = [
            1.0, 2.0, 0.0, 0.0, 9.0,
            4.0, 3.0, 0.0, 5.0, 9.0,
            -1.0, -2.0, 7.0, 7.0, 9.0,
            -3.0, -4.0, 1.0, 1.0, 9.0,
            9.0, 9.0, 9.0, 9.0, 9.0,
        ];
        let (mut y, mut am) = ([0.0; 4], [0u8; 4]);
        pool.forward(&x, &mut y, &mut am);
        assert_eq!(y, [4.0, 5.0, -1.0, 7.0]);
        assert_eq!(am, [2, 3, 0, 0]); // ties go to the first
        let mut gx = [f32::NAN; 25];
        pool.backward(&[1.0, 2.0, 3.0, 4.0], &am, &mut gx);
        let mut want = [0.0; 25];
        (want[5], want[8], want[10], want[12]) = (1.0, 2.0, 3.0, 4.0);
        assert_eq!(gx, want);
    }

    #[test]
    fn dropout_mask_depends_on_the_key_and_keeps_about_1_minus_p() {
        let (mut a, mut b, mut c) = (vec![0.0; 4000], vec![0.0; 4000], vec![0.0; 4000]);
        dropout_mask(7, 0.25, &mut a);
        dropout_mask(7, 0.25, &mut b);
        dropout_mask(8, 0.25, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let kept = a.iter().filter(|&&m| m > 0.0).count();
        assert!((2850..3150).contains(&kept), "{kept}");
        assert!(a.iter().all(|&m| m == 0.0 || m == 1.0 / 0.75));
    }
}
