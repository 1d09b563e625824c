//! `capsnet launch --workers N`: a coordinator and N workers on this machine. The coordinator
//! runs in this process (on a unix socket, or a free loopback port with `--transport tcp`)
//! with a generated token; the workers are child
//! processes whose output is prefixed (`[worker-0] ...`) and interleaved with the coordinator's
//! (`[coordinator] ...`). Ctrl-c or SIGTERM stops them all (the coordinator checkpoints first);
//! the exit status says whether training finished. With `--reducers R` the first R workers
//! also serve a reducer each (co-located, `capsnet worker --serve-reducer`). The coordinator
//! and the reducers serve unix sockets in a private temporary folder (`--transport tcp`:
//! loopback ports).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::distributed::{CoordinatorArgs, runtime, serve_coordinator, shutdown_signal};
use crate::exit::ConfigError;

/// What the coordinator's own lines start with, beside the workers' `[worker-i]`.
pub const COORDINATOR_PREFIX: &str = "[coordinator] ";

#[derive(Args)]
pub struct LaunchArgs {
    /// Worker processes to start.
    #[arg(long, env = "CAPSNET_WORKERS", default_value_t = 2)]
    workers: usize,
    /// The workers send the whole gradient only once their backward pass is done (see
    /// `capsnet worker --no-overlap`).
    #[arg(long)]
    no_overlap: bool,
    /// How the workers reach the coordinator and the reducers they serve (--reducers): unix
    /// sockets (every process is on this machine: no TCP/IP stack) or loopback TCP ports.
    #[arg(long, value_enum, default_value_t = Transport::Unix)]
    transport: Transport,
    #[command(flatten)]
    coordinator: CoordinatorArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Unix,
    Tcp,
}

/// 32 hex characters from the kernel's random source.
fn generate_token() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for a token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
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

