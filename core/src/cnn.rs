//! The CNN baseline of Sabour et al. (2017), with max pooling: forward and backward for the CPU.
//!
//! Shapes below are for the default config (B = batch):
//! ```text
//! images [B,1,28,28]
//!  -> conv.0 5x5 'same' + ReLU + pool    [256, B, 14, 14]   (channel-major; W @ im2col)
//!  -> conv.1 5x5 'same' + ReLU + pool    [256, B, 7, 7]
//!  -> conv.2 5x5 'same' + ReLU           [128, B, 7, 7]
//!  -> flatten (c, y, x)                  [B, 6272]
//!  -> fc.0 + ReLU, fc.1 + ReLU           [B, 328], [B, 192]
//!  -> dropout (training only), fc.2      logits [B, 10]
//! loss = mean_b (logsumexp(z_b) - z_b[label_b])
//! ```
//! Dropout masks come from one key per sample (see [`CnnBaseline::forward_backward`]), so a
//! gradient summed over samples does not depend on how they were split into batches.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::blas::init_blas;
use crate::config::CnnConfig;
use crate::conv::ConvGeom;
use crate::error::{CoreError, Result};
use crate::layers::{self, Conv2d, ConvScratch, LayerGrads, Linear, MaxPool2};
use crate::loss::{self, Targets};
use crate::model::{BatchStats, GradReady, images_in_batch};
use crate::params::{ParamLayout, Params};
use crate::rng::Rng;

/// Floats of im2col columns held at once by default (64 MB): the batch goes through each
/// convolution in blocks of images that fit.
pub const DEFAULT_COL_BUDGET: usize = 1 << 24;

/// Time spent per kind of layer (forward + backward), summed over calls.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CnnTimings {
    /// Convolutions with their ReLU.
    pub conv: Duration,
    pub pool: Duration,
    /// Flatten, fully connected layers, ReLU and dropout.
    pub fc: Duration,
    pub loss: Duration,
}

