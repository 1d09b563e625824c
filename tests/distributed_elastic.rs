//! Membership per round: workers that join late, die (SIGKILL) or come back under a new name
//! change who trains from the next round, never stall the run, and never make a sample of an
//! epoch trained twice or skipped. Real processes on loopback, a tiny network, synthetic data.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tonic_health::ServingStatus;

/// `capsnet worker` named `name`, with no rank (the coordinator picks one).
fn named_worker(s: &Setup, name: &str) -> Proc {
    let mut cmd = capsnet();
    cmd.args(["worker", "--coordinator", &s.url, "--name", name])
        .args(["--threads", "1"])
        .arg("--data-dir")
        .arg(&s.data);
    Proc::spawn(name, cmd, s.tmp.path())
}

/// Fails unless, in every epoch, the positions the rounds trained tile `0..n` exactly once.
fn assert_every_sample_once(run: &Path, n: usize, epochs: u64) {
    let all = rounds(run);
    for epoch in 0..epochs {
        let mut trained = vec![0u32; n];
        for r in all.iter().filter(|r| r["epoch"] == epoch) {
            for p in r["positions"].as_array().unwrap() {
                let (a, b) = (p[0].as_u64().unwrap(), p[1].as_u64().unwrap());
                (a..b).for_each(|i| trained[i as usize] += 1);
            }
        }
        let twice: Vec<usize> = (0..n).filter(|&i| trained[i] > 1).collect();
        let skipped: Vec<usize> = (0..n).filter(|&i| trained[i] == 0).collect();
        assert!(
            twice.is_empty() && skipped.is_empty(),
            "epoch {epoch}: trained twice {twice:?}, skipped {skipped:?}"
        );
    }
}

/// The new user's run from the elastic issue: a coordinator that starts with the first worker,
/// a second worker a moment later, then the first killed and started again under a new name.
/// The late worker trains from the next round, the round goes on without the dead one (the
/// heartbeat, not the 60 s round deadline, notices), the restarted one trains at once, the
/// run finishes by itself, and each epoch trains each sample exactly once.
#[test]
fn late_dead_and_renamed_workers_change_the_next_round_and_lose_no_sample() {
    let n = 384;
    let mut s = Setup::start(
        n,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "2",
            "--min-workers",
            "1",
            "--round-timeout",
            "60s",
            "--heartbeat",
            "200ms",
            "--log-every",
            "1000",
        ],
    );
    let run = s.run.clone();
    let mut alpha = named_worker(&s, "alpha");
    wait_for("rounds with alpha alone", Duration::from_secs(60), || {
        (rounds_with(&run, 0, 1) >= 3).then_some(())
    });
    let _beta = named_worker(&s, "beta");
    let at = rounds(&run).len();
    wait_for_or_log(
        "rounds with the late worker",
        Duration::from_secs(30),
        &[&s.coord],
        || (rounds_with(&run, at, 2) >= 3).then_some(()),
    );
    alpha.signal(libc::SIGKILL);
    let at = rounds(&run).len();
    wait_for_or_log(
        "rounds without the killed worker",
        Duration::from_secs(30),
        &[&s.coord],
        || (rounds_with(&run, at, 1) >= 3).then_some(()),
    );
    drop(alpha);
    let _alpha2 = named_worker(&s, "alpha-2");
    let at = rounds(&run).len();
    wait_for_or_log(
        "rounds with the restarted worker under a new name",
        Duration::from_secs(30),
        &[&s.coord],
        || (rounds_with(&run, at, 2) >= 3).then_some(()),
    );
    s.coord.expect_success(Duration::from_secs(120));
    let log = s.coord.log_text();
    assert!(!log.contains("missed the round deadline"), "{log}");
    assert_every_sample_once(&run, n, 2);
}

/// The health service's readiness answer: `capsnet.v1.Coordinator`.
const READY: &str = "capsnet.v1.Coordinator";

