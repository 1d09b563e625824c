//! Adam's hyper-parameters and the learning-rate schedule.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result};

/// How the learning rate moves with the step count `t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `lr * decay_rate^(t / decay_steps)`, continuous, as `tf.train.exponential_decay` in the
    /// paper's official code.
    #[default]
    Exponential,
    /// Half a cosine from `lr` down to `lr * decay_rate` over the first `decay_steps` steps,
    /// then constant (SGDR's annealing without restarts).
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exponential" | "exp" => Ok(LrSchedule::Exponential),
            "cosine" | "cos" => Ok(LrSchedule::Cosine),
            _ => Err(format!(
                "unknown learning-rate schedule {s:?}; expected exponential or cosine"
            )),
        }
    }
}

/// Adam's hyper-parameters and the learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub schedule: LrSchedule,
    pub decay_rate: f32,
    pub decay_steps: u64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: LrSchedule::Exponential,
            decay_rate: 0.96,
            decay_steps: 2000,
        }
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(ConfigError(format!(
                "lr must be a positive number, got {}",
                self.lr
            )));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(ConfigError(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(ConfigError(format!(
                "eps must be positive, got {}",
                self.eps
            )));
        }
        if !(self.decay_rate > 0.0 && self.decay_rate <= 1.0) {
            return Err(ConfigError(format!(
                "lr decay rate must be in (0, 1], got {}",
                self.decay_rate
            )));
        }
        if self.decay_steps == 0 {
            return Err(ConfigError("lr decay steps must be at least 1".into()));
        }
        Ok(())
    }

    /// Learning rate for the update that follows `step` completed updates.
    pub fn lr_at(&self, step: u64) -> f32 {
        let (lr, rate) = (f64::from(self.lr), f64::from(self.decay_rate));
        let t = step as f64 / self.decay_steps as f64;
        let factor = match self.schedule {
            LrSchedule::Exponential => rate.powf(t),
            LrSchedule::Cosine => {
                rate + (1.0 - rate) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        };
        (lr * factor) as f32
    }
}
