//! The container image, built and run for real with podman: `scripts/image` builds it from
//! deploy/Dockerfile (a debootstrap base and this test build's binary), then a coordinator and
//! two workers run as containers on a podman network the way the manifests run them (non-root,
//! read-only root file system, the token from a mounted file, data read-only, runs on a
//! volume). A worker container killed mid-run and started again rejoins; the health service
//! answers SERVING inside the coordinator's container; SIGTERM to the coordinator's container
//! writes a checkpoint into the volume and exits 0; a new coordinator container at the same
//! address resumes from it and trains to the end, and the workers, which reconnect by
//! themselves, exit 0. Then `podman kube play` runs the
//! coordinator's Deployment, Service, ConfigMap and volume claim as kustomize renders them for
//! the local overlay: the coordinator comes up with the environment the cluster would give it,
//! and its probes answer. Everything the test made is removed, also when it fails. Needs root, podman, runc and debootstrap (CI has them; elsewhere the test is
//! skipped with a message where they are missing).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether this machine can build and run the image; in CI it must.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["podman", "runc", "debootstrap"].map(|t| (t, have(t)));
    let ok = root && tools.iter().all(|(_, h)| *h);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the container test: root {root}, tools {tools:?} (scripts/setup installs them)"
        );
        eprintln!(
            "skipped: the container test needs root, podman, runc and debootstrap ({tools:?})"
        );
    }
    ok
}

/// `podman ARGS` with the runtime and limits this kind of machine needs.
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .output()
        .unwrap()
}

