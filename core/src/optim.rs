//! Adam (Kingma & Ba) with exponential learning-rate decay, over a flat parameter vector.

use rayon::prelude::*;

pub use capsnet_config::adam::{AdamConfig, LrSchedule};

use crate::error::{CoreError, Result};

/// Adam's moments and step count; same layout as the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub config: AdamConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates applied so far.
    pub step: u64,
}

impl Adam {
    pub fn new(config: AdamConfig, len: usize) -> Self {
        Adam {
            config,
            m: vec![0.0; len],
            v: vec![0.0; len],
            step: 0,
        }
    }

    /// The constants of the next update (the `step + 1`-th), without applying it: the
    /// coordinator applies one update range by range as the averaged gradient comes together.
    pub fn next_step(&self) -> AdamStep {
        let c = &self.config;
        let lr = c.lr_at(self.step);
        let t = (self.step + 1) as f64;
        let bc1 = 1.0 - f64::from(c.beta1).powf(t);
        let bc2 = 1.0 - f64::from(c.beta2).powf(t);
        AdamStep {
            step_size: (f64::from(lr) / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            b1: c.beta1,
            b2: c.beta2,
            eps: c.eps,
        }
    }

    /// One update, exactly PyTorch's `torch.optim.Adam` (bias-corrected moments,
    /// `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`), at the decayed learning rate.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32]) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(CoreError::Shape {
                op: "Adam::update",
                expected: vec![self.m.len()],
                got: vec![params.len(), grads.len()],
            });
        }
        let s = self.next_step();
        self.step += 1;
        const CHUNK: usize = 1 << 14;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(
                self.m
                    .par_chunks_mut(CHUNK)
                    .zip(self.v.par_chunks_mut(CHUNK)),
            )
            .for_each(|((p, g), (m, v))| s.apply(p, g, m, v));
        Ok(())
    }
}

/// One Adam update's constants, applicable to any range of the flat vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    step_size: f32,
    inv_sqrt_bc2: f32,
    b1: f32,
    b2: f32,
    eps: f32,
}

impl AdamStep {
    /// The update of one element: `(p, m, v)` after gradient `g`.
    #[inline(always)]
    fn element(&self, p: f32, m: f32, v: f32, g: f32) -> (f32, f32, f32) {
        let m = self.b1 * m + (1.0 - self.b1) * g;
        let v = self.b2 * v + (1.0 - self.b2) * g * g;
        (
            p - self.step_size * m / (v.sqrt() * self.inv_sqrt_bc2 + self.eps),
            m,
            v,
        )
    }

    /// Updates `p`, `m` and `v` in place (all slices the same length).
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        for i in 0..n {
            (p[i], m[i], v[i]) = self.element(p[i], m[i], v[i], g[i]);
        }
    }

    /// Writes the updated `p`, `m` and `v` to the `*_out` slices, leaving the inputs as they
    /// were (all slices the same length).
    #[inline]
    pub fn apply_into(
        &self,
        (p, m, v): (&[f32], &[f32], &[f32]),
        g: &[f32],
        (p_out, m_out, v_out): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let n = n.min(p_out.len()).min(m_out.len()).min(v_out.len());
        for i in 0..n {
            (p_out[i], m_out[i], v_out[i]) = self.element(p[i], m[i], v[i], g[i]);
        }
    }
}

/// The decay an exponential moving average of the weights uses at optimizer step `step`:
/// `min(decay, (1 + step) / (10 + step))`, TensorFlow's `ExponentialMovingAverage` warm-up, so
/// the first steps' weights do not linger in the average.
pub fn ema_decay_at(decay: f32, step: u64) -> f32 {
    let t = step as f64;
    f64::from(decay).min((1.0 + t) / (10.0 + t)) as f32
}

