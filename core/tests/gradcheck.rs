//! Central finite differences against every backward pass.
//!
//! For a scalar loss L and a coordinate x, `(L(x + h) - L(x - h)) / 2h` must match the analytic
//! dL/dx. Each check compares the sampled coordinates of a tensor as vectors:
//! `|g_fd - g_analytic| / |g_analytic| < TOL`. A broken backward (a zeroed routing gradient, a
//! missing iteration, a wrong sign) gives errors of order 1, far above the tolerance; float32
//! rounding with these step sizes stays near 1e-3.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use capsnet_core::caps::{self, DigitDims, RoutingCache};
use capsnet_core::loss::{self, MarginParams, Targets};
use capsnet_core::rng::Rng;
use capsnet_core::{CapsNet, CapsNetConfig, Mask, Params, PassOptions, Workspace};
use common::*;

#[test]
fn squash_gradient() {
    let dim = 4;
    let mut s = randn(5 * dim, 1.0, 1);
    s[..dim].iter_mut().for_each(|x| *x *= 1e-2); // a short vector too
    let r = randn(s.len(), 1.0, 2);
    let loss = |s: &[f32]| {
        let mut v = vec![0.0; s.len()];
        caps::squash(s, dim, 1e-8, &mut v);
        dot64(&v, &r)
    };
    let mut g = vec![0.0; s.len()];
    caps::squash_backward(&s, &r, dim, 1e-8, &mut g);
    let (mut fd, mut an) = (vec![], vec![]);
    for i in 0..s.len() {
        let h = 1e-3;
        let mut p = s.clone();
        p[i] += h;
        let mut m = s.clone();
        m[i] -= h;
        fd.push((loss(&p) - loss(&m)) / (2.0 * f64::from(h)));
        an.push(f64::from(g[i]));
    }
    assert_close("squash", &fd, &an);
}

fn routing_check(iters: usize) {
    let dims = DigitDims {
        batch: 2,
        inputs: 6,
        in_dim: 3,
        outputs: 3,
        out_dim: 4,
        iters,
    };
    let uhat = randn(dims.batch * dims.uhat_per_sample(), 0.6, 10 + iters as u64);
    let r = randn(dims.batch * dims.outputs * dims.out_dim, 1.0, 20);
    let loss = |u: &[f32]| {
        let mut cache = RoutingCache::default();
        let mut v = vec![0.0; r.len()];
        caps::routing_forward(u, &dims, 1e-8, &mut cache, &mut v);
        dot64(&v, &r)
    };
    let mut cache = RoutingCache::default();
    let mut v = vec![0.0; r.len()];
    caps::routing_forward(&uhat, &dims, 1e-8, &mut cache, &mut v);
    let mut g = vec![0.0; uhat.len()];
    caps::routing_backward(&uhat, &dims, 1e-8, &cache, &r, &mut g);
    let (mut fd, mut an) = (vec![], vec![]);
    for i in 0..uhat.len() {
        let h = 2e-3;
        let mut p = uhat.clone();
        p[i] += h;
        let mut m = uhat.clone();
        m[i] -= h;
        fd.push((loss(&p) - loss(&m)) / (2.0 * f64::from(h)));
        an.push(f64::from(g[i]));
    }
    assert_close(&format!("routing r={iters}"), &fd, &an);
}

#[test]
fn routing_gradient_r1() {
    routing_check(1);
}
#[test]
fn routing_gradient_r2() {
    routing_check(2);
}
#[test]
fn routing_gradient_r3() {
    routing_check(3);
}

