//! The Kubernetes manifests (deploy/k8s) against the binary, with no cluster:
//!
//! - every `CAPSNET_*` name the manifests set is a flag of the subcommand that reads it
//!   (`[env: NAME=` in its `--help`), and every flag is either set, documented in an env file
//!   or deliberately left out, so the manifests cannot drift from the CLI;
//! - a rehearsal: one coordinator and two workers on loopback, with exactly the environment the
//!   base ConfigMaps carry (`base/coordinator.env`, `base/worker.env`), changed only where a
//!   laptop-scale run must differ (data, model size, steps, addresses, paths); one of
//!   `components/reducers` (two `capsnet reducer`s with `reducer.env`); and one of
//!   `components/reducers-tls`, over TLS with the Secret's certificates.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use capsnet_core::data::write_synthetic;
use common::*;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Coordinator,
    Worker,
    Reducer,
}

impl Role {
    fn subcommand(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Reducer => "reducer",
        }
    }

    /// The subcommand that reads a file's settings, from the file's name: `coordinator*.env`,
    /// `worker-job.yaml`, `reducer.env`, ... None for files that belong to none
    /// (kustomization.yaml).
    fn of_file(path: &Path) -> Option<Role> {
        let name = path.file_name()?.to_str()?;
        if name.starts_with("coordinator") {
            Some(Role::Coordinator)
        } else if name.starts_with("worker") {
            Some(Role::Worker)
        } else if name.starts_with("reducer") {
            Some(Role::Reducer)
        } else {
            None
        }
    }
}

/// Flags the binary never gets from the manifests, on purpose.
const DELIBERATELY_UNSET: &[(Role, &str, &str)] = &[
    (
        Role::Worker,
        "CAPSNET_RANK",
        "the Indexed Job's JOB_COMPLETION_INDEX is the rank",
    ),
    (
        Role::Worker,
        "CAPSNET_WORKER_NAME",
        "worker-<rank> is the name, so a replacement pod reclaims its shard",
    ),
    (
        Role::Worker,
        "CAPSNET_TLS_DOMAIN",
        "the URL's host (the Service name) is what the certificate names",
    ),
];

/// The names in `[env: NAME=...]` of `capsnet <role> --help`.
fn accepted_names(role: Role) -> BTreeSet<String> {
    let out = capsnet()
        .args([role.subcommand(), "--help"])
        .output()
        .expect("run capsnet --help");
    assert!(
        out.status.success(),
        "capsnet {} --help failed",
        role.subcommand()
    );
    let help = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<String> = help
        .match_indices("[env: ")
        .filter_map(|(i, m)| {
            let rest = &help[i + m.len()..];
            rest.find('=').map(|end| rest[..end].to_string())
        })
        .collect();
    assert!(
        names.len() >= 10 && names.iter().all(|n| n.starts_with("CAPSNET_")),
        "unexpected env names in `capsnet {} --help`: {names:?}",
        role.subcommand()
    );
    names
}

/// The `KEY=VALUE` lines of an env file as kustomize's configMapGenerator reads them: blank lines
/// and `#` lines skipped, the value is everything after the first `=`. A line without `=` (which
/// kustomize would fill from the caller's environment) is refused: the files must say it all.
fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("env file line without `=`: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The names an env file sets or documents: `KEY=` lines, and commented-out `# KEY=` lines,
/// which tell users what they may switch on and so must be real flags too.
fn env_file_names(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_start().trim_start_matches('#').trim_start())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| is_capsnet_name(k))
        .map(str::to_string)
        .collect()
}