/// Moves the average `ema` towards `params` after optimizer step `step`:
/// `ema = d * ema + (1 - d) * params` with `d = ema_decay_at(decay, step)`.
pub fn ema_update(ema: &mut [f32], params: &[f32], decay: f32, step: u64) {
    let d = ema_decay_at(decay, step);
    const CHUNK: usize = 1 << 14;
    ema.par_chunks_mut(CHUNK)
        .zip(params.par_chunks(CHUNK))
        .for_each(|(e, p)| {
            for (e, p) in e.iter_mut().zip(p) {
                *e = d * *e + (1.0 - d) * *p;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_applied_by_ranges_equals_the_whole_update_bit_for_bit() {
        let n = 1000;
        let grads: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * 7 + k * 13) as f32 * 0.01).sin())
                    .collect()
            })
            .collect();
        let mut whole = Adam::new(AdamConfig::default(), n);
        let mut p_whole: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let mut ranged = whole.clone();
        let mut p = p_whole.clone();
        for g in &grads {
            whole.update(&mut p_whole, g).unwrap();
            let s = ranged.next_step();
            let (mut p2, mut m2, mut v2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            for r in [0..300, 300..301, 301..n] {
                s.apply_into(
                    (&p[r.clone()], &ranged.m[r.clone()], &ranged.v[r.clone()]),
                    &g[r.clone()],
                    (&mut p2[r.clone()], &mut m2[r.clone()], &mut v2[r.clone()]),
                );
            }
            (p, ranged.m, ranged.v) = (p2, m2, v2);
            ranged.step += 1;
        }
        assert_eq!(p, p_whole);
        assert_eq!(ranged, whole);
    }

    #[test]
    fn first_step_moves_each_parameter_by_lr_against_the_gradient_sign() {
        let mut adam = Adam::new(AdamConfig::default(), 3);
        let mut p = vec![1.0, 1.0, 1.0];
        adam.update(&mut p, &[0.5, -2.0, 0.0]).unwrap();
        // m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-7, "{p:?}");
        assert!((p[1] - (1.0 + 1e-3)).abs() < 1e-7, "{p:?}");
        assert_eq!(p[2], 1.0);
        assert!(adam.update(&mut p, &[0.0; 2]).is_err());
    }

    #[test]
    fn cosine_schedule_falls_from_lr_to_lr_times_rate_then_holds() {
        let c = AdamConfig {
            schedule: LrSchedule::Cosine,
            decay_rate: 0.1,
            decay_steps: 1000,
            ..AdamConfig::default()
        };
        assert_eq!(c.lr_at(0), 1e-3);
        assert!((c.lr_at(500) - 0.55e-3).abs() < 1e-9, "{}", c.lr_at(500));
        assert!((c.lr_at(1000) - 1e-4).abs() < 1e-9);
        assert_eq!(c.lr_at(5000), c.lr_at(1000));
        let lrs: Vec<f32> = (0..=1000).map(|t| c.lr_at(t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "not monotone");
        assert_eq!("cosine".parse(), Ok(LrSchedule::Cosine));
        assert_eq!("exponential".parse(), Ok(LrSchedule::Exponential));
        let err = "linear".parse::<LrSchedule>().unwrap_err();
        assert!(err.contains("linear") && err.contains("cosine"), "{err}");
    }

    #[test]
    fn ema_warms_up_then_averages_with_the_set_decay() {
        assert_eq!(ema_decay_at(0.999, 0), 0.1);
        assert_eq!(ema_decay_at(0.999, 10), 0.55);
        assert_eq!(ema_decay_at(0.999, 1_000_000), 0.999);
        let mut ema = vec![0.0, 10.0];
        ema_update(&mut ema, &[1.0, 0.0], 0.5, 1000);
        assert_eq!(ema, vec![0.5, 5.0]);
        // A constant sequence is a fixed point.
        let mut ema = vec![3.0; 40_000];
        for t in 0..5 {
            ema_update(&mut ema, &vec![3.0; 40_000], 0.9, t);
        }
        assert!(ema.iter().all(|&e| e == 3.0));
    }

    #[test]
    fn learning_rate_decays_exponentially() {
        let c = AdamConfig::default();
        assert_eq!(c.lr_at(0), 1e-3);
        assert!((c.lr_at(2000) - 0.96e-3).abs() < 1e-9);
        assert!((c.lr_at(1000) - 1e-3 * 0.96f32.sqrt()).abs() < 1e-9);
        assert!(
            AdamConfig {
                lr: -1.0,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            AdamConfig {
                decay_steps: 0,
                ..c
            }
            .validate()
            .is_err()
        );
    }
}