/// With r >= 2 the coupling coefficients depend on u_hat; a backward that treats them as
/// constants (detached routing) must be told apart from the real one.
#[test]
fn routing_gradient_differs_from_detached_coefficients() {
    let dims = DigitDims {
        batch: 1,
        inputs: 6,
        in_dim: 3,
        outputs: 3,
        out_dim: 4,
        iters: 3,
    };
    let uhat = randn(dims.uhat_per_sample(), 0.6, 13);
    let r = randn(dims.outputs * dims.out_dim, 1.0, 20);
    let mut cache = RoutingCache::default();
    let mut v = vec![0.0; r.len()];
    caps::routing_forward(&uhat, &dims, 1e-8, &mut cache, &mut v);
    let mut full = vec![0.0; uhat.len()];
    caps::routing_backward(&uhat, &dims, 1e-8, &cache, &r, &mut full);
    // Detached: s = sum_i c_i u_i with the final c held fixed.
    let (ni, nj, d) = (dims.inputs, dims.outputs, dims.out_dim);
    let c_last = &cache.c[2 * ni * nj..][..ni * nj];
    let s_last = &cache.s[2 * nj * d..][..nj * d];
    let mut gs = vec![0.0; nj * d];
    caps::squash_backward(s_last, &r, d, 1e-8, &mut gs);
    let mut detached = vec![0.0f64; uhat.len()];
    for i in 0..ni {
        for j in 0..nj {
            for k in 0..d {
                detached[(i * nj + j) * d + k] = f64::from(c_last[i * nj + j] * gs[j * d + k]);
            }
        }
    }
    let full64: Vec<f64> = full.iter().map(|&x| f64::from(x)).collect();
    assert!(
        rel_err(&detached, &full64) > 0.05,
        "routing gradient looks detached"
    );
}

#[test]
fn uhat_gradient() {
    let dims = DigitDims {
        batch: 3,
        inputs: 5,
        in_dim: 3,
        outputs: 2,
        out_dim: 4,
        iters: 1,
    };
    let u = randn(dims.batch * dims.inputs * dims.in_dim, 1.0, 30);
    let w = randn(
        dims.inputs * dims.outputs * dims.out_dim * dims.in_dim,
        0.5,
        31,
    );
    let r = randn(dims.batch * dims.uhat_per_sample(), 1.0, 32);
    let loss = |u: &[f32], w: &[f32]| {
        let mut wt = vec![];
        caps::transpose_digit_weight(w, &dims, &mut wt);
        let mut out = vec![0.0; r.len()];
        caps::uhat_forward(u, &wt, &dims, &mut out);
        dot64(&out, &r)
    };
    let (mut gw, mut gu, mut scratch, mut wt) =
        (vec![0.0; w.len()], vec![0.0; u.len()], vec![], vec![]);
    caps::transpose_digit_weight(&w, &dims, &mut wt);
    caps::uhat_backward(&u, &wt, &r, &dims, &mut gw, &mut gu, &mut scratch);
    let h = 1e-2;
    let fd_of = |x: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
        let mut p = x.to_vec();
        p[i] += h;
        let mut m = x.to_vec();
        m[i] -= h;
        (f(&p) - f(&m)) / (2.0 * f64::from(h))
    };
    let fd_w: Vec<f64> = (0..w.len())
        .map(|i| fd_of(&w, i, &|w| loss(&u, w)))
        .collect();
    let fd_u: Vec<f64> = (0..u.len())
        .map(|i| fd_of(&u, i, &|u| loss(u, &w)))
        .collect();
    assert_close(
        "u_hat wrt W",
        &fd_w,
        &gw.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
    );
    assert_close(
        "u_hat wrt u",
        &fd_u,
        &gu.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
    );
}

#[test]
fn margin_loss_gradient() {
    let p = MarginParams {
        m_pos: 0.9,
        m_neg: 0.1,
        lambda_neg: 0.5,
    };
    // Lengths on both sides of both margins, away from the kinks.
    let lengths = [0.3f32, 0.05, 0.6, 0.95, 0.2];
    // One class present, two present (overlapping pairs).
    for present in [&[0][..], &[3], &[2, 4], &[0, 3]] {
        let mut g = [0.0; 5];
        loss::margin_loss(&lengths, present, &p, 1.0, &mut g);
        let mut fd = vec![];
        for i in 0..lengths.len() {
            let h = 1e-3;
            let mut a = lengths;
            a[i] += h;
            let mut b = lengths;
            b[i] -= h;
            let mut scratch = [0.0; 5];
            let lp = loss::margin_loss(&a, present, &p, 1.0, &mut scratch);
            let lm = loss::margin_loss(&b, present, &p, 1.0, &mut scratch);
            fd.push((lp - lm) / (2.0 * f64::from(h)));
        }
        assert_close(
            "margin",
            &fd,
            &g.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        );
    }
}

