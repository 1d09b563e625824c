//! `scripts/lan-bench` run small (the tiny network, 2 workers, a few rounds, no Gloo), so that
//! it cannot rot: it prints and writes its rows, and removes every namespace and process it made,
//! also when a run fails and when it is interrupted. Needs root and iproute2, which CI has; the
//! tests say so and pass elsewhere only outside CI.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/lan-bench")
}

/// Whether this machine can run the script; in CI it must.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !(root && ip) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run scripts/lan-bench: root {root}, iproute2 {ip}"
        );
        eprintln!("skipped: scripts/lan-bench needs root and iproute2 (root {root}, ip {ip})");
    }
    root && ip
}

fn namespaces() -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn lan_bench(args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(script())
        .args(["--model", "tiny", "--no-gloo"])
        .args(["--capsnet", env!("CARGO_BIN_EXE_capsnet")])
        .args(args)
        .stdin(Stdio::null());
    c
}

/// One test, as the runs must not overlap (each compares the namespaces before and after):
/// - two workers, f32 and bf16, batch 2, through the coordinator and sharded (a reducer in
///   each worker, and separate reducers), with and without overlap, parameters pulled whole
///   and as changes (`--delta-pulls`): a row each with round times, in the table and the JSON;
/// - a run that fails (a binary that exits at once) exits non-zero;
/// - a run interrupted with SIGTERM once its processes run exits 143.
///
/// None leaves a namespace or a process behind.
#[test]
fn lan_bench_runs_small_and_cleans_up_after_success_failure_and_interrupt() {
    if !can_run() {
        return;
    }
    let before = namespaces();
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rows.jsonl");
    let out = lan_bench(&["--workers", "2", "--wire", "f32,bf16", "--rounds", "3"])
        .args([
            "--batch-size",
            "2",
            "--overlap",
            "on,off",
            "--delta",
            "off,on",
        ])
        .args(["--layout", "coordinator,colocated,separate"])
        .args(["--warmup", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ring_bound") && text.contains("coordinator"),
        "{text}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut settings = vec![];
    for wire in ["f32", "bf16"] {
        for layout in ["coordinator", "colocated", "separate"] {
            for overlap in [true, false] {
                for delta in [false, true] {
                    settings.push((wire, layout, overlap, delta));
                }
            }
        }
    }
    assert_eq!(rows.len(), settings.len(), "{text}");
    for (r, (wire, layout, overlap, delta)) in rows.iter().zip(settings) {
        assert_eq!(r["wire"], wire, "{text}");
        assert_eq!(r["layout"], layout, "{text}");
        assert_eq!(r["overlap"], overlap, "{text}");
        assert_eq!(r["delta"], delta, "{text}");
        assert_eq!(r["socket_buffer"], "64KiB", "{text}");
        let bound = r["layout_bound_ms"].as_f64().unwrap();
        let want = match layout {
            "coordinator" => r["coordinator_bound_ms"].as_f64().unwrap(),
            // With 2 workers bytes / rate (separate reducers) is the ring bound too.
            _ => r["ring_bound_ms"].as_f64().unwrap(),
        };
        assert!((bound - want).abs() < 0.2, "{r}");
        assert_eq!(r["batch"], 2, "{text}");
        assert_eq!(r["workers"], 2, "{text}");
        let (min, med) = (
            r["min_ms"].as_f64().unwrap(),
            r["median_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= med, "{r}");
        assert!(r["ring_bound_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(namespaces(), before, "namespaces left behind\n{text}");

    let out = Command::new("bash")
        .arg(script())
        .args(["--model", "paper", "--no-gloo", "--capsnet", "/bin/false"])
        .args(["--workers", "2", "--wire", "f32", "--rounds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert_eq!(namespaces(), before, "{}", output_text(&out));

    let cmd = lan_bench(&["--workers", "2", "--wire", "f32", "--rounds", "100000"]);
    let mut p = Proc::spawn("lan-bench", cmd, tmp.path());
    let needle = "--coordinator http://10.77.0.1:";
    let start = Instant::now();
    while processes_mentioning(needle).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.signal(libc::SIGTERM);
    let status = p.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(143), "{}", p.log_text());
    assert_eq!(namespaces(), before, "{}", p.log_text());
    let left = processes_mentioning(needle);
    assert!(left.is_empty(), "left running: {left:?}");
}
