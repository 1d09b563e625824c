//! The trainer end to end on a tiny network and synthetic data: determinism, resume, learning,
//! and configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

use std::path::Path;

use capsnet_core::CapsNetConfig;
use capsnet_core::checkpoint::{Checkpoint, list_checkpoints};
use capsnet_core::data::write_synthetic;
use capsnet_core::train::{self, Silent, TrainConfig};

fn config(data: &Path, run: &Path) -> TrainConfig {
    TrainConfig {
        model: CapsNetConfig::tiny(),
        data_dir: data.to_path_buf(),
        run_dir: run.to_path_buf(),
        batch_size: 8,
        epochs: 2,
        seed: 3,
        threads: 2,
        log_every: 1,
        max_shift: 1,
        eval_batch_size: 16,
        ..TrainConfig::default()
    }
}

fn synthetic(dir: &Path) {
    write_synthetic(dir, 48, 24, 12, 3, 1).unwrap();
}

fn train_losses(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap().to_bits())
        .collect()
}

#[test]
fn same_seed_and_threads_give_bit_identical_losses() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let a = train::train(
        &config(tmp.path(), &tmp.path().join("a")),
        false,
        &mut Silent,
    )
    .unwrap();
    let b = train::train(
        &config(tmp.path(), &tmp.path().join("b")),
        false,
        &mut Silent,
    )
    .unwrap();
    let (la, lb) = (
        train_losses(&tmp.path().join("a")),
        train_losses(&tmp.path().join("b")),
    );
    assert_eq!(la.len(), 12, "6 steps per epoch x 2 epochs");
    assert_eq!(la, lb);
    assert_eq!(a.params.data, b.params.data);
    // A different seed gives a different run.
    let mut c = config(tmp.path(), &tmp.path().join("c"));
    c.seed = 4;
    train::train(&c, false, &mut Silent).unwrap();
    assert_ne!(train_losses(&tmp.path().join("c")), la);
}

#[test]
fn resume_continues_exactly_where_the_checkpoint_left_off() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    // Straight through: 9 steps (into the second epoch).
    let mut straight = config(tmp.path(), &tmp.path().join("straight"));
    straight.max_steps = Some(9);
    let full = train::train(&straight, false, &mut Silent).unwrap();
    // Stopped after 4 steps (mid-epoch), then resumed to 9.
    let mut first = config(tmp.path(), &tmp.path().join("split"));
    first.max_steps = Some(4);
    let part = train::train(&first, false, &mut Silent).unwrap();
    assert_eq!(part.steps, 4);
    let ck = Checkpoint::load(part.checkpoint.as_ref().unwrap(), None).unwrap();
    assert_eq!((ck.step, ck.position.epoch, ck.position.offset), (4, 0, 32));
    let mut second = first.clone();
    second.max_steps = Some(9);
    let resumed = train::train(&second, true, &mut Silent).unwrap();
    assert_eq!(resumed.steps, 9);
    assert_eq!(
        resumed.params.data, full.params.data,
        "resumed run differs from the straight one"
    );
    assert_eq!(
        train_losses(&tmp.path().join("split")),
        train_losses(&tmp.path().join("straight"))
    );
}

