//! The losses of the paper (and the CNN baseline's cross-entropy), per sample, with their
//! gradients.

/// Constants of the margin loss.
#[derive(Clone, Copy, Debug)]
pub struct MarginParams {
    pub m_pos: f32,
    pub m_neg: f32,
    pub lambda_neg: f32,
}

/// Margin loss of one sample, `sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`,
/// from the capsule lengths; writes `scale * dL/d|v_k|` into `grad`.
pub fn margin_loss(
    lengths: &[f32],
    label: usize,
    p: &MarginParams,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let mut loss = 0.0f64;
    for (k, (&len, g)) in lengths.iter().zip(grad.iter_mut()).enumerate() {
        if k == label {
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
        let l = margin_loss(&[0.5, 0.05, 0.3], 0, &p, 1.0, &mut g);
        assert!((l - (0.16 + 0.5 * 0.04)).abs() < 1e-6, "{l}");
        assert!(
            (g[0] + 0.8).abs() < 1e-6 && g[1] == 0.0 && (g[2] - 0.2).abs() < 1e-6,
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
