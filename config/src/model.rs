//! Network configuration. Every size of the model is a value here; the defaults are the paper's.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result};

/// The largest size of any one dimension of a model config.
pub const MAX_DIM: usize = 4096;
pub const MAX_ROUTING_ITERS: usize = 100;
pub const MAX_DECODER_LAYERS: usize = 16;
/// The most parameters a model may have: 1 GiB of f32 (the paper's model has 8.2 million).
pub const MAX_PARAMS: usize = 1 << 28;
/// The most prediction-vector floats per image (the paper's model: 184,320).
pub const MAX_VOTES: usize = 1 << 26;

/// The sizes and constants of a CapsNet. `Default` is the paper's MNIST network
/// (8,215,568 parameters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CapsNetConfig {
    /// Side of the square input image (28).
    pub image_size: usize,
    /// Input channels (1).
    pub in_channels: usize,
    /// conv1 output channels (256).
    pub conv1_channels: usize,
    /// conv1 kernel side (9), stride 1.
    pub conv1_kernel: usize,
    /// Primary capsule types (32).
    pub primary_types: usize,
    /// Primary capsule dimension (8).
    pub primary_dim: usize,
    /// Primary conv kernel side (9).
    pub primary_kernel: usize,
    /// Primary conv stride (2).
    pub primary_stride: usize,
    /// Output (digit) capsules = classes (10).
    pub classes: usize,
    /// Digit capsule dimension (16).
    pub digit_dim: usize,
    /// Routing iterations r (3).
    pub routing_iters: usize,
    /// Hidden sizes of the decoder ([512, 1024]); the output is the image.
    pub decoder_hidden: Vec<usize>,
    /// Weight of the reconstruction loss (0.0005).
    pub recon_weight: f32,
    /// Margin loss m+ (0.9).
    pub m_pos: f32,
    /// Margin loss m- (0.1).
    pub m_neg: f32,
    /// Down-weighting of absent classes (0.5).
    pub lambda_neg: f32,
    /// Epsilon inside the square root of squash (1e-8).
    pub squash_eps: f32,
}

impl Default for CapsNetConfig {
    fn default() -> Self {
        CapsNetConfig {
            image_size: 28,
            in_channels: 1,
            conv1_channels: 256,
            conv1_kernel: 9,
            primary_types: 32,
            primary_dim: 8,
            primary_kernel: 9,
            primary_stride: 2,
            classes: 10,
            digit_dim: 16,
            routing_iters: 3,
            decoder_hidden: vec![512, 1024],
            recon_weight: 0.0005,
            m_pos: 0.9,
            m_neg: 0.1,
            lambda_neg: 0.5,
            squash_eps: 1e-8,
        }
    }
}

impl CapsNetConfig {
    /// A network small enough for finite-difference checks and tests that run in milliseconds:
    /// 12x12 input, conv 3x3 -> 10x10x6, primary 3x3 stride 2 -> 4x4 x (2 types x 4D) = 32
    /// capsules, 3 classes of 5D, decoder 15 -> 8 -> 12 -> 144.
    pub fn tiny() -> Self {
        CapsNetConfig {
            image_size: 12,
            in_channels: 1,
            conv1_channels: 6,
            conv1_kernel: 3,
            primary_types: 2,
            primary_dim: 4,
            primary_kernel: 3,
            primary_stride: 2,
            classes: 3,
            digit_dim: 5,
            routing_iters: 3,
            decoder_hidden: vec![8, 12],
            ..CapsNetConfig::default()
        }
    }

    /// conv1 output side (20).
    pub fn conv1_out(&self) -> usize {
        self.image_size + 1 - self.conv1_kernel
    }
    /// Primary conv output side (6).
    pub fn primary_out(&self) -> usize {
        (self.conv1_out() - self.primary_kernel) / self.primary_stride + 1
    }
    /// Primary conv output channels = types x dim (256).
    pub fn primary_channels(&self) -> usize {
        self.primary_types * self.primary_dim
    }
    /// Number of primary capsules = types x out x out (1152).
    pub fn num_primary(&self) -> usize {
        self.primary_types * self.primary_out() * self.primary_out()
    }
    /// Pixels of one image (784).
    pub fn pixels(&self) -> usize {
        self.in_channels * self.image_size * self.image_size
    }
    /// Decoder input width = classes x digit dim (160).
    pub fn decoder_in(&self) -> usize {
        self.classes * self.digit_dim
    }

