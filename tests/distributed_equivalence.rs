//! Distributed training computes what one process computes: real coordinator and worker
//! processes on loopback, a tiny network, synthetic 28x28 data, compared with the
//! single-process reference in `common/reference.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsnet_core::checkpoint::Checkpoint;
use capsnet_core::optim::{Adam, ema_update};
use common::reference::{Reference, worst};
use common::*;

/// Runs 3 rounds of 2 workers with batch 4 of `model` (plus `extra` coordinator flags) and
/// returns the run dir.
fn three_rounds(
    tmp: &Path,
    d: &Path,
    name: &str,
    model: &str,
    extra: &[&str],
    worker_extra: &[&str],
) -> PathBuf {
    let run = tmp.join(name);
    let (data, run_arg) = (d.display().to_string(), run.display().to_string());
    let (mut coord, url) = coordinator(
        tmp,
        name,
        &[
            "--data-dir",
            &data,
            "--run-dir",
            &run_arg,
            "--model",
            model,
            "--threads",
            "1",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--max-shift",
            "0",
            "--seed",
            "11",
            "--ema-decay",
            "0.5",
            "--expect-workers",
            "2",
            "--min-workers",
            "2",
            // Many chunks, so that workers that overlap send them out of order.
            "--chunk-bytes",
            "4096",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
    );
    let mut w0 = worker(tmp, &url, 0, d, worker_extra);
    let mut w1 = worker(tmp, &url, 1, d, worker_extra);
    coord.expect_success(Duration::from_secs(120));
    w0.expect_success(Duration::from_secs(30));
    w1.expect_success(Duration::from_secs(30));
    run
}

/// 2 workers with batch b each in grad mode give, after 3 rounds, the parameters (and weight
/// average) of one process training with batch 2b on the same samples; and a second run gives
/// the same bits.
#[test]
fn two_workers_equal_one_process_with_the_summed_batch() {
    summed_batch_equivalence("tiny", &[]);
}

/// The same on overlapping pairs (`--multi`): the workers draw the pairs one process draws.
#[test]
fn two_workers_train_on_overlapping_pairs_as_one_process() {
    summed_batch_equivalence("tiny", &["--multi", "2"]);
}

/// The same for the CNN baseline, whose dropout masks are keyed by sample: the workers draw
/// what one process draws.
#[test]
fn two_workers_train_the_cnn_baseline_as_one_process() {
    summed_batch_equivalence("cnn-tiny", &[]);
}

fn summed_batch_equivalence(model: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let run = three_rounds(tmp.path(), &d, "run", model, extra, &[]);

    // The same three steps in one process, on both workers' samples at once.
    let mut reference = Reference::of_run(&run, &d, 2, 4);
    let mut params = reference.init();
    let mut adam = Adam::new(reference.cfg.adam.clone(), params.data.len());
    let mut ema = params.data.clone();
    for r in 0..3 {
        let idx = [reference.work(0, r), reference.work(1, r)].concat();
        assert_eq!(idx.len(), 8);
        let grads = reference.gradient(&params, &idx);
        adam.update(&mut params.data, &grads.data).unwrap();
        ema_update(&mut ema, &params.data, 0.5, r + 1);
    }
    reference.assert_trained(&params);

    let ck = Checkpoint::load(&run.join("checkpoint-3.safetensors"), None).unwrap();
    assert_eq!(ck.step, 3);
    // Three Adam steps move a parameter by up to 3e-3; the two sums differ only in rounding.
    let w = worst(&params.data, &ck.params.data);
    assert!(
        w < 1e-5,
        "distributed and single-process parameters differ by {w}"
    );
    let w = worst(&ema, ck.ema.as_deref().expect("no weight average"));
    assert!(w < 1e-5, "the weight averages differ by {w}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("\"eval\"") && l.contains("ema_test_accuracy")),
        "no evaluation of the weight average:\n{metrics}"
    );

    // The reduction does not depend on which update arrives first, nor on whether the workers
    // send each range as the backward pass finishes it (the default) or the whole gradient at
    // the end: same seed, same bits.
    let again = three_rounds(tmp.path(), &d, "again", model, extra, &["--no-overlap"]);
    let ck2 = Checkpoint::load(&again.join("checkpoint-3.safetensors"), None).unwrap();
    assert!(
        ck.params
            .data
            .iter()
            .zip(&ck2.params.data)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "two runs differ"
    );
    assert_eq!(ck.ema, ck2.ema, "two runs' weight averages differ");
}