/// `--ema-decay`: the average in the checkpoint is the warmed-up moving average of the weights
/// after every step (recomputed here from one checkpoint per step), it survives a resume
/// exactly, and each evaluation reports it.
#[test]
fn the_weight_average_follows_every_step_and_survives_resume() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let decay = 0.9f32;
    let mut straight = config(tmp.path(), &tmp.path().join("straight"));
    (straight.max_steps, straight.ema_decay) = (Some(5), Some(decay));
    (straight.checkpoint_every, straight.keep_checkpoints) = (1, 10);
    let out = train::train(&straight, false, &mut Silent).unwrap();
    let model = capsnet_core::CapsNet::new(straight.model.clone()).unwrap();
    let mut want = model.init_params(straight.seed).data;
    let mut last = None;
    for (step, path) in list_checkpoints(&straight.run_dir).unwrap() {
        let ck = Checkpoint::load(&path, None).unwrap();
        let d = decay.min((1.0 + step as f32) / (10.0 + step as f32));
        for (e, p) in want.iter_mut().zip(&ck.params.data) {
            *e = d * *e + (1.0 - d) * *p;
        }
        assert_eq!(ck.ema.as_ref(), Some(&want), "average after step {step}");
        last = Some(ck);
    }
    let last = last.unwrap();
    assert_eq!(last.step, 5);
    assert_ne!(last.ema.as_ref(), Some(&last.params.data));
    let ema_eval = out.last_ema_eval.expect("no evaluation of the average");
    let line = std::fs::read_to_string(straight.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["kind"] == "eval")
        .unwrap();
    assert_eq!(line["ema_test_accuracy"].as_f64(), Some(ema_eval.accuracy));
    assert_eq!(
        line["test_accuracy"].as_f64(),
        Some(out.last_eval.unwrap().accuracy)
    );
    // `capsnet eval --ema` scores the average; the file's weights are scored without it.
    let ck_path = out.checkpoint.unwrap();
    let avg =
        train::evaluate_checkpoint(&ck_path, tmp.path(), 16, 2, true, Default::default()).unwrap();
    assert_eq!(avg.test, ema_eval);
    assert_eq!((avg.test_set, avg.affine), ("as is", None));

    // Stopped after 2 steps and resumed to 5: the same average, bit for bit.
    let mut first = straight.clone();
    first.run_dir = tmp.path().join("split");
    first.max_steps = Some(2);
    train::train(&first, false, &mut Silent).unwrap();
    first.max_steps = Some(5);
    let resumed = train::train(&first, true, &mut Silent).unwrap();
    let ck = Checkpoint::load(resumed.checkpoint.as_ref().unwrap(), None).unwrap();
    assert_eq!(ck.ema, last.ema);

    // A run without the average has none to evaluate, and says so.
    let mut plain = config(tmp.path(), &tmp.path().join("plain"));
    plain.max_steps = Some(1);
    let p = train::train(&plain, false, &mut Silent).unwrap();
    assert!(p.last_ema_eval.is_none());
    let e = train::evaluate_checkpoint(
        p.checkpoint.as_ref().unwrap(),
        tmp.path(),
        16,
        2,
        true,
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no weight average") && e.contains("--ema-decay"),
        "{e}"
    );

    // Resumed with --ema-decay, that run starts its average from the checkpoint's weights.
    plain.ema_decay = Some(decay);
    plain.max_steps = Some(2);
    let resumed = train::train(&plain, true, &mut Silent).unwrap();
    let at_1 = Checkpoint::load(p.checkpoint.as_ref().unwrap(), None).unwrap();
    let at_2 = Checkpoint::load(resumed.checkpoint.as_ref().unwrap(), None).unwrap();
    let d = decay.min(3.0 / 12.0);
    let want: Vec<f32> = at_1
        .params
        .data
        .iter()
        .zip(&at_2.params.data)
        .map(|(a, b)| d * a + (1.0 - d) * b)
        .collect();
    assert_eq!(at_2.ema, Some(want));
}

