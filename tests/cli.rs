//! The `capsnet` binary end to end: real processes on a tiny network and synthetic 28x28 data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use capsnet_core::checkpoint::{Tensor, TensorFile};
use capsnet_core::data::write_synthetic;
use common::output_text as text;

/// `capsnet` as a user runs it: no token and no log filter from the test's environment.
fn cli() -> Command {
    let mut c = common::capsnet();
    c.env_remove("CAPSNET_TOKEN").env_remove("RUST_LOG");
    c
}

/// `o` is a configuration error (exit 2) whose text says `says`.
fn config_error(o: &Output, says: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    assert!(text(o).contains(says), "{}", text(o));
}

/// `capsnet ARGS` with the test token.
fn with_token(args: &[&str]) -> Output {
    cli()
        .args(args)
        .env("CAPSNET_TOKEN", common::TOKEN)
        .output()
        .unwrap()
}

fn capsnet(args: &[&str]) -> Output {
    cli().args(args).output().expect("run capsnet")
}

fn data(dir: &Path) -> String {
    write_synthetic(dir, 64, 32, 28, 10, 5).unwrap();
    dir.display().to_string()
}

const TINY: &[&str] = &["--model", "tiny", "--batch-size", "16", "--threads", "2"];

#[test]
fn train_then_eval_then_resume_then_grad() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(&tmp.path().join("data"));
    let run = tmp.path().join("run");
    let run_s = run.display().to_string();
    let mut args = vec![
        "train",
        "--data-dir",
        &d,
        "--max-steps",
        "3",
        "--epochs",
        "2",
        "--run-dir",
        &run_s,
    ];
    args.extend_from_slice(TINY);
    let o = capsnet(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("test accuracy"), "{}", text(&o));
    for f in ["config.json", "metrics.jsonl", "checkpoint-3.safetensors"] {
        assert!(run.join(f).exists(), "{f} missing: {}", text(&o));
    }

    // The same run dir again without --resume is refused, and nothing is overwritten.
    let o = capsnet(&args);
    assert!(!o.status.success());
    assert!(text(&o).contains("--resume"), "{}", text(&o));

    // Resume from config.json; only --max-steps changes.
    let o = capsnet(&["train", "--resume", &run_s, "--max-steps", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        run.join("checkpoint-5.safetensors").exists(),
        "{}",
        text(&o)
    );

    let ck = run.join("checkpoint-5.safetensors").display().to_string();
    let o = capsnet(&["eval", "--checkpoint", &ck, "--data-dir", &d, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["accuracy", "margin_loss", "reconstruction_loss", "samples"] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
    assert_eq!(v["samples"], 32);

    // grad: a batch file in the oracle's format in, losses and every gradient out.
    let batch = tmp.path().join("batch.safetensors");
    let mut f = TensorFile::default();
    f.tensors.insert(
        "images".into(),
        Tensor::f32(
            vec![2, 1, 28, 28],
            (0..2 * 784).map(|i| (i % 13) as f32 / 13.0).collect(),
        ),
    );
    f.tensors.insert(
        "labels".into(),
        Tensor::I64 {
            shape: vec![2],
            data: vec![3, 7],
        },
    );
    f.write(&batch).unwrap();
    let out = tmp.path().join("grads.safetensors");
    let o = capsnet(&[
        "grad",
        "--checkpoint",
        &ck,
        "--batch",
        &batch.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let g = TensorFile::read(&out).unwrap();
    for k in [
        "loss.margin",
        "loss.reconstruction",
        "loss.total",
        "lengths",
        "conv1.weight.grad",
        "digit.weight.grad",
        "decoder.2.bias.grad",
    ] {
        assert!(g.tensors.contains_key(k), "{k} missing");
    }
    assert_eq!(g.tensors["lengths"].shape(), &[2, 10]);

    // A label out of range in the batch file is named.
    f.tensors.insert(
        "labels".into(),
        Tensor::I64 {
            shape: vec![2],
            data: vec![3, 12],
        },
    );
    f.write(&batch).unwrap();
    let o = capsnet(&[
        "grad",
        "--checkpoint",
        &ck,
        "--batch",
        &batch.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("label 12"), "{}", text(&o));
}

#[test]
fn bad_flags_fail_before_any_work_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(&tmp.path().join("data"));
    let run = tmp.path().join("run").display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--batch-size", "0"], "batch size"),
        (&["--epochs", "0"], "epochs"),
        (&["--lr", "-1"], "lr"),
        (&["--routing-iters", "0"], "routing_iters"),
        (&["--threads", "0"], "threads"),
        (&["--batch-size", "many"], "invalid value"),
        (&["--ema-decay", "1"], "EMA decay"),
        (
            &["--lr-schedule", "linear"],
            "expected exponential or cosine",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "train",
            "--data-dir",
            &d,
            "--run-dir",
            &run,
            "--model",
            "tiny",
        ];
        args.extend_from_slice(extra);
        let o = capsnet(&args);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert_eq!(
            o.status.code(),
            Some(2),
            "configuration errors exit with 2: {}",
            text(&o)
        );
        assert!(
            text(&o).contains(want),
            "{extra:?}: expected {want:?} in {}",
            text(&o)
        );
    }
    assert!(
        !tmp.path().join("run").exists(),
        "a rejected run created its run dir"
    );

    // Sharded runs: a weight average needs every round's parameters in one place, and a
    // reducer listening on every interface must say the URL workers reach it at.
    let o = with_token(&[
        "coordinator",
        "--data-dir",
        &d,
        "--run-dir",
        &run,
        "--model",
        "tiny",
        "--reducers",
        "2",
        "--ema-decay",
        "0.5",
        "--listen",
        "127.0.0.1:0",
    ]);
    config_error(&o, "does not go with --reducers");
    // How often the reducers' state is gathered: a duration, or 0 for off.
    let o = with_token(&[
        "coordinator",
        "--data-dir",
        &d,
        "--run-dir",
        &run,
        "--reducers",
        "2",
        "--gather-every",
        "often",
    ]);
    config_error(&o, "--gather-every");
    // Socket buffers: a size the flag cannot read, and one out of range (the coordinator's
    // and a reducer's, before anything listens).
    for (size, says) in [
        ("64GiB", "--socket-buffer"),
        ("1000", "socket buffer of 1000 bytes"),
    ] {
        let args = [
            "coordinator",
            "--data-dir",
            &d,
            "--run-dir",
            &run,
            "--socket-buffer",
            size,
        ];
        let o = with_token(&args);
        config_error(&o, says);
    }
    let o = with_token(&[
        "reducer",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        "http://127.0.0.1:1",
        "--socket-buffer",
        "128MiB",
    ]);
    config_error(&o, "socket buffer of 134217728 bytes");
    let o = with_token(&[
        "reducer",
        "--listen",
        "0.0.0.0:0",
        "--coordinator",
        "http://127.0.0.1:1",
    ]);
    config_error(&o, "--advertise");
    // A reducer's port or metrics port already taken: a configuration error (exit 2, so a
    // Job does not retry it), naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let o = with_token(&[
        "reducer",
        "--listen",
        &at,
        "--coordinator",
        "http://127.0.0.1:1",
    ]);
    config_error(&o, &format!("reducer address {at}"));
    let o = with_token(&[
        "reducer",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &at,
        "--coordinator",
        "http://127.0.0.1:1",
    ]);
    config_error(&o, &format!("--metrics-listen {at}"));
    // A reducer certificate name without a CA to check reducers' certificates against.
    let o = with_token(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:1",
        "--reducer-tls-domain",
        "capsnet-reducer",
    ]);
    config_error(&o, "--tls-ca");

    // Environment variables are flags too.
    let o = cli()
        .args([
            "train",
            "--data-dir",
            &d,
            "--run-dir",
            &run,
            "--model",
            "tiny",
        ])
        .env("CAPSNET_BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("batch size"),
        "{}",
        text(&o)
    );

    // Missing data: the message names the folder, once.
    let o = capsnet(&["train", "--data-dir", "/nonexistent/idx", "--run-dir", &run]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(
        text(&o).matches("/nonexistent/idx").count(),
        1,
        "{}",
        text(&o)
    );

    // No token for a worker: a configuration error that says how to give one.
    let o = cli()
        .args(["worker", "--data-dir", &d])
        .env_remove("CAPSNET_TOKEN_FILE")
        .output()
        .unwrap();
    config_error(&o, "CAPSNET_TOKEN");
}

/// Runs `capsnet bench ARGS --json FILE`; returns what it printed and the JSON rows.
fn bench(args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let json_arg = json.display().to_string();
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", &json_arg]);
    let o = capsnet(&all);
    assert!(o.status.success(), "{}", text(&o));
    let rows = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (text(&o), rows)
}

#[test]
fn bench_train_prints_a_table_and_writes_json() {
    let tmp = tempfile::tempdir().unwrap();
    let torch = tmp.path().join("torch.json");
    std::fs::write(
        &torch,
        r#"{"results": [{"mode": "train", "batch": 4, "images_per_s": 10.0, "peak_rss_mib": 100.0}]}"#,
    )
    .unwrap();
    let (t, rows) = bench(&[
        "train",
        "--model",
        "tiny",
        "--batch-sizes",
        "4",
        "--infer-batch-sizes",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--no-sgemm",
        "--torch-json",
        torch.to_str().unwrap(),
    ]);
    assert!(t.contains("images/s") && t.contains("routing"), "{t}");
    // The PyTorch row of the same setting is printed beside ours with the ratios.
    assert!(t.contains("speed-up") && t.contains("10.0"), "{t}");
    assert_eq!(rows.len(), 2);
    for k in [
        "mode",
        "batch",
        "median_s",
        "min_s",
        "max_s",
        "images_per_s",
        "peak_rss_mib",
    ] {
        assert!(rows[0].get(k).is_some(), "{k} missing");
    }
    assert_eq!(rows[0]["mode"], "train");
    assert_eq!(rows[1]["mode"], "infer");
    assert!(rows[0]["images_per_s"].as_f64().unwrap() > 0.0);

    // The canvas network's input size.
    let (t, rows) = bench(&[
        "train",
        "--model",
        "tiny",
        "--image-size",
        "40",
        "--batch-sizes",
        "2",
        "--infer-batch-sizes",
        "none",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--no-sgemm",
    ]);
    assert!(t.contains("at 40x40"), "{t}");
    assert_eq!(rows.len(), 1);
    // The CNN baseline, with its own parts.
    let (t, rows) = bench(&[
        "train",
        "--model",
        "cnn-tiny",
        "--batch-sizes",
        "2",
        "--infer-batch-sizes",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--no-sgemm",
    ]);
    assert!(t.contains("model cnn-tiny at 28x28"), "{t}");
    assert_eq!(rows.len(), 2);
    assert!(rows[0]["parts_s"].get("conv").is_some(), "{}", rows[0]);
    assert!(rows[0]["gflop_per_s"].as_f64().unwrap() > 0.0);
    let o = capsnet(&["bench", "train", "--model", "tiny", "--image-size", "8"]);
    config_error(&o, "--image-size");
}

/// `bench sync` on the tiny model: real rounds through a coordinator, one row per setting.
#[test]
fn bench_sync_times_rounds_and_writes_json() {
    let (t, rows) = bench(&[
        "sync",
        "--model",
        "tiny",
        "--workers",
        "1,2",
        "--wire",
        "f32,bf16",
        "--rounds",
        "3",
        "--warmup",
        "1",
        "--chunk-bytes",
        "4096",
    ]);
    assert!(t.contains("memcpy") && t.contains("peak_MiB"), "{t}");
    assert!(
        t.contains("gloo_allreduce_bench.py"),
        "the anchor is named: {t}"
    );
    let machine = t.lines().find_map(|l| l.strip_prefix("machine: "));
    assert!(machine.is_some_and(|m| !m.trim().is_empty()), "{t}");
    // Bad settings are refused before anything runs, naming the flag.
    for (bad, says) in [
        (["--chunk-bytes", "0"], "--chunk-bytes"),
        (["--layout", "ring"], "--layout"),
        (["--workers", "0"], "--workers"),
    ] {
        let mut args = vec!["bench", "sync", "--model", "tiny"];
        args.extend(bad);
        config_error(&capsnet(&args), says);
    }
    let settings: Vec<(u64, &str, &str, u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["workers"].as_u64().unwrap(),
                r["layout"].as_str().unwrap(),
                r["transport"].as_str().unwrap(),
                r["reducers"].as_u64().unwrap(),
                r["wire"].as_str().unwrap(),
            )
        })
        .collect();
    // Every layout by default: through the coordinator, and a reducer in every worker; each
    // over loopback TCP and over unix sockets.
    let mut expected = vec![];
    for n in [1, 2] {
        for (layout, transport, reducers) in [
            ("coordinator", "tcp", 0),
            ("coordinator", "unix", 0),
            ("colocated", "tcp", n),
            ("colocated", "unix", n),
        ] {
            for wire in ["f32", "bf16"] {
                expected.push((n, layout, transport, reducers, wire));
            }
        }
    }
    assert_eq!(settings, expected);
    // The printed table: one row per setting (workers, layout, wire, median, min, max, MB/s
    // per worker, MB/s coordinator or "-", peak MiB, CPU ms per round), with the JSON's
    // timings, in order.
    let table: Vec<Vec<&str>> = t
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 10 && w[0].parse::<u64>().is_ok())
        .collect();
    assert_eq!(table.len(), rows.len(), "{t}");
    for (row, r) in table.iter().zip(&rows) {
        let (workers, wire) = (r["workers"].as_u64().unwrap(), r["wire"].as_str().unwrap());
        let label = match r["transport"].as_str().unwrap() {
            "unix" => format!("{}-unix", r["layout"].as_str().unwrap()),
            _ => r["layout"].as_str().unwrap().to_string(),
        };
        assert_eq!(
            (row[0], row[1], row[2]),
            (workers.to_string().as_str(), label.as_str(), wire),
            "{t}"
        );
        // With reducers the coordinator moves no tensors.
        assert_eq!(row[7] == "-", r["mb_per_s_coordinator"].is_null(), "{t}");
        let printed: Vec<f64> = row[3..6].iter().map(|v| v.parse().unwrap()).collect();
        for (p, k) in printed.iter().zip(["median_ms", "min_ms", "max_ms"]) {
            let want = r[k].as_f64().unwrap();
            assert!(
                (p - want).abs() <= 0.05 + 1e-9,
                "{k}: printed {p}, JSON {want}\n{t}"
            );
        }
        assert!(printed[1] <= printed[0] && printed[0] <= printed[2], "{t}");
        // Every round costs CPU: the whole setting's, more than nothing.
        let cpu: f64 = row[9].parse().unwrap();
        let want = r["cpu_ms_per_round"].as_f64().unwrap();
        assert!(cpu > 0.0 && (cpu - want).abs() <= 0.05 + 1e-9, "{t}");
    }
    for r in &rows {
        let ms = |k: &str| r[k].as_f64().unwrap();
        assert!(
            0.0 < ms("min_ms")
                && ms("min_ms") <= ms("median_ms")
                && ms("median_ms") <= ms("max_ms"),
            "{r}"
        );
        assert!(r["floats"].as_u64().unwrap() > 0, "{r}");
        assert!(ms("mb_per_s_per_worker") > 0.0, "{r}");
        assert!(ms("peak_rss_mib") > 0.0, "{r}");
    }
}