/// The coordinator at `url` is live and (within 10 s) not ready.
async fn live_not_ready(url: &str) {
    wait_health(
        url,
        READY,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(health(url, "").await, ServingStatus::Serving);
}

/// Every worker dies: the run waits, says so in Status and in its readiness (live, not ready,
/// as before any worker joined), and goes on when a new worker joins.
#[test]
fn a_run_without_live_workers_waits_and_goes_on_when_one_joins() {
    let n = 128;
    let mut s = Setup::start(
        n,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--heartbeat",
            "200ms",
            "--log-every",
            "1000",
        ],
    );
    let run = s.run.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = s.url.clone();
    // Before any worker: the process is live, the run not ready (it cannot make progress).
    rt.block_on(async {
        live_not_ready(&url).await;
    });
    let mut only = named_worker(&s, "only");
    wait_for("a few rounds", Duration::from_secs(60), || {
        (rounds(&run).len() >= 3).then_some(())
    });
    only.signal(libc::SIGKILL);
    rt.block_on(async {
        let mut client = capsnet_worker::Client::connect(&url, TOKEN, None)
            .await
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            let st = coordinator_status(&mut client).await;
            if st.waiting_for_workers {
                assert!(!st.finished);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "never waiting: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Waiting for workers: not ready, still live.
        live_not_ready(&url).await;
    });
    drop(only);
    let _next = named_worker(&s, "next");
    s.coord.expect_success(Duration::from_secs(120));
    assert!(
        s.coord.log_text().contains("no live worker"),
        "{}",
        s.coord.log_text()
    );
    assert_every_sample_once(&run, n, 1);
}

/// A worker killed with SIGKILL is noticed by its closed connection, not by heartbeats (with a
/// 2 s heartbeat a silent worker counts as dead after 6 s; the log says which path noticed)
/// nor by the 60 s round deadline; its work of the round it died in is redone.
#[test]
fn a_killed_worker_is_noticed_by_its_closed_connection() {
    let n = 256;
    let mut s = Setup::start(
        n,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--expect-workers",
            "2",
            "--round-timeout",
            "60s",
            "--heartbeat",
            "2s",
            "--log-every",
            "1000",
        ],
    );
    let run = s.run.clone();
    let mut a = named_worker(&s, "a");
    let _b = named_worker(&s, "b");
    wait_for("rounds with both", Duration::from_secs(60), || {
        (rounds_with(&run, 0, 2) >= 3).then_some(())
    });
    a.signal(libc::SIGKILL);
    s.coord.expect_success(Duration::from_secs(50));
    let log = s.coord.log_text();
    assert!(log.contains("connection closed: unhealthy"), "{log}");
    assert!(!log.contains("missed the round deadline"), "{log}");
    assert!(!log.contains("no heartbeat"), "{log}");
    assert_every_sample_once(&run, n, 1);
}