impl CnnTimings {
    pub fn total(&self) -> Duration {
        self.conv + self.pool + self.fc + self.loss
    }
    /// `(name, duration)` in network order.
    pub fn parts(&self) -> [(&'static str, Duration); 4] {
        [
            ("conv", self.conv),
            ("pool", self.pool),
            ("fc", self.fc),
            ("loss", self.loss),
        ]
    }
}

/// The convolutional part's activations, kept for the backward pass.
#[derive(Debug, Default)]
struct ConvActivations {
    /// The images channel-major `[C, B, H, W]` (only with more than one input channel).
    x: Vec<f32>,
    /// Per convolution: output after ReLU `[cout, B, h, h]`, pooled output, pool winners.
    conv: Vec<Vec<f32>>,
    pool: Vec<Vec<f32>>,
    argmax: Vec<Vec<u8>>,
}

/// Buffers reused across steps, and what the backward pass needs from the forward pass.
#[derive(Debug, Default)]
pub struct CnnWorkspace {
    acts: ConvActivations,
    scratch: ConvScratch,
    /// `fc[0]`: flattened features `[B, F]`; `fc[k + 1]`: hidden layer k after ReLU.
    fc: Vec<Vec<f32>>,
    /// Dropout multipliers and the classifier's dropped-out input, `[B, last hidden]`.
    keep: Vec<f32>,
    dropped: Vec<f32>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    g_logits: Vec<f32>,
    g_fc: Vec<Vec<f32>>,
    g_out: Vec<f32>,
    g_conv: Vec<f32>,
    g_x: Vec<f32>,
    /// When set, [`CnnBaseline::forward_backward`] also writes `dL/dimages` into `g_images`.
    pub input_grad: bool,
    /// Gradient of the loss with respect to the images `[B, C, H, W]`, when `input_grad`.
    pub g_images: Vec<f32>,
    pub timings: CnnTimings,
}

impl CnnWorkspace {
    pub fn new() -> Self {
        Self::default()
    }
    /// Logits `[B, classes]` of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
    /// Class probabilities `[B, classes]` of the last forward pass.
    pub fn probabilities(&self) -> &[f32] {
        &self.probs
    }
}

/// The network: its config, parameter layout and the layers derived from them. Parameters are
/// held outside ([`Params`]), as for [`crate::CapsNet`].
#[derive(Clone, Debug)]
pub struct CnnBaseline {
    cfg: CnnConfig,
    layout: ParamLayout,
    convs: Vec<Conv2d>,
    pools: Vec<Option<MaxPool2>>,
    /// Hidden layers, then the classifier.
    fcs: Vec<Linear>,
}

/// `[B, C*hw]` (rows of c, y, x) from channel-major `[C, B, hw]`.
fn channels_to_rows(x: &[f32], c: usize, hw: usize, rows: &mut [f32]) {
    let b = x.len() / (c * hw);
    rows.par_chunks_mut(c * hw)
        .enumerate()
        .for_each(|(bi, row)| {
            for (ci, dst) in row.chunks_exact_mut(hw).enumerate() {
                dst.copy_from_slice(&x[(ci * b + bi) * hw..][..hw]);
            }
        });
}

/// Channel-major `[C, B, hw]` from `[B, C*hw]`.
fn rows_to_channels(rows: &[f32], c: usize, hw: usize, x: &mut [f32]) {
    let b = rows.len() / (c * hw);
    x.par_chunks_mut(b * hw)
        .enumerate()
        .for_each(|(ci, plane)| {
            for (bi, dst) in plane.chunks_exact_mut(hw).enumerate() {
                dst.copy_from_slice(&rows[(bi * c + ci) * hw..][..hw]);
            }
        });
}

/// The weight and bias gradients of the layer whose weight is spec `w` (its bias follows it).
fn layer_grads<'a>(
    grads: &'a mut Params,
    w: usize,
    input: Option<&'a mut [f32]>,
) -> LayerGrads<'a> {
    let specs = grads.layout().specs();
    let (wr, br) = (specs[w].range(), specs[w + 1].range());
    debug_assert_eq!(wr.end, br.start);
    let (weight, bias) = grads.data[wr.start..br.end].split_at_mut(wr.len());
    LayerGrads {
        weight,
        bias,
        input,
    }
}

impl CnnBaseline {
    pub fn new(cfg: CnnConfig) -> Result<Self> {
        cfg.validate()?;
        init_blas();
        let sides = cfg.sides();
        let mut cin = cfg.in_channels;
        let mut convs = Vec::with_capacity(cfg.conv_channels.len());
        let mut pools = Vec::with_capacity(cfg.conv_channels.len());
        for (l, &cout) in cfg.conv_channels.iter().enumerate() {
            let geom = ConvGeom::padded(cin, cout, cfg.kernel, 1, cfg.padding(), sides[l]);
            convs.push(Conv2d::new(geom, DEFAULT_COL_BUDGET));
            pools.push(cfg.pool_after[l].then(|| MaxPool2::new(geom.h_out)));
            cin = cout;
        }
        let mut prev = cfg.flat_features();
        let mut fcs = Vec::with_capacity(cfg.fc_hidden.len() + 1);
        for &out in cfg.fc_hidden.iter().chain([&cfg.classes]) {
            fcs.push(Linear::new(prev, out));
            prev = out;
        }
        Ok(CnnBaseline {
            layout: ParamLayout::for_cnn(&cfg),
            cfg,
            convs,
            pools,
            fcs,
        })
    }

