//! The CNN baseline: central finite differences against every backward pass, and the properties
//! training relies on (deterministic init, dropout keyed per sample, eval = train without
//! dropout, inputs checked).
//!
//! For a scalar loss L and a coordinate x, `(L(x + h) - L(x - h)) / 2h` must match the analytic
//! dL/dx. Each check compares the sampled coordinates of a tensor as vectors:
//! `|g_fd - g_analytic| / |g_analytic| < TOL`. A broken backward (a missing dropout mask, a
//! gradient routed to the wrong pool input, a padding offset) gives errors of order 1.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use capsnet_core::conv::ConvGeom;
use capsnet_core::layers::{Conv2d, ConvScratch, LayerGrads, MaxPool2};
use capsnet_core::loss::Targets;
use capsnet_core::rng::Rng;
use capsnet_core::{CnnBaseline, CnnConfig, CnnWorkspace, ParamLayout, Params};
use common::*;

/// Central difference of `f` at every coordinate of `x`.
fn fd_all(x: &[f32], h: f32, f: &dyn Fn(&[f32]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let mut p = x.to_vec();
            p[i] += h;
            let mut m = x.to_vec();
            m[i] -= h;
            (f(&p) - f(&m)) / (2.0 * f64::from(h))
        })
        .collect()
}

/// Steps tried by [`derivative`].
const STEPS: [f32; 3] = [1e-3, 3e-4, 1e-4];

/// `f'(0)` by a central difference, with the step of [`STEPS`] whose forward and backward
/// quotients agree best. ReLU and max pooling make the loss piecewise smooth: a kink inside a
/// step shows as one-sided quotients that disagree (a conv.0 bias of the tiny network, with a
/// unit 3e-4 from its kink, reads 5.36e-2 forward and 4.72e-2 backward at 1e-3, against 5.27e-2
/// analytic). The choice looks at `f` alone, never at the analytic gradient.
fn derivative(f: &dyn Fn(f32) -> f64) -> f64 {
    let f0 = f(0.0);
    let mut best = (f64::INFINITY, 0.0);
    for h in STEPS {
        let (p, m) = (f(h), f(-h));
        let h = f64::from(h);
        let disagreement = ((p - f0) / h - (f0 - m) / h).abs();
        if disagreement < best.0 {
            best = (disagreement, (p - m) / (2.0 * h));
        }
    }
    best.1
}

/// Checks a tensor's gradient `g` of `loss` at `x` two ways: the directional derivative along
/// `g / |g|` must equal `|g|` (this sees every coordinate at once), and the `k` largest
/// coordinates must match one by one.
fn check_tensor(what: &str, x: &[f32], g: &[f32], k: usize, loss: &dyn Fn(&[f32]) -> f64) {
    let norm = g
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    assert!(
        norm > 1e-6,
        "{what}: analytic gradient is ~0 ({norm}); the check would prove nothing"
    );
    let dir = derivative(&|t| {
        let moved: Vec<f32> = x
            .iter()
            .zip(g)
            .map(|(&xi, &gi)| xi + t * (f64::from(gi) / norm) as f32)
            .collect();
        loss(&moved)
    });
    assert!(
        (dir / norm - 1.0).abs() < TOL,
        "{what}: derivative along the gradient is {dir:.6e}, |g| = {norm:.6e} (ratio {:.4})",
        dir / norm
    );
    let (mut fd, mut an) = (vec![], vec![]);
    for i in top_k(g, k) {
        fd.push(derivative(&|t| {
            let mut p = x.to_vec();
            p[i] += t;
            loss(&p)
        }));
        an.push(f64::from(g[i]));
    }
    assert_close(what, &fd, &an);
}

