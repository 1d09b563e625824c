//! The CNN baseline of Sabour et al. (2017), with max pooling added: every size is a value here;
//! the defaults are the paper's MNIST baseline.
//!
//! ```text
//! images [B,1,28,28]
//!  -> conv 5x5 'same' 256 + ReLU + maxpool 2x2   [256, 14, 14]
//!  -> conv 5x5 'same' 256 + ReLU + maxpool 2x2   [256, 7, 7]
//!  -> conv 5x5 'same' 128 + ReLU                 [128, 7, 7] -> flatten 6272
//!  -> fc 328 + ReLU -> fc 192 + ReLU -> dropout 0.5 -> fc 10 -> softmax cross-entropy
//! ```

use serde::{Deserialize, Serialize};

use crate::model::{MAX_DIM, MAX_PARAMS};
use crate::{ConfigError, ParamLayout, Result};

/// The most convolutional or fully connected layers a CNN config may have.
pub const MAX_LAYERS: usize = 16;
/// The most floats of one layer's activations, or of one layer's im2col columns, per image (the
/// default network's largest: 1,254,400, the columns of conv.1).
pub const MAX_ACTIVATIONS: usize = 1 << 26;

/// The sizes of a [`CnnConfig`] network. Convolutions are square, stride 1 with 'same' zero
/// padding (`kernel / 2` on each side, so the kernel must be odd); each may be followed by a 2x2
/// max pool of stride 2 (odd sides are floored, as PyTorch's `MaxPool2d(2)`).
///
/// `Default` is the paper's baseline with pooling: 4,587,282 parameters (the paper's 35.4 M
/// has no pooling, so its first fully connected layer sees 28x28x128 features instead of 7x7x128).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CnnConfig {
    /// Side of the square input image (28).
    pub image_size: usize,
    /// Input channels (1).
    pub in_channels: usize,
    /// Output channels of each convolution ([256, 256, 128]).
    pub conv_channels: Vec<usize>,
    /// Kernel side of every convolution (5); odd.
    pub kernel: usize,
    /// Whether a 2x2 max pool follows each convolution ([true, true, false]); one per conv.
    pub pool_after: Vec<bool>,
    /// Hidden fully connected sizes ([328, 192]), each followed by ReLU.
    pub fc_hidden: Vec<usize>,
    /// Classes (10): the classifier's outputs.
    pub classes: usize,
    /// Dropout probability on the classifier's input (0.5), during training only.
    pub dropout: f32,
}

impl Default for CnnConfig {
    fn default() -> Self {
        CnnConfig {
            image_size: 28,
            in_channels: 1,
            conv_channels: vec![256, 256, 128],
            kernel: 5,
            pool_after: vec![true, true, false],
            fc_hidden: vec![328, 192],
            classes: 10,
            dropout: 0.5,
        }
    }
}

impl CnnConfig {
    /// A network for finite-difference checks: 12x12 input, conv 3x3 4 -> pool 6x6, conv 3x3 4
    /// -> pool 3x3, conv 3x3 3 -> 27 features -> fc 8 -> fc 6 -> 3 classes.
    pub fn tiny() -> Self {
        CnnConfig {
            image_size: 12,
            in_channels: 1,
            conv_channels: vec![4, 4, 3],
            kernel: 3,
            pool_after: vec![true, true, false],
            fc_hidden: vec![8, 6],
            classes: 3,
            dropout: 0.5,
        }
    }

    /// Floats of one image (784).
    pub fn pixels(&self) -> usize {
        self.in_channels * self.image_size * self.image_size
    }
    /// Zero padding on each side of every convolution (2).
    pub fn padding(&self) -> usize {
        self.kernel / 2
    }
    /// Side of the input of each convolution, then the side of the last layer's output
    /// ([28, 14, 7, 7]). Convolutions keep the side; pools halve it.
    pub fn sides(&self) -> Vec<usize> {
        let mut sides = vec![self.image_size];
        let mut h = self.image_size;
        for l in 0..self.conv_channels.len() {
            if self.pool_after.get(l).copied().unwrap_or(false) {
                h /= 2;
            }
            sides.push(h);
        }
        sides
    }
    /// Inputs of the first fully connected layer: channels x side x side of the last
    /// convolution's output (6272).
    pub fn flat_features(&self) -> usize {
        let c = self
            .conv_channels
            .last()
            .copied()
            .unwrap_or(self.in_channels);
        let h = self.sides().last().copied().unwrap_or(self.image_size);
        c * h * h
    }