/// `bench scale` on the tiny model: a row per layout and variant, a projection per worker
/// count, a PNG of the expected size (one 560 x 460 panel per rate), and `--lan` prints a
/// projection beside each measured lan-bench row (and skips Gloo's).
#[test]
fn bench_scale_projects_plots_and_checks_against_lan_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("scale.png");
    let png_arg = png.display().to_string();
    let json = tmp.path().join("scale.json");
    let json_arg = json.display().to_string();
    let o = capsnet(&[
        "bench",
        "scale",
        "--model",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--workers",
        "1,4",
        "--rates",
        "1,10",
        "--png",
        &png_arg,
        "--json",
        &json_arg,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        t.contains("sharded, own machines") && t.contains("N=4"),
        "{t}"
    );
    let rows = v["rows"].as_array().unwrap();
    // 2 rates x 3 layouts x 7 variants x 2 worker counts.
    assert_eq!(rows.len(), 84, "{t}");
    for r in rows {
        let e = r["projection"]["efficiency"].as_f64().unwrap();
        assert!(e > 0.0 && e <= 1.0, "{r}");
    }
    assert!(v["costs"]["step_s"].as_f64().unwrap() > 0.0);
    // The data plane's CPU per byte, by chunk size and encoding: measured, so not all zero.
    let net: Vec<f64> = (v["costs"]["net_s"].as_array().unwrap().iter())
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert!(
        net.len() == 4 && net.iter().all(|x| x.is_finite() && *x >= 0.0),
        "{net:?}"
    );
    assert!(net.iter().any(|x| *x > 0.0), "{net:?}");
    assert!(t.contains("measured for the data plane"), "{t}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (2 * 560, 460));

    let lan = tmp.path().join("lan.jsonl");
    std::fs::write(
        &lan,
        concat!(
            r#"{"workers":2,"wire":"f32","layout":"gloo-ring","median_ms":10,"rate":"1gbit"}"#,
            "\n",
            r#"{"workers":2,"wire":"bf16","layout":"coordinator","median_ms":5,"rate":"1gbit"}"#,
            "\n",
            r#"{"workers":2,"wire":"f32","layout":"coordinator","overlap":true,"batch":2,"#,
            r#""median_ms":7,"rate":"1gbit"}"#,
            "\n",
            r#"{"workers":2,"wire":"f32","layout":"colocated","overlap":true,"delta":true,"#,
            r#""median_ms":9,"rate":"1gbit"}"#,
            "\n"
        ),
    )
    .unwrap();
    let lan_arg = lan.display().to_string();
    let o = capsnet(&[
        "bench", "scale", "--model", "tiny", "--steps", "1", "--lan", &lan_arg,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let row = out
        .lines()
        .find(|l| l.contains("one coordinator"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("bf16") && row.contains("5.0") && row.contains('%'),
        "{out}"
    );
    // A row of a larger batch with overlap is projected with both (its step measured too).
    let row = out
        .lines()
        .find(|l| l.contains("one coordinator") && l.contains("7.0"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols.contains(&"2") && cols.contains(&"on"), "{out}");
    assert!(out.contains("batch 2:"), "{out}");
    assert!(!out.contains("gloo"), "{out}");
    // A row with delta pulls is projected with them.
    let row = out
        .lines()
        .find(|l| l.contains("in the workers") && l.contains("9.0"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols.iter().filter(|c| **c == "on").count(), 2, "{out}");
    assert!(out.contains("measured for --delta-pulls"), "{out}");

    // Bad flags: a configuration error that names them, before anything is measured.
    for bad in [["--workers", "0"], ["--rates", "0"], ["--sync-every", "0"]] {
        let mut args = vec!["bench", "scale", "--model", "tiny"];
        args.extend(bad);
        let o = capsnet(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", text(&o));
        assert!(text(&o).contains(bad[0]), "{bad:?}: {}", text(&o));
    }
    // A lan file that is not JSON lines names itself.
    std::fs::write(&lan, "not json\n").unwrap();
    let o = capsnet(&[
        "bench", "scale", "--model", "tiny", "--steps", "1", "--lan", &lan_arg,
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("lan.jsonl"), "{}", text(&o));
}

/// `capsnet plot` of a real single-process run (its lines carry `unix_s`) and a distributed
/// run's lines: a PNG of 2 x 3 panels of 640 x 400, the same as SVG; a folder without
/// metrics.jsonl and a wrong number of --labels are configuration errors.
#[test]
fn plot_draws_runs_as_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(&tmp.path().join("data"));
    let single = tmp.path().join("single");
    let single_s = single.display().to_string();
    let mut args = vec![
        "train",
        "--data-dir",
        &d,
        "--max-steps",
        "6",
        "--log-every",
        "1",
        "--run-dir",
        &single_s,
    ];
    args.extend_from_slice(TINY);
    let o = capsnet(&args);
    assert!(o.status.success(), "{}", text(&o));
    let lines = std::fs::read_to_string(single.join("metrics.jsonl")).unwrap();
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["unix_s"].as_f64().unwrap() > 1.7e9, "{l}");
    }
    // A distributed run's lines, written as the coordinator writes them (without unix_s, as
    // before it had one: the wall time is then the sum of the rounds' times).
    let dist = tmp.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    let mut text_lines = String::new();
    for r in 0..20 {
        text_lines += &format!(
            "{{\"kind\":\"round\",\"round\":{r},\"train_loss\":{},\"images_per_s\":{},\"round_s\":0.5}}\n",
            1.0 / (r as f64 + 1.0),
            100 + r
        );
    }
    text_lines += "{\"kind\":\"eval\",\"round\":20,\"step\":20,\"test_accuracy\":0.5}\n";
    std::fs::write(dist.join("metrics.jsonl"), text_lines).unwrap();

    let dist_s = dist.display().to_string();
    let png = tmp.path().join("curves.png");
    let png_s = png.display().to_string();
    let o = capsnet(&[
        "plot", &single_s, &dist_s, "--out", &png_s, "--labels", "one,two",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (2 * 640, 3 * 400));
    let svg = tmp.path().join("curves.svg");
    let svg_s = svg.display().to_string();
    let o = capsnet(&["plot", &single_s, &dist_s, "--out", &svg_s]);
    assert!(o.status.success(), "{}", text(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("<svg") && s.contains("test accuracy") && s.contains("dist"));

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = capsnet(&["plot", &empty.display().to_string(), "--out", &png_s]);
    config_error(&o, "metrics.jsonl");
    let o = capsnet(&["plot", &single_s, "--labels", "a,b", "--out", &png_s]);
    config_error(&o, "--labels");
}

/// A `capsnet reducer` turns transparent huge pages off for its own process (main.rs: each
/// fault on a huge page the allocator had handed back zeroed 2 MiB afresh), unless
/// `MIMALLOC_ALLOW_THP` says what to do: the process's /proc status shows `THP_enabled: 0`, or
/// 1 with the variable. A reducer that waits for an unreachable coordinator is the long-lived
/// process to look at.
#[test]
fn capsnet_turns_transparent_huge_pages_off_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    for (allow, want) in [(None, "0"), (Some("1"), "1")] {
        let metrics = common::free_addr();
        let mut cmd = common::capsnet();
        cmd.args([
            "reducer",
            "--coordinator",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
            "--give-up-after",
            "60s",
        ]);
        cmd.env_remove("MIMALLOC_ALLOW_THP");
        if let Some(a) = allow {
            cmd.env("MIMALLOC_ALLOW_THP", a);
        }
        let mut p = common::Proc::spawn("thp", cmd, dir.path());
        // Its metrics port is bound after main's first steps.
        common::wait_for_or_log(
            "the reducer's metrics port",
            Duration::from_secs(30),
            &[&p],
            || std::net::TcpStream::connect(&metrics).ok().map(|_| ()),
        );
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let thp = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(str::trim)
            .expect("THP_enabled in /proc/PID/status (Linux 5.0 and later)");
        assert_eq!(thp, want, "MIMALLOC_ALLOW_THP={allow:?}:\n{status}");
        p.signal(libc::SIGKILL);
        p.wait(Duration::from_secs(10));
    }
}