/// A 'same' convolution (3x3, padding 1) on 5x5 images, in blocks of one image: L = <y, r>
/// is linear in W, b and x, so finite differences are exact up to rounding.
#[test]
fn padded_convolution_gradient() {
    let geom = ConvGeom::padded(2, 3, 3, 1, 1, 5);
    assert_eq!(geom.h_out, 5);
    let conv = Conv2d::new(geom, geom.k() * geom.positions());
    assert_eq!(conv.images_per_block(), 1);
    let batch = 3;
    let x = randn(geom.cin * batch * 25, 1.0, 1);
    let w = randn(geom.cout * geom.k(), 0.5, 2);
    let bias = randn(geom.cout, 0.5, 3);
    let r = randn(geom.cout * batch * geom.positions(), 1.0, 4);
    let loss = |w: &[f32], b: &[f32], x: &[f32]| {
        let mut y = vec![0.0; r.len()];
        conv.forward(w, b, x, batch, &mut ConvScratch::default(), &mut y);
        dot64(&y, &r)
    };
    let (mut gw, mut gb, mut gx) = (vec![0.0; w.len()], vec![0.0; 3], vec![f32::NAN; x.len()]);
    conv.backward(
        &w,
        &x,
        &r,
        batch,
        &mut ConvScratch::default(),
        LayerGrads {
            weight: &mut gw,
            bias: &mut gb,
            input: Some(&mut gx),
        },
    );
    let h = 1e-2;
    assert_close(
        "conv weight",
        &fd_all(&w, h, &|w| loss(w, &bias, &x)),
        &to64(&gw),
    );
    assert_close(
        "conv bias",
        &fd_all(&bias, h, &|b| loss(&w, b, &x)),
        &to64(&gb),
    );
    assert_close(
        "conv input",
        &fd_all(&x, h, &|x| loss(&w, &bias, x)),
        &to64(&gx),
    );
    // A corner pixel meets only 4 of the 9 kernel taps: the padding must not wrap around.
    let corner: f64 = (0..geom.cout)
        .map(|co| {
            (0..2)
                .flat_map(|dy| (0..2).map(move |dx| (dy, dx)))
                .map(|(dy, dx)| {
                    // Output (dy, dx) of image 0 reads input (0, 0) at tap (1 - dy, 1 - dx).
                    let tap = (1 - dy) * 3 + (1 - dx);
                    f64::from(w[co * geom.k() + tap])
                        * f64::from(r[(co * batch) * 25 + dy * 5 + dx])
                })
                .sum::<f64>()
        })
        .sum();
    assert!(
        (corner - f64::from(gx[0])).abs() < 1e-4,
        "{corner} {}",
        gx[0]
    );
}

/// Max pooling on 5x5 planes (the odd edge is dropped): the gradient reaches each window's
/// maximum only. Inputs are distinct and 0.01 apart, so a step of 1e-3 never changes a winner.
#[test]
fn max_pool_gradient() {
    let pool = MaxPool2::new(5);
    let planes = 3;
    let n = planes * 25;
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(9).shuffle(&mut order);
    let x: Vec<f32> = order.iter().map(|&i| i as f32 * 0.01).collect();
    let r = randn(planes * 4, 1.0, 10);
    let loss = |x: &[f32]| {
        let (mut y, mut am) = (vec![0.0; r.len()], vec![0u8; r.len()]);
        pool.forward(x, &mut y, &mut am);
        dot64(&y, &r)
    };
    let (mut y, mut am) = (vec![0.0; r.len()], vec![0u8; r.len()]);
    pool.forward(&x, &mut y, &mut am);
    let mut gx = vec![f32::NAN; n];
    pool.backward(&r, &am, &mut gx);
    assert_eq!(gx.iter().filter(|&&g| g != 0.0).count(), r.len());
    assert_close("max pool", &fd_all(&x, 1e-3, &loss), &to64(&gx));
}

/// A tiny network with its parameters, a batch and fixed dropout keys.
struct Setup {
    model: CnnBaseline,
    params: Params,
    images: Vec<f32>,
    /// `[objects, b]`.
    labels: Vec<usize>,
    objects: usize,
    /// Reconstruction targets of two objects (the CNN reconstructs nothing).
    parts: Vec<f32>,
    keys: Vec<u64>,
}

/// [`setup`] with two objects per image (overlapping pairs): the sigmoid outputs.
fn setup_pairs(cfg: CnnConfig, b: usize) -> Setup {
    let mut s = setup(cfg.clone(), b);
    let second: Vec<usize> = s.labels.iter().map(|&l| (l + 1) % cfg.classes).collect();
    s.labels.extend(second);
    s.objects = 2;
    s.parts = vec![0.0; 2 * b * cfg.pixels()];
    s
}

fn setup(cfg: CnnConfig, b: usize) -> Setup {
    let model = CnnBaseline::new(cfg.clone()).unwrap();
    let params = model.init_params(5);
    let mut rng = Rng::new(8);
    let images: Vec<f32> = (0..b * cfg.pixels())
        .map(|_| rng.uniform(0.0, 1.0))
        .collect();
    let labels: Vec<usize> = (0..b).map(|i| (i * 7 + 1) % cfg.classes).collect();
    let keys: Vec<u64> = (0..b as u64).map(|i| 1000 + 17 * i).collect();
    Setup {
        model,
        params,
        images,
        labels,
        objects: 1,
        parts: Vec::new(),
        keys,
    }
}