/// `capsnet bench chaos` run small: a fault-free run, then the same under a worker kill with a
/// restart, a stopped worker, a joining worker and a coordinator kill with --resume. Both
/// finish, and the faulty one trains every sample of each epoch exactly once.
#[test]
fn bench_chaos_runs_small_and_loses_no_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("chaos.json");
    let out = capsnet()
        .args(["bench", "chaos", "--workers", "2", "--synthetic", "600"])
        .args(["--epochs", "2", "--batch-size", "4", "--test-limit", "32"])
        .args(["--kills", "1", "--restart-after", "1s", "--stragglers", "1"])
        .args([
            "--stop-for",
            "2s",
            "--joins",
            "1",
            "--coordinator-kills",
            "1",
        ])
        .args(["--heartbeat", "300ms", "--checkpoint-every", "10"])
        .arg("--keep")
        .arg(tmp.path().join("runs"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for run in ["baseline", "chaos"] {
        let r = &v[run];
        assert_eq!(r["finished"], true, "{run}: {text}");
        assert_eq!(r["samples_twice"], 0, "{run}: {text}");
        assert_eq!(r["samples_skipped"], 0, "{run}: {text}");
        assert!(r["rounds"].as_u64().unwrap() > 0, "{run}: {text}");
    }
    let kinds: Vec<&str> = v["chaos"]["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    for k in [
        "kill_worker",
        "stop_worker",
        "worker_joins",
        "kill_coordinator",
    ] {
        assert!(kinds.contains(&k), "{k} not injected: {kinds:?}\n{text}");
    }
    assert!(v["baseline"]["faults"].as_array().unwrap().is_empty());
    assert!(text.contains("throughput kept"), "{text}");
}

/// A worker much slower than the other (stopped and continued in a loop: running a tenth of the
/// time) is
/// marked a straggler in Status and the round lines; with --drop-stragglers the rounds go on
/// without it, but for the probation rounds that measure it again.
#[test]
fn a_slow_worker_is_marked_a_straggler_and_dropped() {
    let mut s = Setup::start(
        4096,
        &[
            "--batch-size",
            "64",
            "--epochs",
            "1000",
            "--expect-workers",
            "2",
            "--heartbeat",
            "2s",
            "--drop-stragglers",
            "--log-every",
            "100000",
        ],
    );
    let run = s.run.clone();
    let _fast = named_worker(&s, "fast");
    let mut slow = named_worker(&s, "slow");
    wait_for("rounds with both", Duration::from_secs(60), || {
        (rounds_with(&run, 0, 2) >= 3).then_some(())
    });
    // Slow it down for the rest of the test: stopped 90 ms of every 100.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slowing = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                slow.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(90));
                slow.signal(libc::SIGCONT);
                std::thread::sleep(Duration::from_millis(10));
            }
            slow
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt
        .block_on(capsnet_worker::Client::connect(&s.url, TOKEN, None))
        .unwrap();
    let start = std::time::Instant::now();
    let marked = loop {
        std::thread::sleep(Duration::from_millis(100));
        let st = rt.block_on(coordinator_status(&mut client));
        let w = st.workers.iter().find(|w| w.name == "slow").unwrap();
        if w.straggler {
            assert!(w.pace > 2.0, "{w:?}");
            break rounds(&run).len();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never marked: {st:?}"
        );
    };
    // Dropped: the rounds go on with the fast worker alone but for probation rounds.
    wait_for_or_log(
        "rounds without the straggler",
        Duration::from_secs(30),
        &[&s.coord],
        || (rounds_with(&run, marked, 1) >= 20).then_some(()),
    );
    let later = rounds(&run);
    assert!(
        later[marked..].iter().any(|r| r["stragglers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "slow")),
        "the round lines name the straggler"
    );
    assert!(
        s.coord.log_text().contains("straggler"),
        "{}",
        s.coord.log_text()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _slow = slowing.join().unwrap();
    s.coord.signal(libc::SIGTERM);
    s.coord.expect_success(Duration::from_secs(30));
}

/// --metrics-listen serves Prometheus metrics during a run, on the coordinator and on a
/// worker, and they move: rounds, members by state, heartbeat ages, bytes by direction; the
/// worker's updates, step times and bytes. Other paths get 404, and an endless request is cut
/// off without an answer.
#[test]
fn metrics_are_served_and_move_during_a_run() {
    let addr = free_addr();
    let mut s = Setup::start(
        4096,
        &[
            "--batch-size",
            "2",
            "--epochs",
            "1000",
            "--expect-workers",
            "2",
            "--metrics-listen",
            &addr,
            "--log-every",
            "100000",
        ],
    );
    let run = s.run.clone();
    let _a = named_worker(&s, "a");
    let worker_addr = free_addr();
    let _b = {
        let mut cmd = capsnet();
        cmd.args(["worker", "--coordinator", &s.url, "--name", "b"])
            .args(["--threads", "1", "--metrics-listen", &worker_addr])
            .arg("--data-dir")
            .arg(&s.data);
        Proc::spawn("b", cmd, s.tmp.path())
    };
    wait_for("rounds", Duration::from_secs(60), || {
        (rounds(&run).len() >= 5).then_some(())
    });
    // Rounds are closing: ready.
    let url = s.url.clone();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        wait_health(&url, READY, ServingStatus::Serving, Duration::from_secs(10)).await;
        assert_eq!(health(&url, "").await, ServingStatus::Serving);
    });
    let (status, first) = scrape(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let rounds_then = sample(&first, "capsnet_rounds_total").unwrap();
    wait_for("more rounds", Duration::from_secs(30), || {
        (rounds(&run).len() as f64 >= rounds_then + 5.0).then_some(())
    });
    let (_, body) = scrape(&addr, "/metrics");
    assert!(
        sample(&body, "capsnet_rounds_total").unwrap() > rounds_then,
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"capsnet_members{state="healthy"}"#),
        Some(2.0),
        "{body}"
    );
    for dir in ["in", "out"] {
        let name = format!(r#"capsnet_wire_bytes_total{{encoding="f32",direction="{dir}"}}"#);
        assert!(
            sample(&body, &name).is_some_and(|b| b > 0.0),
            "{name}: {body}"
        );
    }
    let age = sample(&body, r#"capsnet_worker_heartbeat_age_seconds{worker="a"}"#).unwrap();
    assert!((0.0..10.0).contains(&age), "{body}");
    assert!(sample(&body, "capsnet_last_round_timestamp_seconds").unwrap() > 1.7e9);
    assert_eq!(sample(&body, "capsnet_waiting_for_workers"), Some(0.0));
    assert!(body.contains("capsnet_round_seconds_bucket"), "{body}");
    let updates = sample(&body, r#"capsnet_worker_update_seconds_count{worker="b"}"#);
    assert!(updates.is_some_and(|n| n >= 5.0), "{body}");
    // The worker's own view: updates used, step and sync times, bytes both ways, a member.
    let (status, w) = scrape(&worker_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let used = sample(&w, "capsnet_worker_updates_total").unwrap();
    assert!(used >= 1.0, "{w}");
    assert_eq!(sample(&w, "capsnet_worker_joined"), Some(1.0), "{w}");
    assert_eq!(sample(&w, "capsnet_worker_joins_total"), Some(1.0), "{w}");
    assert!(
        sample(&w, "capsnet_worker_compute_seconds_count").is_some_and(|n| n >= used),
        "{w}"
    );
    for dir in ["in", "out"] {
        let name =
            format!(r#"capsnet_worker_wire_bytes_total{{encoding="f32",direction="{dir}"}}"#);
        assert!(sample(&w, &name).is_some_and(|b| b > 0.0), "{name}: {w}");
    }
    assert!(
        sample(&w, "capsnet_worker_loss").is_some_and(f64::is_finite),
        "{w}"
    );
    assert!(sample(&w, "capsnet_worker_last_update_timestamp_seconds").unwrap() > 1.7e9);
    wait_for("more worker updates", Duration::from_secs(30), || {
        let (_, w) = scrape(&worker_addr, "/metrics");
        (sample(&w, "capsnet_worker_updates_total").unwrap() > used).then_some(())
    });
    assert!(scrape(&worker_addr, "/other").0.contains("404"));
    assert!(scrape(&addr, "/other").0.contains("404"));
    // A request that never ends is cut off at its size limit, unanswered.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let junk = vec![b'x'; 64 << 10];
        let _ = c.write_all(&junk);
        let mut out = vec![];
        let _ = c.read_to_end(&mut out);
        assert!(out.is_empty(), "answered a 64 KiB request line");
    }
    s.coord.signal(libc::SIGTERM);
    s.coord.expect_success(Duration::from_secs(30));
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let parent = pid.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            (ppid == parent).then_some(child)
        })
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// `capsnet bench chaos` killed with SIGKILL mid-run (it can stop nothing itself): its
/// coordinator and workers, which log to files and would otherwise run on, die with it.
#[test]
fn bench_chaos_killed_with_sigkill_leaves_no_process_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("runs");
    let mut cmd = capsnet();
    cmd.args(["bench", "chaos", "--workers", "2", "--synthetic", "256"])
        .args([
            "--epochs",
            "1000",
            "--batch-size",
            "4",
            "--test-limit",
            "16",
        ])
        .args(["--kills", "0", "--stragglers", "0", "--joins", "0"])
        .args(["--coordinator-kills", "0", "--no-baseline"])
        .arg("--keep")
        .arg(&keep);
    let mut bench = Proc::spawn("bench", cmd, tmp.path());
    let metrics = keep.join("chaos").join("run").join("metrics.jsonl");
    wait_for_or_log("rounds", Duration::from_secs(60), &[&bench], || {
        let n = std::fs::read_to_string(&metrics).ok()?.lines().count();
        (n >= 3).then_some(())
    });
    let children = children_of(bench.pid());
    assert_eq!(
        children.len(),
        3,
        "a coordinator and two workers: {children:?}"
    );
    bench.signal(libc::SIGKILL);
    bench.wait(Duration::from_secs(10));
    let start = std::time::Instant::now();
    loop {
        let left: Vec<u32> = children.iter().copied().filter(|&p| running(p)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still running 10 s after the bench was killed: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