/// `--sync params --sync-every 2`: each worker takes two local Adam steps (its optimizer kept
/// across rounds) from the round's parameters, and the coordinator's new parameters are the
/// sample-weighted average of the workers', over two rounds.
#[test]
fn params_mode_averages_local_steps() {
    params_mode_equals_the_reference(None);
}

/// The same with `--outer-optimizer nesterov --outer-lr 0.7 --outer-momentum 0.9`: the
/// coordinator's new parameters are its old ones minus 0.7 x (g + 0.9 m'), where g is the old
/// parameters minus the workers' average and m' = 0.9 m + g, and its checkpoint holds m'.
#[test]
fn params_mode_with_the_outer_optimizer_follows_nesterov() {
    params_mode_equals_the_reference(Some((0.7, 0.9)));
}

/// Two workers in params mode, two rounds of two local steps, against the single-process
/// reference, with the outer optimizer's (lr, momentum) if given.
fn params_mode_equals_the_reference(outer: Option<(f32, f32)>) {
    let (lr, mu) = outer.unwrap_or((1.0, 0.0));
    let (lr_s, mu_s) = (lr.to_string(), mu.to_string());
    let mut extra = vec![];
    if outer.is_some() {
        extra = vec![
            "--outer-optimizer",
            "nesterov",
            "--outer-lr",
            &lr_s,
            "--outer-momentum",
            &mu_s,
        ];
    }
    let mut args = vec![
        "--sync",
        "params",
        "--sync-every",
        "2",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--max-shift",
        "0",
        "--seed",
        "5",
        "--expect-workers",
        "2",
        "--min-workers",
        "2",
    ];
    args.extend(extra);
    let mut s = Setup::start(64, &args);
    let mut w0 = s.worker(0, &[]);
    let mut w1 = s.worker(1, &[]);
    s.coord.expect_success(Duration::from_secs(120));
    w0.expect_success(Duration::from_secs(30));
    w1.expect_success(Duration::from_secs(30));

    // Each member's round is 2 local steps of batch 4.
    let mut reference = Reference::of_run(&s.run, &s.data, 2, 8);
    let mut global = reference.init();
    let mut local_adam: Vec<Adam> = (0..2)
        .map(|_| Adam::new(reference.cfg.adam.clone(), global.data.len()))
        .collect();
    let mut last_locals = vec![];
    let mut momentum = vec![0.0f32; global.data.len()];
    for r in 0..2 {
        let mut locals = vec![];
        for (k, adam) in local_adam.iter_mut().enumerate() {
            let mut p = global.clone();
            let idx = reference.work(k, r);
            assert_eq!(idx.len(), 8);
            for b in idx.chunks(4) {
                let grads = reference.gradient(&p, b);
                adam.update(&mut p.data, &grads.data).unwrap();
            }
            locals.push(p);
        }
        // Equal samples: weight 1/2 each, summed from zero in rank order.
        let w = (8.0f64 / 16.0) as f32;
        for (i, p) in global.data.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for l in &locals {
                acc += w * l.data[i];
            }
            if outer.is_some() {
                let g = *p - acc;
                momentum[i] = mu * momentum[i] + g;
                *p -= lr * (g + mu * momentum[i]);
            } else {
                *p = acc;
            }
        }
        last_locals = locals;
    }
    reference.assert_trained(&global);

    let ck = Checkpoint::load(&s.run.join("checkpoint-2.safetensors"), None).unwrap();
    // The workers run one thread and this reference the test's pool: sums inside the passes
    // round differently (by about 1e-8), nothing more.
    let w = worst(&global.data, &ck.params.data);
    assert!(
        w < 1e-6,
        "distributed and reference parameters differ by {w}"
    );
    // And the check can tell: each worker's own parameters are far from the average.
    let apart = worst(&global.data, &last_locals[0].data);
    assert!(apart > 1e-4, "the workers barely differ ({apart})");
    match outer {
        Some(_) => {
            let m = ck.outer.expect("the checkpoint holds the outer momentum");
            let w = worst(&momentum, &m);
            assert!(w < 1e-6, "outer momentum differs by {w}");
        }
        None => assert!(ck.outer.is_none()),
    }
}
