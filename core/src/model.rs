//! The CapsNet of Sabour, Frosst & Hinton (2017): forward and backward for the CPU.
//!
//! Shapes below are for the default config (B = batch):
//! ```text
//! images [B,1,28,28]
//!  -> conv1 9x9 + ReLU            h1  [256, B, 20, 20]   (channel-major; W1 @ im2col)
//!  -> primary 9x9 stride 2        a2  [B*36, 256]        (im2col @ W2^T, in batch chunks)
//!  -> regroup + squash            u   [B, 1152, 8]       (capsule i = type*36 + row*6 + col)
//!  -> u_hat = W u                 u_hat [B, 1152, 10, 16]
//!  -> dynamic routing (r iters)   v   [B, 10, 16],  lengths |v| [B, 10]
//!  -> mask by label, decoder      recon [B, 784]   160 -> 512 -> 1024 -> 784 (ReLU, ReLU, sigmoid)
//! loss = mean_b (margin_b + 0.0005 * SSE_b)
//! ```

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::blas::{init_blas, par_gemm, view2, view2_mut};
use crate::caps::{self, DigitDims, RoutingCache};
use crate::config::CapsNetConfig;
use crate::conv::ConvGeom;
use crate::error::{CoreError, Result};
use crate::loss::{self, MarginParams, Targets};
use crate::params::{
    CONV1_B, CONV1_W, DECODER_0, DIGIT_W, PRIMARY_B, PRIMARY_W, ParamLayout, Params,
};
use crate::rng::Rng;

/// Images per block of the primary-capsule im2col: bounds its buffer (16 images = 48 MB at full
/// size) instead of materialising the whole batch (380 MB at batch 128).
pub const DEFAULT_PRIMARY_CHUNK: usize = 16;

/// Time spent per part of the network (forward + backward), summed over calls.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Timings {
    pub conv1: Duration,
    pub primary: Duration,
    pub u_hat: Duration,
    pub routing: Duration,
    pub decoder: Duration,
    pub loss: Duration,
    pub optimizer: Duration,
}

impl Timings {
    pub fn total(&self) -> Duration {
        self.conv1
            + self.primary
            + self.u_hat
            + self.routing
            + self.decoder
            + self.loss
            + self.optimizer
    }
    /// `(name, duration)` in network order.
    pub fn parts(&self) -> [(&'static str, Duration); 7] {
        [
            ("conv1", self.conv1),
            ("primary", self.primary),
            ("u_hat", self.u_hat),
            ("routing", self.routing),
            ("decoder", self.decoder),
            ("loss", self.loss),
            ("optimizer", self.optimizer),
        ]
    }
}

/// Losses of a batch (means over the batch) and how many predictions were right.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct BatchStats {
    pub samples: usize,
    /// The classification loss: the margin loss for [`CapsNet`], the softmax cross-entropy for
    /// [`crate::CnnBaseline`].
    pub margin_loss: f64,
    pub reconstruction_loss: f64,
    pub correct: usize,
}

/// Hears, during a backward pass, which part of the gradient is final: `ready` is called after
/// each layer with `from` decreasing (the flat vector is laid out input first, and the
/// backward pass runs from the output), the last time with 0, and `tail` = `grads[from..]`,
/// which the pass does not write again. A worker sends those ranges while the rest of the
/// backward pass runs (compute/sync overlap).
pub trait GradReady {
    fn ready(&mut self, stats: &BatchStats, from: usize, tail: &[f32]);
}

/// No one listening.
impl GradReady for () {
    fn ready(&mut self, _: &BatchStats, _: usize, _: &[f32]) {}
}

impl BatchStats {
    pub fn total_loss(&self) -> f64 {
        self.margin_loss + self.reconstruction_loss
    }
    pub fn accuracy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.correct as f64 / self.samples as f64
        }
    }
}

/// Which capsule the decoder sees: the true class (training) or the predicted one (test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    Label,
    Predicted,
}

