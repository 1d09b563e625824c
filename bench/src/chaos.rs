//! `capsnet bench chaos`: a coordinator and N worker processes of this machine trained while
//! faults are injected on a seeded schedule (workers killed and restarted, stopped and
//! continued, leaving, joining; the coordinator killed and resumed), and what it cost: time
//! lost, samples trained twice or skipped, accuracy, and whether the run finished at all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsnet_core::rng::Rng;
use rustix::process::{Pid, Signal, kill_process};

use crate::{BenchError, Result};

/// One chaos (or fault-free) run.
#[derive(Clone, Debug)]
pub struct ChaosSettings {
    /// The `capsnet` binary to run.
    pub exe: PathBuf,
    /// Where the run directory and the processes' logs go.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// Training flags for the coordinator (`--model`, `--epochs`, `--batch-size`, ...).
    pub train_args: Vec<String>,
    /// Training images in use (for counting the samples of each epoch).
    pub train_len: usize,
    pub epochs: u64,
    pub workers: usize,
    pub threads_per_worker: usize,
    /// Workers killed with SIGKILL, each restarted `restart_after` later (every other one
    /// under a new name).
    pub kills: usize,
    pub restart_after: Duration,
    /// Workers stopped (SIGSTOP) for `stop_for`, then continued.
    pub stragglers: usize,
    pub stop_for: Duration,
    /// Workers that leave (SIGTERM), and new workers that join.
    pub leaves: usize,
    pub joins: usize,
    /// Times the coordinator is killed (SIGKILL) and started again with --resume.
    pub coordinator_kills: usize,
    pub seed: u64,
    pub heartbeat: Duration,
    /// Give up (and report the run as not finished) after this long.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    KillWorker,
    StopWorker,
    WorkerLeaves,
    WorkerJoins,
    KillCoordinator,
}

/// A fault as injected.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fault {
    pub at_s: f64,
    pub kind: FaultKind,
    pub target: String,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChaosReport {
    pub faults: Vec<Fault>,
    /// The coordinator finished training and exited 0.
    pub finished: bool,
    pub wall_s: f64,
    /// Rounds in the final history (rounds lost to a coordinator restart not counted).
    pub rounds: usize,
    pub samples: u64,
    pub images_per_s: f64,
    pub median_round_s: f64,
    /// Positions of finished epochs trained more than once, and not at all.
    pub samples_twice: u64,
    pub samples_skipped: u64,
    pub final_test_accuracy: Option<f64>,
}

