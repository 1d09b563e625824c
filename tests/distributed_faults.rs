//! Distributed training through failures and whole-fleet launches: real processes on
//! loopback, a tiny network, synthetic 28x28 data. Every process is killed when its guard drops.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::time::Duration;

use capsnet_core::checkpoint::{Checkpoint, latest_checkpoint};
use common::*;

/// `capsnet launch` runs a coordinator and workers to the end, prefixes their logs, and fails
/// (before starting anything) on bad flags.
#[test]
fn launch_runs_a_fleet_to_the_end() {
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
            "--batch-size",
            "4",
            "--max-steps",
            "4",
        ])
        .arg("--data-dir")
        .arg(&d)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    for prefix in ["[coordinator]", "[worker-0]", "[worker-1]"] {
        assert!(text.contains(prefix), "{prefix} missing:\n{text}");
    }
    assert!(run.join("checkpoint-4.safetensors").exists(), "{text}");
    assert_eq!(rounds(&run).len(), 4);

    let out = capsnet()
        .args([
            "launch",
            "--workers",
            "2",
            "--model",
            "tiny",
            "--batch-size",
            "0",
            "--data-dir",
        ])
        .arg(&d)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch size"));
}

/// SIGTERM to `capsnet launch` mid-run: the coordinator checkpoints, every worker is stopped,
/// and launch exits non-zero saying where the checkpoint is.
#[test]
fn launch_stops_coordinator_and_workers_on_sigterm() {
    let (tmp, mut launch) = launch_training();
    let (d, run) = (tmp.path().join("data"), tmp.path().join("run"));
    launch.signal(libc::SIGTERM);
    let status = launch.wait(Duration::from_secs(60));
    let log = launch.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("interrupted after") && log.contains("checkpoint"),
        "{log}"
    );
    assert!(latest_checkpoint(&run).unwrap().is_some(), "{log}");
    let left = processes_mentioning(&d.display().to_string());
    assert!(left.is_empty(), "workers left running: {left:?}\n{log}");
}

/// `capsnet launch` of 2 workers on the tiny network for far longer than a test, once it has
/// logged 3 rounds.
fn launch_training() -> (tempfile::TempDir, Proc) {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 256);
    let run = tmp.path().join("run");
    let mut cmd = capsnet();
    cmd.env_remove("CAPSNET_TOKEN")
        .args(["launch", "--workers", "2", "--model", "tiny"])
        .args([
            "--batch-size",
            "2",
            "--epochs",
            "1000",
            "--log-every",
            "1000",
        ])
        .arg("--data-dir")
        .arg(&d)
        .arg("--run-dir")
        .arg(&run);
    let launch = Proc::spawn("launch", cmd, tmp.path());
    wait_for_or_log("rounds", Duration::from_secs(60), &[&launch], || {
        (rounds(&run).len() >= 3).then_some(())
    });
    (tmp, launch)
}

/// A worker stopped by SIGTERM before training is over leaves and exits 143, so that a
/// Kubernetes Indexed Job does not count its index as completed.
#[test]
fn a_worker_stopped_by_sigterm_exits_143() {
    let s = Setup::start(
        256,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "1000",
            "--log-every",
            "1000",
        ],
    );
    let run = s.run.clone();
    let mut w = s.worker(0, &[]);
    wait_for_or_log("rounds", Duration::from_secs(60), &[&w], || {
        (rounds(&run).len() >= 3).then_some(())
    });
    w.signal(libc::SIGTERM);
    let status = w.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(143), "{}", w.log_text());
    assert!(
        w.log_text().contains("stopped by a signal"),
        "{}",
        w.log_text()
    );
}

/// A worker killed mid-run: the round closes without it, training goes on, and the worker
/// restarted under the same rank rejoins and contributes again. Nothing hangs.
#[test]
fn a_killed_worker_is_dropped_and_rejoins() {
    let mut s = Setup::start(
        512,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "1000",
            "--expect-workers",
            "2",
            "--min-workers",
            "1",
            "--round-timeout",
            "2s",
            "--heartbeat",
            "200ms",
            "--log-every",
            "1000",
        ],
    );
    let run = s.run.clone();
    let _w0 = s.worker(0, &[]);
    let mut w1 = s.worker(1, &[]);
    wait_for("rounds with both workers", Duration::from_secs(60), || {
        (rounds_with(&run, 0, 2) >= 5).then_some(())
    });
    w1.signal(libc::SIGKILL);
    let killed_at = rounds(&run).len();
    wait_for(
        "rounds without the killed worker",
        Duration::from_secs(30),
        || (rounds_with(&run, killed_at, 1) >= 5).then_some(()),
    );
    drop(w1);
    let _w1 = s.worker(1, &[]);
    let restarted_at = rounds(&run).len();
    wait_for(
        "rounds with the restarted worker",
        Duration::from_secs(60),
        || (rounds_with(&run, restarted_at, 2) >= 5).then_some(()),
    );
    s.coord.signal(libc::SIGTERM);
    s.coord.expect_success(Duration::from_secs(30));
    assert!(
        s.coord.log_text().contains("unhealthy"),
        "{}",
        s.coord.log_text()
    );
    assert!(std::fs::read_dir(&run).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint-")
    }));
}