    pub fn config(&self) -> &CnnConfig {
        &self.cfg
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    /// Bounds the im2col buffer to `floats` (at least one image's columns per convolution).
    pub fn set_col_budget(&mut self, floats: usize) {
        for c in &mut self.convs {
            *c = Conv2d::new(c.geom, floats);
        }
    }

    /// Initial parameters: PyTorch's default for conv and linear layers (weight and bias uniform
    /// in +-1/sqrt(fan_in)), each tensor from `seed` and its name alone.
    pub fn init_params(&self, seed: u64) -> Params {
        let mut p = Params::zeros(&self.layout);
        for (index, spec) in self.layout.specs().iter().enumerate() {
            let mut rng = Rng::derive(seed, &spec.name, 0);
            // A bias shares its layer's fan-in: the weight just before it.
            let w = if spec.name.ends_with(".bias") {
                &self.layout.specs()[index - 1]
            } else {
                spec
            };
            let fan_in: usize = w.shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            p.at_mut(index)
                .iter_mut()
                .for_each(|x| *x = rng.uniform(-bound, bound));
        }
        p
    }

    /// Index in the layout of conv `l`'s weight (its bias follows).
    fn conv_w(l: usize) -> usize {
        2 * l
    }
    /// Index in the layout of fully connected layer `k`'s weight (its bias follows).
    fn fc_w(&self, k: usize) -> usize {
        2 * (self.convs.len() + k)
    }

    fn check_images(&self, params: &Params, images: &[f32]) -> Result<usize> {
        images_in_batch(&self.layout, params, images, self.cfg.pixels())
    }

    fn check_inputs(&self, params: &Params, images: &[f32], targets: &Targets) -> Result<usize> {
        let b = self.check_images(params, images)?;
        targets.check(b, self.cfg.classes, self.cfg.pixels())?;
        Ok(b)
    }

    /// Evaluation: the batch's mean cross-entropy (in `margin_loss`, the field the trainer
    /// reports as the classification loss; `reconstruction_loss` is 0) and its correct
    /// predictions. No dropout.
    pub fn forward(
        &self,
        params: &Params,
        images: &[f32],
        labels: &[usize],
        ws: &mut CnnWorkspace,
    ) -> Result<BatchStats> {
        self.forward_targets(params, images, &Targets::single(labels), ws)
    }

    /// [`Self::forward`] against [`Targets`]: with one object per image the softmax
    /// cross-entropy, with several a sigmoid per class and their cross-entropies (the paper's
    /// baseline on overlapping pairs; an image is right when its largest logits are its
    /// classes). The reconstruction targets are not used.
    pub fn forward_targets(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        ws: &mut CnnWorkspace,
    ) -> Result<BatchStats> {
        let b = self.check_inputs(params, images, targets)?;
        self.forward_logits(params, images, b, None, ws);
        Ok(self.loss(targets, b, ws))
    }

    /// Inference: class probabilities `[B, classes]` (softmax of the logits).
    pub fn predict<'w>(
        &self,
        params: &Params,
        images: &[f32],
        ws: &'w mut CnnWorkspace,
    ) -> Result<&'w [f32]> {
        let b = self.check_images(params, images)?;
        self.forward_logits(params, images, b, None, ws);
        let nc = self.cfg.classes;
        ws.probs.resize(b * nc, 0.0);
        for (z, p) in ws
            .logits
            .chunks_exact(nc)
            .zip(ws.probs.chunks_exact_mut(nc))
        {
            loss::softmax(z, p);
        }
        Ok(&ws.probs)
    }

    /// Forward and backward pass: writes the gradient of the batch's mean cross-entropy into
    /// `grads` (overwritten) and returns the batch's loss and accuracy.
    ///
    /// With `dropout = Some(keys)`, the classifier's input goes through inverted dropout (rate
    /// `config().dropout`); sample `i`'s mask is drawn from `keys[i]` alone (e.g. a hash of the
    /// run seed, the epoch and the sample's index in the data set), so the gradient summed over
    /// a set of samples is the same however they are split into batches or across workers.
    /// With `None`, no dropout (the loss equals [`Self::forward`]'s).
    pub fn forward_backward(
        &self,
        params: &Params,
        images: &[f32],
        labels: &[usize],
        dropout: Option<&[u64]>,
        grads: &mut Params,
        ws: &mut CnnWorkspace,
    ) -> Result<BatchStats> {
        let targets = Targets::single(labels);
        self.forward_backward_targets(params, images, &targets, dropout, grads, ws)
    }

    /// [`Self::forward_backward`] against [`Targets`] (the loss of [`Self::forward_targets`]).
    pub fn forward_backward_targets(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        dropout: Option<&[u64]>,
        grads: &mut Params,
        ws: &mut CnnWorkspace,
    ) -> Result<BatchStats> {
        self.forward_backward_ready(params, images, targets, dropout, grads, ws, &mut ())
    }

    /// [`Self::forward_backward_targets`], telling `ready` after each layer of the backward
    /// pass which gradients are final: the fully connected layers', then each convolution's
    /// from the last.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_ready(
        &self,
        params: &Params,
        images: &[f32],
        targets: &Targets,
        dropout: Option<&[u64]>,
        grads: &mut Params,
        ws: &mut CnnWorkspace,
        ready: &mut dyn GradReady,
    ) -> Result<BatchStats> {
        let b = self.check_inputs(params, images, targets)?;
        if grads.layout() != &self.layout {
            return Err(CoreError::LayoutMismatch {
                what: "gradient buffers",
            });
        }
        if let Some(keys) = dropout
            && keys.len() != b
        {
            return Err(CoreError::Shape {
                op: "dropout keys",
                expected: vec![b],
                got: vec![keys.len()],
            });
        }
        self.forward_logits(params, images, b, dropout, ws);
        let stats = self.loss(targets, b, ws);
        let mut ready =
            |from: usize, grads: &Params| ready.ready(&stats, from, &grads.data[from..]);
        self.backward(params, images, b, dropout.is_some(), grads, ws, &mut ready);
        Ok(stats)
    }

    /// Convolutions, pools, fully connected layers and dropout, up to `ws.logits`.
    fn forward_logits(
        &self,
        params: &Params,
        images: &[f32],
        b: usize,
        dropout: Option<&[u64]>,
        ws: &mut CnnWorkspace,
    ) {
        let cfg = &self.cfg;
        let hw = cfg.image_size * cfg.image_size;
        let acts = &mut ws.acts;
        if cfg.in_channels > 1 {
            acts.x.resize(images.len(), 0.0);
            rows_to_channels(images, cfg.in_channels, hw, &mut acts.x);
        }
        let nl = self.convs.len();
        acts.conv.resize_with(nl, Vec::new);
        acts.pool.resize_with(nl, Vec::new);
        acts.argmax.resize_with(nl, Vec::new);
        let (mut conv_time, mut pool_time) = (Duration::ZERO, Duration::ZERO);
        for (l, conv) in self.convs.iter().enumerate() {
            let t0 = Instant::now();
            let g = &conv.geom;
            let mut out = std::mem::take(&mut acts.conv[l]);
            out.resize(g.cout * b * g.positions(), 0.0);
            let w = Self::conv_w(l);
            let input = self.conv_input(l, images, acts);
            conv.forward(
                params.at(w),
                params.at(w + 1),
                input,
                b,
                &mut ws.scratch,
                &mut out,
            );
            layers::relu(&mut out);
            acts.conv[l] = out;
            let t1 = Instant::now();
            if let Some(pool) = &self.pools[l] {
                let n = g.cout * b * pool.h_out * pool.h_out;
                acts.pool[l].resize(n, 0.0);
                acts.argmax[l].resize(n, 0);
                pool.forward(&acts.conv[l], &mut acts.pool[l], &mut acts.argmax[l]);
            }
            conv_time += t1 - t0;
            pool_time += t1.elapsed();
        }
        ws.timings.conv += conv_time;
        ws.timings.pool += pool_time;

        let t1 = Instant::now();
        let nh = cfg.fc_hidden.len();
        ws.fc.resize_with(nh + 1, Vec::new);
        {
            let mut rows = std::mem::take(&mut ws.fc[0]);
            rows.resize(b * cfg.flat_features(), 0.0);
            let last = self.conv_input(nl, images, &ws.acts);
            let c = cfg.conv_channels[nl - 1];
            channels_to_rows(last, c, last.len() / (c * b), &mut rows);
            ws.fc[0] = rows;
        }
        for k in 0..nh {
            let fc = &self.fcs[k];
            let w = self.fc_w(k);
            let (done, rest) = ws.fc.split_at_mut(k + 1);
            let out = &mut rest[0];
            out.resize(b * fc.outputs, 0.0);
            fc.forward(params.at(w), params.at(w + 1), &done[k], out);
            layers::relu(out);
        }
        let classifier = &self.fcs[nh];
        let cls_in: &[f32] = match dropout {
            Some(keys) => {
                let width = classifier.inputs;
                ws.keep.resize(b * width, 0.0);
                let p = cfg.dropout;
                ws.keep
                    .par_chunks_mut(width)
                    .zip(keys.par_iter())
                    .for_each(|(m, &key)| layers::dropout_mask(key, p, m));
                ws.dropped.clear();
                ws.dropped
                    .extend(ws.fc[nh].iter().zip(&ws.keep).map(|(x, m)| x * m));
                &ws.dropped
            }
            None => &ws.fc[nh],
        };
        ws.logits.resize(b * cfg.classes, 0.0);
        let w = self.fc_w(nh);
        classifier.forward(params.at(w), params.at(w + 1), cls_in, &mut ws.logits);
        ws.timings.fc += t1.elapsed();
    }

    /// The input of convolution `l` (for `l` = the number of convolutions: the last one's
    /// output), channel-major.
    fn conv_input<'a>(&self, l: usize, images: &'a [f32], acts: &'a ConvActivations) -> &'a [f32] {
        if l == 0 {
            if self.cfg.in_channels > 1 {
                &acts.x
            } else {
                images
            }
        } else if self.pools[l - 1].is_some() {
            &acts.pool[l - 1]
        } else {
            &acts.conv[l - 1]
        }
    }

    /// The cross-entropy of each sample (softmax with one object per image, sigmoids with
    /// several); leaves `dL/dlogits` of the batch mean in `ws.g_logits`.
    fn loss(&self, targets: &Targets, b: usize, ws: &mut CnnWorkspace) -> BatchStats {
        let t = Instant::now();
        let nc = self.cfg.classes;
        ws.probs.resize(b * nc, 0.0);
        ws.g_logits.resize(b * nc, 0.0);
        let scale = 1.0 / b as f32;
        let (mut total, mut correct) = (0.0, 0);
        let mut present = Vec::with_capacity(targets.objects);
        for (i, ((z, p), g)) in ws
            .logits
            .chunks_exact(nc)
            .zip(ws.probs.chunks_exact_mut(nc))
            .zip(ws.g_logits.chunks_exact_mut(nc))
            .enumerate()
        {
            present.clear();
            present.extend(targets.classes_of(i, b));
            total += match present[..] {
                [label] => loss::softmax_cross_entropy(z, label, scale, p, g),
                _ => loss::sigmoid_cross_entropy(z, &present, scale, p, g),
            };
            correct += usize::from(loss::top_k_matches(z, &present));
        }
        ws.timings.loss += t.elapsed();
        BatchStats {
            samples: b,
            margin_loss: total / b as f64,
            reconstruction_loss: 0.0,
            correct,
        }
    }

    /// From `ws.g_logits` back through the classifier, dropout, the hidden layers, the flatten
    /// and the convolutions (with `ws.input_grad`, on to the images).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        params: &Params,
        images: &[f32],
        b: usize,
        dropout: bool,
        grads: &mut Params,
        ws: &mut CnnWorkspace,
        ready: &mut dyn FnMut(usize, &Params),
    ) {
        let offset = |i: usize| self.layout.specs()[i].offset;
        let cfg = &self.cfg;
        let t0 = Instant::now();
        let nh = cfg.fc_hidden.len();
        ws.g_fc.resize_with(nh + 1, Vec::new);
        for k in (0..=nh).rev() {
            let fc = &self.fcs[k];
            let w = self.fc_w(k);
            let mut gx = std::mem::take(&mut ws.g_fc[k]);
            let (x, gy): (&[f32], &[f32]) = if k == nh {
                let x = if dropout { &ws.dropped } else { &ws.fc[nh] };
                (x, &ws.g_logits)
            } else {
                (&ws.fc[k], &ws.g_fc[k + 1])
            };
            gx.resize(b * fc.inputs, 0.0);
            fc.backward(params.at(w), x, gy, layer_grads(grads, w, Some(&mut gx)));
            if k == nh && dropout {
                gx.iter_mut().zip(&ws.keep).for_each(|(g, m)| *g *= m);
            }
            if k > 0 {
                layers::relu_backward(&mut gx, &ws.fc[k]);
            }
            ws.g_fc[k] = gx;
        }
        let nl = self.convs.len();
        let c_last = cfg.conv_channels[nl - 1];
        ws.g_out.resize(b * cfg.flat_features(), 0.0);
        rows_to_channels(
            &ws.g_fc[0],
            c_last,
            cfg.flat_features() / c_last,
            &mut ws.g_out,
        );
        ready(offset(self.fc_w(0)), grads);
        let t1 = Instant::now();
        ws.timings.fc += t1 - t0;

        let (mut conv_time, mut pool_time) = (Duration::ZERO, Duration::ZERO);
        for l in (0..nl).rev() {
            let t0 = Instant::now();
            // ws.g_out: the gradient of layer l's output; into ws.g_conv: of its conv + ReLU.
            if let Some(pool) = &self.pools[l] {
                ws.g_conv.resize(ws.acts.conv[l].len(), 0.0);
                pool.backward(&ws.g_out, &ws.acts.argmax[l], &mut ws.g_conv);
            } else {
                std::mem::swap(&mut ws.g_out, &mut ws.g_conv);
            }
            let t1 = Instant::now();
            pool_time += t1 - t0;
            layers::relu_backward(&mut ws.g_conv, &ws.acts.conv[l]);
            let w = Self::conv_w(l);
            let want_input = l > 0 || ws.input_grad;
            let mut gx = std::mem::take(if l == 0 && cfg.in_channels == 1 {
                &mut ws.g_images
            } else if l == 0 {
                &mut ws.g_x
            } else {
                &mut ws.g_out
            });
            let input = self.conv_input(l, images, &ws.acts);
            if want_input {
                gx.resize(input.len(), 0.0);
            }
            self.convs[l].backward(
                params.at(w),
                input,
                &ws.g_conv,
                b,
                &mut ws.scratch,
                layer_grads(grads, w, want_input.then_some(gx.as_mut_slice())),
            );
            if l > 0 {
                ws.g_out = gx;
            } else if cfg.in_channels == 1 {
                ws.g_images = gx;
                if !want_input {
                    // Nothing stale for a reader who forgot to set `input_grad`.
                    ws.g_images.clear();
                }
            } else {
                if want_input {
                    ws.g_images.resize(gx.len(), 0.0);
                    let hw = cfg.image_size * cfg.image_size;
                    channels_to_rows(&gx, cfg.in_channels, hw, &mut ws.g_images);
                } else {
                    ws.g_images.clear();
                }
                ws.g_x = gx;
            }
            ready(offset(Self::conv_w(l)), grads);
            conv_time += t1.elapsed();
        }
        ws.timings.conv += conv_time;
        ws.timings.pool += pool_time;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_channels_are_inverse_transposes() {
        let (c, b, hw) = (3, 2, 4);
        let x: Vec<f32> = (0..c * b * hw).map(|i| i as f32).collect();
        let mut rows = vec![0.0; x.len()];
        channels_to_rows(&x, c, hw, &mut rows);
        // Sample 1, channel 2, position 3 sits at x[(2 * 2 + 1) * 4 + 3].
        assert_eq!(rows[(c + 2) * hw + 3], x[(2 * b + 1) * hw + 3]);
        let mut back = vec![0.0; x.len()];
        rows_to_channels(&rows, c, hw, &mut back);
        assert_eq!(back, x);
    }
}
