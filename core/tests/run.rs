//! The run lifecycle both the trainer and the coordinator use: each `--resume` policy of the
//! table in `capsnet_core::run` against an empty directory, a full checkpoint, one without Adam
//! state, and one of another network.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

use std::path::Path;

use capsnet_core::checkpoint::{Checkpointer, DataPosition};
use capsnet_core::run::{Resume, Run, RunState};
use capsnet_core::train::TrainConfig;
use capsnet_core::{CapsNet, CapsNetConfig, CoreError};

fn config(run: &Path) -> TrainConfig {
    TrainConfig {
        model: CapsNetConfig::tiny(),
        run_dir: run.to_path_buf(),
        seed: 5,
        ema_decay: Some(0.9),
        ..TrainConfig::default()
    }
}

/// A checkpoint at step 7 whose weights, moments and position differ from a fresh start.
fn write_checkpoint(cfg: &TrainConfig, with_adam: bool, with_ema: bool) -> RunState {
    let model = CapsNet::new(cfg.model.clone()).unwrap();
    let mut state = RunState::fresh(&model, cfg);
    state.params.data.iter_mut().for_each(|p| *p += 0.25);
    state.adam.m.fill(0.5);
    state.adam.step = 7;
    state.step = 7;
    state.position = DataPosition {
        epoch: 1,
        offset: 16,
        redo: vec![(2, 4)],
    };
    state.ema = with_ema.then(|| vec![0.125; state.params.data.len()]);
    Checkpointer::new(&cfg.run_dir, 3)
        .save(&state.checkpoint(cfg, with_adam))
        .unwrap();
    state
}

fn open(cfg: &TrainConfig, resume: Resume) -> Result<Run, CoreError> {
    Run::open(cfg, &CapsNet::new(cfg.model.clone()).unwrap(), resume)
}

fn new_run() -> Resume {
    Resume::No {
        how: "--resume DIR".into(),
    }
}

#[test]
fn a_new_run_starts_fresh_and_refuses_a_directory_with_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("run"));
    let run = open(&cfg, new_run()).unwrap();
    let fresh = RunState::fresh(&CapsNet::new(cfg.model.clone()).unwrap(), &cfg);
    assert_eq!(run.state.params.data, fresh.params.data);
    assert_eq!(run.state.ema.as_deref(), Some(&fresh.params.data[..]));
    assert_eq!((run.state.step, run.resumed_from), (0, None));
    let written: TrainConfig = TrainConfig::load(&cfg.run_dir).unwrap();
    assert_eq!(written, cfg, "config.json holds the effective config");

    write_checkpoint(&cfg, true, true);
    let e = open(&cfg, new_run()).err().unwrap();
    assert!(e.is_config(), "{e:?}");
    assert!(e.to_string().contains("--resume DIR"), "{e}");
}

#[test]
fn both_policies_continue_a_full_checkpoint() {
    for policy in [Resume::Required, Resume::IfAny] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        let saved = write_checkpoint(&cfg, true, true);
        cfg.adam.lr = 0.05; // the run's Adam settings win over the stored ones
        let run = open(&cfg, policy.clone()).unwrap();
        let s = &run.state;
        assert_eq!(s.params.data, saved.params.data, "{policy:?}");
        assert_eq!((s.adam.step, s.adam.m[0], s.adam.config.lr), (7, 0.5, 0.05));
        assert_eq!((s.step, &s.position), (7, &saved.position));
        assert_eq!(s.ema, saved.ema);
        assert!(
            run.resumed_from
                .unwrap()
                .ends_with("checkpoint-7.safetensors")
        );
    }
}

#[test]
fn the_policies_differ_on_a_missing_checkpoint_or_missing_adam_state() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let e = open(&cfg, Resume::Required).err().unwrap();
    assert!(e.to_string().contains("no checkpoint"), "{e}");
    let run = open(&cfg, Resume::IfAny).unwrap();
    assert_eq!((run.state.step, run.resumed_from), (0, None));

    let saved = write_checkpoint(&cfg, false, false);
    let e = open(&cfg, Resume::Required).err().unwrap();
    assert!(e.to_string().contains("no optimizer state"), "{e}");
    let run = open(&cfg, Resume::IfAny).unwrap();
    assert_eq!(run.state.params.data, saved.params.data);
    assert_eq!((run.state.step, run.state.adam.step), (7, 0));
    assert!(run.state.adam.m.iter().all(|&m| m == 0.0), "fresh moments");
    // The run keeps an average the checkpoint lacks: it starts at the checkpoint's weights.
    assert_eq!(run.state.ema.as_deref(), Some(&saved.params.data[..]));
}

#[test]
fn a_checkpoint_of_another_network_is_a_configuration_error_for_both() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    write_checkpoint(&cfg, true, true);
    let other = TrainConfig {
        model: CapsNetConfig {
            digit_dim: 6,
            ..CapsNetConfig::tiny()
        },
        ..cfg
    };
    for policy in [Resume::Required, Resume::IfAny] {
        let e = open(&other, policy).err().unwrap();
        assert!(e.is_config(), "{e:?}");
        assert!(e.to_string().contains("different network config"), "{e}");
    }
}
