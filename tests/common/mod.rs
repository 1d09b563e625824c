//! Helpers for tests that start real `capsnet` processes: a guard that kills them on drop, and
//! waiting for files and metrics without sleeping blindly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn capsnet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsnet"));
    c.env(
        "OPENBLAS_CORETYPE",
        std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "Haswell".into()),
    )
    .env("CAPSNET_TOKEN", TOKEN)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null());
    c
}

/// A child process that is killed when the guard drops (a failing test leaves nothing behind).
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let child = cmd.spawn().expect("spawn capsnet");
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not exit within {timeout:?}\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit and fails the test, showing its log, unless it exited 0.
    pub fn expect_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.log_text()
        );
    }

    /// Waits for the process to exit and fails the test, showing its log, if it exited 0.
    pub fn expect_failure(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            !status.success(),
            "{} exited 0 but should have failed\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns Some, failing after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `kind: round` lines of a run's metrics.
pub fn rounds(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "round")
        .collect()
}

/// Starts `capsnet coordinator` on a free port and returns it with its URL.
pub fn coordinator(dir: &Path, name: &str, args: &[&str]) -> (Proc, String) {
    let ready = dir.join(format!("{name}.addr"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = capsnet();
    cmd.arg("coordinator")
        .args(args)
        .arg("--ready-file")
        .arg(&ready);
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let p = Proc::spawn(name, cmd, dir);
    let addr = wait_for("the coordinator to listen", Duration::from_secs(60), || {
        std::fs::read_to_string(&ready)
            .ok()
            .filter(|s| !s.is_empty())
    });
    (p, format!("http://{addr}"))
}

pub fn worker(dir: &Path, url: &str, rank: u32, data: &Path, extra: &[&str]) -> Proc {
    let mut cmd = capsnet();
    cmd.args([
        "worker",
        "--coordinator",
        url,
        "--rank",
        &rank.to_string(),
        "--threads",
        "1",
    ])
    .arg("--data-dir")
    .arg(data)
    .args(extra);
    Proc::spawn(&format!("worker-{rank}"), cmd, dir)
}

/// [`wait_for`], printing the logs of `procs` when it times out.
pub fn wait_for_or_log<T>(
    what: &str,
    timeout: Duration,
    procs: &[&Proc],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            for p in procs {
                eprintln!("--- {} ---\n{}", p.name, p.log_text());
            }
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `coordinator` for the tiny network on `data`, writing to `run`, one thread, plus `extra`.
pub fn tiny_coordinator(
    dir: &Path,
    name: &str,
    data: &Path,
    run: &Path,
    extra: &[&str],
) -> (Proc, String) {
    let (d, r) = (data.display().to_string(), run.display().to_string());
    let mut args = vec![
        "--data-dir",
        d.as_str(),
        "--run-dir",
        r.as_str(),
        "--model",
        "tiny",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    coordinator(dir, name, &args)
}
