//! The network a run trains: the capsule network, or the paper's CNN baseline
//! (`--model cnn-baseline`). The trainer, the worker and the coordinator's evaluation go through
//! [`Net`], so both train with the same data, optimizer, checkpoints and commands.
//!
//! A run's [`crate::train::TrainConfig`] names the CNN in `baseline`; its `model` (the capsule
//! config) then only gives the input side and the number of classes, which the CNN's config
//! repeats.

use std::time::Duration;

use crate::cnn::{CnnBaseline, CnnWorkspace};
use crate::config::{CapsNetConfig, CnnConfig};
use crate::data::Batch;
use crate::error::Result;
use crate::model::{BatchStats, CapsNet, GradReady, Mask, PassOptions, Workspace};
use crate::params::{ParamLayout, Params};
use crate::rng::Rng;

/// Either network.
#[derive(Clone, Debug)]
pub enum Net {
    Caps(CapsNet),
    Cnn(CnnBaseline),
}

/// The buffers of either network (the other's stay empty).
#[derive(Debug, Default)]
pub struct NetWorkspace {
    pub caps: Workspace,
    pub cnn: CnnWorkspace,
}

impl NetWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the per-part timings afresh.
    pub fn reset_timings(&mut self) {
        self.caps.timings = Default::default();
        self.cnn.timings = Default::default();
    }
}

/// The layout of the network a config names.
pub fn layout_for(model: &CapsNetConfig, baseline: Option<&CnnConfig>) -> ParamLayout {
    match baseline {
        Some(b) => ParamLayout::for_cnn(b),
        None => ParamLayout::for_config(model),
    }
}

/// One dropout key per sample, from the run's seed, the epoch and the sample's index in the
/// data set: the same wherever and in whatever batch the sample is trained.
pub fn sample_keys(seed: u64, epoch: u64, indices: &[usize]) -> Vec<u64> {
    indices
        .iter()
        .map(|&i| Rng::derive(seed, "dropout", epoch.wrapping_mul(1 << 40) ^ i as u64).next_u64())
        .collect()
}

impl Net {
    /// The CNN when `baseline` is given, else the capsule network of `model`.
    pub fn new(model: &CapsNetConfig, baseline: Option<&CnnConfig>) -> Result<Self> {
        Ok(match baseline {
            Some(b) => Net::Cnn(CnnBaseline::new(b.clone())?),
            None => Net::Caps(CapsNet::new(model.clone())?),
        })
    }

    /// `"capsnet"` or `"cnn-baseline"`.
    pub fn name(&self) -> &'static str {
        match self {
            Net::Caps(_) => "capsnet",
            Net::Cnn(_) => "cnn-baseline",
        }
    }

    /// The name of the classification loss: the capsule network's margin loss, the CNN's
    /// softmax (one object) or sigmoid (two) cross-entropy.
    pub fn loss_name(&self) -> &'static str {
        match self {
            Net::Caps(_) => "margin loss",
            Net::Cnn(_) => "cross-entropy",
        }
    }

    pub fn layout(&self) -> &ParamLayout {
        match self {
            Net::Caps(m) => m.layout(),
            Net::Cnn(m) => m.layout(),
        }
    }

    pub fn init_params(&self, seed: u64) -> Params {
        match self {
            Net::Caps(m) => m.init_params(seed),
            Net::Cnn(m) => m.init_params(seed),
        }
    }

    /// The capsule network, when it is one.
    pub fn capsnet(&self) -> Option<&CapsNet> {
        match self {
            Net::Caps(m) => Some(m),
            Net::Cnn(_) => None,
        }
    }

    /// Floats of one input image.
    pub fn pixels(&self) -> usize {
        match self {
            Net::Caps(m) => m.config().pixels(),
            Net::Cnn(m) => m.config().pixels(),
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Net::Caps(m) => m.config().classes,
            Net::Cnn(m) => m.config().classes,
        }
    }

    /// Inference: the capsule lengths, or the CNN's class probabilities, `[B, classes]`.
    pub fn predict<'w>(
        &self,
        params: &Params,
        images: &[f32],
        ws: &'w mut NetWorkspace,
    ) -> Result<&'w [f32]> {
        match self {
            Net::Caps(m) => m.predict(params, images, &mut ws.caps),
            Net::Cnn(m) => m.predict(params, images, &mut ws.cnn),
        }
    }

    /// Time per part of the network since [`NetWorkspace::reset_timings`], in network order
    /// (the optimizer, which is not the network's, left out).
    pub fn timings(&self, ws: &NetWorkspace) -> Vec<(&'static str, Duration)> {
        match self {
            Net::Caps(_) => ws
                .caps
                .timings
                .parts()
                .into_iter()
                .filter(|(k, _)| *k != "optimizer")
                .collect(),
            Net::Cnn(_) => ws.cnn.timings.parts().to_vec(),
        }
    }

    /// A test pass: losses and correct predictions (the capsule decoder sees the predicted
    /// classes; the CNN runs without dropout).
    pub fn evaluate_batch(
        &self,
        params: &Params,
        batch: &Batch,
        ws: &mut NetWorkspace,
    ) -> Result<BatchStats> {
        let t = batch.targets();
        match self {
            Net::Caps(m) => {
                m.forward_targets(params, &batch.images, &t, Mask::Predicted, &mut ws.caps)
            }
            Net::Cnn(m) => m.forward_targets(params, &batch.images, &t, &mut ws.cnn),
        }
    }

    /// A training pass: the gradient of the batch-mean loss into `grads`. `keys` (one per
    /// sample, [`sample_keys`]) draw the CNN's dropout masks; the capsule network has none.
    pub fn train_batch(
        &self,
        params: &Params,
        batch: &Batch,
        keys: &[u64],
        grads: &mut Params,
        ws: &mut NetWorkspace,
    ) -> Result<BatchStats> {
        self.train_batch_ready(params, batch, keys, grads, ws, &mut ())
    }

    /// [`Self::train_batch`], telling `ready` after each layer of the backward pass which
    /// gradients are final (see [`GradReady`]).
    pub fn train_batch_ready(
        &self,
        params: &Params,
        batch: &Batch,
        keys: &[u64],
        grads: &mut Params,
        ws: &mut NetWorkspace,
        ready: &mut dyn GradReady,
    ) -> Result<BatchStats> {
        let t = batch.targets();
        match self {
            Net::Caps(m) => m.forward_backward_ready(
                params,
                &batch.images,
                &t,
                PassOptions {
                    mask: Mask::Label,
                    input_grad: false,
                },
                grads,
                &mut ws.caps,
                ready,
            ),
            Net::Cnn(m) => m.forward_backward_ready(
                params,
                &batch.images,
                &t,
                Some(keys),
                grads,
                &mut ws.cnn,
                ready,
            ),
        }
    }
}
