//! A cluster on loopback for one test: synthetic data, a coordinator on a free port, workers,
//! and clients that join by hand to drive the protocol.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsnet_core::data::write_synthetic;
use capsnet_proto::{RunSettings, pb};
use capsnet_worker::Client;

use super::{Proc, TOKEN, capsnet};

/// `n_train` synthetic 28x28 training images (and 16 test images) in `dir/data`.
pub fn synthetic(dir: &Path, n_train: usize) -> PathBuf {
    let d = dir.join("data");
    write_synthetic(&d, n_train, 16, 28, 10, 3).unwrap();
    d
}

/// Starts `capsnet coordinator` (on a free port unless `args` has `--listen`) and returns it
/// with its URL once it listens.
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
    let mut p = Proc::spawn(name, cmd, dir);
    let addr = p.wait_ready(&ready, Duration::from_secs(60));
    // host:port, or unix:/path (--listen unix:/path), which is its URL as it is.
    let url = if addr.starts_with("unix:") {
        addr
    } else {
        format!("http://{addr}")
    };
    (p, url)
}

/// [`coordinator`] for the tiny network on `data`, writing to `run`, one thread, plus `extra`.
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

/// `capsnet worker` of rank `rank` with one thread on `data`, plus `extra`.
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

/// `capsnet reducer` of the coordinator at `url`, on a free loopback port, one thread, plus
/// `extra`.
pub fn reducer(dir: &Path, url: &str, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = capsnet();
    cmd.args([
        "reducer",
        "--coordinator",
        url,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--name",
        name,
    ])
    .args(extra);
    Proc::spawn(name, cmd, dir)
}

/// A temporary folder with synthetic images (`data`) and a tiny coordinator on them that
/// writes to `run`.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub run: PathBuf,
    pub coord: Proc,
    pub url: String,
}

impl Setup {
    /// `n_train` synthetic images and a tiny coordinator started with `args`.
    pub fn start(n_train: usize, args: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let data = synthetic(tmp.path(), n_train);
        let run = tmp.path().join("run");
        let (coord, url) = tiny_coordinator(tmp.path(), "coordinator", &data, &run, args);
        Setup {
            tmp,
            data,
            run,
            coord,
            url,
        }
    }

    /// `capsnet worker` of rank `rank` on this setup's data, plus `extra`.
    pub fn worker(&self, rank: u32, extra: &[&str]) -> Proc {
        worker(self.tmp.path(), &self.url, rank, &self.data, extra)
    }
}

/// Flags for a tiny run that outlasts any test that drives it by hand: 100 rounds of batch 4,
/// heartbeats that do not expire while a test thinks, small chunks (1024 floats).
pub const STEADY: [&str; 8] = [
    "--batch-size",
    "4",
    "--max-steps",
    "100",
    "--heartbeat",
    "5s",
    "--chunk-bytes",
    "4096",
];

/// Starts a tiny coordinator on 64 synthetic images with `args`, runs `body` with its URL on
/// a runtime, then stops it with SIGTERM and checks that it exits 0. Returns its log.
pub fn with_coordinator<F: std::future::Future<Output = ()>>(
    args: &[&str],
    body: impl FnOnce(String) -> F,
) -> String {
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, args);
    tokio::runtime::Runtime::new().unwrap().block_on(body(url));
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    coord.log_text()
}

/// A client that joined by hand, with no worker process behind it.
pub struct Joined {
    pub client: Client,
    pub id: String,
    pub settings: RunSettings,
    /// Floats in the parameter vector.
    pub total: u64,
}

/// Joins the coordinator at `url` as `name` with the test token.
pub async fn join(url: &str, name: &str, rank_hint: Option<u32>) -> Joined {
    let mut client = Client::connect(url, TOKEN, None).await.unwrap();
    let j = client
        .rpc()
        .join(pb::JoinRequest {
            name: name.into(),
            rank_hint,
        })
        .await
        .unwrap()
        .into_inner();
    let settings = RunSettings::try_from(j.config.unwrap()).unwrap();
    let total = settings.layout().total() as u64;
    Joined {
        client,
        id: j.worker_id,
        settings,
        total,
    }
}

/// The coordinator's Status, over `client`.
pub async fn coordinator_status(client: &mut Client) -> pb::StatusResponse {
    client
        .rpc()
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The health service's answer for `service` (`""`: the process; `capsnet.v1.Coordinator`:
/// readiness) at `url`, with no token.
pub async fn health(url: &str, service: &str) -> tonic_health::ServingStatus {
    use tonic_health::pb::health_check_response::ServingStatus as S;
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = c
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    match S::try_from(r.status).unwrap() {
        S::Serving => tonic_health::ServingStatus::Serving,
        S::NotServing => tonic_health::ServingStatus::NotServing,
        _ => tonic_health::ServingStatus::Unknown,
    }
}

/// Waits (up to `within`) until [`health`] of `service` answers `want`.
pub async fn wait_health(
    url: &str,
    service: &str,
    want: tonic_health::ServingStatus,
    within: Duration,
) {
    let start = std::time::Instant::now();
    loop {
        let got = health(url, service).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "health of {service:?} is {got:?}, not {want:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