impl Setup {
    fn targets(&self) -> Targets<'_> {
        Targets {
            labels: &self.labels,
            objects: self.objects,
            parts: (self.objects > 1).then_some(self.parts.as_slice()),
        }
    }

    /// The training loss with the fixed dropout masks (the function the gradient is of).
    fn loss(&self, params: &Params, images: &[f32], dropout: Option<&[u64]>) -> f64 {
        let mut grads = Params::zeros(self.model.layout());
        self.model
            .forward_backward_targets(
                params,
                images,
                &self.targets(),
                dropout,
                &mut grads,
                &mut CnnWorkspace::new(),
            )
            .unwrap()
            .margin_loss
    }

    fn grads(&self, dropout: Option<&[u64]>, ws: &mut CnnWorkspace) -> Params {
        let mut grads = Params::zeros(self.model.layout());
        self.model
            .forward_backward_targets(
                &self.params,
                &self.images,
                &self.targets(),
                dropout,
                &mut grads,
                ws,
            )
            .unwrap();
        grads
    }
}

/// Every parameter tensor and the images, with dropout on (fixed keys), so the masks are part
/// of the checked function.
///
/// The weights are doubled from PyTorch's init: confident predictions give gradients of order
/// 1, far above float32 noise. Steps are at most 1e-3 (see [`derivative`]): at 1e-2 many units
/// cross a ReLU kink or swap a pool's winner, and conv.0's quotients are off by several per cent.
fn model_check(cfg: CnnConfig, b: usize, k: usize) {
    model_check_of(setup(cfg, b), k);
}

fn model_check_of(mut s: Setup, k: usize) {
    for spec in s.model.layout().specs() {
        if spec.name.ends_with(".weight") {
            s.params.data[spec.range()]
                .iter_mut()
                .for_each(|w| *w *= 2.0);
        }
    }
    let mut ws = CnnWorkspace::new();
    ws.input_grad = true;
    let grads = s.grads(Some(&s.keys), &mut ws);
    // The masks matter: without dropout the gradient is a different one.
    let plain = s.grads(None, &mut CnnWorkspace::new());
    assert!(
        rel_err(&to64(&plain.data), &to64(&grads.data)) > 0.05,
        "dropout did not change the gradient"
    );
    for spec in s.model.layout().specs() {
        let r = spec.range();
        let with = |t: &[f32]| {
            let mut p = s.params.clone();
            p.data[r.clone()].copy_from_slice(t);
            s.loss(&p, &s.images, Some(&s.keys))
        };
        check_tensor(
            &spec.name,
            &s.params.data[r.clone()],
            &grads.data[r.clone()],
            k,
            &with,
        );
    }
    assert_eq!(ws.g_images.len(), s.images.len());
    check_tensor("images", &s.images, &ws.g_images, k, &|x| {
        s.loss(&s.params, x, Some(&s.keys))
    });
}

#[test]
fn whole_model_gradient_tiny() {
    model_check(CnnConfig::tiny(), 3, 20);
}

/// Two objects per image: a sigmoid per class and their cross-entropies.
#[test]
fn whole_model_gradient_of_the_sigmoid_outputs() {
    model_check_of(setup_pairs(CnnConfig::tiny(), 3), 20);
}

/// On pairs the loss is the sum of each class's sigmoid cross-entropy, and an image is right
/// when its two classes have the two largest logits.
#[test]
fn pairs_loss_and_accuracy_follow_the_sigmoids() {
    let s = setup_pairs(CnnConfig::tiny(), 4);
    let mut ws = CnnWorkspace::new();
    let stats = s
        .model
        .forward_targets(&s.params, &s.images, &s.targets(), &mut ws)
        .unwrap();
    let (mut loss, mut correct) = (0.0, 0);
    for (i, z) in ws.logits().chunks_exact(3).enumerate() {
        let present = [s.labels[i], s.labels[4 + i]];
        for (k, &zk) in z.iter().enumerate() {
            let p = 1.0 / (1.0 + (-f64::from(zk)).exp());
            loss -= if present.contains(&k) {
                p.ln()
            } else {
                (1.0 - p).ln()
            };
        }
        let absent = (0..3).find(|k| !present.contains(k)).unwrap();
        correct += usize::from(present.iter().all(|&c| z[c] > z[absent]));
    }
    assert!(
        (stats.margin_loss - loss / 4.0).abs() < 1e-5,
        "{stats:?} {}",
        loss / 4.0
    );
    assert_eq!(stats.correct, correct);
}