/// A tiny network whose routing is far from uniform (large digit weights), so every path of the
/// backward pass carries gradient.
fn tiny_setup(iters: usize) -> (CapsNet, Params, Vec<f32>, Vec<usize>) {
    // recon_weight 1: the paper's 0.0005 would leave the decoder's gradient near rounding noise.
    let cfg = CapsNetConfig {
        routing_iters: iters,
        recon_weight: 1.0,
        ..CapsNetConfig::tiny()
    };
    let model = CapsNet::new(cfg.clone()).unwrap();
    let mut params = model.init_params(5);
    let dw = params.get_mut("digit.weight").unwrap();
    let big = randn(dw.len(), 0.4, 6);
    dw.copy_from_slice(&big);
    let b = 3;
    let mut rng = Rng::new(8);
    let images: Vec<f32> = (0..b * cfg.pixels())
        .map(|_| rng.uniform(0.0, 1.0))
        .collect();
    let labels = vec![0, 2, 1];
    (model, params, images, labels)
}

/// Checks a tensor's gradient `g` of `loss` at `x` two ways: the directional derivative along
/// `g / |g|` must equal `|g|` (this sees every coordinate at once), and the `k` largest
/// coordinates must match one by one.
fn check_tensor(what: &str, x: &[f32], g: &[f32], k: usize, h: f32, loss: &dyn Fn(&[f32]) -> f64) {
    let norm = g
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    assert!(
        norm > 1e-6,
        "{what}: analytic gradient is ~0 ({norm}); the check would prove nothing"
    );
    let step = |sign: f32| -> Vec<f32> {
        x.iter()
            .zip(g)
            .map(|(&xi, &gi)| xi + sign * h * (f64::from(gi) / norm) as f32)
            .collect()
    };
    let dir = (loss(&step(1.0)) - loss(&step(-1.0))) / (2.0 * f64::from(h));
    assert!(
        (dir / norm - 1.0).abs() < TOL,
        "{what}: derivative along the gradient is {dir:.6e}, |g| = {norm:.6e} (ratio {:.4})",
        dir / norm
    );
    // One coordinate moves the loss less than the whole direction does: a larger step keeps the
    // difference above float32 rounding.
    let h = 3.0 * h;
    let (mut fd, mut an) = (vec![], vec![]);
    for i in top_k(g, k) {
        let mut p = x.to_vec();
        p[i] += h;
        let mut m = x.to_vec();
        m[i] -= h;
        fd.push((loss(&p) - loss(&m)) / (2.0 * f64::from(h)));
        an.push(f64::from(g[i]));
    }
    assert_close(what, &fd, &an);
}

fn model_check(iters: usize, k: usize) {
    let (model, params, images, labels) = tiny_setup(iters);
    targets_check(
        &model,
        &params,
        &images,
        &Targets::single(&labels),
        iters,
        k,
    );
}

/// Every parameter's gradient and the images' against finite differences of the loss against
/// `targets`.
fn targets_check(
    model: &CapsNet,
    params: &Params,
    images: &[f32],
    targets: &Targets,
    iters: usize,
    k: usize,
) {
    let mut ws = Workspace::new();
    let mut grads = Params::zeros(model.layout());
    let opts = PassOptions {
        mask: Mask::Label,
        input_grad: true,
    };
    model
        .forward_backward_targets(params, images, targets, opts, &mut grads, &mut ws)
        .unwrap();
    let objects = targets.objects;
    let loss = |p: &Params, x: &[f32]| {
        let mut ws = Workspace::new();
        model
            .forward_targets(p, x, targets, Mask::Label, &mut ws)
            .unwrap()
            .total_loss()
    };
    for spec in model.layout().specs() {
        let r = spec.range();
        let with = |t: &[f32]| {
            let mut p = params.clone();
            p.data[r.clone()].copy_from_slice(t);
            loss(&p, images)
        };
        check_tensor(
            &format!("r={iters} objects={objects} {}", spec.name),
            &params.data[r.clone()],
            &grads.data[r.clone()],
            k,
            3e-3,
            &with,
        );
    }
    check_tensor(
        &format!("r={iters} objects={objects} images"),
        images,
        &ws.g_images,
        k,
        3e-3,
        &|x| loss(params, x),
    );
}

