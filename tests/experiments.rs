//! The paper's experiments from the command line: `--canvas` training (single process and a
//! launched fleet), `capsnet eval --affine`, and `capsnet figures`. Tiny networks, synthetic
//! 28x28 data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;

use capsnet_core::checkpoint::{Checkpoint, latest_checkpoint};
use common::*;

/// `capsnet SUB --checkpoint CK --data-dir DATA`, for `eval` and `figures`.
fn on_checkpoint(sub: &str, ck: &Path, data: &Path) -> std::process::Command {
    let mut c = capsnet();
    c.arg(sub)
        .arg("--checkpoint")
        .arg(ck)
        .arg("--data-dir")
        .arg(data);
    c
}

fn eval_json(ck: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let out = on_checkpoint("eval", ck, data)
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
    let out = on_checkpoint("eval", &ck, &d)
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

/// A PNG's size and its RGB pixels.
fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// `capsnet figures` writes valid PNGs of the sizes its layout gives, the perturbation grid
/// changes along its rows, and the confusion matrix adds up to the test set.
#[test]
fn figures_draws_reconstructions_dimensions_and_confusion() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let run = tmp.path().join("run");
    let out = capsnet()
        .args([
            "train",
            "--model",
            "tiny",
            "--max-steps",
            "8",
            "--batch-size",
            "8",
        ])
        .args(["--threads", "2", "--data-dir"])
        .arg(&d)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let ck = latest_checkpoint(&run).unwrap().unwrap();
    let figs = tmp.path().join("figs");
    let out = on_checkpoint("figures", &ck, &d)
        .arg("--out")
        .arg(&figs)
        .args(["--examples", "2", "--perturb", "2", "--threads", "2"])
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");

    // The layout of capsnet_bench::pictures at scale 3: 28x28 pictures are 84 px cells plus
    // 6 px gaps; a 30 px title, 18 px column heads, 16 px captions, a 70 px row-head column.
    // reconstructions: at most 2 right + 2 wrong pairs = 8 cells = one row of 8 columns.
    let (w, h, _) = read_png(&figs.join("reconstructions.png"));
    assert_eq!((w, h), (6 + 8 * 90, 30 + 18 + 84 + 16 + 6), "{text}");
    // dimensions: 5 rows (the tiny model's 5-D capsules) of 11 perturbations, no captions.
    let dims: Vec<_> = std::fs::read_dir(&figs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("dimensions-")
        })
        .collect();
    assert_eq!(dims.len(), 2, "{text}");
    let (w, h, px) = read_png(&dims[0]);
    assert_eq!((w, h), (6 + 70 + 11 * 90, 30 + 18 + 5 * 90));
    // Along each row the cells differ from the first (not one image repeated); compare each
    // cell's 84x84 block of pixels.
    let cell = |r: u32, c: u32| -> Vec<u8> {
        let (x0, y0) = (6 + 70 + c * 90, 30 + 18 + r * 90);
        (y0..y0 + 84)
            .flat_map(|y| {
                let at = ((y * w + x0) * 3) as usize;
                px[at..at + 84 * 3].to_vec()
            })
            .collect()
    };
    for r in 0..5 {
        let first = cell(r, 0);
        assert!(first.iter().any(|&v| v > 0), "row {r} is black");
        assert!(
            (1..11).filter(|&c| cell(r, c) != first).count() >= 5,
            "row {r} barely changes"
        );
    }
    // The confusion matrix: 10 classes, and its counts add up to the 16 test images.
    let (w, h, _) = read_png(&figs.join("confusion.png"));
    assert_eq!((w, h), (110 + 10 * 46 + 6, 110 + 10 * 46 + 6 + 30));
    let csv = std::fs::read_to_string(figs.join("confusion.csv")).unwrap();
    let total: u64 = csv
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|c| c.parse::<u64>().unwrap()))
        .sum();
    assert_eq!(total, 16, "{csv}");

    // Bad flags are named.
    let out = on_checkpoint("figures", &ck, &d)
        .args(["--class-names", "a,b"])
        .arg("--out")
        .arg(&figs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("2 names for 10 classes"));
}