/// Buffers reused across steps (allocating them per step costs page faults that rival the
/// arithmetic), plus what the backward pass needs from the forward pass.
#[derive(Debug, Default)]
pub struct Workspace {
    batch: usize,
    col1: Vec<f32>,
    h1: Vec<f32>,
    col2: Vec<f32>,
    a2: Vec<f32>,
    u: Vec<f32>,
    uhat: Vec<f32>,
    digit_wt: Vec<f32>,
    routing: RoutingCache,
    v: Vec<f32>,
    lengths: Vec<f32>,
    dec: Vec<Vec<f32>>,
    mask: Vec<usize>,
    g_len: Vec<f32>,
    g_v: Vec<f32>,
    g_dec: Vec<Vec<f32>>,
    g_uhat: Vec<f32>,
    g_u: Vec<f32>,
    g_scratch: Vec<f32>,
    g_a2: Vec<f32>,
    g_col2: Vec<f32>,
    g_h1: Vec<f32>,
    g_col1: Vec<f32>,
    /// Gradient of the loss with respect to the input images, when asked for.
    pub g_images: Vec<f32>,
    pub timings: Timings,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }
    /// Capsule lengths `[B, classes]` of the last forward pass.
    pub fn lengths(&self) -> &[f32] {
        &self.lengths
    }
    /// Digit capsules `[B, classes, dim]` of the last forward pass.
    pub fn digit_caps(&self) -> &[f32] {
        &self.v
    }
    /// Reconstructions `[B, pixels]` of the last forward pass.
    pub fn reconstruction(&self) -> &[f32] {
        self.dec.last().map(Vec::as_slice).unwrap_or(&[])
    }
    /// Primary capsules `[B, I, dim]` after squash.
    pub fn primary_caps(&self) -> &[f32] {
        &self.u
    }
    /// `u_hat [B, I, classes, dim]`.
    pub fn u_hat(&self) -> &[f32] {
        &self.uhat
    }
}

/// Options of one forward/backward pass.
#[derive(Clone, Copy, Debug)]
pub struct PassOptions {
    pub mask: Mask,
    /// Also compute the gradient with respect to the images (for gradient checks).
    pub input_grad: bool,
}

/// The network: its config, parameter layout and the geometry derived from them. Parameters are
/// held outside ([`Params`]) so one model serves many replicas and optimizers.
#[derive(Clone, Debug)]
pub struct CapsNet {
    cfg: CapsNetConfig,
    layout: ParamLayout,
    conv1: ConvGeom,
    primary: ConvGeom,
    primary_chunk: usize,
}

fn relu_grad_mask(g: &mut [f32], out: &[f32]) {
    g.par_chunks_mut(4096)
        .zip(out.par_chunks(4096))
        .for_each(|(g, o)| {
            for (g, &o) in g.iter_mut().zip(o) {
                if o <= 0.0 {
                    *g = 0.0;
                }
            }
        });
}

impl CapsNet {
    pub fn new(cfg: CapsNetConfig) -> Result<Self> {
        cfg.validate()?;
        init_blas();
        let conv1 = ConvGeom::new(
            cfg.in_channels,
            cfg.conv1_channels,
            cfg.conv1_kernel,
            1,
            cfg.image_size,
        );
        let primary = ConvGeom::new(
            cfg.conv1_channels,
            cfg.primary_channels(),
            cfg.primary_kernel,
            cfg.primary_stride,
            conv1.h_out,
        );
        let layout = ParamLayout::for_config(&cfg);
        Ok(CapsNet {
            cfg,
            layout,
            conv1,
            primary,
            primary_chunk: DEFAULT_PRIMARY_CHUNK,
        })
    }

