//! The losses of the paper (and the CNN baseline's cross-entropy), per sample, with their
//! gradients.

/// Constants of the margin loss.
#[derive(Clone, Copy, Debug)]
pub struct MarginParams {
    pub m_pos: f32,
    pub m_neg: f32,
    pub lambda_neg: f32,
}

use crate::error::{CoreError, Result};

/// What a batch is scored against: one class per image, or several (the overlapping pairs of
/// section 6), with each object alone as the target of its reconstruction.
#[derive(Clone, Copy, Debug)]
pub struct Targets<'a> {
    /// The classes of each image's objects, `[objects, b]`: object `o` of image `i` is
    /// `labels[o * b + i]`. An image's classes are distinct.
    pub labels: &'a [usize],
    /// Objects per image.
    pub objects: usize,
    /// Each object alone, `[objects, b, pixels]`: what the decoder reconstructs from the
    /// object's capsule. `None`: the image itself (one object per image).
    pub parts: Option<&'a [f32]>,
}

impl<'a> Targets<'a> {
    /// One class per image, reconstructed from the image itself.
    pub fn single(labels: &'a [usize]) -> Self {
        Targets {
            labels,
            objects: 1,
            parts: None,
        }
    }

    /// Checks the targets of a batch of `b` images of `pixels` for a network of `classes`.
    pub fn check(&self, b: usize, classes: usize, pixels: usize) -> Result<()> {
        let k = self.objects;
        if k == 0 || k > classes {
            return Err(CoreError::Config(format!(
                "{k} objects per image for a network of {classes} classes"
            )));
        }
        if self.labels.len() != k * b {
            return Err(CoreError::Shape {
                op: "labels",
                expected: vec![k, b],
                got: vec![self.labels.len()],
            });
        }
        if let Some(&l) = self.labels.iter().find(|&&l| l >= classes) {
            return Err(CoreError::Label { label: l, classes });
        }
        for i in 0..b {
            let mut seen: Vec<usize> = self.classes_of(i, b).collect();
            seen.sort_unstable();
            if seen.windows(2).any(|w| w[0] == w[1]) {
                return Err(CoreError::Config(format!(
                    "image {i} of the batch has two objects of class {}; an image's classes \
                     must differ",
                    seen.windows(2).find(|w| w[0] == w[1]).map_or(0, |w| w[0])
                )));
            }
        }
        match self.parts {
            Some(parts) if parts.len() != k * b * pixels => Err(CoreError::Shape {
                op: "reconstruction targets",
                expected: vec![k, b, pixels],
                got: vec![parts.len()],
            }),
            None if k > 1 => Err(CoreError::Config(format!(
                "{k} objects per image need a reconstruction target for each"
            ))),
            _ => Ok(()),
        }
    }

    /// The classes of image `i` of a batch of `b`.
    pub fn classes_of(&self, i: usize, b: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.objects).map(move |o| self.labels[o * b + i])
    }
}

/// The `k` largest of `scores` (indices, largest first; ties to the lower index).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Whether the `k` largest scores are the classes `present` (in any order; `k = present.len()`):
/// the paper's accuracy on overlapping pairs, both labels right.
pub fn top_k_matches(scores: &[f32], present: &[usize]) -> bool {
    let top = top_k(scores, present.len());
    present.iter().all(|c| top.contains(c))
}

/// Margin loss of one sample, `sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`
/// with `T_k = 1` for the classes in `present`, from the capsule lengths; writes
/// `scale * dL/d|v_k|` into `grad`.
pub fn margin_loss(
    lengths: &[f32],
    present: &[usize],
    p: &MarginParams,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let mut loss = 0.0f64;
    for (k, (&len, g)) in lengths.iter().zip(grad.iter_mut()).enumerate() {
        if present.contains(&k) {
            let gap = (p.m_pos - len).max(0.0);
            loss += f64::from(gap) * f64::from(gap);
            *g = -2.0 * gap * scale;
        } else {
            let gap = (len - p.m_neg).max(0.0);
            loss += f64::from(p.lambda_neg) * f64::from(gap) * f64::from(gap);
            *g = 2.0 * p.lambda_neg * gap * scale;
        }
    }
    loss
}

/// Reconstruction loss of one sample, `weight * sum_p (r_p - x_p)^2`; writes `scale * dL/dr` into
/// `grad`.
pub fn reconstruction_loss(
    recon: &[f32],
    image: &[f32],
    weight: f32,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let mut sse = 0.0f64;
    for ((&r, &x), g) in recon.iter().zip(image).zip(grad.iter_mut()) {
        let e = r - x;
        sse += f64::from(e) * f64::from(e);
        *g = 2.0 * weight * e * scale;
    }
    f64::from(weight) * sse
}

/// Softmax cross-entropy of one sample, `-log softmax(z)[label] = logsumexp(z) - z_label`,
/// computed around `max(z)` so no exponential overflows; writes `softmax(z)` into `probs` and
/// `scale * (softmax(z) - onehot(label))`, the gradient with respect to `z`, into `grad`.
pub fn softmax_cross_entropy(
    logits: &[f32],
    label: usize,
    scale: f32,
    probs: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    let lse = log_sum_exp(logits);
    for (k, ((&z, p), g)) in logits.iter().zip(probs.iter_mut()).zip(grad).enumerate() {
        *p = (f64::from(z) - lse).exp() as f32;
        *g = scale * (*p - if k == label { 1.0 } else { 0.0 });
    }
    lse - f64::from(logits[label])
}