/// `--model cnn-tiny` (the CNN baseline's shape, small): trains on a canvas, resumes, is
/// scored by `capsnet eval --affine`; `capsnet figures` says it has no capsules.
#[test]
fn the_cnn_baseline_trains_resumes_and_is_evaluated() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let run = tmp.path().join("cnn");
    let train = |steps: &str, resume: bool| {
        let mut c = capsnet();
        c.arg("train");
        if resume {
            c.arg("--resume").arg(&run);
        } else {
            c.args(["--model", "cnn-tiny", "--canvas", "32", "--batch-size", "8"])
                .arg("--data-dir")
                .arg(&d)
                .arg("--run-dir")
                .arg(&run);
        }
        let out = c
            .args(["--max-steps", steps, "--threads", "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
    };
    train("2", false);
    train("4", true);
    let ck_path = latest_checkpoint(&run).unwrap().unwrap();
    let ck = Checkpoint::load(&ck_path, None).unwrap();
    assert_eq!(ck.step, 4);
    let b = ck.baseline.expect("the checkpoint names the CNN");
    assert_eq!((b.image_size, b.classes), (32, 10));
    assert!(ck.params.get("fc.2.weight").is_some());
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("\"baseline\""), "{config}");

    let e = eval_json(&ck_path, &d, &["--affine"]);
    assert_eq!(
        (e["test_set"].as_str(), e["image_size"].as_u64()),
        (Some("translated"), Some(32))
    );
    assert_eq!(e["reconstruction_loss"], 0.0);
    assert_eq!(e["affine"]["samples"], 16);

    let out = on_checkpoint("figures", &ck_path, &d)
        .arg("--out")
        .arg(tmp.path().join("figs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("no capsules"));
}

/// `--multi`: a capsule network and the CNN train on overlapping pairs, `capsnet eval --multi`
/// scores the test pairs, `capsnet figures --multi` draws them, and flags that cannot work are
/// refused with their names.
#[test]
fn overlapping_pairs_train_evaluate_and_draw() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let train = |model: &str, run: &str, extra: &[&str]| {
        capsnet()
            .args([
                "train",
                "--model",
                model,
                "--max-steps",
                "6",
                "--batch-size",
                "8",
            ])
            .args(["--threads", "2", "--data-dir"])
            .arg(&d)
            .arg("--run-dir")
            .arg(tmp.path().join(run))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = train("tiny", "caps", &["--multi", "2"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("overlapping pairs shifted up to 2"), "{text}");
    let ck = latest_checkpoint(&tmp.path().join("caps"))
        .unwrap()
        .unwrap();
    assert_eq!(Checkpoint::load(&ck, None).unwrap().config.image_size, 32);
    let e = eval_json(&ck, &d, &["--multi"]);
    assert_eq!(
        (e["test_set"].as_str(), e["pair_shift"].as_u64()),
        (Some("translated"), Some(2))
    );
    assert_eq!(e["pairs"]["samples"], 16);
    assert!(e["pairs"]["reconstruction_loss"].as_f64().unwrap() > 0.0);
    let right = (e["pairs"]["accuracy"].as_f64().unwrap() * 16.0).round() as u32;

    let figs = tmp.path().join("figs");
    let out = on_checkpoint("figures", &ck, &d)
        .arg("--out")
        .arg(&figs)
        .args([
            "--multi",
            "--examples",
            "2",
            "--perturb",
            "0",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("overlapping pairs (32x32, shifts up to 2)"),
        "{text}"
    );
    // pairs.png is drawn at scale 5 at least: 32x32 pictures are 160 px cells and 6 px gaps;
    // three cells per pair, two pairs a row: up to 2 right and 2 wrong ones.
    let pairs = right.min(2) + (16 - right).min(2);
    let rows = (3 * pairs).div_ceil(6);
    let (w, h, px) = read_png(&figs.join("pairs.png"));
    assert_eq!((w, h), (6 + 6 * 166, 30 + 18 + rows * 182), "{text}");
    // The first pair's objects are drawn in two colours: red-orange and green-blue pixels.
    let (x0, y0) = (6 + 166, 30 + 18);
    let cell: Vec<[u8; 3]> = (y0..y0 + 160)
        .flat_map(|y| (x0..x0 + 160).map(move |x| (y * w + x) as usize * 3))
        .map(|at| [px[at], px[at + 1], px[at + 2]])
        .collect();
    assert!(
        cell.iter().any(|p| p[0] > 100 && p[2] < 30),
        "no first object"
    );
    assert!(
        cell.iter().any(|p| p[2] > 100 && p[0] < 30),
        "no second object"
    );

    // The CNN on pairs: sigmoid outputs, no reconstruction.
    let out = train("cnn-tiny", "cnn", &["--multi", "2"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let ck = latest_checkpoint(&tmp.path().join("cnn")).unwrap().unwrap();
    let e = eval_json(&ck, &d, &["--multi"]);
    assert_eq!(e["pairs"]["samples"], 16);
    assert_eq!(e["pairs"]["reconstruction_loss"], 0.0);

    // Refusals name what is wrong.
    let out = train("tiny", "bad", &["--multi", "2", "--canvas", "36"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("--multi and --canvas"));
    let out = train("tiny", "bad", &["--multi", "2", "--max-shift", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("--max-shift 1"));
    let plain = tmp.path().join("plain");
    let out = train("tiny", "plain", &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let ck = latest_checkpoint(&plain).unwrap().unwrap();
    let eval = |extra: &[&str]| on_checkpoint("eval", &ck, &d).args(extra).output().unwrap();
    let out = eval(&["--multi"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("larger by an even number"),
        "{}",
        output_text(&out)
    );
    let out = eval(&["--test-limit", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("--test-limit"));
    let out = on_checkpoint("figures", &ck, &d)
        .args(["--scale", "0", "--out"])
        .arg(&figs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(output_text(&out).contains("--scale"));
}