/// A child process with its log file.
struct Proc {
    name: String,
    child: Child,
    stopped: bool,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
        let io = |what| move |source| BenchError::Io { what, source };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .map_err(io("opening a process log"))?;
        let err = log.try_clone().map_err(io("opening a process log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io("starting a capsnet process"))?;
        Ok(Proc {
            name: name.into(),
            child,
            stopped: false,
        })
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` while the child is not reaped (its pid cannot be reused before).
    fn signal(&mut self, sig: Signal) {
        if self.running()
            && let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw)
        {
            let _ = kill_process(pid, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.stopped {
            self.signal(Signal::CONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seeded schedule: each fault at a uniform point of the training's progress (the share of
/// its samples trained so far) between 10% and 90%, so that every fault lands inside the run
/// whatever the machine's speed.
fn schedule(s: &ChaosSettings) -> Vec<(f64, FaultKind)> {
    let mut rng = Rng::new(s.seed);
    let mut out = vec![];
    for (n, kind) in [
        (s.kills, FaultKind::KillWorker),
        (s.stragglers, FaultKind::StopWorker),
        (s.leaves, FaultKind::WorkerLeaves),
        (s.joins, FaultKind::WorkerJoins),
        (s.coordinator_kills, FaultKind::KillCoordinator),
    ] {
        for _ in 0..n {
            out.push((0.1 + 0.8 * f64::from(rng.uniform(0.0, 1.0)), kind));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// A free loopback port for the coordinator, kept across its restarts.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        what: "finding a free port",
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            what: "finding a free port",
            source,
        })
}

const TOKEN: &str = "chaos-bench-token-0123456789";

struct Fleet<'a> {
    s: &'a ChaosSettings,
    run: PathBuf,
    listen: String,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
    names: u64,
}

impl Fleet<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.s.exe);
        cmd.args(args)
            .env("CAPSNET_TOKEN", TOKEN)
            // The child gets SIGKILL when this process is gone, however it ended.
            .env("CAPSNET_PARENT_PID", std::process::id().to_string())
            .env_remove("CAPSNET_TOKEN_FILE")
            .env("RUST_LOG", "info");
        cmd
    }

    fn start_coordinator(&mut self, resume: bool) -> Result<()> {
        let hb = format!("{}ms", self.s.heartbeat.as_millis());
        let mut cmd = self.command(&["coordinator", "--listen", &self.listen]);
        cmd.arg("--data-dir")
            .arg(&self.s.data_dir)
            .arg("--run-dir")
            .arg(&self.run)
            .args([
                "--heartbeat",
                &hb,
                "--min-workers",
                "1",
                "--round-timeout",
                "60s",
            ])
            .args(["--expect-workers", &self.s.workers.to_string()])
            .args(["--log-every", "1000000"])
            .args(&self.s.train_args);
        if resume {
            cmd.arg("--resume");
        }
        self.coordinator = Some(Proc::spawn("coordinator", cmd, &self.s.dir)?);
        Ok(())
    }

    fn start_worker(&mut self, name: String) -> Result<()> {
        let url = format!("http://{}", self.listen);
        let threads = self.s.threads_per_worker.to_string();
        let mut cmd = self.command(&["worker", "--coordinator", &url, "--name", &name]);
        cmd.args(["--threads", &threads])
            .arg("--data-dir")
            .arg(&self.s.data_dir);
        let p = Proc::spawn(&name, cmd, &self.s.dir)?;
        self.workers.push(p);
        Ok(())
    }

    fn new_name(&mut self) -> String {
        self.names += 1;
        format!("chaos-{}", self.names)
    }

    /// A worker that runs and is not stopped, chosen by `rng`.
    fn pick(&mut self, rng: &mut Rng) -> Option<usize> {
        let live: Vec<usize> = (self.workers.iter_mut().enumerate())
            .filter_map(|(i, w)| (!w.stopped && w.running()).then_some(i))
            .collect();
        if live.is_empty() {
            return None;
        }
        let k = (rng.uniform(0.0, live.len() as f32) as usize).min(live.len() - 1);
        Some(live[k])
    }
}

/// Runs one training under the schedule of faults `s` describes (none: the fault-free run).
pub fn run(s: &ChaosSettings) -> Result<ChaosReport> {
    if s.workers == 0 {
        return Err(BenchError::Settings("--workers must be at least 1".into()));
    }
    std::fs::create_dir_all(&s.dir).map_err(|source| BenchError::Io {
        what: "creating the bench directory",
        source,
    })?;
    let mut fleet = Fleet {
        s,
        run: s.dir.join("run"),
        listen: format!("127.0.0.1:{}", free_port()?),
        coordinator: None,
        workers: vec![],
        names: 0,
    };
    let started = Instant::now();
    fleet.start_coordinator(false)?;
    for _ in 0..s.workers {
        let name = fleet.new_name();
        fleet.start_worker(name)?;
    }
    let mut rng = Rng::new(s.seed ^ 0x9e37_79b9);
    let mut plan = schedule(s).into_iter().peekable();
    // (when, worker index, action) for restarts and continues.
    let mut later: Vec<(Instant, Later)> = vec![];
    let mut faults = vec![];
    let mut kills = 0usize;
    let mut progress = Progress::default();
    let total = (s.train_len as u64 * s.epochs).max(1) as f64;
    let finished = loop {
        let now = Instant::now();
        let t = now - started;
        if t > s.timeout {
            break false;
        }
        if let Some(c) = fleet.coordinator.as_mut()
            && let Ok(Some(status)) = c.child.try_wait()
        {
            break status.success();
        }
        let done = progress.read(&fleet.run.join("metrics.jsonl")) as f64 / total;
        while plan.peek().is_some_and(|(at, _)| *at <= done) {
            let Some((_, kind)) = plan.next() else { break };
            let target = match kind {
                FaultKind::KillWorker => fleet.pick(&mut rng).map(|i| {
                    fleet.workers[i].signal(Signal::KILL);
                    kills += 1;
                    // Every other one comes back under its own name, the rest under a new one.
                    let name = if kills % 2 == 0 {
                        fleet.workers[i].name.clone()
                    } else {
                        fleet.new_name()
                    };
                    later.push((now + s.restart_after, Later::Start(name)));
                    fleet.workers[i].name.clone()
                }),
                FaultKind::StopWorker => fleet.pick(&mut rng).map(|i| {
                    fleet.workers[i].signal(Signal::STOP);
                    fleet.workers[i].stopped = true;
                    later.push((now + s.stop_for, Later::Continue(i)));
                    fleet.workers[i].name.clone()
                }),
                FaultKind::WorkerLeaves => fleet.pick(&mut rng).map(|i| {
                    fleet.workers[i].signal(Signal::TERM);
                    fleet.workers[i].name.clone()
                }),
                FaultKind::WorkerJoins => {
                    let name = fleet.new_name();
                    fleet.start_worker(name.clone())?;
                    Some(name)
                }
                FaultKind::KillCoordinator => {
                    if let Some(c) = fleet.coordinator.as_mut() {
                        c.signal(Signal::KILL);
                        let _ = c.child.wait();
                    }
                    fleet.coordinator = None;
                    fleet.start_coordinator(true)?;
                    Some("coordinator".into())
                }
            };
            if let Some(target) = target {
                faults.push(Fault {
                    at_s: t.as_secs_f64(),
                    kind,
                    target,
                });
            }
        }
        let mut i = 0;
        while i < later.len() {
            if later[i].0 <= now {
                match later.swap_remove(i).1 {
                    Later::Start(name) => fleet.start_worker(name)?,
                    Later::Continue(k) => {
                        fleet.workers[k].signal(Signal::CONT);
                        fleet.workers[k].stopped = false;
                    }
                }
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall_s = started.elapsed().as_secs_f64();
    // Workers leave once they hear training is over (within the coordinator's grace period);
    // one that was stopped or restarted too late to hear it is killed on drop.
    let deadline = Instant::now() + Duration::from_secs(3);
    for w in fleet.workers.iter_mut() {
        if w.stopped {
            w.signal(Signal::CONT);
            w.stopped = false;
        }
        while w.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(fleet);
    report(s, faults, finished, wall_s)
}

/// Samples trained so far, read from metrics.jsonl as it grows (rounds redone after a
/// coordinator restart count again: progress only has to move forward).
#[derive(Default)]
struct Progress {
    read: u64,
    samples: u64,
}

impl Progress {
    fn read(&mut self, path: &Path) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(path) else {
            return self.samples;
        };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(self.read)).is_err() || f.read_to_string(&mut text).is_err() {
            return self.samples;
        }
        // Whole lines only; a line still being written is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text[..whole].lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                for p in v["positions"].as_array().into_iter().flatten() {
                    self.samples += p[1].as_u64().unwrap_or(0) - p[0].as_u64().unwrap_or(0);
                }
            }
        }
        self.read += whole as u64;
        self.samples
    }
}

enum Later {
    Start(String),
    Continue(usize),
}

/// The round lines of the run's final history: a coordinator restarted from a checkpoint
/// redoes the rounds after it, and their earlier lines are dropped.
fn history(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let mut rounds: Vec<serde_json::Value> = vec![];
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if v["kind"] != "round" {
            continue;
        }
        let r = v["round"].as_u64().unwrap_or(0);
        rounds.retain(|x| x["round"].as_u64().unwrap_or(0) < r);
        rounds.push(v);
    }
    rounds
}

fn report(
    s: &ChaosSettings,
    faults: Vec<Fault>,
    finished: bool,
    wall_s: f64,
) -> Result<ChaosReport> {
    let run = s.dir.join("run");
    let rounds = history(&run);
    let mut twice = 0;
    let mut skipped = 0;
    let done_epochs = if finished { s.epochs } else { 0 };
    for epoch in 0..done_epochs {
        let mut count = vec![0u32; s.train_len];
        for r in rounds.iter().filter(|r| r["epoch"] == epoch) {
            for p in r["positions"].as_array().into_iter().flatten() {
                let (a, b) = (p[0].as_u64().unwrap_or(0), p[1].as_u64().unwrap_or(0));
                for i in a..b.min(s.train_len as u64) {
                    count[i as usize] += 1;
                }
            }
        }
        twice += count.iter().filter(|&&c| c > 1).count() as u64;
        skipped += count.iter().filter(|&&c| c == 0).count() as u64;
    }
    let samples: u64 = rounds
        .iter()
        .filter_map(|r| r["positions"].as_array())
        .flatten()
        .map(|p| p[1].as_u64().unwrap_or(0) - p[0].as_u64().unwrap_or(0))
        .sum();
    let mut times: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r["round_s"].as_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let median_round_s = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let final_test_accuracy = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "eval")
        .and_then(|v| v["test_accuracy"].as_f64());
    Ok(ChaosReport {
        faults,
        finished,
        wall_s,
        rounds: rounds.len(),
        samples,
        images_per_s: samples as f64 / wall_s.max(1e-9),
        median_round_s,
        samples_twice: twice,
        samples_skipped: skipped,
        final_test_accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_coordinator_replaces_the_rounds_after_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"kind":"round","round":0,"epoch":0,"positions":[[0,2]]}"#,
            r#"{"kind":"round","round":1,"epoch":0,"positions":[[2,4]]}"#,
            r#"{"kind":"round","round":2,"epoch":0,"positions":[[4,6]]}"#,
            r#"{"kind":"eval","step":3}"#,
            r#"{"kind":"round","round":1,"epoch":0,"positions":[[2,3]]}"#,
            r#"{"kind":"round","round":2,"epoch":0,"positions":[[3,6]]}"#,
        ];
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let h = history(dir.path());
        let rounds: Vec<(u64, u64)> = h
            .iter()
            .map(|r| {
                (
                    r["round"].as_u64().unwrap(),
                    r["positions"][0][1].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(rounds, vec![(0, 2), (1, 3), (2, 6)]);
    }

    #[test]
    fn the_schedule_is_seeded_and_inside_the_span() {
        let s = ChaosSettings {
            exe: "capsnet".into(),
            dir: "d".into(),
            data_dir: "x".into(),
            train_args: vec![],
            train_len: 10,
            epochs: 1,
            workers: 2,
            threads_per_worker: 1,
            kills: 3,
            restart_after: Duration::from_secs(1),
            stragglers: 2,
            stop_for: Duration::from_secs(1),
            leaves: 1,
            joins: 1,
            coordinator_kills: 1,
            seed: 4,
            heartbeat: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        };
        let a = schedule(&s);
        assert_eq!(a, schedule(&s));
        assert_eq!(a.len(), 8);
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(a.iter().all(|(f, _)| (0.1..=0.9).contains(f)));
        let other = schedule(&ChaosSettings { seed: 5, ..s });
        assert_ne!(a, other);
    }
}