    /// Checks that every size is usable, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("image_size", self.image_size),
            ("in_channels", self.in_channels),
            ("conv1_channels", self.conv1_channels),
            ("conv1_kernel", self.conv1_kernel),
            ("primary_types", self.primary_types),
            ("primary_dim", self.primary_dim),
            ("primary_kernel", self.primary_kernel),
            ("primary_stride", self.primary_stride),
            ("classes", self.classes),
            ("digit_dim", self.digit_dim),
            ("routing_iters", self.routing_iters),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        if self.classes < 2 {
            return Err(ConfigError("classes must be at least 2".into()));
        }
        if self.classes > 256 {
            return Err(ConfigError(
                "classes must be at most 256 (labels are bytes)".into(),
            ));
        }
        if self.conv1_kernel > self.image_size {
            return Err(ConfigError(format!(
                "conv1_kernel {} is larger than image_size {}",
                self.conv1_kernel, self.image_size
            )));
        }
        if self.primary_kernel > self.conv1_out() {
            return Err(ConfigError(format!(
                "primary_kernel {} is larger than the conv1 output {}",
                self.primary_kernel,
                self.conv1_out()
            )));
        }
        // Upper bounds, before any size is multiplied: a config read from a file or received
        // from the network can neither overflow the size arithmetic nor ask for more memory
        // than a machine has.
        let bounded = [
            ("image_size", self.image_size, MAX_DIM),
            ("in_channels", self.in_channels, MAX_DIM),
            ("conv1_channels", self.conv1_channels, MAX_DIM),
            ("conv1_kernel", self.conv1_kernel, MAX_DIM),
            ("primary_types", self.primary_types, MAX_DIM),
            ("primary_dim", self.primary_dim, MAX_DIM),
            ("primary_kernel", self.primary_kernel, MAX_DIM),
            ("primary_stride", self.primary_stride, MAX_DIM),
            ("digit_dim", self.digit_dim, MAX_DIM),
            ("routing_iters", self.routing_iters, MAX_ROUTING_ITERS),
            (
                "decoder layers",
                self.decoder_hidden.len(),
                MAX_DECODER_LAYERS,
            ),
        ];
        let hidden = self
            .decoder_hidden
            .iter()
            .map(|&h| ("decoder_hidden", h, MAX_DIM * 16));
        for (name, v, max) in bounded.into_iter().chain(hidden) {
            if v > max {
                return Err(ConfigError(format!(
                    "{name} must be at most {max}, got {v}"
                )));
            }
        }
        if let Some(i) = self.decoder_hidden.iter().position(|&h| h == 0) {
            return Err(ConfigError(format!(
                "decoder_hidden[{i}] must be at least 1"
            )));
        }
        // With every size bounded above, these products fit in 64 bits.
        let params = crate::ParamLayout::for_config(self).total();
        if params > MAX_PARAMS {
            return Err(ConfigError(format!(
                "the model has {params} parameters, more than the {MAX_PARAMS} allowed"
            )));
        }
        let votes = self.num_primary() * self.classes * self.digit_dim;
        if votes > MAX_VOTES {
            return Err(ConfigError(format!(
                "the model has {votes} prediction vectors' floats per image (primary capsules x \
                 classes x digit_dim), more than the {MAX_VOTES} allowed"
            )));
        }
        for (name, v) in [
            ("recon_weight", self.recon_weight),
            ("m_pos", self.m_pos),
            ("m_neg", self.m_neg),
            ("lambda_neg", self.lambda_neg),
            ("squash_eps", self.squash_eps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ConfigError(format!(
                    "{name} must be a finite non-negative number, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Forward FLOPs per image by layer (multiply-adds count 2), the unit of the benchmark's
    /// GFLOP/s.
    pub fn layer_flops(&self) -> LayerFlops {
        let conv1 = 2.0
            * (self.conv1_channels * self.in_channels * self.conv1_kernel * self.conv1_kernel)
                as f64
            * (self.conv1_out() * self.conv1_out()) as f64;
        let k2 = self.conv1_channels * self.primary_kernel * self.primary_kernel;
        let primary = 2.0
            * (self.primary_channels() * k2) as f64
            * (self.primary_out() * self.primary_out()) as f64;
        let u_hat =
            2.0 * (self.num_primary() * self.classes * self.digit_dim * self.primary_dim) as f64;
        // Per iteration: s (2 flops per element of u_hat) and agreement (2 more but the last).
        let per = (self.num_primary() * self.classes * self.digit_dim) as f64;
        let routing =
            per * (2.0 * self.routing_iters as f64 + 2.0 * (self.routing_iters - 1) as f64);
        let mut decoder = 0.0;
        let mut prev = self.decoder_in();
        for &h in self
            .decoder_hidden
            .iter()
            .chain(std::iter::once(&self.pixels()))
        {
            decoder += 2.0 * (prev * h) as f64;
            prev = h;
        }
        LayerFlops {
            conv1,
            primary,
            u_hat,
            routing,
            decoder,
        }
    }

    /// Forward FLOPs per image (406.4 M for the paper's network).
    pub fn forward_flops(&self) -> f64 {
        self.layer_flops().total()
    }
}

/// Forward FLOPs of one image, per layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerFlops {
    pub conv1: f64,
    pub primary: f64,
    pub u_hat: f64,
    pub routing: f64,
    pub decoder: f64,
}

impl LayerFlops {
    pub fn total(&self) -> f64 {
        self.conv1 + self.primary + self.u_hat + self.routing + self.decoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_sizes_of_the_paper_network() {
        let c = CapsNetConfig::default();
        assert_eq!(c.conv1_out(), 20);
        assert_eq!(c.primary_out(), 6);
        assert_eq!(c.primary_channels(), 256);
        assert_eq!(c.num_primary(), 1152);
        assert_eq!(c.decoder_in(), 160);
        // 406.4 MFLOP per image, the number the PyTorch benchmark reports.
        assert!(
            (c.forward_flops() / 1e6 - 406.4).abs() < 1.0,
            "{}",
            c.forward_flops()
        );
    }

    #[test]
    fn validate_names_the_bad_value() {
        let c = CapsNetConfig {
            primary_kernel: 30,
            ..CapsNetConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("primary_kernel"), "{e}");
        let c = CapsNetConfig {
            routing_iters: 0,
            ..CapsNetConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("routing_iters")
        );
    }
}
