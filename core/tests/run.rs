//! The run lifecycle both the trainer and the coordinator use: each `--resume` policy of the
//! table in `capsnet_core::run` against an empty directory, a full checkpoint, one without Adam
//! state, and one of another network.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

use std::path::Path;

use capsnet_core::checkpoint::{Checkpointer, DataPosition};
use capsnet_core::net::Net;
use capsnet_core::run::{Resume, Run, RunState};
use capsnet_core::train::TrainConfig;
use capsnet_core::{CapsNetConfig, CoreError};

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
    let model = Net::new(&cfg.model, None).unwrap();
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
    Run::open(cfg, &Net::new(&cfg.model, None).unwrap(), resume)
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
    let fresh = RunState::fresh(&Net::new(&cfg.model, None).unwrap(), &cfg);
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

/// `write_checkpoint`'s state at step `step`, saved with the run's checkpointer.
fn save_at(cfg: &TrainConfig, step: u64) -> RunState {
    let model = Net::new(&cfg.model, None).unwrap();
    let mut state = RunState::fresh(&model, cfg);
    state.params.data.iter_mut().for_each(|p| *p += step as f32);
    state.step = step;
    Checkpointer::new(&cfg.run_dir, 5)
        .save(&state.checkpoint(cfg, true))
        .unwrap();
    state
}

/// A newest checkpoint that was damaged after it was written (a flipped byte in its tensors,
/// caught by the checksum in its metadata) or holds a non-finite value is skipped: the run
/// resumes from the newest one that verifies. When none does, the error names the damage.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_an_older_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let good = save_at(&cfg, 3);
    save_at(&cfg, 5);
    let newest = cfg.run_dir.join("checkpoint-5.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();
    let e = capsnet_core::checkpoint::Checkpoint::load(&newest, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("do not match their checksum"), "{e}");

    for policy in [Resume::Required, Resume::IfAny] {
        let run = open(&cfg, policy).unwrap();
        assert_eq!(run.state.step, 3);
        assert_eq!(run.state.params.data, good.params.data);
        assert!(
            run.resumed_from
                .unwrap()
                .ends_with("checkpoint-3.safetensors")
        );
    }

    // A state written with a NaN in it (checksummed as it was) is not resumed either.
    let model = Net::new(&cfg.model, None).unwrap();
    let mut nan = RunState::fresh(&model, &cfg);
    nan.step = 9;
    nan.adam.v[4] = f32::NAN;
    Checkpointer::new(&cfg.run_dir, 5)
        .save(&nan.checkpoint(&cfg, true))
        .unwrap();
    let run = open(&cfg, Resume::IfAny).unwrap();
    assert_eq!(run.state.step, 3);

    // Nothing good left: the newest one's error.
    for step in [3, 9] {
        std::fs::write(
            cfg.run_dir.join(format!("checkpoint-{step}.safetensors")),
            b"junk",
        )
        .unwrap();
    }
    let e = open(&cfg, Resume::IfAny).err().unwrap();
    assert!(e.to_string().contains("checkpoint-9"), "{e}");
}

/// Temporary files that a crash left in the run directory are removed when the run opens;
/// other files stay.
#[test]
fn leftover_temporary_files_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    let leftovers = [".checkpoint-40.safetensors.tmp-4242", ".config.json.tmp-17"];
    let kept = ["notes.txt", ".hidden", "a.tmp-x"];
    for f in leftovers.iter().chain(&kept) {
        std::fs::write(cfg.run_dir.join(f), b"x").unwrap();
    }
    open(&cfg, Resume::IfAny).unwrap();
    for f in leftovers {
        assert!(!cfg.run_dir.join(f).exists(), "{f} is still there");
    }
    for f in kept {
        assert!(cfg.run_dir.join(f).exists(), "{f} was removed");
    }
}
