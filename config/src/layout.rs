//! Named parameter tensors stored in one flat vector.
//!
//! The model's parameters (and, with the same layout, its gradients and Adam moments) live in a
//! single `Vec<f32>`; each name addresses a contiguous range of it. One flat vector makes the
//! optimizer a single loop and lets the distributed code address chunks by range.

use crate::cnn::CnnConfig;
use crate::model::CapsNetConfig;
use crate::{ConfigError, Result};

/// One named tensor inside the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The names, shapes and offsets of every parameter, in checkpoint order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    specs: Vec<ParamSpec>,
    total: usize,
}

/// Indices of the fixed tensors in [`ParamLayout::specs`]; decoder tensors follow.
pub const CONV1_W: usize = 0;
pub const CONV1_B: usize = 1;
pub const PRIMARY_W: usize = 2;
pub const PRIMARY_B: usize = 3;
pub const DIGIT_W: usize = 4;
pub const DECODER_0: usize = 5;

impl ParamLayout {
    /// The layout of docs/design.md: conv1, primary, digit, decoder.{k}.
    pub fn for_config(cfg: &CapsNetConfig) -> Self {
        let k1 = cfg.conv1_kernel;
        let k2 = cfg.primary_kernel;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "conv1.weight".into(),
                vec![cfg.conv1_channels, cfg.in_channels, k1, k1],
            ),
            ("conv1.bias".into(), vec![cfg.conv1_channels]),
            (
                "primary.weight".into(),
                vec![cfg.primary_channels(), cfg.conv1_channels, k2, k2],
            ),
            ("primary.bias".into(), vec![cfg.primary_channels()]),
            (
                "digit.weight".into(),
                vec![
                    cfg.num_primary(),
                    cfg.classes,
                    cfg.digit_dim,
                    cfg.primary_dim,
                ],
            ),
        ];
        let mut prev = cfg.decoder_in();
        let outs: Vec<usize> = cfg
            .decoder_hidden
            .iter()
            .copied()
            .chain([cfg.pixels()])
            .collect();
        for (k, &out) in outs.iter().enumerate() {
            shapes.push((format!("decoder.{k}.weight"), vec![out, prev]));
            shapes.push((format!("decoder.{k}.bias"), vec![out]));
            prev = out;
        }
        Self::tile(shapes)
    }

    /// The layout of [`CnnConfig`]: `conv.{k}.weight` `[cout, cin, k, k]` and `conv.{k}.bias`
    /// per convolution, then `fc.{k}.weight` `[out, in]` and `fc.{k}.bias` per fully connected
    /// layer, the last of which is the classifier.
    pub fn for_cnn(cfg: &CnnConfig) -> Self {
        let k = cfg.kernel;
        let mut shapes =
            Vec::with_capacity(2 * (cfg.conv_channels.len() + cfg.fc_hidden.len() + 1));
        let mut cin = cfg.in_channels;
        for (l, &cout) in cfg.conv_channels.iter().enumerate() {
            shapes.push((format!("conv.{l}.weight"), vec![cout, cin, k, k]));
            shapes.push((format!("conv.{l}.bias"), vec![cout]));
            cin = cout;
        }
        let mut prev = cfg.flat_features();
        for (l, &out) in cfg.fc_hidden.iter().chain([&cfg.classes]).enumerate() {
            shapes.push((format!("fc.{l}.weight"), vec![out, prev]));
            shapes.push((format!("fc.{l}.bias"), vec![out]));
            prev = out;
        }
        Self::tile(shapes)
    }

    /// A layout of the given tensors, in order. Names must be unique: they key gradients, wire
    /// messages and checkpoints.
    pub fn from_shapes(shapes: Vec<(String, Vec<usize>)>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        if let Some((name, _)) = shapes.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(ConfigError(format!(
                "parameter {name:?} appears twice in the layout"
            )));
        }
        Ok(Self::tile(shapes))
    }

    /// Lays the tensors end to end.
    fn tile(shapes: Vec<(String, Vec<usize>)>) -> Self {
        let mut offset = 0;
        let specs = shapes
            .into_iter()
            .map(|(name, shape)| {
                let spec = ParamSpec {
                    name,
                    shape,
                    offset,
                };
                offset += spec.len();
                spec
            })
            .collect();
        ParamLayout {
            specs,
            total: offset,
        }
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
    /// Total number of floats.
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
    /// Number of decoder layers (hidden + output).
    pub fn decoder_layers(&self) -> usize {
        (self.specs.len() - DECODER_0) / 2
    }
}