/// Two objects per image (overlapping pairs): the margin loss with both classes present and
/// each object reconstructed from its own capsule against its own target image.
#[test]
fn two_object_model_gradient() {
    let (model, params, images, _) = tiny_setup(3);
    let px = model.config().pixels();
    // Images (0, 1), (2, 0), (1, 2): each class present in two images, absent in one.
    let labels = vec![0, 2, 1, 1, 0, 2];
    let mut rng = Rng::new(21);
    let parts: Vec<f32> = (0..2 * 3 * px).map(|_| rng.uniform(0.0, 1.0)).collect();
    let targets = Targets {
        labels: &labels,
        objects: 2,
        parts: Some(&parts),
    };
    targets_check(&model, &params, &images, &targets, 3, 24);

    // Decoder row o * b + i is object o of image i, decoded from its own capsule alone and
    // scored against its own target.
    let mut ws = Workspace::new();
    let stats = model
        .forward_targets(&params, &images, &targets, Mask::Label, &mut ws)
        .unwrap();
    let cfg = model.config();
    let (nj, dd) = (cfg.classes, cfg.digit_dim);
    let mut caps = vec![0.0f32; 6 * nj * dd];
    for (r, &c) in labels.iter().enumerate() {
        let src = ((r % 3) * nj + c) * dd;
        caps[(r * nj + c) * dd..][..dd].copy_from_slice(&ws.digit_caps()[src..][..dd]);
    }
    let rec = model.reconstruct(&params, &caps).unwrap();
    let worst = rec
        .iter()
        .zip(ws.reconstruction())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "{worst}");
    let sse: f64 = rec
        .iter()
        .zip(&parts)
        .map(|(&r, &x)| f64::from(r - x).powi(2))
        .sum();
    let want = f64::from(cfg.recon_weight) * sse / 3.0;
    assert!(
        (stats.reconstruction_loss - want).abs() < 1e-5 * want,
        "{stats:?} {want}"
    );
}

/// With the two longest capsules right, the test pass (predicted capsules) decodes what the
/// training pass (labelled capsules) decodes, object by object; and the accuracy counts an
/// image right only when both its classes are the two longest.
#[test]
fn two_object_prediction_matches_each_object() {
    let (model, params, images, _) = tiny_setup(3);
    let (px, nj) = (model.config().pixels(), model.config().classes);
    let mut ws = Workspace::new();
    model.predict(&params, &images, &mut ws).unwrap();
    let lengths = ws.lengths().to_vec();
    // Label each image with its two longest capsules, the second longest as object 0.
    let mut labels = vec![0; 6];
    for (i, len) in lengths.chunks_exact(nj).enumerate() {
        let top = loss::top_k(len, 2);
        (labels[i], labels[3 + i]) = (top[1], top[0]);
    }
    let mut rng = Rng::new(3);
    let parts: Vec<f32> = (0..2 * 3 * px).map(|_| rng.uniform(0.0, 1.0)).collect();
    let t = Targets {
        labels: &labels,
        objects: 2,
        parts: Some(&parts),
    };
    let pred = model
        .forward_targets(&params, &images, &t, Mask::Predicted, &mut ws)
        .unwrap();
    let rec_pred = ws.reconstruction().to_vec();
    let lab = model
        .forward_targets(&params, &images, &t, Mask::Label, &mut ws)
        .unwrap();
    assert_eq!(pred.correct, 3);
    assert_eq!(rec_pred, ws.reconstruction());
    assert_eq!(pred.reconstruction_loss, lab.reconstruction_loss);
    // The longest and the shortest capsule: wrong.
    let mut labels = labels.clone();
    for (i, len) in lengths.chunks_exact(nj).enumerate() {
        labels[3 + i] = loss::top_k(len, nj)[nj - 1];
    }
    let t = Targets {
        labels: &labels,
        objects: 2,
        parts: Some(&parts),
    };
    let wrong = model
        .forward_targets(&params, &images, &t, Mask::Predicted, &mut ws)
        .unwrap();
    assert_eq!(wrong.correct, 0);
}

