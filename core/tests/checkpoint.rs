//! Checkpoint files: round trips, parameters-only files, and every kind of mismatch.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

use capsnet_core::checkpoint::{
    Checkpoint, Checkpointer, DataPosition, Tensor, TensorFile, latest_checkpoint, list_checkpoints,
};
use capsnet_core::optim::{Adam, AdamConfig};
use capsnet_core::{CapsNet, CapsNetConfig};

fn sample() -> Checkpoint {
    let cfg = CapsNetConfig::tiny();
    let model = CapsNet::new(cfg.clone()).unwrap();
    let params = model.init_params(1);
    let mut adam = Adam::new(AdamConfig::default(), params.data.len());
    let mut p = params.clone();
    let g: Vec<f32> = (0..p.data.len()).map(|i| (i % 7) as f32 - 3.0).collect();
    adam.update(&mut p.data, &g).unwrap();
    let ema = p.data.iter().map(|x| 0.5 * x).collect();
    let outer = p.data.iter().map(|x| 0.25 * x).collect();
    Checkpoint {
        config: cfg,
        baseline: None,
        params: p,
        adam: Some(adam),
        ema: Some(ema),
        outer: Some(outer),
        step: 1,
        position: DataPosition {
            epoch: 2,
            offset: 40,
            redo: vec![(4, 8), (16, 20)],
        },
    }
}

#[test]
fn round_trip_keeps_everything_and_the_design_names() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.safetensors");
    let ck = sample();
    ck.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path, None).unwrap(), ck);
    let f = TensorFile::read(&path).unwrap();
    for name in [
        "conv1.weight",
        "primary.bias",
        "digit.weight",
        "decoder.2.bias",
        "adam.m.digit.weight",
        "adam.v.conv1.bias",
        "ema.digit.weight",
        "outer.m.decoder.0.weight",
    ] {
        assert!(f.tensors.contains_key(name), "{name} missing");
    }
    assert_eq!(f.tensors["digit.weight"].shape(), &[32, 3, 5, 4]);
    assert!(
        !tmp.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp"))
    );
}

#[test]
fn a_parameters_only_file_loads_without_optimizer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("p.safetensors");
    let ck = sample();
    let mut f = ck.to_file().unwrap();
    f.tensors.retain(|n, _| {
        !n.starts_with("adam.") && !n.starts_with("ema.") && !n.starts_with("outer.")
    });
    f.metadata.clear();
    f.write(&path).unwrap();
    // Without metadata the config must be supplied (the paper's by default).
    let loaded = Checkpoint::load(&path, Some(&CapsNetConfig::tiny())).unwrap();
    assert_eq!(loaded.params, ck.params);
    assert!(loaded.adam.is_none() && loaded.ema.is_none());
    let e = Checkpoint::load(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("shape"),
        "tiny weights against the paper's shapes: {e}"
    );
}

fn assert_load_error(f: &TensorFile, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.safetensors");
    f.write(&path).unwrap();
    let e = Checkpoint::load(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors"),
        "error does not name the file: {e}"
    );
    for w in words {
        assert!(e.contains(w), "expected {w:?} in: {e}");
    }
}

#[test]
fn mismatches_are_errors_that_name_the_tensor() {
    let good = sample().to_file().unwrap();
    let mut f = good.clone();
    f.tensors.remove("primary.weight");
    assert_load_error(&f, &["missing parameters", "primary.weight"]);
    let mut f = good.clone();
    f.tensors.insert(
        "conv1.weight".into(),
        Tensor::f32(vec![6, 1, 3], vec![0.0; 18]),
    );
    assert_load_error(&f, &["conv1.weight", "shape"]);
    let mut f = good.clone();
    f.tensors
        .insert("conv2.weight".into(), Tensor::f32(vec![1], vec![0.0]));
    assert_load_error(&f, &["conv2.weight"]);
    let mut f = good.clone();
    f.tensors.remove("adam.v.digit.weight");
    assert_load_error(&f, &["adam.v.digit.weight"]);
    let mut f = good.clone();
    f.tensors.remove("ema.primary.bias");
    assert_load_error(&f, &["weight average", "ema.primary.bias"]);
    let mut f = good.clone();
    f.tensors
        .insert("ema.conv1.bias".into(), Tensor::f32(vec![2], vec![0.0; 2]));
    assert_load_error(&f, &["ema.conv1.bias", "shape"]);
    for bad in ["4-8,6-9", "8-4", "x-3", "4", "4-8,,"] {
        let mut f = good.clone();
        f.metadata.insert("epoch_redo".into(), bad.into());
        assert_load_error(&f, &["epoch_redo", bad]);
    }
    let mut f = good.clone();
    f.metadata.insert("step".into(), "many".into());
    assert_load_error(&f, &["step"]);
    let mut f = good;
    f.metadata.insert("config".into(), "{not json".into());
    assert_load_error(&f, &["config"]);
}

#[test]
fn garbage_and_missing_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("junk.safetensors");
    std::fs::write(&path, b"definitely not safetensors").unwrap();
    let e = Checkpoint::load(&path, None).unwrap_err().to_string();
    assert!(e.contains("junk.safetensors"), "{e}");
    let e = Checkpoint::load(&tmp.path().join("absent.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn checkpointer_keeps_the_newest_n() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpointer::new(tmp.path(), 2);
    let mut ck = sample();
    for step in [5, 10, 15, 20] {
        ck.step = step;
        ckpt.save(&ck).unwrap();
    }
    let names: Vec<String> = {
        let mut v: Vec<String> = tmp
            .path()
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        vec!["checkpoint-15.safetensors", "checkpoint-20.safetensors"]
    );
    assert_eq!(
        latest_checkpoint(tmp.path()).unwrap().unwrap(),
        tmp.path().join("checkpoint-20.safetensors")
    );
}

/// Something named like a checkpoint that is not a file (here a folder) is neither a checkpoint
/// nor pruned, and does not make later saves fail.
#[test]
fn a_folder_named_like_a_checkpoint_is_not_one() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("checkpoint-1.safetensors")).unwrap();
    let ckpt = Checkpointer::new(tmp.path(), 1);
    let mut ck = sample();
    for step in [2, 3] {
        ck.step = step;
        ckpt.save(&ck).unwrap();
    }
    assert_eq!(
        list_checkpoints(tmp.path()).unwrap(),
        vec![(3, tmp.path().join("checkpoint-3.safetensors"))]
    );
    assert!(tmp.path().join("checkpoint-1.safetensors").is_dir());
}