    pub fn config(&self) -> &CapsNetConfig {
        &self.cfg
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    /// Images per im2col block of the primary convolution.
    pub fn set_primary_chunk(&mut self, images: usize) {
        self.primary_chunk = images.max(1);
    }

    /// Initial parameters: PyTorch's default for conv and linear layers (weight and bias uniform
    /// in +-1/sqrt(fan_in)) and N(0, 0.01^2) for `digit.weight`, from `seed` alone.
    pub fn init_params(&self, seed: u64) -> Params {
        let mut p = Params::zeros(&self.layout);
        for (index, spec) in self.layout.specs().iter().enumerate() {
            let mut rng = Rng::derive(seed, &spec.name, 0);
            let t = p.at_mut(index);
            if index == DIGIT_W {
                t.iter_mut().for_each(|x| *x = 0.01 * rng.normal());
                continue;
            }
            // A bias shares its layer's fan-in: the weight just before it.
            let w = if spec.name.ends_with(".bias") {
                &self.layout.specs()[index - 1]
            } else {
                spec
            };
            let fan_in: usize = w.shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            t.iter_mut().for_each(|x| *x = rng.uniform(-bound, bound));
        }
        p
    }

    fn digit_dims(&self, batch: usize) -> DigitDims {
        DigitDims {
            batch,
            inputs: self.cfg.num_primary(),
            in_dim: self.cfg.primary_dim,
            outputs: self.cfg.classes,
            out_dim: self.cfg.digit_dim,
            iters: self.cfg.routing_iters,
        }
    }

    fn check_inputs(&self, params: &Params, images: &[f32], targets: &Targets) -> Result<usize> {
        let px = self.cfg.pixels();
        let b = images_in_batch(&self.layout, params, images, px)?;
        targets.check(b, self.cfg.classes, px)?;
        Ok(b)
    }

    /// Forward pass of a batch; returns its losses and accuracy. `labels` score the losses and,
    /// with [`Mask::Label`], choose the capsule the decoder sees.
    pub fn forward(
        &self,
        params: &Params,
        images: &[f32],
        labels: &[usize],
        mask: Mask,
        ws: &mut Workspace,
    ) -> Result<BatchStats> {
        self.forward_targets(params, images, &Targets::single(labels), mask, ws)
    }

    /// [`Self::forward`] against [`Targets`] of any number of objects per image: the decoder
    /// reconstructs each object from its own capsule (with [`Mask::Predicted`], from the
    /// longest capsules, each matched to an object of its class where there is one), and an
    /// image counts as correct when its longest capsules are its classes.
    pub fn forward_targets(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        mask: Mask,
        ws: &mut Workspace,
    ) -> Result<BatchStats> {
        let b = self.check_inputs(params, images, targets)?;
        self.forward_impl(params, images, targets, mask, b, ws, 0.0)
    }

    /// Forward and backward pass: writes the gradient of the batch loss (mean over the batch)
    /// into `grads` (overwritten) and returns the batch's losses.
    pub fn forward_backward(
        &self,
        params: &Params,
        images: &[f32],
        labels: &[usize],
        opts: PassOptions,
        grads: &mut Params,
        ws: &mut Workspace,
    ) -> Result<BatchStats> {
        self.forward_backward_targets(params, images, &Targets::single(labels), opts, grads, ws)
    }

    /// [`Self::forward_backward`] against [`Targets`] of any number of objects per image.
    pub fn forward_backward_targets(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        opts: PassOptions,
        grads: &mut Params,
        ws: &mut Workspace,
    ) -> Result<BatchStats> {
        self.forward_backward_ready(params, images, targets, opts, grads, ws, &mut ())
    }

    /// [`Self::forward_backward_targets`], telling `ready` after each layer of the backward
    /// pass which gradients are final: the decoder's, then the digit capsules', the primary
    /// capsules' and conv1's.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_ready(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        opts: PassOptions,
        grads: &mut Params,
        ws: &mut Workspace,
        ready: &mut dyn GradReady,
    ) -> Result<BatchStats> {
        let b = self.check_inputs(params, images, targets)?;
        if grads.layout() != &self.layout {
            return Err(CoreError::LayoutMismatch {
                what: "gradient buffers",
            });
        }
        let stats = self.forward_impl(params, images, targets, opts.mask, b, ws, 1.0 / b as f32)?;
        let mut ready =
            |from: usize, grads: &Params| ready.ready(&stats, from, &grads.data[from..]);
        self.backward_impl(
            params,
            images,
            targets,
            b,
            opts.input_grad,
            grads,
            ws,
            &mut ready,
        );
        Ok(stats)
    }