/// Targets that do not fit the batch are refused with what is wrong, before any work.
#[test]
fn bad_targets_are_refused() {
    let (model, params, images, _) = tiny_setup(1);
    let px = model.config().pixels();
    let parts = vec![0.5; 2 * 3 * px];
    let mut ws = Workspace::new();
    let mut err = |labels: &[usize], objects: usize, parts: Option<&[f32]>| {
        let t = Targets {
            labels,
            objects,
            parts,
        };
        model
            .forward_targets(&params, &images, &t, Mask::Label, &mut ws)
            .unwrap_err()
            .to_string()
    };
    let e = err(&[0, 1, 2, 1, 2, 2], 2, Some(&parts));
    assert!(e.contains("image 2") && e.contains("class 2"), "{e}");
    let e = err(&[0, 1, 2, 1, 2, 0], 2, None);
    assert!(e.contains("reconstruction target"), "{e}");
    let e = err(&[0, 1, 2, 1, 2, 0], 2, Some(&parts[px..]));
    assert!(e.contains("reconstruction targets"), "{e}");
    let e = err(&[0, 1, 2, 1, 2], 2, Some(&parts));
    assert!(e.contains("labels"), "{e}");
    let e = err(&[0, 1, 2, 1, 2, 0, 1, 2, 0, 0, 1, 2], 4, Some(&parts));
    assert!(e.contains("4 objects"), "{e}");
}

#[test]
fn whole_model_gradient_r3() {
    model_check(3, 40);
}

#[test]
fn whole_model_gradient_r1_and_r2() {
    model_check(1, 12);
    model_check(2, 12);
}

/// The decoder sees only the masked capsule: the gradient of the reconstruction loss reaches
/// `v` of the true class alone, and the decoder's weight gradient for the other classes' input
/// columns is exactly zero.
#[test]
fn masked_decoder_gradient() {
    let (model, params, images, _) = tiny_setup(3);
    let labels = vec![1, 1, 1];
    let mut ws = Workspace::new();
    let mut grads = Params::zeros(model.layout());
    let opts = PassOptions {
        mask: Mask::Label,
        input_grad: false,
    };
    model
        .forward_backward(&params, &images, &labels, opts, &mut grads, &mut ws)
        .unwrap();
    let cfg = model.config();
    let gw0 = grads.get("decoder.0.weight").unwrap();
    let din = cfg.decoder_in();
    for row in gw0.chunks_exact(din) {
        for (col, &g) in row.iter().enumerate() {
            let class = col / cfg.digit_dim;
            if class != 1 {
                assert_eq!(
                    g, 0.0,
                    "decoder.0.weight column {col} (class {class}) got gradient"
                );
            }
        }
    }
    assert!(gw0.iter().any(|&g| g != 0.0));
    // And the decoder weights' gradient matches finite differences (reconstruction path only).
    let loss = |w: &[f32]| {
        let mut p = params.clone();
        p.get_mut("decoder.0.weight").unwrap().copy_from_slice(w);
        let mut ws = Workspace::new();
        model
            .forward(&p, &images, &labels, Mask::Label, &mut ws)
            .unwrap()
            .reconstruction_loss
    };
    let w0 = params.get("decoder.0.weight").unwrap();
    check_tensor("masked decoder.0.weight", w0, gw0, 12, 3e-3, &loss);
}

/// `CapsNet::reconstruct` on the predicted capsule, masked, gives the forward pass's
/// reconstruction (the figures decode through it).
#[test]
fn reconstruct_matches_the_forward_pass() {
    let (model, params, images, labels) = tiny_setup(3);
    let cfg = model.config().clone();
    let mut ws = Workspace::new();
    model
        .forward(&params, &images, &labels, Mask::Predicted, &mut ws)
        .unwrap();
    let (nj, dd) = (cfg.classes, cfg.digit_dim);
    let mut caps = vec![0.0f32; labels.len() * nj * dd];
    for (b, len) in ws.lengths().chunks_exact(nj).enumerate() {
        let j = (0..nj).fold(0, |m, j| if len[j] > len[m] { j } else { m });
        let at = (b * nj + j) * dd;
        caps[at..at + dd].copy_from_slice(&ws.digit_caps()[at..at + dd]);
    }
    let rec = model.reconstruct(&params, &caps).unwrap();
    assert_eq!(rec, ws.reconstruction());
    let err = model
        .reconstruct(&params, &caps[1..])
        .unwrap_err()
        .to_string();
    assert!(err.contains("reconstruct"), "{err}");
}
