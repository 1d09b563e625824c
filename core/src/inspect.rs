//! What a trained network does with a test set, for the paper's figures (`capsnet figures`):
//! predictions and digit capsules of every image, a confusion matrix, reconstructions from the
//! predicted capsule, and the decoder's answer to one capsule dimension perturbed at a time
//! (the paper's figure 4); for overlapping pairs, the two longest capsules of each pair and
//! each object reconstructed from its own (figure 5).

use crate::data::{self, Batch, Dataset};
use crate::error::Result;
use crate::loss;
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
        masked(self.classes, class, capsule)
    }
}

/// Capsules `[classes, capsule.len()]` holding only `capsule` in class `class`.
fn masked(classes: usize, class: usize, capsule: &[f32]) -> Vec<f32> {
    let dim = capsule.len();
    let mut m = vec![0.0; classes * dim];
    m[class * dim..][..dim].copy_from_slice(capsule);
    m
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

/// Overlapping pairs through the network.
#[derive(Clone, Debug, PartialEq)]
pub struct PairPredictions {
    /// The two longest capsules of each pair, matched to its objects: a predicted class that
    /// is one of the pair's comes at that object's place.
    pub predicted: Vec<[usize; 2]>,
    /// The classes of each pair's two objects.
    pub labels: Vec<[usize; 2]>,
    /// The digit capsules `[n, classes, dim]`.
    pub caps: Vec<f32>,
    pub classes: usize,
    pub dim: usize,
}

impl PairPredictions {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether pair `i` has both classes right.
    pub fn right(&self, i: usize) -> bool {
        let (p, l) = (self.predicted[i], self.labels[i]);
        l.iter().all(|c| p.contains(c))
    }

    /// Pairs with both classes right.
    pub fn accuracy(&self) -> f64 {
        let right = (0..self.len()).filter(|&i| self.right(i)).count();
        right as f64 / self.len().max(1) as f64
    }
}

/// Runs batches of pairs (two objects per image, [`crate::multi::make_pair_batch`]) through
/// the network.
pub fn predict_pairs(
    model: &CapsNet,
    params: &Params,
    batches: impl IntoIterator<Item = Batch>,
    ws: &mut Workspace,
) -> Result<PairPredictions> {
    let cfg = model.config();
    let (k, dim) = (cfg.classes, cfg.digit_dim);
    let mut out = PairPredictions {
        predicted: vec![],
        labels: vec![],
        caps: vec![],
        classes: k,
        dim,
    };
    for batch in batches {
        let b = batch.len();
        let t = batch.targets();
        let batch = &batch;
        if t.objects != 2 {
            return Err(crate::error::CoreError::Config(format!(
                "a batch of {} objects per image where pairs were expected",
                t.objects
            )));
        }
        let lengths = model.predict(params, &batch.images, ws)?;
        for (i, len) in lengths.chunks_exact(k).enumerate() {
            let labels = [t.labels[i], t.labels[b + i]];
            let top = loss::top_k(len, 2);
            let mut p = [top[0], top[1]];
            if p[0] == labels[1] || p[1] == labels[0] {
                p.swap(0, 1);
            }
            out.predicted.push(p);
            out.labels.push(labels);
        }
        out.caps.extend_from_slice(ws.digit_caps());
    }
    Ok(out)
}

/// Reconstructions `[n, 2, pixels]` of pairs `which`: each from one of its two predicted
/// capsules, in the order of [`PairPredictions::predicted`].
pub fn pair_reconstructions(
    model: &CapsNet,
    params: &Params,
    p: &PairPredictions,
    which: &[usize],
) -> Result<Vec<f32>> {
    let at = |i: usize, c: usize| &p.caps[(i * p.classes + c) * p.dim..][..p.dim];
    let mut caps = Vec::with_capacity(which.len() * 2 * p.classes * p.dim);
    for &i in which {
        for c in p.predicted[i] {
            caps.extend(masked(p.classes, c, at(i, c)));
        }
    }
    if caps.is_empty() {
        return Ok(vec![]);
    }
    model.reconstruct(params, &caps)
}