    /// conv1 -> primary capsules -> u_hat -> routing -> lengths.
    fn forward_caps(
        &self,
        params: &Params,
        images: &[f32],
        b: usize,
        ws: &mut Workspace,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (g1, g2) = (&self.conv1, &self.primary);
        ws.batch = b;

        // conv1 + ReLU: h1[c, (b,y,x)] = relu(W1 @ col1 + b1), channel-major.
        let t0 = Instant::now();
        let n1 = b * g1.positions();
        ws.col1.resize(g1.k() * n1, 0.0);
        g1.im2col_k_major(images, b, 0, b, &mut ws.col1);
        ws.h1.resize(g1.cout * n1, 0.0);
        par_gemm(
            1.0,
            &view2(params.at(CONV1_W), g1.cout, g1.k()),
            &view2(&ws.col1, g1.k(), n1),
            0.0,
            &mut view2_mut(&mut ws.h1, g1.cout, n1),
        );
        let b1 = params.at(CONV1_B);
        ws.h1
            .par_chunks_mut(n1)
            .zip(b1.par_iter())
            .for_each(|(row, &bias)| {
                row.iter_mut().for_each(|x| *x = (*x + bias).max(0.0));
            });
        let t1 = Instant::now();
        ws.timings.conv1 += t1 - t0;

        // Primary capsules: a2[(b,p), c] = col2 @ W2^T + b2, in blocks of images.
        let p2 = g2.positions();
        let w2 = view2(params.at(PRIMARY_W), g2.cout, g2.k());
        ws.a2.resize(b * p2 * g2.cout, 0.0);
        let chunk = self.primary_chunk.min(b);
        ws.col2.resize(chunk * p2 * g2.k(), 0.0);
        for b0 in (0..b).step_by(chunk) {
            let nb = chunk.min(b - b0);
            let col = &mut ws.col2[..nb * p2 * g2.k()];
            g2.im2col_row_major(&ws.h1, b, b0, nb, col);
            let out = &mut ws.a2[b0 * p2 * g2.cout..][..nb * p2 * g2.cout];
            par_gemm(
                1.0,
                &view2(col, nb * p2, g2.k()),
                &w2.t(),
                0.0,
                &mut view2_mut(out, nb * p2, g2.cout),
            );
        }
        let b2 = params.at(PRIMARY_B);
        ws.a2.par_chunks_mut(g2.cout).for_each(|row| {
            row.iter_mut().zip(b2).for_each(|(x, &bias)| *x += bias);
        });
        // Regroup to capsules (i = type*P + p) and squash.
        let (types, pd, ni) = (cfg.primary_types, cfg.primary_dim, cfg.num_primary());
        ws.u.resize(b * ni * pd, 0.0);
        let a2 = &ws.a2;
        ws.u.par_chunks_mut(ni * pd)
            .enumerate()
            .for_each(|(bi, ub)| {
                for t in 0..types {
                    for p in 0..p2 {
                        let s = &a2[(bi * p2 + p) * g2.cout + t * pd..][..pd];
                        caps::squash(s, pd, cfg.squash_eps, &mut ub[(t * p2 + p) * pd..][..pd]);
                    }
                }
            });
        let t2 = Instant::now();
        ws.timings.primary += t2 - t1;

        // Digit capsules.
        let dims = self.digit_dims(b);
        ws.uhat.resize(b * dims.uhat_per_sample(), 0.0);
        caps::transpose_digit_weight(params.at(DIGIT_W), &dims, &mut ws.digit_wt);
        caps::uhat_forward(&ws.u, &ws.digit_wt, &dims, &mut ws.uhat);
        let t3 = Instant::now();
        ws.timings.u_hat += t3 - t2;
        let (nj, dd) = (cfg.classes, cfg.digit_dim);
        ws.v.resize(b * nj * dd, 0.0);
        caps::routing_forward(&ws.uhat, &dims, cfg.squash_eps, &mut ws.routing, &mut ws.v);
        ws.lengths.resize(b * nj, 0.0);
        for (l, v) in ws.lengths.iter_mut().zip(ws.v.chunks_exact(dd)) {
            *l = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        }
        ws.timings.routing += t3.elapsed();
        Ok(())
    }