#[test]
fn resume_without_a_checkpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let e = train::train(
        &config(tmp.path(), &tmp.path().join("empty")),
        true,
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

#[test]
fn the_tiny_network_learns_the_synthetic_classes() {
    let tmp = tempfile::tempdir().unwrap();
    write_synthetic(tmp.path(), 240, 60, 12, 3, 7).unwrap();
    let mut cfg = config(tmp.path(), &tmp.path().join("run"));
    cfg.epochs = 4;
    cfg.adam.lr = 1e-2;
    cfg.keep_checkpoints = 2;
    let out = train::train(&cfg, false, &mut Silent).unwrap();
    let acc = out.last_eval.unwrap().accuracy;
    assert!(
        acc > 0.8,
        "test accuracy {acc} after 4 epochs (chance is 0.33)"
    );
    // One checkpoint per epoch, the oldest two pruned.
    let kept: Vec<u64> = list_checkpoints(&tmp.path().join("run"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![90, 120]);
    let evals = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(evals.lines().filter(|l| l.contains("\"eval\"")).count(), 4);
    assert!(tmp.path().join("run/config.json").exists());
}

#[test]
fn bad_values_are_rejected_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let base = config(Path::new("/nonexistent"), &tmp.path().join("never"));
    let cases: Vec<(TrainConfig, &str)> = vec![
        (
            TrainConfig {
                batch_size: 0,
                ..base.clone()
            },
            "batch size",
        ),
        (
            TrainConfig {
                epochs: 0,
                ..base.clone()
            },
            "epochs",
        ),
        (
            TrainConfig {
                threads: 0,
                ..base.clone()
            },
            "threads",
        ),
        (
            TrainConfig {
                max_steps: Some(0),
                ..base.clone()
            },
            "max steps",
        ),
        (
            TrainConfig {
                max_shift: 6,
                ..base.clone()
            },
            "shift",
        ),
        (
            TrainConfig {
                adam: capsnet_core::optim::AdamConfig {
                    lr: 0.0,
                    ..Default::default()
                },
                ..base.clone()
            },
            "lr",
        ),
        (
            TrainConfig {
                model: CapsNetConfig {
                    routing_iters: 0,
                    ..CapsNetConfig::tiny()
                },
                ..base.clone()
            },
            "routing_iters",
        ),
        (
            TrainConfig {
                ema_decay: Some(1.0),
                ..base.clone()
            },
            "EMA decay",
        ),
    ];
    for (cfg, word) in cases {
        let e = train::train(&cfg, false, &mut Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains(word), "expected {word:?} in: {e}");
    }
    assert!(
        !tmp.path().join("never").exists(),
        "a rejected run created its run dir"
    );
}

/// A line torn by a crash (a process killed mid-write) is closed when the log is opened again,
/// so the resumed run's lines parse.
#[test]
fn a_torn_metrics_line_does_not_swallow_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"tra").unwrap();
    let mut log = train::MetricsLog::open(dir.path()).unwrap();
    log.write(&serde_json::json!({"kind": "train", "step": 2}))
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(parsed.len(), 2, "{text}");
    assert_eq!(parsed[1]["step"], 2);
}

/// `--canvas`: the model takes the canvas, training places images at random on it, evaluation
/// during training is the translated test set of seed 0 (the one `capsnet eval` scores by
/// default), and `--affine` adds the affine set.
#[test]
fn training_on_a_canvas_evaluates_on_the_translated_set() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let mut cfg = config(tmp.path(), &tmp.path().join("canvas"));
    train::TrainOverrides {
        canvas: Some(16),
        ..Default::default()
    }
    .apply(&mut cfg);
    assert_eq!((cfg.model.image_size, cfg.max_shift), (16, 0));
    cfg.epochs = 1;
    let out = train::train(&cfg, false, &mut Silent).unwrap();
    let ck_path = out.checkpoint.unwrap();
    let ck = Checkpoint::load(&ck_path, None).unwrap();
    assert_eq!(ck.config.image_size, 16);
    let sets = train::EvalSets {
        affine: Some(4),
        ..Default::default()
    };
    let e = train::evaluate_checkpoint(&ck_path, tmp.path(), 16, 2, false, sets).unwrap();
    assert_eq!(
        (e.test_set, e.image_size, e.test.samples),
        ("translated", 16, 24)
    );
    assert_eq!(e.test, out.last_eval.unwrap());
    let affine = e.affine.unwrap();
    assert_eq!(affine.samples, 24);
    assert_ne!(affine, e.test);
    // Another placement seed is another translated set.
    let other = train::EvalSets {
        placement_seed: 9,
        limit: Some(10),
        ..Default::default()
    };
    let o = train::evaluate_checkpoint(&ck_path, tmp.path(), 16, 2, false, other).unwrap();
    assert_eq!((o.test.samples, o.affine), (10, None));

    // What is refused, and how it is named.
    let mut shifted = cfg.clone();
    shifted.max_shift = 1;
    let err = shifted.validate().unwrap_err().to_string();
    assert!(err.contains("--max-shift 1"), "{err}");
    let mut mismatch = cfg.clone();
    mismatch.model.image_size = 20;
    let err = mismatch.validate().unwrap_err().to_string();
    assert!(err.contains("16x16") && err.contains("(20)"), "{err}");
    let mut small = config(tmp.path(), &tmp.path().join("small"));
    train::TrainOverrides {
        canvas: Some(11),
        ..Default::default()
    }
    .apply(&mut small);
    let err = train::train(&small, false, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("12x12 do not fit on the 11x11 canvas"),
        "{err}"
    );
}

