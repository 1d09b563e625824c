//! What a trained network does with a test set, for the paper's figures (`capsnet figures`):
//! predictions and digit capsules of every image, a confusion matrix, reconstructions from the
//! predicted capsule, and the decoder's answer to one capsule dimension perturbed at a time
//! (the paper's figure 4).

use crate::data::{self, Dataset};
use crate::error::Result;
use crate::model::{CapsNet, Workspace};
use crate::params::Params;

/// The perturbations of the paper's figure 4: -0.25 to 0.25 in steps of 0.05.
pub fn figure4_deltas() -> Vec<f32> {
    (-5..=5).map(|k| k as f32 * 0.05).collect()
}

/// Every image of a data set through the network.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    /// The longest capsule of each image.
    pub predicted: Vec<usize>,
    pub labels: Vec<usize>,
    /// The digit capsules `[n, classes, dim]`.
    pub caps: Vec<f32>,
    pub classes: usize,
    pub dim: usize,
}

impl Predictions {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn accuracy(&self) -> f64 {
        let right = self
            .predicted
            .iter()
            .zip(&self.labels)
            .filter(|(p, l)| p == l)
            .count();
        right as f64 / self.len().max(1) as f64
    }

    /// `counts[true * classes + predicted]`.
    pub fn confusion(&self) -> Vec<u64> {
        let k = self.classes;
        let mut counts = vec![0u64; k * k];
        for (&p, &l) in self.predicted.iter().zip(&self.labels) {
            counts[l * k + p] += 1;
        }
        counts
    }

    /// The predicted capsule of image `i` (`dim` floats).
    pub fn predicted_capsule(&self, i: usize) -> &[f32] {
        let at = (i * self.classes + self.predicted[i]) * self.dim;
        &self.caps[at..at + self.dim]
    }

    /// Capsules `[classes, dim]` holding only `capsule` in class `class`: the decoder's input.
    pub fn masked(&self, class: usize, capsule: &[f32]) -> Vec<f32> {
        let mut m = vec![0.0; self.classes * self.dim];
        m[class * self.dim..][..self.dim].copy_from_slice(capsule);
        m
    }
}

/// Runs `ds` through the network in batches of `batch_size`.
pub fn predict_all(
    model: &CapsNet,
    params: &Params,
    ds: &Dataset,
    batch_size: usize,
    ws: &mut Workspace,
) -> Result<Predictions> {
    let cfg = model.config();
    let (k, dim) = (cfg.classes, cfg.digit_dim);
    let mut out = Predictions {
        predicted: Vec::with_capacity(ds.len()),
        labels: Vec::with_capacity(ds.len()),
        caps: Vec::with_capacity(ds.len() * k * dim),
        classes: k,
        dim,
    };
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let batch = data::make_batch(ds, chunk, None);
        let lengths = model.predict(params, &batch.images, ws)?;
        out.predicted
            .extend(lengths.chunks_exact(k).map(crate::model::argmax));
        out.labels.extend(&batch.labels);
        out.caps.extend_from_slice(ws.digit_caps());
    }
    Ok(out)
}

/// Reconstructions `[n, pixels]` of image indices `which`, each from its predicted capsule.
pub fn reconstructions(
    model: &CapsNet,
    params: &Params,
    p: &Predictions,
    which: &[usize],
) -> Result<Vec<f32>> {
    let caps: Vec<f32> = which
        .iter()
        .flat_map(|&i| p.masked(p.predicted[i], p.predicted_capsule(i)))
        .collect();
    if caps.is_empty() {
        return Ok(vec![]);
    }
    model.reconstruct(params, &caps)
}

/// The figure-4 grid of image `i`: row `d`, column `c` is the reconstruction (`pixels` floats)
/// of its predicted capsule with dimension `d` moved by `deltas[c]`; row-major,
/// `[dim, deltas, pixels]`.
pub fn perturbations(
    model: &CapsNet,
    params: &Params,
    p: &Predictions,
    i: usize,
    deltas: &[f32],
) -> Result<Vec<f32>> {
    let class = p.predicted[i];
    let base = p.predicted_capsule(i);
    let mut caps = Vec::with_capacity(p.dim * deltas.len() * p.classes * p.dim);
    for d in 0..p.dim {
        for &delta in deltas {
            let mut v = base.to_vec();
            v[d] += delta;
            caps.extend(p.masked(class, &v));
        }
    }
    if caps.is_empty() {
        return Ok(vec![]);
    }
    model.reconstruct(params, &caps)
}