    /// Inference: class capsule lengths `[B, classes]` only (no decoder, no losses).
    pub fn predict<'w>(
        &self,
        params: &Params,
        images: &[f32],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        let b = images_in_batch(&self.layout, params, images, self.cfg.pixels())?;
        self.forward_caps(params, images, b, ws)?;
        Ok(&ws.lengths)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_impl(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        mask: Mask,
        b: usize,
        ws: &mut Workspace,
        grad_scale: f32,
    ) -> Result<BatchStats> {
        self.forward_caps(params, images, b, ws)?;
        let cfg = &self.cfg;
        let (nj, dd, k) = (cfg.classes, cfg.digit_dim, targets.objects);
        let rows = k * b;
        let t4 = Instant::now();

        // The capsule each decoder row sees: row o * b + i decodes object o of image i.
        ws.mask.clear();
        ws.mask.resize(rows, 0);
        let mut correct = 0;
        let mut present = Vec::with_capacity(k);
        for (bi, len) in ws.lengths.chunks_exact(nj).enumerate() {
            present.clear();
            present.extend(targets.classes_of(bi, b));
            correct += usize::from(loss::top_k_matches(len, &present));
            let chosen = match mask {
                Mask::Label => present.clone(),
                Mask::Predicted => match_to_objects(&loss::top_k(len, k), &present),
            };
            for (o, &m) in chosen.iter().enumerate() {
                ws.mask[o * b + bi] = m;
            }
        }
        let nl = self.layout.decoder_layers();
        ws.dec.resize_with(nl + 1, Vec::new);
        let din = cfg.decoder_in();
        ws.dec[0].clear();
        ws.dec[0].resize(rows * din, 0.0);
        for (r, &m) in ws.mask.iter().enumerate() {
            let bi = r % b;
            ws.dec[0][r * din + m * dd..][..dd].copy_from_slice(&ws.v[(bi * nj + m) * dd..][..dd]);
        }
        self.decoder_forward(params, rows, &mut ws.dec);
        let t5 = Instant::now();
        ws.timings.decoder += t5 - t4;

        // Losses (per sample, then the batch mean) and their gradients scaled by 1/B.
        let mp = MarginParams {
            m_pos: cfg.m_pos,
            m_neg: cfg.m_neg,
            lambda_neg: cfg.lambda_neg,
        };
        ws.g_len.resize(b * nj, 0.0);
        let mut margin = 0.0;
        for (bi, (len, g)) in ws
            .lengths
            .chunks_exact(nj)
            .zip(ws.g_len.chunks_exact_mut(nj))
            .enumerate()
        {
            present.clear();
            present.extend(targets.classes_of(bi, b));
            margin += loss::margin_loss(len, &present, &mp, grad_scale, g);
        }
        let px = cfg.pixels();
        let mut g_rec = std::mem::take(&mut ws.g_dec);
        g_rec.resize_with(nl + 1, Vec::new);
        g_rec[nl].resize(rows * px, 0.0);
        let recon = &ws.dec[nl];
        let want = targets.parts.unwrap_or(images);
        let rec_sum: f64 = g_rec[nl]
            .par_chunks_mut(px)
            .zip(recon.par_chunks(px))
            .zip(want.par_chunks(px))
            .map(|((g, r), x)| loss::reconstruction_loss(r, x, cfg.recon_weight, grad_scale, g))
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        ws.g_dec = g_rec;
        ws.timings.loss += t5.elapsed();
        Ok(BatchStats {
            samples: b,
            margin_loss: margin / b as f64,
            reconstruction_loss: rec_sum / b as f64,
            correct,
        })
    }

    /// The decoder on `dec[0]` (`[b, classes x dim]`, the masked capsules): `dec[k]` gets
    /// layer k's output, the last one the reconstructions `[b, pixels]`.
    fn decoder_forward(&self, params: &Params, b: usize, dec: &mut Vec<Vec<f32>>) {
        let nl = self.layout.decoder_layers();
        dec.resize_with(nl + 1, Vec::new);
        for k in 0..nl {
            let w = &self.layout.specs()[DECODER_0 + 2 * k];
            let (dout, dinp) = (w.shape[0], w.shape[1]);
            let (prev, next) = dec.split_at_mut(k + 1);
            let out = &mut next[0];
            out.resize(b * dout, 0.0);
            par_gemm(
                1.0,
                &view2(&prev[k], b, dinp),
                &view2(params.at(DECODER_0 + 2 * k), dout, dinp).t(),
                0.0,
                &mut view2_mut(out, b, dout),
            );
            let bias = params.at(DECODER_0 + 2 * k + 1);
            let last = k + 1 == nl;
            out.par_chunks_mut(dout).for_each(|row| {
                for (x, &bb) in row.iter_mut().zip(bias) {
                    let z = *x + bb;
                    *x = if last {
                        1.0 / (1.0 + (-z).exp())
                    } else {
                        z.max(0.0)
                    };
                }
            });
        }
    }