/// The figures' numbers agree with evaluation: predictions score what `evaluate` scores, the
/// confusion matrix holds every image with the right ones on its diagonal, and a zero
/// perturbation decodes to the plain reconstruction.
#[test]
fn inspection_agrees_with_evaluation() {
    use capsnet_core::inspect;
    use capsnet_core::model::Workspace;
    use capsnet_core::{CapsNet, Mask};
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let mut cfg = config(tmp.path(), &tmp.path().join("i"));
    cfg.max_steps = Some(6);
    let out = train::train(&cfg, false, &mut Silent).unwrap();
    let ck = Checkpoint::load(out.checkpoint.as_ref().unwrap(), None).unwrap();
    let model = CapsNet::new(ck.config.clone()).unwrap();
    let test = match train::load_data(&cfg).unwrap().1 {
        train::TestSet::Images(ds) => ds,
        other => panic!("{other:?}"),
    };
    let mut ws = Workspace::new();
    let p = inspect::predict_all(&model, &ck.params, &test, 5, &mut ws).unwrap();
    let net = capsnet_core::net::Net::Caps(model.clone());
    let mut nws = capsnet_core::net::NetWorkspace::new();
    let set = train::TestSet::Images(test.clone());
    let e = train::evaluate(&net, &ck.params, &set, 16, &mut nws).unwrap();
    assert_eq!(p.accuracy(), e.accuracy);
    let k = p.classes;
    let counts = p.confusion();
    assert_eq!(counts.iter().sum::<u64>(), test.len() as u64);
    let diagonal: u64 = (0..k).map(|c| counts[c * k + c]).sum();
    assert_eq!(diagonal as f64 / test.len() as f64, e.accuracy);

    let rec = inspect::reconstructions(&model, &ck.params, &p, &[0, 3]).unwrap();
    let px = ck.config.pixels();
    // The forward pass decodes the predicted capsule the same way (up to the rounding of
    // BLAS at another batch size).
    let batch = capsnet_core::data::make_batch(&test, &[0, 3], None);
    model
        .forward(
            &ck.params,
            &batch.images,
            &batch.labels,
            Mask::Predicted,
            &mut ws,
        )
        .unwrap();
    let worst = rec
        .iter()
        .zip(ws.reconstruction())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "{worst}");
    let grid = inspect::perturbations(&model, &ck.params, &p, 3, &[0.0, 0.25]).unwrap();
    assert_eq!(grid.len(), p.dim * 2 * px);
    let gap = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    for d in 0..p.dim {
        let plain = &rec[px..2 * px];
        assert!(gap(&grid[(2 * d) * px..][..px], plain) < 1e-5, "dim {d}");
        assert!(
            gap(&grid[(2 * d + 1) * px..][..px], plain) > 1e-4,
            "dim {d}"
        );
    }
    assert_eq!(inspect::figure4_deltas().len(), 11);
}

/// The CNN baseline goes through the same trainer: stopped and resumed it ends with the bits
/// of a straight run (dropout keyed by seed, epoch and sample), and its checkpoint names it.
#[test]
fn the_cnn_baseline_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let cnn = |run: &str| {
        let mut cfg = config(tmp.path(), &tmp.path().join(run));
        // The capsule config gives the input side (12) and classes (3).
        train::TrainOverrides {
            model: Some(CapsNetConfig::tiny()),
            baseline: Some(capsnet_core::CnnConfig::default()),
            ..Default::default()
        }
        .apply(&mut cfg);
        let b = cfg.baseline.as_mut().unwrap();
        (b.conv_channels, b.kernel, b.fc_hidden) = (vec![4, 4, 3], 3, vec![8, 6]);
        cfg
    };
    let mut straight = cnn("straight");
    let b = straight.baseline.as_ref().unwrap();
    assert_eq!((b.image_size, b.classes), (12, 3));
    straight.max_steps = Some(5);
    let a = train::train(&straight, false, &mut Silent).unwrap();
    let mut split = cnn("split");
    split.max_steps = Some(2);
    train::train(&split, false, &mut Silent).unwrap();
    split.max_steps = Some(5);
    let b = train::train(&split, true, &mut Silent).unwrap();
    assert_eq!(a.params.data, b.params.data);
    assert!(a.last_eval.unwrap().accuracy >= 0.0);
    let ck = Checkpoint::load(b.checkpoint.as_ref().unwrap(), None).unwrap();
    assert_eq!(ck.baseline, split.baseline);
    // A capsule-network run cannot resume from it.
    let mut caps = config(tmp.path(), &tmp.path().join("split"));
    caps.max_steps = Some(6);
    let err = train::train(&caps, true, &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different network config"), "{err}");
}

