//! The trainer end to end on a tiny network and synthetic data: determinism, resume, learning,
//! and configuration errors.

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