    /// Reconstructions `[B, pixels]` of masked capsules `caps` (`[B, classes, dim]`, zero but
    /// for the capsule to decode, as in training): the paper's figures 3 and 4 decode the
    /// predicted capsule, as it is or with one dimension perturbed.
    pub fn reconstruct(&self, params: &Params, caps: &[f32]) -> Result<Vec<f32>> {
        let din = self.cfg.decoder_in();
        if params.layout() != &self.layout {
            return Err(CoreError::LayoutMismatch { what: "parameters" });
        }
        if caps.is_empty() || caps.len() % din != 0 {
            return Err(CoreError::Shape {
                op: "reconstruct",
                expected: vec![0, self.cfg.classes, self.cfg.digit_dim],
                got: vec![caps.len()],
            });
        }
        let mut dec = vec![caps.to_vec()];
        self.decoder_forward(params, caps.len() / din, &mut dec);
        Ok(dec.pop().unwrap_or_default())
    }

    /// The backward pass, layer by layer from the losses to conv1, each stage timed. `ws`
    /// holds the forward pass's activations and the loss gradients it left.
    #[allow(clippy::too_many_arguments)]
    fn backward_impl(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        b: usize,
        input_grad: bool,
        grads: &mut Params,
        ws: &mut Workspace,
        ready: &mut dyn FnMut(usize, &Params),
    ) {
        let offset = |i: usize| self.layout.specs()[i].offset;
        let t0 = Instant::now();
        let rows = targets.objects * b;
        self.decoder_backward(
            params,
            rows,
            input_grad && targets.parts.is_none(),
            grads,
            ws,
        );
        if input_grad && targets.parts.is_some() {
            // The targets are not the image: its gradient comes through the network alone.
            ws.g_images.clear();
            ws.g_images.resize(images.len(), 0.0);
        }
        self.capsule_lengths_backward(b, ws);
        ready(offset(DECODER_0), grads);
        let t1 = Instant::now();
        ws.timings.decoder += t1 - t0;

        let dims = self.digit_dims(b);
        ws.g_uhat.resize(ws.uhat.len(), 0.0);
        caps::routing_backward(
            &ws.uhat,
            &dims,
            self.cfg.squash_eps,
            &ws.routing,
            &ws.g_v,
            &mut ws.g_uhat,
        );
        let t2 = Instant::now();
        ws.timings.routing += t2 - t1;
        ws.g_u.resize(ws.u.len(), 0.0);
        caps::uhat_backward(
            &ws.u,
            &ws.digit_wt,
            &ws.g_uhat,
            &dims,
            &mut grads.data[self.layout.specs()[DIGIT_W].range()],
            &mut ws.g_u,
            &mut ws.g_scratch,
        );
        ready(offset(DIGIT_W), grads);
        let t3 = Instant::now();
        ws.timings.u_hat += t3 - t2;

        self.primary_backward(params, b, grads, ws, ready);
        let t4 = Instant::now();
        ws.timings.primary += t4 - t3;

        self.conv1_backward(params, images, b, input_grad, grads, ws);
        ready(0, grads);
        ws.timings.conv1 += t4.elapsed();
    }

    /// Decoder over its `b` rows, last layer first (sigmoid, then ReLUs): its weight and bias
    /// gradients, and the gradient of its input in `ws.g_dec[0]`. With `input_grad`, starts
    /// `ws.g_images` (the image is also the reconstruction target).
    fn decoder_backward(
        &self,
        params: &Params,
        b: usize,
        input_grad: bool,
        grads: &mut Params,
        ws: &mut Workspace,
    ) {
        let nl = self.layout.decoder_layers();
        if input_grad {
            // The image is also the reconstruction target: dL/dx = -dL/dr there.
            ws.g_images.clear();
            ws.g_images.extend(ws.g_dec[nl].iter().map(|g| -g));
        }
        for k in (0..nl).rev() {
            let w = &self.layout.specs()[DECODER_0 + 2 * k];
            let (dout, dinp) = (w.shape[0], w.shape[1]);
            {
                let out = &ws.dec[k + 1];
                let g = &mut ws.g_dec[k + 1];
                if k + 1 == nl {
                    g.par_iter_mut()
                        .zip(out.par_iter())
                        .for_each(|(g, &y)| *g *= y * (1.0 - y));
                } else {
                    relu_grad_mask(g, out);
                }
            }
            let (gb_all, rest) = grads
                .data
                .split_at_mut(self.layout.specs()[DECODER_0 + 2 * k + 1].offset);
            let gw = &mut gb_all[w.range()];
            let gb = &mut rest[..dout];
            let gz = &ws.g_dec[k + 1];
            par_gemm(
                1.0,
                &view2(gz, b, dout).t(),
                &view2(&ws.dec[k], b, dinp),
                0.0,
                &mut view2_mut(gw, dout, dinp),
            );
            gb.fill(0.0);
            for row in gz.chunks_exact(dout) {
                gb.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
            }
            let (lo, hi) = ws.g_dec.split_at_mut(k + 1);
            let gx = &mut lo[k];
            gx.resize(b * dinp, 0.0);
            par_gemm(
                1.0,
                &view2(&hi[0], b, dout),
                &view2(params.at(DECODER_0 + 2 * k), dout, dinp),
                0.0,
                &mut view2_mut(gx, b, dinp),
            );
        }
    }