fn is_capsnet_name(s: &str) -> bool {
    s.len() > "CAPSNET_".len()
        && s.starts_with("CAPSNET_")
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// The `CAPSNET_*` names in a YAML file's content (explicit `env:` entries, replacement field
/// paths), comments left out: they explain, and may name the other subcommand's flags.
fn yaml_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let content = match line.find('#') {
            Some(i) if i == 0 || line[..i].ends_with(char::is_whitespace) => &line[..i],
            _ => line,
        };
        let mut rest = content;
        while let Some(i) = rest.find("CAPSNET_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Every file under `dir` (sorted, so failures read the same on every run).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A `CAPSNET_*` name found in a manifest, with the subcommand that must accept it (None: either).
#[derive(Debug)]
struct Use {
    file: String,
    role: Option<Role>,
    name: String,
}

/// Every name the files set or mention as a setting. `.env` files must be named for their
/// subcommand; an env file that belongs to neither is an error in itself.
fn names_in(files: &[(String, String)]) -> Vec<Use> {
    let mut uses = Vec::new();
    for (file, text) in files {
        let role = Role::of_file(Path::new(file));
        let names = if file.ends_with(".env") {
            assert!(
                role.is_some(),
                "{file}: an env file must be named coordinator*.env, worker*.env or \
                 reducer*.env, after the subcommand that reads it"
            );
            env_file_names(text)
        } else if file.ends_with(".yaml") || file.ends_with(".yml") {
            yaml_names(text)
        } else {
            continue;
        };
        uses.extend(names.into_iter().map(|name| Use {
            file: file.clone(),
            role,
            name,
        }));
    }
    uses
}

/// The uses the binary does not accept, as readable lines.
fn unknown(uses: &[Use], accepted: &BTreeMap<Role, BTreeSet<String>>) -> Vec<String> {
    uses.iter()
        .filter(|u| match u.role {
            Some(r) => !accepted[&r].contains(&u.name),
            None => !accepted.values().any(|s| s.contains(&u.name)),
        })
        .map(|u| match u.role {
            Some(r) => format!(
                "{}: {} is not a flag of `capsnet {}`",
                u.file,
                u.name,
                r.subcommand()
            ),
            None => format!("{}: {} is not a flag of capsnet", u.file, u.name),
        })
        .collect()
}

fn manifest_files() -> Vec<(String, String)> {
    let root = k8s_dir();
    files_under(&root)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn manifest_env_names_are_flags_the_binary_accepts() {
    let accepted: BTreeMap<Role, BTreeSet<String>> =
        [Role::Coordinator, Role::Worker, Role::Reducer]
            .into_iter()
            .map(|r| (r, accepted_names(r)))
            .collect();

    // The check itself catches a made-up name, a commented one, one in a YAML env entry, and a
    // real flag given to the wrong subcommand.
    let planted = [
        (
            "x/coordinator.env".to_string(),
            "CAPSNET_EPOCHS=1\nCAPSNET_NOT_A_FLAG=1\n".to_string(),
        ),
        (
            "x/worker.env".to_string(),
            "# CAPSNET_ALSO_NOT_A_FLAG=2\n".to_string(),
        ),
        (
            "x/coordinator-patch.yaml".to_string(),
            "env:\n  - name: CAPSNET_BOGUS  # a typo\n".to_string(),
        ),
        (
            "x/worker-more.env".to_string(),
            "CAPSNET_EPOCHS=3\n".to_string(),
        ),
    ];
    let found = unknown(&names_in(&planted), &accepted);
    assert_eq!(
        found.len(),
        4,
        "the checker missed planted names: {found:#?}"
    );
    for n in [
        "NOT_A_FLAG",
        "ALSO_NOT_A_FLAG",
        "BOGUS",
        "x/worker-more.env: CAPSNET_EPOCHS",
    ] {
        assert!(
            found.iter().any(|f| f.contains(n)),
            "{n} not reported: {found:#?}"
        );
    }

    let files = manifest_files();
    let uses = names_in(&files);
    let bad = unknown(&uses, &accepted);
    assert!(
        bad.is_empty(),
        "deploy/k8s sets names `capsnet` does not accept (see `capsnet coordinator --help`, \
         `capsnet worker --help` and `capsnet reducer --help`):\n{}",
        bad.join("\n")
    );

    // The base ConfigMaps' files were really read, and the explicit env entries too.
    let in_file = |file: &str| -> BTreeSet<&str> {
        uses.iter()
            .filter(|u| u.file == file)
            .map(|u| u.name.as_str())
            .collect()
    };
    assert!(
        in_file("base/coordinator.env").len() >= 25,
        "{:?}",
        in_file("base/coordinator.env")
    );
    assert!(
        in_file("base/worker.env").len() >= 4,
        "{:?}",
        in_file("base/worker.env")
    );
    assert!(in_file("base/coordinator-deployment.yaml").contains("CAPSNET_THREADS"));
    assert!(in_file("base/worker-job.yaml").contains("CAPSNET_THREADS"));
    assert!(
        in_file("components/reducers/reducer.env").len() >= 6,
        "{:?}",
        in_file("components/reducers/reducer.env")
    );
    assert!(in_file("components/reducers/reducer-job.yaml").contains("CAPSNET_THREADS"));

    // The other way round: each flag is set or documented somewhere in deploy/k8s for its
    // subcommand, or listed in DELIBERATELY_UNSET with the reason. A new flag fails here until
    // someone decides what the cluster should do with it.
    for (role, names) in &accepted {
        let mentioned: BTreeSet<&str> = uses
            .iter()
            .filter(|u| u.role == Some(*role))
            .map(|u| u.name.as_str())
            .collect();
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !mentioned.contains(n.as_str()))
            .filter(|n| {
                !DELIBERATELY_UNSET
                    .iter()
                    .any(|(r, name, _)| r == role && name == n)
            })
            .collect();
        assert!(
            missing.is_empty(),
            "`capsnet {}` flags that deploy/k8s neither sets nor documents: {missing:?}; add them \
             to a {}*.env file (commented out if the default is right) or to DELIBERATELY_UNSET \
             in tests/deploy.rs with the reason",
            role.subcommand(),
            role.subcommand()
        );
    }
    for (role, name, _) in DELIBERATELY_UNSET {
        assert!(
            accepted[role].contains(*name),
            "{name} is no longer a flag: drop it here"
        );
    }
}

/// Where the pods mount their Secrets (capsnet-token, capsnet-tls); a rehearsal maps these paths
/// into its own folder.
const SECRETS: &str = "/var/run/secrets/";

/// The environment for one rehearsal process: the env `files` merged in order (as a component's
/// configMapGenerator merge puts its settings on top of the base's), then `overrides`, each of
/// which must replace a variable the files set or be one of `may_add` (set by the manifest
/// outside the files, like CAPSNET_THREADS, or a limit only the rehearsal needs), so the
/// rehearsal cannot quietly run settings the cluster never sees. Paths under the Secrets' mount
/// point move under `secrets`, where the rehearsal put the same files.
fn rehearsal_env(
    files: &[&str],
    secrets: &Path,
    overrides: &[(&str, String)],
    may_add: &[&str],
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
        env.extend(parse_env(&text));
    }
    for v in env.values_mut() {
        if let Some(rest) = v.strip_prefix(SECRETS) {
            *v = path(&secrets.join(rest));
        }
    }
    for (k, v) in overrides {
        assert!(
            env.contains_key(*k) || may_add.contains(k),
            "{files:?} do not set {k}: the rehearsal would override nothing"
        );
        env.insert(k.to_string(), v.clone());
    }
    env.into_iter().collect()
}

/// `scheme://addr`, with the scheme of `var`'s URL in `files` (merged): the rehearsal dials
/// loopback, over TLS exactly when the manifests do.
fn url_like(files: &[&str], var: &str, addr: &str) -> String {
    let mut url = None;
    for file in files {
        let text = std::fs::read_to_string(k8s_dir().join(file)).unwrap();
        for (k, v) in parse_env(&text) {
            if k == var {
                url = Some(v);
            }
        }
    }
    let url = url.unwrap_or_else(|| panic!("{files:?} do not set {var}"));
    let (scheme, _) = url.split_once("://").unwrap();
    format!("{scheme}://{addr}")
}

/// `capsnet <args>` with exactly `env` as its CAPSNET_* variables: none leak in from the test's
/// own environment (nor the common helper's CAPSNET_TOKEN; the token comes from the file).
fn command_with(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = capsnet();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CAPSNET_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("CAPSNET_TOKEN")
        .env_remove("JOB_COMPLETION_INDEX")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args);
    cmd
}

