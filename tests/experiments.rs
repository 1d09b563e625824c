//! The paper's experiments from the command line: `--canvas` training (single process and a
//! launched fleet), `capsnet eval --affine`, and `capsnet figures`. Tiny networks, synthetic
//! 28x28 data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;

use capsnet_core::checkpoint::{Checkpoint, latest_checkpoint};
use common::*;

fn eval_json(ck: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let out = capsnet()
        .arg("eval")
        .arg("--checkpoint")
        .arg(ck)
        .arg("--data-dir")
        .arg(data)
        .args(["--json", "--threads", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A fleet trains on a 36x36 canvas (the coordinator tells the workers), and `capsnet eval
/// --affine` scores its checkpoint on the translated and the affine test sets.
#[test]
fn a_fleet_trains_on_a_canvas_and_eval_scores_the_affine_set() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let run = tmp.path().join("run");
    let out = capsnet()
        .env_remove("CAPSNET_TOKEN")
        .args([
            "launch",
            "--workers",
            "2",
            "--model",
            "tiny",
            "--canvas",
            "36",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
        ])
        .arg("--data-dir")
        .arg(&d)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let ck = latest_checkpoint(&run).unwrap().unwrap();
    assert_eq!(Checkpoint::load(&ck, None).unwrap().config.image_size, 36);

    let e = eval_json(&ck, &d, &["--affine", "--seed", "5"]);
    assert_eq!(e["test_set"], "translated");
    assert_eq!(e["image_size"], 36);
    assert_eq!(e["samples"], 16);
    assert_eq!(e["affine"]["samples"], 16);
    let acc = e["affine"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // The same seed gives the same numbers.
    assert_eq!(eval_json(&ck, &d, &["--affine", "--seed", "5"]), e);

    // Text output names both sets.
    let out = capsnet()
        .arg("eval")
        .arg("--checkpoint")
        .arg(&ck)
        .arg("--data-dir")
        .arg(&d)
        .arg("--affine")
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("translated test set (36x36, seed 0)")
            && text.contains("affine test set (36x36, seed 0)"),
        "{text}"
    );
}

/// `capsnet train --canvas` refuses what cannot work before it starts, naming the flag.
#[test]
fn canvas_flags_that_cannot_work_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 16);
    let train = |extra: &[&str]| {
        capsnet()
            .args(["train", "--model", "tiny", "--max-steps", "1"])
            .arg("--data-dir")
            .arg(&d)
            .arg("--run-dir")
            .arg(tmp.path().join("run"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = train(&["--canvas", "36", "--max-shift", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("--max-shift 2"));
    let out = train(&["--canvas", "20"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("28x28 do not fit on the 20x20 canvas"),
        "{}",
        output_text(&out)
    );
    let out = train(&["--canvas", "32", "--batch-size", "4"]);
    assert!(out.status.success(), "{}", output_text(&out));
}