/// `--multi`: the model's input grows by twice the shift, a run on overlapping pairs resumes
/// bit for bit (the pairs are drawn from the seed, epoch and sample alone), its evaluations
/// score the test pairs, and `capsnet eval --multi` scores the same pairs.
#[test]
fn training_on_overlapping_pairs_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path());
    let pairs = |run: &str| {
        let mut cfg = config(tmp.path(), &tmp.path().join(run));
        train::TrainOverrides {
            model: Some(CapsNetConfig::tiny()),
            multi: Some(2),
            ..Default::default()
        }
        .apply(&mut cfg);
        cfg
    };
    let mut straight = pairs("straight");
    assert_eq!((straight.model.image_size, straight.max_shift), (16, 0));
    assert_eq!(straight.inputs(), train::Inputs::Pairs(2));
    straight.max_steps = Some(5);
    let a = train::train(&straight, false, &mut Silent).unwrap();
    let mut split = pairs("split");
    split.max_steps = Some(2);
    train::train(&split, false, &mut Silent).unwrap();
    // Resuming with the flag given again keeps the input size.
    let mut again = TrainConfig::load(&tmp.path().join("split")).unwrap();
    train::TrainOverrides {
        multi: Some(2),
        max_steps: Some(5),
        ..Default::default()
    }
    .apply(&mut again);
    assert_eq!(again.model.image_size, 16);
    let b = train::train(&again, true, &mut Silent).unwrap();
    assert_eq!(a.params.data, b.params.data);
    assert_eq!(
        train_losses(&tmp.path().join("split")),
        train_losses(&tmp.path().join("straight"))
    );
    let e = b.last_eval.unwrap();
    assert_eq!(e.samples, 24);

    let sets = train::EvalSets {
        multi: true,
        ..Default::default()
    };
    let ck = b.checkpoint.unwrap();
    let r = train::evaluate_checkpoint(&ck, tmp.path(), 16, 1, false, sets).unwrap();
    assert_eq!(
        (r.test_set, r.image_size, r.pair_shift),
        ("translated", 16, Some(2))
    );
    let p = r.pairs.unwrap();
    assert_eq!(p.samples, 24);
    assert!((p.accuracy - e.accuracy).abs() < 1e-12, "{p:?} {e:?}");
    assert!((p.margin_loss - e.margin_loss).abs() < 1e-5, "{p:?} {e:?}");
}

/// The tiny network tells both classes of an overlapping pair apart well above chance (a third
/// of the pairs when guessing two of three classes).
#[test]
fn the_tiny_network_learns_overlapping_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    write_synthetic(tmp.path(), 240, 60, 12, 3, 7).unwrap();
    let mut cfg = config(tmp.path(), &tmp.path().join("run"));
    train::TrainOverrides {
        model: Some(CapsNetConfig::tiny()),
        multi: Some(1),
        ..Default::default()
    }
    .apply(&mut cfg);
    (cfg.epochs, cfg.adam.lr) = (4, 1e-2);
    let out = train::train(&cfg, false, &mut Silent).unwrap();
    let acc = out.last_eval.unwrap().accuracy;
    assert!(acc > 0.7, "both classes right on {acc} of the test pairs");
}

/// `--multi` with a canvas, a shift augmentation or a shift that leaves no image is refused.
#[test]
fn bad_pair_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = config(Path::new("/nonexistent"), &tmp.path().join("never"));
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = base.clone();
        (c.multi, c.max_shift) = (Some(2), 0);
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    let e = with(&|c| c.canvas = Some(12));
    assert!(e.contains("--canvas"), "{e}");
    let e = with(&|c| c.max_shift = 1);
    assert!(e.contains("--max-shift 1"), "{e}");
    let e = with(&|c| c.multi = Some(6));
    assert!(e.contains("--multi 6"), "{e}");
    let e = train::train(
        &TrainConfig {
            multi: Some(2),
            max_shift: 0,
            ..base.clone()
        },
        false,
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent"), "{e}");
}