/// A rehearsal's folder: synthetic data (256 images = 4 rounds of 2 workers x
/// CAPSNET_BATCH_SIZE, 32 from the env file), the Secrets' files as the pods mount them (the
/// token; with TLS, the certificates of capsnet-tls under the names its README gives) and the
/// run directory.
struct Rehearsal {
    tmp: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl Rehearsal {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        write_synthetic(&data, 256, 32, 28, 10, 5).unwrap();
        let secrets = tmp.path().join("secrets");
        std::fs::create_dir_all(secrets.join("capsnet")).unwrap();
        std::fs::write(secrets.join("capsnet/token"), format!("{TOKEN}\n")).unwrap();
        let run = tmp.path().join("run");
        Rehearsal { tmp, data, run }
    }

    /// With the Secret capsnet-tls too: the coordinator's certificate (which names
    /// capsnet-coordinator and 127.0.0.1), the CA, and the one certificate of every reducer,
    /// which names capsnet-reducer alone.
    fn with_tls() -> Self {
        let r = Rehearsal::new();
        let certs = r.dir().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        certs::certificates(&certs);
        let tls = r.secrets().join("capsnet-tls");
        std::fs::create_dir_all(&tls).unwrap();
        for (from, to) in [
            ("server.pem", "tls.crt"),
            ("server.key", "tls.key"),
            ("ca.pem", "ca.crt"),
            ("reducer.pem", "reducer.crt"),
            ("reducer.key", "reducer.key"),
        ] {
            std::fs::copy(certs.join(from), tls.join(to)).unwrap();
        }
        r
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn secrets(&self) -> PathBuf {
        self.dir().join("secrets")
    }

    /// The coordinator with `files` (base/coordinator.env first), changed only for a
    /// laptop-scale run and by `more` (which may add the names in `may_add`); its process and
    /// address.
    fn coordinator(
        &self,
        files: &[&str],
        more: &[(&str, String)],
        may_add: &[&str],
    ) -> (Proc, String) {
        let mut overrides = vec![
            ("CAPSNET_DATA_DIR", path(&self.data)),
            ("CAPSNET_MODEL", "tiny".into()),
            ("CAPSNET_MAX_STEPS", "4".into()),
            ("CAPSNET_LISTEN", "127.0.0.1:0".into()),
            ("CAPSNET_RUN_DIR", path(&self.run)),
            ("CAPSNET_THREADS", "1".into()),
            // The pod's port 9090; here the rehearsals share loopback.
            ("CAPSNET_METRICS_LISTEN", "127.0.0.1:0".into()),
        ];
        overrides.extend(more.iter().cloned());
        let mut added = vec!["CAPSNET_THREADS", "CAPSNET_MAX_STEPS"];
        added.extend(may_add);
        let env = rehearsal_env(files, &self.secrets(), &overrides, &added);
        let ready = self.dir().join("coordinator.addr");
        let cmd = command_with(&env, &["coordinator", "--ready-file", &path(&ready)]);
        let mut coord = Proc::spawn("coordinator", cmd, self.dir());
        let addr = coord.wait_ready(&ready, Duration::from_secs(60));
        (coord, addr)
    }

    /// Two workers with `files` (base/worker.env first), as the pods of an Indexed Job: no
    /// rank flag, only the pod's completion index.
    fn workers(&self, files: &[&str], addr: &str) -> Vec<Proc> {
        let env = rehearsal_env(
            files,
            &self.secrets(),
            &[
                (
                    "CAPSNET_COORDINATOR",
                    url_like(files, "CAPSNET_COORDINATOR", addr),
                ),
                ("CAPSNET_DATA_DIR", path(&self.data)),
                ("CAPSNET_THREADS", "1".into()),
                // One port per pod in the cluster; here the workers share loopback.
                ("CAPSNET_METRICS_LISTEN", "127.0.0.1:0".into()),
            ],
            &["CAPSNET_THREADS"],
        );
        (0..2)
            .map(|i| {
                let mut cmd = command_with(&env, &["worker"]);
                cmd.env("JOB_COMPLETION_INDEX", i.to_string());
                Proc::spawn(&format!("worker-{i}"), cmd, self.dir())
            })
            .collect()
    }

    /// Two `capsnet reducer`s with `files` (components/reducers/reducer.env first), as the
    /// pods of the reducer Job.
    fn reducers(&self, files: &[&str], addr: &str) -> Vec<Proc> {
        let env = rehearsal_env(
            files,
            &self.secrets(),
            &[
                (
                    "CAPSNET_COORDINATOR",
                    url_like(files, "CAPSNET_COORDINATOR", addr),
                ),
                // One port per pod in the cluster; here the reducers share loopback (and
                // advertise what they bound, as the Job advertises the pod's address).
                ("CAPSNET_REDUCER_LISTEN", "127.0.0.1:0".into()),
                ("CAPSNET_METRICS_LISTEN", "127.0.0.1:0".into()),
                ("CAPSNET_THREADS", "1".into()),
            ],
            &["CAPSNET_THREADS"],
        );
        (0..2)
            .map(|i| {
                let cmd = command_with(&env, &["reducer"]);
                Proc::spawn(&format!("reducer-{i}"), cmd, self.dir())
            })
            .collect()
    }
}

#[test]
fn rehearsal_with_the_configmap_environment_on_loopback() {
    let r = Rehearsal::new();
    let files = ["base/coordinator.env"];
    let (mut coord, addr) = r.coordinator(&files, &[], &[]);
    let mut workers = r.workers(&["base/worker.env"], &addr);
    let run = r.run.clone();

    for w in &mut workers {
        w.expect_success(Duration::from_secs(60));
    }
    // CAPSNET_EXIT_WHEN_DONE=false: the finished coordinator keeps serving (so a Deployment does
    // not restart it) until SIGTERM, which it answers with a checkpoint and exit 0.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        coord.exited().is_none(),
        "the coordinator exited after finishing:\n{}",
        coord.log_text()
    );
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(60));

    // Every round had both workers, and training ran to the requested step.
    let rounds = rounds(&run);
    assert_eq!(rounds.len(), 4, "{rounds:?}\n{}", coord.log_text());
    assert!(rounds.iter().all(|r| r["workers"] == 2), "{rounds:?}");
    assert!(
        run.join("checkpoint-4.safetensors").is_file(),
        "no checkpoint in {}: {:?}",
        run.display(),
        std::fs::read_dir(&run).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    // The workers took their names from the completion index, as pods of the Job will.
    let log = coord.log_text();
    for name in ["worker-0", "worker-1"] {
        assert!(log.contains(name), "{name} never joined:\n{log}");
    }

    // The settings the file carries are the ones the run used (config.json), not defaults.
    let file: BTreeMap<String, String> =
        parse_env(&std::fs::read_to_string(k8s_dir().join("base/coordinator.env")).unwrap())
            .into_iter()
            .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    for (var, pointer) in [
        ("CAPSNET_BATCH_SIZE", "/batch_size"),
        ("CAPSNET_EPOCHS", "/epochs"),
        ("CAPSNET_SEED", "/seed"),
        ("CAPSNET_CHECKPOINT_EVERY", "/checkpoint_every"),
        ("CAPSNET_KEEP_CHECKPOINTS", "/keep_checkpoints"),
        ("CAPSNET_MAX_SHIFT", "/max_shift"),
        ("CAPSNET_LOG_EVERY", "/log_every"),
        ("CAPSNET_LR", "/adam/lr"),
        ("CAPSNET_LR_DECAY", "/adam/decay_rate"),
        ("CAPSNET_LR_DECAY_STEPS", "/adam/decay_steps"),
        ("CAPSNET_ROUTING_ITERS", "/model/routing_iters"),
    ] {
        let want: f64 = file[var].parse().unwrap();
        let got = config.pointer(pointer).and_then(|v| v.as_f64());
        assert_eq!(got, Some(want), "{var} (config.json {pointer})");
    }
}