/// Sends SIGTERM to every worker still running, waits up to `grace`, then kills the rest.
async fn stop(workers: &mut [(String, Child)], grace: Duration) {
    for (_, c) in workers.iter() {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on a child we started and have not reaped (`id()` is None once
            // it is reaped, so the pid cannot belong to another process yet).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    for (_, c) in workers.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

pub fn run(a: LaunchArgs) -> Result<()> {
    if a.workers == 0 {
        return Err(ConfigError("--workers must be at least 1".into()).into());
    }
    let args = &a.coordinator;
    if args.reducers > a.workers {
        return Err(ConfigError(format!(
            "--reducers {} with --workers {}: launch serves the reducers in its workers (one \
             each, `capsnet worker --serve-reducer`), so at most one per worker; start `capsnet \
             reducer` processes yourself for more",
            args.reducers, a.workers
        ))
        .into());
    }
    if args.tls_cert.is_some() {
        return Err(ConfigError(
            "launch runs everything on loopback without TLS; start `capsnet coordinator` and `capsnet worker` yourself for TLS".into(),
        )
        .into());
    }
    // The token the operator gave (--token-file or CAPSNET_TOKEN), else a fresh one.
    let given = args.token.token_file.is_some() || std::env::var_os("CAPSNET_TOKEN").is_some();
    let token = if given {
        args.token.token()?
    } else {
        generate_token()?
    };
    // Every flag is checked before anything starts.
    let mut cfg = args.config(token.clone(), Some(a.workers))?;
    // Every worker connects from 127.0.0.1 (a worker holds one connection, and briefly a second
    // when it reconnects): the per-address limit must not cap the fleet.
    let needed = a.workers.saturating_mul(4).saturating_add(16);
    cfg.max_connections_per_ip = cfg.max_connections_per_ip.max(needed);
    cfg.max_connections = cfg.max_connections.max(needed);
    let data_dir = cfg.train.data_dir.clone();
    let exe = std::env::current_exe().context("cannot find the capsnet executable")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = (cores / a.workers).max(1);
    // The sockets: in a folder only this user can enter, removed at the end.
    let sockets = match a.transport {
        Transport::Unix => Some(
            tempfile::Builder::new()
                .prefix("capsnet-launch-")
                .tempdir()
                .context("making a folder for the unix sockets")?,
        ),
        Transport::Tcp => None,
    };
    let serve_at = |i: usize| match &sockets {
        Some(dir) => format!(
            "unix:{}",
            dir.path().join(format!("reducer-{i}.sock")).display()
        ),
        None => "127.0.0.1:0".to_string(),
    };
    runtime()?.block_on(async {
        // Handlers first: a signal from here on stops the coordinator (after its checkpoint)
        // and then the workers, never the process alone with its workers left behind.
        let signal = shutdown_signal();
        let (listener, url) = match &sockets {
            Some(dir) => {
                let at = format!("unix:{}", dir.path().join("coordinator.sock").display());
                let l = capsnet_coordinator::Listener::bind(&at)
                    .await
                    .context("binding the coordinator's unix socket")?;
                (l, at)
            }
            None => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .context("binding a loopback port for the coordinator")?;
                let url = format!("http://{}", l.local_addr()?);
                (l.into(), url)
            }
        };
        let coordinator = tokio::spawn(async move {
            serve_coordinator(listener, cfg, signal, COORDINATOR_PREFIX).await
        });
        eprintln!(
            "[launch] coordinator at {url}; starting {} workers with {threads} threads each",
            a.workers
        );
        let mut workers: Vec<(String, Child)> = vec![];
        for i in 0..a.workers {
            let name = format!("worker-{i}");
            let mut w = Command::new(&exe)
                .args(["worker", "--coordinator", &url, "--rank", &i.to_string(), "--name", &name])
                .args(["--threads", &threads.to_string()])
                .args(a.no_overlap.then_some("--no-overlap"))
                // With --reducers R, the first R workers each serve one.
                .args(
                    (i < args.reducers)
                        .then(|| ["--serve-reducer".to_string(), serve_at(i)])
                        .into_iter()
                        .flatten(),
                )
                .arg("--data-dir")
                .arg(&data_dir)
                .env("CAPSNET_TOKEN", &token)
                .env(crate::PARENT_PID_ENV, std::process::id().to_string())
                .env_remove("CAPSNET_TOKEN_FILE")
                .env_remove("CAPSNET_WORKER_NAME")
                .env_remove("CAPSNET_RANK")
                .env_remove("CAPSNET_COORDINATOR")
                // The coordinator's settings are not the workers': one metrics port each would
                // collide, and TLS files would not fit a plaintext loopback address.
                .env_remove("CAPSNET_METRICS_LISTEN")
                .env_remove("CAPSNET_TLS_CA")
                .env_remove("CAPSNET_TLS_CERT")
                .env_remove("CAPSNET_TLS_KEY")
                .env_remove("CAPSNET_TLS_DOMAIN")
                // Each reducer gets its own loopback port above, plaintext.
                .env_remove("CAPSNET_SERVE_REDUCER")
                .env_remove("CAPSNET_REDUCER_ADVERTISE")
                .env_remove("CAPSNET_REDUCER_TLS_CERT")
                .env_remove("CAPSNET_REDUCER_TLS_KEY")
                .env_remove("CAPSNET_REDUCER_TLS_CLIENT_CA")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            relay(&mut w, name.clone());
            workers.push((name, w));
        }
        // The coordinator stops on the same signal (after its checkpoint) or at the end of
        // training; the workers leave on their own once they hear training is over.
        let outcome = coordinator.await.context("the coordinator task")?;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                stop(&mut workers, Duration::from_secs(10)).await;
                return Err(e.context("training failed: the coordinator stopped"));
            }
        };
        if !outcome.finished {
            eprintln!("[launch] stopping the workers");
            stop(&mut workers, Duration::from_secs(30)).await;
            match &outcome.checkpoint {
                Some(p) => bail!(
                    "interrupted after {} rounds; checkpoint {} (continue with `capsnet launch --resume` and the same --run-dir)",
                    outcome.rounds,
                    p.display()
                ),
                None => bail!("interrupted after {} rounds; no checkpoint was written", outcome.rounds),
            }
        }
        let mut failed = vec![];
        for (name, c) in workers.iter_mut() {
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
        if !failed.is_empty() {
            bail!("training finished but workers failed: {}", failed.join(", "));
        }
        Ok(())
    })
}