fn podman_ok(args: &[&str]) -> String {
    let o = podman(args);
    assert!(o.status.success(), "podman {args:?}: {}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Removes the containers, network and image of one test run when dropped.
struct Made {
    tag: String,
    network: String,
    containers: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = podman(&["network", "rm", "-f", &self.network]);
        let _ = podman(&["rmi", "-f", &self.tag]);
    }
}

/// The `podman run` arguments every container of the test shares: the sandbox's limits, the
/// network, a read-only root, the image's non-root user, the data and the token file.
fn run_args<'a>(made: &'a Made, name: &'a str, data: &'a str, secret: &'a str) -> Vec<String> {
    [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        &made.network,
        "--read-only",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        &format!("{data}:/data:ro"),
        "-v",
        &format!("{secret}:/var/run/secrets/capsnet:ro"),
        "-e",
        "CAPSNET_TOKEN_FILE=/var/run/secrets/capsnet/token",
        "-e",
        "RUST_LOG=info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn rounds_in(run: &Path) -> Vec<serde_json::Value> {
    rounds(run)
}

fn logs(name: &str) -> String {
    output_text(&podman(&["logs", name]))
}

#[test]
fn the_image_runs_a_fleet_through_a_worker_kill_and_a_coordinator_restart_to_the_end() {
    if !can_run() {
        return;
    }
    let id = std::process::id();
    let tag = format!("localhost/capsnet:test-{id}");
    let mut made = Made {
        tag: tag.clone(),
        network: format!("capsnet-test-{id}"),
        containers: vec![],
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/image");
    let start = Instant::now();
    let o = Command::new("bash")
        .arg(&script)
        .args(["--tag", &tag, "--binary", env!("CARGO_BIN_EXE_capsnet")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    eprintln!("{} ({:.0?})", output_text(&o).trim(), start.elapsed());

    // The image as the manifests expect it: non-root, runs read-only.
    let user = podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", &tag]);
    assert_eq!(user, "10001:10001");

    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path(), 256);
    let runs = tmp.path().join("runs");
    let secret = tmp.path().join("secret");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("token"), TOKEN).unwrap();
    // The volume belongs to the image's user, as fsGroup makes it in the cluster.
    Command::new("chown")
        .args(["-R", "10001:10001"])
        .arg(&runs)
        .status()
        .unwrap();
    for p in [tmp.path(), data.as_path(), secret.as_path()] {
        Command::new("chmod").arg("a+rx").arg(p).status().unwrap();
    }
    Command::new("chmod")
        .args(["-R", "a+r"])
        .arg(&data)
        .arg(&secret)
        .status()
        .unwrap();
    let (data_s, secret_s, runs_s) = (
        data.display().to_string(),
        secret.display().to_string(),
        runs.display().to_string(),
    );
    // A subnet of the test's, so that the coordinator keeps its address when it is replaced.
    let subnet = format!("10.233.{}", id % 250);
    podman_ok(&[
        "network",
        "create",
        "--subnet",
        &format!("{subnet}.0/24"),
        &made.network,
    ]);
    let ip = format!("{subnet}.10");

    let coord = format!("capsnet-coordinator-{id}");
    let workers: Vec<String> = (0..2).map(|i| format!("capsnet-worker-{i}-{id}")).collect();
    made.containers.push(coord.clone());
    made.containers.extend(workers.iter().cloned());
    let start_coordinator = |extra: &[&str]| {
        let mut args = run_args(&made, &coord, &data_s, &secret_s);
        args.extend(
            [
                "--ip",
                &ip,
                "-v",
                &format!("{runs_s}:/runs"),
                &tag,
                "coordinator",
                "--listen",
                "0.0.0.0:50051",
                "--data-dir",
                "/data",
                "--run-dir",
                "/runs/run",
                "--model",
                "tiny",
                "--threads",
                "1",
                "--batch-size",
                "4",
                "--epochs",
                "1000",
                "--expect-workers",
                "2",
                "--heartbeat",
                "500ms",
                "--checkpoint-every",
                "20",
                "--log-every",
                "1000",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        podman_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    start_coordinator(&[]);
    let url = format!("http://{ip}:50051");
    for (i, w) in workers.iter().enumerate() {
        let mut args = run_args(&made, w, &data_s, &secret_s);
        args.extend(
            [
                &tag,
                "worker",
                "--coordinator",
                &url,
                "--rank",
                &i.to_string(),
                "--name",
                &format!("worker-{i}"),
                "--threads",
                "1",
                "--data-dir",
                "/data",
            ]
            .map(|s| s.to_string()),
        );
        podman_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let run = runs.join("run");
    let wait = |what: &str, f: &dyn Fn(&[serde_json::Value]) -> bool| {
        let start = Instant::now();
        loop {
            if f(&rounds_in(&run)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "waited 120 s for {what}\n{}\n{}",
                logs(&coord),
                logs(&workers[1])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("rounds with both workers", &|r| {
        r.iter().filter(|l| l["workers"] == 2).count() >= 5
    });

    // Readiness inside the coordinator's container, with the binary the image holds. The
    // coordinator updates it once a second, so it may take that long to follow the rounds (the
    // kubelet's probe retries too).
    let start = Instant::now();
    loop {
        let o = podman(&[
            "exec",
            &coord,
            "capsnet",
            "health",
            "--service",
            "capsnet.v1.Coordinator",
        ]);
        if o.status.success() {
            assert!(output_text(&o).contains("SERVING"), "{}", output_text(&o));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not ready 10 s into training: {}",
            output_text(&o)
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // A worker container killed outright, then started again: it rejoins.
    podman_ok(&["kill", "-s", "KILL", &workers[1]]);
    let killed_at = rounds_in(&run).len();
    wait("rounds after the kill", &|r| r.len() >= killed_at + 3);
    podman_ok(&["start", &workers[1]]);
    wait("both workers again", &|r| {
        r.iter()
            .skip(killed_at + 3)
            .filter(|l| l["workers"] == 2)
            .count()
            >= 3
    });

    // SIGTERM to the coordinator's container: a checkpoint in the volume, exit 0.
    podman_ok(&["kill", "-s", "TERM", &coord]);
    let code = podman_ok(&["wait", &coord]);
    assert_eq!(code, "0", "{}", logs(&coord));
    assert!(
        logs(&coord).contains("stopped by signal"),
        "{}",
        logs(&coord)
    );
    let ck = capsnet_core::checkpoint::latest_checkpoint(&run).unwrap();
    let ck = ck.unwrap_or_else(|| panic!("no checkpoint in the volume\n{}", logs(&coord)));
    let step = capsnet_core::checkpoint::Checkpoint::load(&ck, None)
        .unwrap()
        .step;

    // A new coordinator container at the same address resumes from it and trains to the end;
    // the workers reconnect by themselves and exit 0 once training is over.
    podman_ok(&["rm", &coord]);
    let last = (step + 10).to_string();
    start_coordinator(&["--resume", "--max-steps", &last]);
    let code = podman_ok(&["wait", &coord]);
    assert_eq!(code, "0", "{}", logs(&coord));
    assert!(logs(&coord).contains("finished"), "{}", logs(&coord));
    for w in &workers {
        let code = podman_ok(&["wait", w]);
        assert_eq!(code, "0", "{w}: {}", logs(w));
    }
    let last_round = rounds_in(&run).last().map(|r| r["round"].as_u64().unwrap());
    assert_eq!(last_round, Some(step + 9), "{}", logs(&coord));

    kube_play(&tag, tmp.path());
}

/// Removes what `podman kube play` made when dropped.
struct Played {
    yaml: PathBuf,
}

impl Drop for Played {
    fn drop(&mut self) {
        let y = self.yaml.display().to_string();
        let _ = podman(&["kube", "down", &y]);
        let _ = podman(&[
            "volume",
            "rm",
            "-f",
            "capsnet-runs",
            "capsnet-token",
            "capsnet-tls",
        ]);
        let _ = podman(&["secret", "rm", "capsnet-token", "capsnet-tls"]);
    }
}

/// The coordinator's objects of the local overlay, rendered by kustomize through an overlay of
/// the test's that changes only what podman 4.3 cannot do as a cluster does: the image is the
/// test's; no init container (podman restarts it forever), the data comes from a host folder
/// instead; the token Secret volume says `optional: false` (podman crashes on the default,
/// containers/podman#16636). Podman plays the Deployment as a pod, with the ConfigMap as its
/// environment, the claim as a volume and the Secrets as files.
fn kube_play(tag: &str, tmp: &Path) {
    let dir = tmp.join("kube");
    let data = dir.join("data");
    capsnet_core::data::write_synthetic(&data.join("fashion-mnist"), 64, 16, 28, 10, 3).unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir)
        .status()
        .unwrap();
    // kustomize takes only relative paths to other kustomizations.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let up = "../".repeat(dir.components().count() - 1);
    let overlay = format!(
        "{up}{}",
        repo.join("deploy/k8s/overlays/local")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    let (name, version) = tag.rsplit_once(':').unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            r#"resources:
  - {overlay}
images:
  - name: capsnet
    newName: {name}
    newTag: {version}
patches:
  - target:
      kind: Deployment
      name: capsnet-coordinator
    patch: |-
      - op: remove
        path: /spec/template/spec/initContainers
  - target:
      kind: Deployment
      name: capsnet-coordinator
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: capsnet-coordinator
      spec:
        template:
          spec:
            volumes:
              - name: data
                emptyDir: null
                hostPath:
                  path: {data}
              - name: token
                secret:
                  optional: false
"#,
            data = data.display()
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let rendered = String::from_utf8(out.stdout).unwrap();
    // The coordinator's objects; the worker Job and its ConfigMap are not podman's to play.
    let docs: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|d| {
            [
                "ConfigMap",
                "Service",
                "PersistentVolumeClaim",
                "Deployment",
            ]
            .iter()
            .any(|k| {
                d.contains(&format!("\nkind: {k}\n")) || d.starts_with(&format!("kind: {k}\n"))
            }) && !d.contains("name: capsnet-worker")
        })
        .collect();
    assert_eq!(docs.len(), 4, "{rendered}");
    let yaml = dir.join("coordinator.yaml");
    std::fs::write(&yaml, docs.join("\n---\n")).unwrap();
    let secrets = dir.join("secrets.yaml");
    let b64 = |s: &str| {
        let o = Command::new("base64")
            .args(["-w0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    std::fs::write(
        &secrets,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: capsnet-token\ndata:\n  token: {}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: capsnet-tls\ndata:\n  unused: {}\n",
            b64(TOKEN),
            b64("none")
        ),
    )
    .unwrap();
    let _played = Played { yaml: yaml.clone() };
    podman_ok(&[
        "kube",
        "play",
        "--network",
        "podman",
        &secrets.display().to_string(),
    ]);
    // kube play takes no --ulimit: the same limits through a containers.conf of the test's.
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let o = Command::new("podman")
        .env("CONTAINERS_CONF", &conf)
        .args(["kube", "play", "--network", "podman"])
        .arg(&yaml)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let c = "capsnet-coordinator-pod-0-coordinator";
    let start = Instant::now();
    while !logs(c).contains("coordinator listening") {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", logs(c));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The cluster's settings reached it: the ConfigMap's run folder and the token file.
    assert!(logs(c).contains("/runs/local"), "{}", logs(c));
    // Liveness answers SERVING; readiness says NOT_SERVING while it waits for its 2 workers.
    let o = podman(&["exec", c, "capsnet", "health"]);
    assert!(
        o.status.success() && output_text(&o).contains("SERVING"),
        "{}",
        output_text(&o)
    );
    let o = podman(&[
        "exec",
        c,
        "capsnet",
        "health",
        "--service",
        "capsnet.v1.Coordinator",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("NOT_SERVING"),
        "{}",
        output_text(&o)
    );
    // As the pod's securityContext says: its user, a read-only root.
    assert_eq!(podman_ok(&["exec", c, "id", "-u"]), "10001");
    let ro = podman_ok(&["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", c]);
    assert_eq!(ro, "true");
    eprintln!(
        "kube play: the coordinator came up with the local overlay's settings in {:.0?}; liveness SERVING, readiness NOT_SERVING while it waits for workers",
        start.elapsed()
    );
}