/// Two input channels (the images are transposed to channel-major and the input gradient
/// back), an odd side under the pool (7 -> 3), no hidden layer (dropout on the flattened
/// features) and a convolution without a pool last.
#[test]
fn whole_model_gradient_two_channels_odd_side_no_hidden_layer() {
    let cfg = CnnConfig {
        image_size: 7,
        in_channels: 2,
        conv_channels: vec![3, 2],
        kernel: 3,
        pool_after: vec![true, false],
        fc_hidden: vec![],
        classes: 4,
        dropout: 0.3,
    };
    model_check(cfg, 2, 12);
}

#[test]
fn same_seed_same_init_within_pytorch_bounds() {
    let model = CnnBaseline::new(CnnConfig::tiny()).unwrap();
    let a = model.init_params(42);
    assert_eq!(a, model.init_params(42));
    assert_ne!(a.data, model.init_params(43).data);
    // conv.1 has fan-in 4 * 3 * 3 = 36: weight and bias in +-1/6.
    for name in ["conv.1.weight", "conv.1.bias"] {
        let t = a.get(name).unwrap();
        assert!(t.iter().all(|x| x.abs() <= 1.0 / 6.0), "{name}");
        assert!(t.iter().any(|x| x.abs() > 0.1), "{name} looks too small");
    }
}

/// The gradient summed over 4 samples is the same whether they go through as one batch, as two
/// batches of 2, or in another order, because each sample's dropout mask follows its key.
#[test]
fn dropout_gradient_does_not_depend_on_the_batch_split() {
    let s = setup(CnnConfig::tiny(), 4);
    let px = s.model.config().pixels();
    let run = |idx: &[usize], keys: &[u64]| {
        let images: Vec<f32> = idx
            .iter()
            .flat_map(|&i| s.images[i * px..][..px].iter().copied())
            .collect();
        let labels: Vec<usize> = idx.iter().map(|&i| s.labels[i]).collect();
        let keys: Vec<u64> = idx.iter().map(|&i| keys[i]).collect();
        let mut grads = Params::zeros(s.model.layout());
        let stats = s
            .model
            .forward_backward(
                &s.params,
                &images,
                &labels,
                Some(&keys),
                &mut grads,
                &mut CnnWorkspace::new(),
            )
            .unwrap();
        let n = idx.len() as f32;
        let sum: Vec<f32> = grads.data.iter().map(|g| g * n).collect();
        (sum, stats.margin_loss * idx.len() as f64)
    };
    let (whole, loss_whole) = run(&[0, 1, 2, 3], &s.keys);
    let (a, loss_a) = run(&[0, 1], &s.keys);
    let (b, loss_b) = run(&[2, 3], &s.keys);
    let split: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let e = rel_err(&to64(&split), &to64(&whole));
    assert!(
        e < 1e-5,
        "two batches of 2 vs one of 4: relative error {e:.3e}"
    );
    assert!((loss_a + loss_b - loss_whole).abs() < 1e-5 * loss_whole);
    let (shuffled, _) = run(&[2, 0, 3, 1], &s.keys);
    let e = rel_err(&to64(&shuffled), &to64(&whole));
    assert!(e < 1e-5, "reordered batch: relative error {e:.3e}");
    // The test has teeth: other keys (other masks) give another gradient.
    let other: Vec<u64> = s.keys.iter().map(|k| k + 1).collect();
    let (moved, _) = run(&[0, 1, 2, 3], &other);
    assert!(rel_err(&to64(&moved), &to64(&whole)) > 0.05);
}

/// Blocks of one image through im2col give the same result as the whole batch at once.
#[test]
fn conv_blocks_do_not_change_the_result() {
    let s = setup(CnnConfig::tiny(), 3);
    let whole = s.grads(Some(&s.keys), &mut CnnWorkspace::new());
    let mut blocked = s.model.clone();
    blocked.set_col_budget(1);
    let mut grads = Params::zeros(s.model.layout());
    blocked
        .forward_backward(
            &s.params,
            &s.images,
            &s.labels,
            Some(&s.keys),
            &mut grads,
            &mut CnnWorkspace::new(),
        )
        .unwrap();
    let e = rel_err(&to64(&grads.data), &to64(&whole.data));
    assert!(e < 1e-5, "relative error {e:.3e}");
}

