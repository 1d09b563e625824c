//! Helpers for tests that start real `capsnet` processes.
//!
//! # Layout
//!
//! - this file: the command builder, the test token, waiting without sleeping blindly, reading
//!   a run's metrics;
//! - [`proc`]: a child process that is killed when its guard drops;
//! - [`cluster`]: synthetic data, coordinators and workers on loopback, and clients that join by
//!   hand to drive the protocol;
//! - [`certs`]: a CA and certificates made with openssl, for the TLS tests;
//! - [`reference`]: the single-process training that distributed runs are compared with.

// Each test file uses its own part of these helpers.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod proc;
pub mod reference;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// Not every test file starts a cluster.
#[allow(unused_imports)]
pub use cluster::*;
pub use proc::Proc;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// `capsnet` as a node of a test cluster: the test token, `info` logs, no stdin, and the
/// Haswell kernels unless the caller chose others (older OpenBLAS builds compute wrong results
/// on this processor otherwise).
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

/// What a finished command printed, stdout then stderr.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `f` every 20 ms until it returns Some, failing after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or_log(what, timeout, &[], f)
}

/// [`wait_for`], printing the logs of `procs` when it times out.
pub fn wait_for_or_log<T>(
    what: &str,
    timeout: Duration,
    procs: &[&Proc],
    f: impl FnMut() -> Option<T>,
) -> T {
    poll_for(timeout, f).unwrap_or_else(|| {
        for p in procs {
            eprintln!("--- {} ---\n{}", p.name, p.log_text());
        }
        panic!("timed out waiting for {what}");
    })
}

/// Polls `f` every 20 ms until it returns Some, or None after `timeout`.
pub fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
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

/// Rounds of a run's metrics with `workers` updates, from the `from`-th round line on.
pub fn rounds_with(run: &Path, from: usize, workers: u64) -> usize {
    rounds(run)
        .iter()
        .skip(from)
        .filter(|r| r["workers"] == workers)
        .count()
}

/// Processes whose command line mentions `needle` (a test's own temporary path or address), as
/// "pid: command line".
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// `GET /metrics` on `addr`; the response's status line and body.
pub fn scrape(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name` (with its labels, as printed) in an OpenMetrics body.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}