/// The coordinator killed (SIGKILL) and restarted with --resume on the same address: workers
/// reconnect and training continues from the checkpoint's round.
#[test]
fn a_restarted_coordinator_resumes_and_workers_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 512);
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap().to_string();
    let ds = d.to_str().unwrap().to_string();
    let base = [
        "--data-dir",
        &ds,
        "--run-dir",
        &r,
        "--model",
        "tiny",
        "--batch-size",
        "2",
        "--epochs",
        "1000",
        "--expect-workers",
        "2",
        "--heartbeat",
        "200ms",
        "--checkpoint-every",
        "10",
        "--threads",
        "1",
        "--log-every",
        "1000",
    ];
    let (mut coord, url) = coordinator(tmp.path(), "coordinator", &base);
    let w0 = worker(tmp.path(), &url, 0, &d, &[]);
    let w1 = worker(tmp.path(), &url, 1, &d, &[]);
    let ck = wait_for_or_log(
        "a checkpoint",
        Duration::from_secs(60),
        &[&coord, &w0, &w1],
        || latest_checkpoint(&run).ok().flatten(),
    );
    coord.signal(libc::SIGKILL);
    drop(coord);
    let ck_round = latest_checkpoint(&run)
        .unwrap()
        .map_or(0, |p| Checkpoint::load(&p, None).unwrap().step);
    assert!(ck_round >= 10, "{}", ck.display());
    let before = rounds(&run).len();
    let addr = url.trim_start_matches("http://").to_string();
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--resume", "--listen", &addr]);
    let (mut coord, _) = coordinator(tmp.path(), "coordinator-2", &args);
    let resumed = wait_for_or_log(
        "rounds after the restart",
        Duration::from_secs(60),
        &[&coord, &w0, &w1],
        || {
            let r = rounds(&run);
            (r.len() >= before + 5).then(|| r[before].clone())
        },
    );
    assert_eq!(
        resumed["round"].as_u64().unwrap(),
        ck_round,
        "training did not continue from the checkpoint"
    );
    assert_eq!(resumed["workers"], 2, "both workers should be back");
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    assert!(
        coord.log_text().contains("resuming"),
        "{}",
        coord.log_text()
    );
}

/// The final checkpoint cannot be written (its path is taken by a folder): the coordinator
/// tries three times, says why, and exits non-zero instead of 0, so that a supervisor (or a
/// Kubernetes Job) sees the lost state.
#[test]
fn a_final_checkpoint_that_cannot_be_written_fails_the_run() {
    let mut s = Setup::start(64, &["--batch-size", "4", "--max-steps", "3"]);
    std::fs::create_dir_all(s.run.join("checkpoint-3.safetensors")).unwrap();
    let mut w = s.worker(0, &[]);
    let status = s.coord.wait(Duration::from_secs(60));
    let log = s.coord.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("checkpoint failed 3 times"), "{log}");
    assert!(
        log.contains("the last checkpoint could not be written"),
        "{log}"
    );
    w.wait(Duration::from_secs(30));
}

/// One background checkpoint and one background evaluation at a time: with an evaluation
/// after every round on 2,048 test images (much slower than a round) and every checkpoint
/// after the first failing three times (their paths are taken by folders; the tries take 3 s),
/// rounds go on meanwhile and the checkpoints and evaluations that would start while one runs
/// are skipped, not queued. The final ones are written, and the run exits 0.
#[test]
fn a_checkpoint_or_evaluation_still_running_makes_the_next_one_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    capsnet_core::data::write_synthetic(&data, 64, 2048, 28, 10, 3).unwrap();
    let run = tmp.path().join("run");
    let rounds = 40;
    let (mut coord, url) = tiny_coordinator(
        tmp.path(),
        "coordinator",
        &data,
        &run,
        &[
            "--batch-size",
            "4",
            "--epochs",
            "100",
            "--max-steps",
            &rounds.to_string(),
            "--eval-every",
            "1",
        ],
    );
    // After the coordinator checked its run folder (it logs "listening" then), before any
    // round.
    wait_for("the coordinator to start", Duration::from_secs(60), || {
        coord
            .log_text()
            .contains("coordinator listening")
            .then_some(())
    });
    for r in 2..rounds {
        std::fs::create_dir_all(run.join(format!("checkpoint-{r}.safetensors"))).unwrap();
    }
    let mut w = worker(tmp.path(), &url, 0, &data, &[]);
    coord.expect_success(Duration::from_secs(120));
    w.expect_success(Duration::from_secs(30));
    let log = coord.log_text();
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    let (written, failed) = (
        count("checkpoint written"),
        count("checkpoint failed 3 times"),
    );
    let evaluated = count(" evaluated ");
    let (ck_skipped, eval_skipped) = (
        count("the last checkpoint is still being written: skipping this one"),
        count("the last evaluation is still running: skipping this one"),
    );
    eprintln!(
        "{rounds} rounds: {written} checkpoints written, {failed} failed, {ck_skipped} skipped; \
         {evaluated} evaluations, {eval_skipped} skipped"
    );
    assert!(failed >= 1 && ck_skipped >= 1 && eval_skipped >= 1, "{log}");
    // Rounds 1 to 39 asked for both, each done (or failed) or skipped; round 40 has the final
    // ones, always done.
    assert_eq!(written + failed + ck_skipped, rounds, "{log}");
    assert_eq!(evaluated + eval_skipped, rounds, "{log}");
    assert!(
        run.join(format!("checkpoint-{rounds}.safetensors"))
            .is_file()
    );
}