    /// `ws.g_v`, the gradient of the digit capsules: the margin loss through their lengths,
    /// plus the decoder's input gradient through the masked capsule of each decoder row.
    fn capsule_lengths_backward(&self, b: usize, ws: &mut Workspace) {
        let (nj, dd) = (self.cfg.classes, self.cfg.digit_dim);
        ws.g_v.resize(b * nj * dd, 0.0);
        for (((gv, v), &gl), _) in ws
            .g_v
            .chunks_exact_mut(dd)
            .zip(ws.v.chunks_exact(dd))
            .zip(&ws.g_len)
            .zip(0..)
        {
            let len = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let k = if len > 0.0 { gl / len } else { 0.0 };
            gv.iter_mut().zip(v).for_each(|(g, &x)| *g = k * x);
        }
        let din = self.cfg.decoder_in();
        for (r, &m) in ws.mask.iter().enumerate() {
            let bi = r % b;
            let src = &ws.g_dec[0][r * din + m * dd..][..dd];
            ws.g_v[(bi * nj + m) * dd..][..dd]
                .iter_mut()
                .zip(src)
                .for_each(|(g, &s)| *g += s);
        }
    }

    /// Squash of the primary capsules back to the conv layout, then the primary conv's bias,
    /// weight and input gradients (the input's in `ws.g_h1`), blocks of images in reverse so
    /// the last block's im2col from the forward pass is reused. `ready` hears that the primary
    /// convolution's parameters are final as soon as they are, before its input gradient.
    fn primary_backward(
        &self,
        params: &Params,
        b: usize,
        grads: &mut Params,
        ws: &mut Workspace,
        ready: &mut dyn FnMut(usize, &Params),
    ) {
        let cfg = &self.cfg;
        let (g1, g2) = (&self.conv1, &self.primary);
        let (types, pd, ni, p2) = (
            cfg.primary_types,
            cfg.primary_dim,
            cfg.num_primary(),
            g2.positions(),
        );
        ws.g_a2.resize(ws.a2.len(), 0.0);
        {
            let (a2, gu) = (&ws.a2, &ws.g_u);
            ws.g_a2
                .par_chunks_mut(p2 * g2.cout)
                .enumerate()
                .for_each(|(bi, ga)| {
                    for p in 0..p2 {
                        for t in 0..types {
                            let s = &a2[(bi * p2 + p) * g2.cout + t * pd..][..pd];
                            let gv = &gu[(bi * ni + t * p2 + p) * pd..][..pd];
                            caps::squash_backward(
                                s,
                                gv,
                                pd,
                                cfg.squash_eps,
                                &mut ga[p * g2.cout + t * pd..][..pd],
                            );
                        }
                    }
                });
        }
        {
            let gb2 = &mut grads.data[self.layout.specs()[PRIMARY_B].range()];
            gb2.fill(0.0);
            for row in ws.g_a2.chunks_exact(g2.cout) {
                gb2.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
            }
        }
        let n1 = b * g1.positions();
        ws.g_h1.clear();
        ws.g_h1.resize(g1.cout * n1, 0.0);
        let chunk = self.primary_chunk.min(b);
        ws.g_col2.resize(chunk * p2 * g2.k(), 0.0);
        let w2 = view2(params.at(PRIMARY_W), g2.cout, g2.k());
        let last_b0 = (b - 1) / chunk * chunk;
        // The weight gradient first, over every block (the last block's im2col from the
        // forward pass reused): it is final before the input gradient is begun, so a listener
        // can send it while the input gradient and conv1 are computed.
        let mut first = true;
        for b0 in (0..b).step_by(chunk).rev() {
            let nb = chunk.min(b - b0);
            let col = &mut ws.col2[..nb * p2 * g2.k()];
            if b0 != last_b0 {
                g2.im2col_row_major(&ws.h1, b, b0, nb, col);
            }
            let ga = view2(
                &ws.g_a2[b0 * p2 * g2.cout..][..nb * p2 * g2.cout],
                nb * p2,
                g2.cout,
            );
            let gw2 = &mut grads.data[self.layout.specs()[PRIMARY_W].range()];
            let beta = if first { 0.0 } else { 1.0 };
            first = false;
            par_gemm(
                1.0,
                &ga.t(),
                &view2(col, nb * p2, g2.k()),
                beta,
                &mut view2_mut(gw2, g2.cout, g2.k()),
            );
        }
        ready(self.layout.specs()[PRIMARY_W].offset, grads);
        // Then the input gradient, which needs no im2col.
        for b0 in (0..b).step_by(chunk).rev() {
            let nb = chunk.min(b - b0);
            let ga = view2(
                &ws.g_a2[b0 * p2 * g2.cout..][..nb * p2 * g2.cout],
                nb * p2,
                g2.cout,
            );
            let gcol = &mut ws.g_col2[..nb * p2 * g2.k()];
            par_gemm(1.0, &ga, &w2, 0.0, &mut view2_mut(gcol, nb * p2, g2.k()));
            g2.col2im_row_major(gcol, b, b0, nb, &mut ws.g_h1);
        }
    }