/// Sigmoid cross-entropy of one sample against several classes (a multi-label output, the
/// CNN baseline's on overlapping pairs): `sum_k -T_k log s(z_k) - (1 - T_k) log(1 - s(z_k))`
/// with `T_k = 1` for the classes in `present`, computed as `softplus(z) - T z` so no
/// exponential overflows; writes `s(z)` into `probs` and `scale * (s(z) - T)` into `grad`.
pub fn sigmoid_cross_entropy(
    logits: &[f32],
    present: &[usize],
    scale: f32,
    probs: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    let mut loss = 0.0f64;
    for (k, ((&z, p), g)) in logits.iter().zip(probs.iter_mut()).zip(grad).enumerate() {
        let t = if present.contains(&k) { 1.0 } else { 0.0 };
        let z64 = f64::from(z);
        // softplus(z) = max(z, 0) + ln(1 + e^-|z|).
        loss += z64.max(0.0) + (-z64.abs()).exp().ln_1p() - f64::from(t) * z64;
        *p = sigmoid(z);
        *g = scale * (*p - t);
    }
    loss
}

/// The logistic function, without overflow for large `|z|`.
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `softmax(z)` into `probs`.
pub fn softmax(logits: &[f32], probs: &mut [f32]) {
    let lse = log_sum_exp(logits);
    for (&z, p) in logits.iter().zip(probs) {
        *p = (f64::from(z) - lse).exp() as f32;
    }
}

/// `log sum_k exp(z_k)`, in f64 around the maximum.
fn log_sum_exp(z: &[f32]) -> f64 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let m = f64::from(m);
    let sum: f64 = z.iter().map(|&v| (f64::from(v) - m).exp()).sum();
    m + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_loss_values() {
        let p = MarginParams {
            m_pos: 0.9,
            m_neg: 0.1,
            lambda_neg: 0.5,
        };
        let mut g = [0.0; 3];
        // Present class at 0.5 (gap 0.4), absent ones at 0.05 (no loss) and 0.3 (gap 0.2).
        let l = margin_loss(&[0.5, 0.05, 0.3], &[0], &p, 1.0, &mut g);
        assert!((l - (0.16 + 0.5 * 0.04)).abs() < 1e-6, "{l}");
        assert!(
            (g[0] + 0.8).abs() < 1e-6 && g[1] == 0.0 && (g[2] - 0.2).abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn margin_loss_of_two_present_classes_pulls_both_up() {
        let p = MarginParams {
            m_pos: 0.9,
            m_neg: 0.1,
            lambda_neg: 0.5,
        };
        let mut g = [0.0; 3];
        let l = margin_loss(&[0.5, 0.3, 0.95], &[0, 1], &p, 1.0, &mut g);
        // Gaps 0.4 and 0.6 below m+, and 0.85 above m- for the absent class.
        let want = 0.16 + 0.36 + 0.5 * 0.85 * 0.85;
        assert!((l - want).abs() < 1e-6, "{l} {want}");
        assert!(
            (g[0] + 0.8).abs() < 1e-6 && (g[1] + 1.2).abs() < 1e-6,
            "{g:?}"
        );
        assert!((g[2] - 0.85).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn top_k_and_its_match() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 2), [1, 3]);
        assert!(top_k_matches(&[0.1, 0.9, 0.5, 0.8], &[3, 1]));
        assert!(!top_k_matches(&[0.1, 0.9, 0.5, 0.4], &[3, 1]));
        assert!(top_k_matches(&[0.1, 0.9], &[1]));
    }

    #[test]
    fn sigmoid_cross_entropy_is_stable_and_exact() {
        // z = 0: ln 2 per class whatever the target; z = +-100: no overflow, loss ~0 or ~100.
        let (mut p, mut g) = ([0.0; 4], [0.0; 4]);
        let l = sigmoid_cross_entropy(&[0.0, 0.0, 100.0, -100.0], &[1, 3], 0.5, &mut p, &mut g);
        let want = 2.0 * 2f64.ln() + 100.0 + 100.0;
        assert!((l - want).abs() < 1e-6, "{l} {want}");
        assert_eq!(p[..2], [0.5, 0.5]);
        assert!(p[2] == 1.0 && p[3] < 1e-40, "{p:?}");
        assert!(
            (g[0] - 0.25).abs() < 1e-7 && (g[1] + 0.25).abs() < 1e-7,
            "{g:?}"
        );
        assert!(
            (g[2] - 0.5).abs() < 1e-7 && (g[3] + 0.5).abs() < 1e-7,
            "{g:?}"
        );
    }

    #[test]
    fn softmax_cross_entropy_is_stable_and_exact() {
        // Logits this large overflow a naive exp; the loss of [1000, 0, 1000 - ln 3] at label 1
        // is logsumexp - 0 = 1000 + ln(1 + 1/3) (the e^-1000 term vanishes).
        let z = [1000.0f32, 0.0, 1000.0 - 3f32.ln()];
        let (mut p, mut g) = ([0.0; 3], [0.0; 3]);
        let l = softmax_cross_entropy(&z, 1, 0.5, &mut p, &mut g);
        assert!((l - (1000.0 + (4.0f64 / 3.0).ln())).abs() < 1e-3, "{l}");
        assert!((p[0] - 0.75).abs() < 1e-4 && p[1] == 0.0 && (p[2] - 0.25).abs() < 1e-4);
        assert!(
            (g[0] - 0.375).abs() < 1e-4 && (g[1] + 0.5).abs() < 1e-6,
            "{g:?}"
        );
        let mut q = [0.0; 3];
        softmax(&z, &mut q);
        assert_eq!(p, q);
    }
}