/// A sharded rehearsal with separate reducers: the coordinator, two reducers and two workers,
/// each with its env files merged in order; they train to the end, and the reducers exit 0
/// when it is over (completing their Job's indices).
fn rehearse_separate_reducers(
    r: &Rehearsal,
    coordinator: &[&str],
    reducer: &[&str],
    worker: &[&str],
) {
    // The tiny model fits in one chunk of the component's size: two reducers need two.
    let (mut coord, addr) =
        r.coordinator(coordinator, &[("CAPSNET_CHUNK_BYTES", "4096".into())], &[]);
    let mut reducers = r.reducers(reducer, &addr);
    let mut workers = r.workers(worker, &addr);
    for w in &mut workers {
        w.expect_success(Duration::from_secs(90));
    }
    for r in &mut reducers {
        r.expect_success(Duration::from_secs(30));
        assert!(
            r.log_text().contains("training finished"),
            "{}",
            r.log_text()
        );
    }
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(60));
    let rounds = rounds(&r.run);
    assert_eq!(rounds.len(), 4, "{rounds:?}\n{}", coord.log_text());
    assert!(rounds.iter().all(|r| r["workers"] == 2), "{rounds:?}");
    assert!(r.run.join("checkpoint-4.safetensors").is_file());
    let log = coord.log_text();
    assert!(log.matches("reducer joined").count() >= 2, "{log}");
}