    /// conv1: through its ReLU to the bias and weight gradients, and with `input_grad` on to
    /// the images (added to `ws.g_images`).
    fn conv1_backward(
        &self,
        params: &Params,
        images: &[f32],
        b: usize,
        input_grad: bool,
        grads: &mut Params,
        ws: &mut Workspace,
    ) {
        let g1 = &self.conv1;
        let n1 = b * g1.positions();
        relu_grad_mask(&mut ws.g_h1, &ws.h1);
        {
            let gb1 = &mut grads.data[self.layout.specs()[CONV1_B].range()];
            gb1.par_iter_mut()
                .zip(ws.g_h1.par_chunks(n1))
                .for_each(|(gb, row)| {
                    *gb = row.iter().map(|&g| f64::from(g)).sum::<f64>() as f32;
                });
        }
        let gw1 = &mut grads.data[self.layout.specs()[CONV1_W].range()];
        par_gemm(
            1.0,
            &view2(&ws.g_h1, g1.cout, n1),
            &view2(&ws.col1, g1.k(), n1).t(),
            0.0,
            &mut view2_mut(gw1, g1.cout, g1.k()),
        );
        if input_grad {
            ws.g_col1.resize(g1.k() * n1, 0.0);
            par_gemm(
                1.0,
                &view2(params.at(CONV1_W), g1.cout, g1.k()).t(),
                &view2(&ws.g_h1, g1.cout, n1),
                0.0,
                &mut view2_mut(&mut ws.g_col1, g1.k(), n1),
            );
            debug_assert_eq!(ws.g_images.len(), images.len());
            g1.col2im_k_major(&ws.g_col1, b, 0, b, &mut ws.g_images);
        }
    }
}

/// The images in a batch of `images` (`[b, pixels]`) for a network of `layout`, after checking
/// that `params` are of that layout and the batch is whole.
pub(crate) fn images_in_batch(
    layout: &ParamLayout,
    params: &Params,
    images: &[f32],
    pixels: usize,
) -> Result<usize> {
    if params.layout() != layout {
        return Err(CoreError::LayoutMismatch { what: "parameters" });
    }
    if images.is_empty() || images.len() % pixels != 0 {
        return Err(CoreError::Shape {
            op: "images",
            expected: vec![0, pixels],
            got: vec![images.len()],
        });
    }
    Ok(images.len() / pixels)
}

/// The predicted classes `top` in the order of the objects `present`: an object whose class
/// was predicted gets that capsule, the others the remaining predictions in rank order. So each
/// reconstruction is scored against its own object when the prediction is right.
fn match_to_objects(top: &[usize], present: &[usize]) -> Vec<usize> {
    let mut rest = top.iter().filter(|c| !present.contains(c));
    present
        .iter()
        .map(|c| {
            if top.contains(c) {
                *c
            } else {
                rest.next().copied().unwrap_or(*c)
            }
        })
        .collect()
}

pub(crate) fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
