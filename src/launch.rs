//! `capsnet launch --workers N`: a coordinator and N workers as child processes on this machine,
//! with a generated token and a free port, their logs prefixed and interleaved. Ctrl-c or
//! SIGTERM stops them all (the coordinator checkpoints first); the exit status says whether
//! training finished.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::CoordinatorArgs;

/// 32 hex characters from the kernel's random source.
fn generate_token() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for a token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The arguments given to `launch` minus its own, to pass on to `capsnet coordinator`.
fn coordinator_args() -> Vec<String> {
    let mut out = vec![];
    let mut args = std::env::args().skip(1).peekable();
    let mut seen_launch = false;
    while let Some(a) = args.next() {
        if !seen_launch {
            if a == "launch" {
                seen_launch = true;
            } else {
                out.push(a); // global flags such as --log-format
            }
            continue;
        }
        let takes_value = ["--workers", "--listen", "--ready-file", "--expect-workers"];
        if takes_value.contains(&a.as_str()) {
            args.next();
            continue;
        }
        if takes_value.iter().any(|f| a.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a);
    }
    out
}

fn relay(child: &mut Child, name: String) {
    if let Some(out) = child.stdout.take() {
        let n = name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                println!("[{n}] {l}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("[{name}] {l}");
            }
        });
    }
}

fn signal(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child we started and have not yet reaped.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
async fn stop(children: &mut [(String, Child)], grace: Duration) {
    for (_, c) in children.iter() {
        signal(c, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for (_, c) in children.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

async fn wait_ready(file: &Path, coordinator: &mut Child) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Ok(addr) = std::fs::read_to_string(file) {
            if !addr.is_empty() {
                return Ok(addr);
            }
        }
        if let Some(status) = coordinator.try_wait()? {
            bail!("the coordinator exited before listening ({status})");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the coordinator did not start listening within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn run(workers: usize, args: &CoordinatorArgs) -> Result<()> {
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.tls_cert.is_some() {
        bail!(
            "launch runs everything on loopback without TLS; start `capsnet coordinator` and `capsnet worker` yourself for TLS"
        );
    }
    let token = std::env::var("CAPSNET_TOKEN")
        .ok()
        .filter(|t| t.len() >= 16)
        .map_or_else(generate_token, Ok)?;
    // SAFETY: single-threaded at this point; the variable is read by config() and inherited.
    unsafe { std::env::set_var("CAPSNET_TOKEN", &token) };
    let cfg = args.config()?; // every flag checked before anything starts
    let data_dir = cfg.train.data_dir.clone();
    let exe = std::env::current_exe().context("cannot find the capsnet executable")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = (cores / workers).max(1);
    let ready = std::env::temp_dir().join(format!("capsnet-launch-{}.addr", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let rt = crate::runtime()?;
    let result = rt.block_on(async {
        let mut coordinator = Command::new(&exe)
            .arg("coordinator")
            .args(coordinator_args())
            .args(["--listen", "127.0.0.1:0", "--expect-workers", &workers.to_string()])
            .arg("--ready-file")
            .arg(&ready)
            .env("CAPSNET_TOKEN", &token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the coordinator")?;
        relay(&mut coordinator, "coordinator".into());
        let addr = tokio::select! {
            a = wait_ready(&ready, &mut coordinator) => a?,
            _ = crate::shutdown_signal() => {
                stop(&mut [("coordinator".into(), coordinator)], Duration::from_secs(30)).await;
                bail!("interrupted");
            }
        };
        let url = format!("http://{}", addr.trim());
        eprintln!("[launch] coordinator at {url}; starting {workers} workers with {threads} threads each");
        let mut children: Vec<(String, Child)> = vec![];
        for i in 0..workers {
            let name = format!("worker-{i}");
            let mut w = Command::new(&exe)
                .args(["worker", "--coordinator", &url, "--rank", &i.to_string(), "--name", &name])
                .args(["--threads", &threads.to_string()])
                .arg("--data-dir")
                .arg(&data_dir)
                .env("CAPSNET_TOKEN", &token)
                .env_remove("CAPSNET_WORKER_NAME")
                .env_remove("CAPSNET_RANK")
                .env_remove("CAPSNET_COORDINATOR")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            relay(&mut w, name.clone());
            children.push((name, w));
        }
        let status = tokio::select! {
            s = coordinator.wait() => s?,
            _ = crate::shutdown_signal() => {
                eprintln!("[launch] stopping everything");
                children.insert(0, ("coordinator".into(), coordinator));
                stop(&mut children, Duration::from_secs(30)).await;
                bail!("interrupted; the coordinator wrote a checkpoint (resume with `capsnet coordinator --resume`)");
            }
        };
        // Workers leave on their own once they hear training is over.
        let mut failed = vec![];
        for (name, c) in children.iter_mut() {
            match tokio::time::timeout(Duration::from_secs(20), c.wait()).await {
                Ok(Ok(s)) if s.success() => {}
                Ok(Ok(s)) => failed.push(format!("{name} ({s})")),
                _ => {
                    let _ = c.start_kill();
                    let _ = c.wait().await;
                    failed.push(format!("{name} (did not exit; killed)"));
                }
            }
        }
        if !status.success() {
            bail!("training failed: the coordinator exited with {status}");
        }
        if !failed.is_empty() {
            bail!("training finished but workers failed: {}", failed.join(", "));
        }
        Ok(())
    });
    let _ = std::fs::remove_file(&ready);
    result
}