/// components/reducers rehearsed: the coordinator with the base's and the component's
/// environment, two `capsnet reducer`s with reducer.env, two workers with the base's.
#[test]
fn rehearsal_of_the_reducer_job_environment_on_loopback() {
    let r = Rehearsal::new();
    let component = parse_env(
        &std::fs::read_to_string(k8s_dir().join("components/reducers/coordinator-reducers.env"))
            .unwrap(),
    );
    assert!(
        component
            .iter()
            .any(|(k, v)| k == "CAPSNET_REDUCERS" && v == "2")
    );
    rehearse_separate_reducers(
        &r,
        &[
            "base/coordinator.env",
            "components/reducers/coordinator-reducers.env",
        ],
        &["components/reducers/reducer.env"],
        &["base/worker.env"],
    );
}

/// components/reducers-tls rehearsed, with the Secret capsnet-tls as its README makes it: the
/// coordinator serves TLS; the reducers reach it over TLS and serve the one certificate that
/// names only capsnet-reducer; the workers reach both over TLS, checking that name in the
/// reducers' certificate. Anything plaintext or any name check that fails stops the run.
#[test]
fn rehearsal_of_the_reducer_job_over_tls_on_loopback() {
    let r = Rehearsal::with_tls();
    rehearse_separate_reducers(
        &r,
        &[
            "base/coordinator.env",
            "components/tls/coordinator-tls.env",
            "components/reducers/coordinator-reducers.env",
        ],
        &[
            "components/reducers/reducer.env",
            "components/reducers-tls/settings/reducer-tls.env",
        ],
        &[
            "base/worker.env",
            "components/tls/worker-tls.env",
            "components/reducers-tls/settings/worker-reducers-tls.env",
        ],
    );
}

/// The image build's context (`.dockerignore`, an allowlist) holds every workspace member, the
/// root package's sources and the lock file: `cargo build --locked` in deploy/Dockerfile fails
/// on a workspace member it cannot find.
#[test]
fn the_image_build_context_holds_the_whole_workspace() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let allowed: BTreeSet<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members_line = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("a members list in Cargo.toml");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.len() >= 6, "{members_line}");
    for need in members
        .iter()
        .copied()
        .chain(["src", "Cargo.toml", "Cargo.lock"])
    {
        assert!(
            allowed.contains(need),
            ".dockerignore leaves {need} out of the image's build context: {allowed:?}"
        );
    }
}