/// Evaluation is training without dropout: the same loss and accuracy, and `predict`'s
/// probabilities are the softmax of the same logits.
#[test]
fn eval_forward_equals_training_loss_without_dropout() {
    let s = setup(CnnConfig::tiny(), 5);
    let mut ws = CnnWorkspace::new();
    let eval = s
        .model
        .forward(&s.params, &s.images, &s.labels, &mut ws)
        .unwrap();
    let mut grads = Params::zeros(s.model.layout());
    let train = s
        .model
        .forward_backward(&s.params, &s.images, &s.labels, None, &mut grads, &mut ws)
        .unwrap();
    assert_eq!(eval, train);
    assert!(ws.g_images.is_empty(), "an input gradient nobody asked for");
    assert_eq!(eval.samples, 5);
    assert_eq!(eval.reconstruction_loss, 0.0);
    // Near-uniform predictions from a fresh init: the loss is close to ln(3).
    assert!((eval.margin_loss - 3f64.ln()).abs() < 0.3, "{eval:?}");
    let with_dropout = s.loss(&s.params, &s.images, Some(&s.keys));
    assert_ne!(with_dropout, eval.margin_loss);

    let probs = s
        .model
        .predict(&s.params, &s.images, &mut ws)
        .unwrap()
        .to_vec();
    assert_eq!(probs.len(), 5 * 3);
    let mut loss = 0.0;
    let mut correct = 0;
    for (p, &label) in probs.chunks_exact(3).zip(&s.labels) {
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        loss -= f64::from(p[label]).ln();
        let best = (0..3).fold(0, |a, k| if p[k] > p[a] { k } else { a });
        correct += usize::from(best == label);
    }
    assert!((loss / 5.0 - eval.margin_loss).abs() < 1e-5);
    assert_eq!(correct, eval.correct);
}

#[test]
fn bad_inputs_are_named() {
    let s = setup(CnnConfig::tiny(), 2);
    let m = &s.model;
    let mut ws = CnnWorkspace::new();
    let mut grads = Params::zeros(m.layout());
    let err = |r: capsnet_core::Result<capsnet_core::BatchStats>| r.unwrap_err().to_string();

    let short = &s.images[..s.images.len() - 1];
    let e = err(m.forward(&s.params, short, &s.labels, &mut ws));
    assert!(e.contains("images") && e.contains("144"), "{e}");
    let e = err(m.forward_backward(&s.params, short, &s.labels, None, &mut grads, &mut ws));
    assert!(e.contains("images"), "{e}");
    assert!(m.predict(&s.params, short, &mut ws).is_err());

    let e = err(m.forward(&s.params, &s.images, &[0, 3], &mut ws));
    assert!(e.contains("label 3 out of range for 3 classes"), "{e}");
    let e = err(m.forward(&s.params, &s.images, &[0], &mut ws));
    assert!(e.contains("labels"), "{e}");
    let e = err(m.forward_backward(
        &s.params,
        &s.images,
        &s.labels,
        Some(&[1, 2, 3]),
        &mut grads,
        &mut ws,
    ));
    assert!(e.contains("dropout keys"), "{e}");

    let other = Params::zeros(&ParamLayout::for_cnn(&CnnConfig {
        classes: 4,
        ..CnnConfig::tiny()
    }));
    let e = err(m.forward(&other, &s.images, &s.labels, &mut ws));
    assert!(e.contains("parameters"), "{e}");
    let mut other_grads = other.clone();
    let e = err(m.forward_backward(
        &s.params,
        &s.images,
        &s.labels,
        None,
        &mut other_grads,
        &mut ws,
    ));
    assert!(e.contains("gradient buffers"), "{e}");

    let e = CnnBaseline::new(CnnConfig {
        kernel: 2,
        ..CnnConfig::tiny()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("kernel"), "{e}");
}

/// The default network's size, by hand (with pooling, the first fully connected layer sees
/// 128 x 7 x 7 = 6272 features):
///   conv.0   256 x 1 x 5 x 5 + 256   =     6,656
///   conv.1   256 x 256 x 5 x 5 + 256 = 1,638,656
///   conv.2   128 x 256 x 5 x 5 + 128 =   819,328
///   fc.0     328 x 6272 + 328        = 2,057,544
///   fc.1     192 x 328 + 192         =    63,168
///   fc.2     10 x 192 + 10           =     1,930
///   total                              4,587,282
#[test]
fn default_config_parameter_count() {
    let model = CnnBaseline::new(CnnConfig::default()).unwrap();
    let total = model.layout().total();
    println!("CNN baseline parameters: {total}");
    assert_eq!(total, 4_587_282);
    let names: Vec<&str> = model
        .layout()
        .specs()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "conv.0.weight",
            "conv.0.bias",
            "conv.1.weight",
            "conv.1.bias",
            "conv.2.weight",
            "conv.2.bias",
            "fc.0.weight",
            "fc.0.bias",
            "fc.1.weight",
            "fc.1.bias",
            "fc.2.weight",
            "fc.2.bias"
        ]
    );
}