    /// Checks that every size is usable, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("image_size", self.image_size),
            ("in_channels", self.in_channels),
            ("kernel", self.kernel),
        ] {
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
        if self.conv_channels.is_empty() {
            return Err(ConfigError(
                "conv_channels must name at least one convolution".into(),
            ));
        }
        if self.pool_after.len() != self.conv_channels.len() {
            return Err(ConfigError(format!(
                "pool_after has {} entries but conv_channels has {}: one per convolution",
                self.pool_after.len(),
                self.conv_channels.len()
            )));
        }
        if self.kernel % 2 == 0 {
            return Err(ConfigError(format!(
                "kernel must be odd for 'same' padding, got {}",
                self.kernel
            )));
        }
        // Upper bounds, before any size is multiplied: a config read from a file cannot overflow
        // the size arithmetic below.
        let bounded = [
            ("image_size", self.image_size, MAX_DIM),
            ("in_channels", self.in_channels, MAX_DIM),
            ("kernel", self.kernel, MAX_DIM),
            ("conv layers", self.conv_channels.len(), MAX_LAYERS),
            ("fc_hidden layers", self.fc_hidden.len(), MAX_LAYERS),
        ];
        let conv = self
            .conv_channels
            .iter()
            .map(|&c| ("conv_channels", c, MAX_DIM));
        let fc = self
            .fc_hidden
            .iter()
            .map(|&h| ("fc_hidden", h, MAX_DIM * 16));
        for (name, v, max) in bounded.into_iter().chain(conv).chain(fc) {
            if v > max {
                return Err(ConfigError(format!(
                    "{name} must be at most {max}, got {v}"
                )));
            }
        }
        if let Some(i) = self.conv_channels.iter().position(|&c| c == 0) {
            return Err(ConfigError(format!(
                "conv_channels[{i}] must be at least 1"
            )));
        }
        if let Some(i) = self.fc_hidden.iter().position(|&h| h == 0) {
            return Err(ConfigError(format!("fc_hidden[{i}] must be at least 1")));
        }
        let sides = self.sides();
        let mut cin = self.in_channels;
        for (l, &cout) in self.conv_channels.iter().enumerate() {
            let h = sides[l];
            if self.pool_after[l] && h < 2 {
                return Err(ConfigError(format!(
                    "pool_after[{l}]: conv.{l}'s output is {h}x{h}, too small for a 2x2 pool"
                )));
            }
            // Bounded sizes: these products fit in 64 bits.
            let cols = cin * self.kernel * self.kernel * h * h;
            let acts = cout * h * h;
            for (what, v) in [("im2col columns", cols), ("activations", acts)] {
                if v > MAX_ACTIVATIONS {
                    return Err(ConfigError(format!(
                        "conv.{l} has {v} floats of {what} per image, more than the \
                         {MAX_ACTIVATIONS} allowed"
                    )));
                }
            }
            cin = cout;
        }
        let params = ParamLayout::for_cnn(self).total();
        if params > MAX_PARAMS {
            return Err(ConfigError(format!(
                "the model has {params} parameters, more than the {MAX_PARAMS} allowed"
            )));
        }
        if !self.dropout.is_finite() || !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Forward FLOPs per image (multiply-adds count 2; ReLU, pooling and softmax are not
    /// counted): 736.8 M for the default network, of which conv.1 is 642.3 M.
    pub fn forward_flops(&self) -> f64 {
        let sides = self.sides();
        let kk = (self.kernel * self.kernel) as f64;
        let mut flops = 0.0;
        let mut cin = self.in_channels;
        for (l, &cout) in self.conv_channels.iter().enumerate() {
            let h = sides[l] as f64;
            flops += 2.0 * (cout * cin) as f64 * kk * h * h;
            cin = cout;
        }
        let mut prev = self.flat_features();
        for &out in self.fc_hidden.iter().chain([&self.classes]) {
            flops += 2.0 * (prev * out) as f64;
            prev = out;
        }
        flops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_sizes_of_the_default_network() {
        let c = CnnConfig::default();
        c.validate().unwrap();
        assert_eq!(c.sides(), vec![28, 14, 7, 7]);
        assert_eq!(c.flat_features(), 6272);
        assert_eq!(c.padding(), 2);
        // conv: 2*25*(256*1*784 + 256*256*196 + 128*256*49) = 732,569,600;
        // fc: 2*(6272*328 + 328*192 + 192*10) = 4,244,224.
        assert_eq!(c.forward_flops(), 736_813_824.0);
        let t = CnnConfig::tiny();
        t.validate().unwrap();
        assert_eq!(t.sides(), vec![12, 6, 3, 3]);
        assert_eq!(t.flat_features(), 27);
    }

    #[test]
    fn layout_names_and_shapes() {
        let l = ParamLayout::for_cnn(&CnnConfig::default());
        let shape = |n: &str| l.get(n).map(|s| s.shape.clone());
        assert_eq!(shape("conv.0.weight"), Some(vec![256, 1, 5, 5]));
        assert_eq!(shape("conv.2.bias"), Some(vec![128]));
        assert_eq!(shape("fc.0.weight"), Some(vec![328, 6272]));
        assert_eq!(shape("fc.2.weight"), Some(vec![10, 192]));
        assert_eq!(l.specs().len(), 12);
    }

    #[test]
    fn validate_names_the_bad_value() {
        let bad = |c: CnnConfig, what: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        let d = CnnConfig::default;
        bad(CnnConfig { kernel: 4, ..d() }, "kernel must be odd");
        bad(
            CnnConfig {
                pool_after: vec![true],
                ..d()
            },
            "pool_after",
        );
        bad(
            CnnConfig {
                image_size: 3,
                ..d()
            },
            "pool_after[1]",
        );
        bad(
            CnnConfig {
                dropout: 1.0,
                ..d()
            },
            "dropout",
        );
        bad(
            CnnConfig {
                dropout: f32::NAN,
                ..d()
            },
            "dropout",
        );
        bad(CnnConfig { classes: 1, ..d() }, "classes");
        bad(
            CnnConfig {
                fc_hidden: vec![328, 0],
                ..d()
            },
            "fc_hidden[1]",
        );
        bad(
            CnnConfig {
                conv_channels: vec![],
                pool_after: vec![],
                ..d()
            },
            "conv_channels",
        );
        bad(
            CnnConfig {
                conv_channels: vec![4096, 4096, 4096],
                ..d()
            },
            "more than",
        );
    }

    #[test]
    fn from_shapes_rejects_duplicate_names() {
        let l = ParamLayout::from_shapes(vec![("a".into(), vec![2, 3]), ("b".into(), vec![4])])
            .unwrap();
        assert_eq!(l.total(), 10);
        assert_eq!(l.get("b").map(|s| s.offset), Some(6));
        let e = ParamLayout::from_shapes(vec![("a".into(), vec![1]), ("a".into(), vec![1])])
            .unwrap_err();
        assert!(e.to_string().contains("\"a\""), "{e}");
    }
}
