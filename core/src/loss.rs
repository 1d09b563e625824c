//! The losses of the paper, per sample, with their gradients.

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
}
