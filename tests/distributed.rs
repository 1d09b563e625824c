//! Distributed training with real processes on loopback: a tiny network, synthetic 28x28 data,
//! seconds per test. Every process is killed when its guard drops.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;
use std::time::Duration;

use capsnet_coordinator::plan::EpochPlan;
use capsnet_core::checkpoint::Checkpoint;
use capsnet_core::data::{self, Split, write_synthetic};
use capsnet_core::model::{Mask, PassOptions, Workspace};
use capsnet_core::optim::Adam;
use capsnet_core::train::TrainConfig;
use capsnet_core::{CapsNet, Params};
use common::*;

/// The largest difference between two vectors.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

fn data(dir: &Path, n_train: usize) -> std::path::PathBuf {
    let d = dir.join("data");
    write_synthetic(&d, n_train, 16, 28, 10, 3).unwrap();
    d
}

/// A temporary folder with `n_train` synthetic images (`d`) and a tiny coordinator on them,
/// started with `args`, that writes to `run`.
struct Setup {
    tmp: tempfile::TempDir,
    d: std::path::PathBuf,
    run: std::path::PathBuf,
    coord: Proc,
    url: String,
}

impl Setup {
    /// The folder guard, the coordinator and its URL, for tests that need nothing else.
    fn server(self) -> (tempfile::TempDir, Proc, String) {
        (self.tmp, self.coord, self.url)
    }
}

fn start(n_train: usize, args: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), n_train);
    let run = tmp.path().join("run");
    let (coord, url) = tiny_coordinator(tmp.path(), "coordinator", &d, &run, args);
    Setup {
        tmp,
        d,
        run,
        coord,
        url,
    }
}

/// Runs 3 rounds of 2 workers with batch 4 and returns the run dir.
fn three_rounds(tmp: &Path, d: &Path, name: &str) -> std::path::PathBuf {
    let run = tmp.join(name);
    let (mut coord, url) = tiny_coordinator(
        tmp,
        name,
        d,
        &run,
        &[
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--max-shift",
            "0",
            "--seed",
            "11",
            "--ema-decay",
            "0.5",
            "--expect-workers",
            "2",
            "--min-workers",
            "2",
        ],
    );
    let mut w0 = worker(tmp, &url, 0, d, &[]);
    let mut w1 = worker(tmp, &url, 1, d, &[]);
    coord.expect_success(Duration::from_secs(120));
    w0.expect_success(Duration::from_secs(30));
    w1.expect_success(Duration::from_secs(30));
    run
}

/// 2 workers with batch b each in grad mode give, after 3 rounds, the parameters (and weight
/// average) of one process training with batch 2b on the same samples; and a second run gives
/// the same bits.
#[test]
fn two_workers_equal_one_process_with_the_summed_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 64);
    let run = three_rounds(tmp.path(), &d, "run");

    // The same three steps in one process.
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let model = CapsNet::new(cfg.model.clone()).unwrap();
    let ds = data::load_split(&d, Split::Train, 10, 28).unwrap();
    let mut params = model.init_params(cfg.seed);
    let mut adam = Adam::new(cfg.adam.clone(), params.data.len());
    let mut ema = params.data.clone();
    let mut grads = Params::zeros(model.layout());
    let mut ws = Workspace::new();
    let plan = EpochPlan::new(0, vec!["worker-0".into(), "worker-1".into()], ds.len(), 4);
    let perm = data::epoch_permutation(ds.len(), cfg.seed, 0);
    for r in 0..3 {
        let idx: Vec<usize> = plan
            .work(0, r)
            .chain(plan.work(1, r))
            .map(|p| perm[p])
            .collect();
        assert_eq!(idx.len(), 8);
        let batch = data::make_batch(&ds, &idx, None);
        let opts = PassOptions {
            mask: Mask::Label,
            input_grad: false,
        };
        model
            .forward_backward(
                &params,
                &batch.images,
                &batch.labels,
                opts,
                &mut grads,
                &mut ws,
            )
            .unwrap();
        adam.update(&mut params.data, &grads.data).unwrap();
        capsnet_core::optim::ema_update(&mut ema, &params.data, 0.5, r + 1);
    }
    let ck = Checkpoint::load(&run.join("checkpoint-3.safetensors"), None).unwrap();
    assert_eq!(ck.step, 3);
    let init = model.init_params(cfg.seed);
    let moved = params
        .data
        .iter()
        .zip(&init.data)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        moved > params.data.len() / 2,
        "the reference barely trained"
    );
    // Three Adam steps move a parameter by up to 3e-3; the two sums differ only in rounding.
    let w = worst(&params.data, &ck.params.data);
    assert!(
        w < 1e-5,
        "distributed and single-process parameters differ by {w}"
    );
    let w = worst(&ema, ck.ema.as_deref().expect("no weight average"));
    assert!(w < 1e-5, "the weight averages differ by {w}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("\"eval\"") && l.contains("ema_test_accuracy")),
        "no evaluation of the weight average:\n{metrics}"
    );

    // The reduction does not depend on which update arrives first: same seed, same bits.
    let again = three_rounds(tmp.path(), &d, "again");
    let ck2 = Checkpoint::load(&again.join("checkpoint-3.safetensors"), None).unwrap();
    assert!(
        ck.params
            .data
            .iter()
            .zip(&ck2.params.data)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "two runs differ"
    );
    assert_eq!(ck.ema, ck2.ema, "two runs' weight averages differ");
}

/// `--sync params --sync-every 2`: each worker takes two local Adam steps (its optimizer kept
/// across rounds) from the round's parameters, and the coordinator's new parameters are the
/// sample-weighted average of the workers', over two rounds.
#[test]
fn params_mode_averages_local_steps() {
    let mut s = start(
        64,
        &[
            "--sync",
            "params",
            "--sync-every",
            "2",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--max-shift",
            "0",
            "--seed",
            "5",
            "--expect-workers",
            "2",
            "--min-workers",
            "2",
        ],
    );
    let mut w0 = worker(s.tmp.path(), &s.url, 0, &s.d, &[]);
    let mut w1 = worker(s.tmp.path(), &s.url, 1, &s.d, &[]);
    s.coord.expect_success(Duration::from_secs(120));
    w0.expect_success(Duration::from_secs(30));
    w1.expect_success(Duration::from_secs(30));

    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(s.run.join("config.json")).unwrap()).unwrap();
    let model = CapsNet::new(cfg.model.clone()).unwrap();
    let ds = data::load_split(&s.d, Split::Train, 10, 28).unwrap();
    let mut global = model.init_params(cfg.seed);
    let mut local_adam: Vec<Adam> = (0..2)
        .map(|_| Adam::new(cfg.adam.clone(), global.data.len()))
        .collect();
    let mut grads = Params::zeros(model.layout());
    let mut ws = Workspace::new();
    let plan = EpochPlan::new(0, vec!["worker-0".into(), "worker-1".into()], ds.len(), 8);
    let perm = data::epoch_permutation(ds.len(), cfg.seed, 0);
    let opts = PassOptions {
        mask: Mask::Label,
        input_grad: false,
    };
    let mut last_locals = vec![];
    for r in 0..2 {
        let mut locals = vec![];
        for (k, adam) in local_adam.iter_mut().enumerate() {
            let mut p = global.clone();
            let idx: Vec<usize> = plan.work(k, r).map(|i| perm[i]).collect();
            assert_eq!(idx.len(), 8);
            for b in idx.chunks(4) {
                let batch = data::make_batch(&ds, b, None);
                model
                    .forward_backward(&p, &batch.images, &batch.labels, opts, &mut grads, &mut ws)
                    .unwrap();
                adam.update(&mut p.data, &grads.data).unwrap();
            }
            locals.push(p);
        }
        // Equal samples: weight 1/2 each, summed from zero in rank order.
        let w = (8.0f64 / 16.0) as f32;
        for (i, g) in global.data.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for l in &locals {
                acc += w * l.data[i];
            }
            *g = acc;
        }
        last_locals = locals;
    }
    let ck = Checkpoint::load(&s.run.join("checkpoint-2.safetensors"), None).unwrap();
    let init = model.init_params(cfg.seed);
    assert!(
        global
            .data
            .iter()
            .zip(&init.data)
            .filter(|(a, b)| a != b)
            .count()
            > global.data.len() / 2,
        "the reference barely trained"
    );
    // The workers run one thread and this reference the test's pool: sums inside the passes
    // round differently (by about 1e-8), nothing more.
    let w = worst(&global.data, &ck.params.data);
    assert!(
        w < 1e-6,
        "distributed and reference parameters differ by {w}"
    );
    // And the check can tell: each worker's own parameters are far from the average.
    let apart = worst(&global.data, &last_locals[0].data);
    assert!(apart > 1e-4, "the workers barely differ ({apart})");
}

/// `capsnet launch` runs a coordinator and workers to the end, prefixes their logs, and fails
/// (before starting anything) on bad flags.
#[test]
fn launch_runs_a_fleet_to_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 64);
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A worker killed mid-run: the round closes without it, training goes on, and the worker
/// restarted under the same rank rejoins and contributes again. Nothing hangs.
#[test]
fn a_killed_worker_is_dropped_and_rejoins() {
    let Setup {
        tmp,
        d,
        run,
        mut coord,
        url,
    } = start(
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
    let _w0 = worker(tmp.path(), &url, 0, &d, &[]);
    let w1 = worker(tmp.path(), &url, 1, &d, &[]);
    wait_for("rounds with both workers", Duration::from_secs(60), || {
        (rounds(&run).iter().filter(|r| r["workers"] == 2).count() >= 5).then_some(())
    });
    w1.signal(libc::SIGKILL);
    let killed_at = rounds(&run).len();
    wait_for(
        "rounds without the killed worker",
        Duration::from_secs(30),
        || {
            (rounds(&run)
                .iter()
                .skip(killed_at)
                .filter(|r| r["workers"] == 1)
                .count()
                >= 5)
                .then_some(())
        },
    );
    drop(w1);
    let _w1 = worker(tmp.path(), &url, 1, &d, &[]);
    let restarted_at = rounds(&run).len();
    wait_for(
        "rounds with the restarted worker",
        Duration::from_secs(60),
        || {
            (rounds(&run)
                .iter()
                .skip(restarted_at)
                .filter(|r| r["workers"] == 2)
                .count()
                >= 5)
                .then_some(())
        },
    );
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    assert!(
        coord.log_text().contains("unhealthy"),
        "{}",
        coord.log_text()
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
    let d = data(tmp.path(), 512);
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
    let (coord, url) = coordinator(tmp.path(), "coordinator", &base);
    let w0 = worker(tmp.path(), &url, 0, &d, &[]);
    let w1 = worker(tmp.path(), &url, 1, &d, &[]);
    let ck = wait_for_or_log(
        "a checkpoint",
        Duration::from_secs(60),
        &[&coord, &w0, &w1],
        || {
            capsnet_core::checkpoint::latest_checkpoint(&run)
                .ok()
                .flatten()
        },
    );
    coord.signal(libc::SIGKILL);
    drop(coord);
    let ck_round = capsnet_core::checkpoint::latest_checkpoint(&run)
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

mod rejected {
    use super::*;
    use capsnet_proto::wire::encode_chunks;
    use capsnet_proto::{Encoding, RunSettings, pb};
    use capsnet_worker::Client;
    use tonic::Code;

    /// A tiny run for clients that drive the protocol by hand: two rounds, heartbeats that do
    /// not expire while a test thinks, small chunks.
    const PROBE: [&str; 8] = [
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--heartbeat",
        "5s",
        "--chunk-bytes",
        "4096",
    ];

    fn chunks_msg(
        id: &str,
        round: u64,
        s: &RunSettings,
        samples: u64,
        data: &[f32],
    ) -> Vec<pb::UpdateChunk> {
        chunks_sized(id, round, s, samples, data, s.chunk_bytes)
    }

    fn chunks_sized(
        id: &str,
        round: u64,
        s: &RunSettings,
        samples: u64,
        data: &[f32],
        chunk_bytes: usize,
    ) -> Vec<pb::UpdateChunk> {
        encode_chunks(data, Encoding::F32, chunk_bytes)
            .into_iter()
            .map(|c| pb::UpdateChunk {
                worker_id: id.into(),
                round,
                offset: c.offset,
                total_len: data.len() as u64,
                encoding: Encoding::F32 as i32,
                payload: c.payload,
                crc32: c.crc32,
                samples,
                layout_hash: s.layout_hash,
                total_crc32: c.total_crc32,
                loss: 0.5,
            })
            .collect()
    }

    async fn push(c: &mut Client, msgs: Vec<pb::UpdateChunk>) -> Result<(), tonic::Status> {
        c.rpc()
            .push_update(tokio_stream::iter(msgs))
            .await
            .map(|_| ())
    }

    /// Full duplex: a pull for the next round, made while the round is still being reduced,
    /// gets ranges early. When a range it got is reduced again (a worker's update failed after
    /// taking part, and its retry carries other values), the stream ends with ABORTED, and
    /// pulling again gives the final parameters.
    #[test]
    fn an_early_pull_is_aborted_when_a_range_it_got_is_redone() {
        let args = [&PROBE[..], &["--expect-workers", "2", "--min-workers", "2"]].concat();
        let (_tmp, mut coord, url) = start(64, &args).server();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut joined = vec![];
            for (name, rank) in [("a", 0), ("b", 1)] {
                let mut c = Client::connect(&url, TOKEN, None).await.unwrap();
                let j = c
                    .rpc()
                    .join(pb::JoinRequest {
                        name: name.into(),
                        rank_hint: Some(rank),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                joined.push((c, j));
            }
            let s = RunSettings::try_from(joined[0].1.config.clone().unwrap()).unwrap();
            let total = s.layout().total() as u64;
            let [(mut a, ja), (mut b, jb)] = <[_; 2]>::try_from(joined).ok().unwrap();
            let (a_id, b_id) = (ja.worker_id, jb.worker_id);
            let oa = capsnet_worker::pull(&mut a, &a_id, None, Encoding::F32, total)
                .await
                .unwrap()
                .order;
            let ob = capsnet_worker::pull(&mut b, &b_id, None, Encoding::F32, total)
                .await
                .unwrap()
                .order;
            let (sa, sb) = (oa.end - oa.start, ob.end - ob.start);
            let one = vec![1e-3f32; total as usize];
            push(&mut a, chunks_msg(&a_id, 0, &s, sa, &one))
                .await
                .unwrap();

            // a pulls round 1 while b is still sending.
            let mut early = a
                .rpc()
                .pull_params(pb::PullRequest {
                    worker_id: a_id.clone(),
                    after_round: Some(0),
                    encoding: Encoding::F32 as i32,
                })
                .await
                .unwrap()
                .into_inner();
            // b sends all but its last chunk, waits until a got range 0, then sends a corrupt
            // last chunk.
            let mut msgs = chunks_msg(&b_id, 0, &s, sb, &one);
            assert!(msgs.len() > 2);
            let mut last = msgs.pop().unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(msgs.len() + 1);
            for m in msgs {
                tx.send(m).await.unwrap();
            }
            let mut b2 = b.clone();
            let failing = tokio::spawn(async move {
                b2.rpc()
                    .push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            let first = early.message().await.unwrap().unwrap();
            assert_eq!((first.round, first.offset), (1, 0));
            assert!(first.work.is_none(), "the work order comes last");
            let mut p = last.payload.to_vec();
            p[0] ^= 1;
            last.payload = p.into();
            tx.send(last).await.unwrap();
            drop(tx);
            let e = failing.await.unwrap().unwrap_err();
            assert_eq!(e.code(), Code::DataLoss, "{e}");

            // b's retry carries other values: every range is reduced again.
            let two = vec![2e-3f32; total as usize];
            push(&mut b, chunks_msg(&b_id, 0, &s, sb, &two))
                .await
                .unwrap();
            let e = loop {
                match early.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the early stream ended normally"),
                    Err(e) => break e,
                }
            };
            assert_eq!(e.code(), Code::Aborted, "{e}");

            // Pulling again gives round 1 as it closed, with range 0 unlike the early copy.
            let fin = capsnet_worker::pull_into(
                &mut a,
                &a_id,
                Some(0),
                Encoding::F32,
                &mut vec![0.0; total as usize],
            )
            .await
            .unwrap();
            assert_eq!(fin.round, 1);
            let again = capsnet_worker::pull(&mut a, &a_id, Some(0), Encoding::F32, total)
                .await
                .unwrap();
            let mut early0 = vec![0.0f32; first.payload.len() / 4];
            capsnet_proto::wire::decode_into(&first.payload, Encoding::F32, &mut early0).unwrap();
            assert_ne!(
                early0[..],
                again.params[..early0.len()],
                "range 0 was not redone"
            );

            // Finish the run.
            let fb = capsnet_worker::pull(&mut b, &b_id, Some(0), Encoding::F32, total)
                .await
                .unwrap()
                .order;
            for (c, id, o) in [(&mut a, &a_id, &fin), (&mut b, &b_id, &fb)] {
                push(c, chunks_msg(id, 1, &s, o.end - o.start, &one))
                    .await
                    .unwrap();
            }
        });
        coord.expect_success(Duration::from_secs(60));
    }

    /// Bad token, stale round, wrong size, wrong layout, NaN and a corrupt chunk are each
    /// rejected with a clear status, and none of them changes the round or takes the worker's
    /// slot: its valid update is accepted afterwards and closes the round.
    #[test]
    fn bad_updates_are_rejected_and_change_nothing() {
        let (_tmp, mut coord, url) = start(64, &PROBE).server();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut bad = Client::connect(&url, "wrong-token-0123456789", None)
                .await
                .unwrap();
            let e = bad
                .rpc()
                .join(pb::JoinRequest {
                    name: "x".into(),
                    rank_hint: None,
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
            let e = bad.rpc().status(pb::StatusRequest {}).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
            // The bulk streams are served ahead of tonic's router and check the token too.
            let e = capsnet_worker::pull(&mut bad, "w", None, Encoding::F32, 8)
                .await
                .err()
                .unwrap();
            assert!(
                matches!(&e, capsnet_worker::WorkerError::Rpc(s) if s.code() == Code::Unauthenticated),
                "{e}"
            );
            let e = push(&mut bad, vec![pb::UpdateChunk::default()])
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");

            let mut c = Client::connect(&url, TOKEN, None).await.unwrap();
            let j = c
                .rpc()
                .join(pb::JoinRequest {
                    name: "probe".into(),
                    rank_hint: Some(0),
                })
                .await
                .unwrap()
                .into_inner();
            let s = RunSettings::try_from(j.config.unwrap()).unwrap();
            let id = j.worker_id;
            let total = s.layout().total() as u64;
            let pulled = capsnet_worker::pull(&mut c, &id, None, Encoding::F32, total)
                .await
                .unwrap();
            let o = pulled.order;
            assert!(o.participate);
            let samples = o.end - o.start;
            // A generic gRPC client (tonic's generated one) reads the hand-framed parameter
            // stream as the same parameters and work order.
            let mut stream = c
                .rpc()
                .pull_params(pb::PullRequest {
                    worker_id: id.clone(),
                    after_round: None,
                    encoding: Encoding::F32 as i32,
                })
                .await
                .unwrap()
                .into_inner();
            let mut via_tonic = vec![0.0f32; total as usize];
            let mut asm = capsnet_proto::wire::Assembler::new(total, total, Encoding::F32).unwrap();
            let mut work = None;
            while let Some(m) = stream.message().await.unwrap() {
                work = work.or(m.work);
                asm.accept((&m).into(), &mut via_tonic).unwrap();
            }
            asm.finish().unwrap();
            assert_eq!(via_tonic, pulled.params);
            assert_eq!(work, Some(o));
            let good = vec![1e-3f32; total as usize];

            let e = push(&mut c, chunks_msg(&id, 7, &s, samples, &good))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
            assert!(e.message().contains("round 7"), "{e}");

            let e = push(&mut c, chunks_msg(&id, 0, &s, samples, &good[1..]))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(e.message().contains("floats"), "{e}");

            let mut msgs = chunks_msg(&id, 0, &s, samples, &good);
            msgs.iter_mut().for_each(|m| m.layout_hash ^= 1);
            let e = push(&mut c, msgs).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(e.message().contains("layout"), "{e}");

            let mut nan = good.clone();
            let at = s.layout().get("digit.weight").unwrap().offset + 5;
            nan[at] = f32::NAN;
            let e = push(&mut c, chunks_msg(&id, 0, &s, samples, &nan))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(e.message().contains("digit.weight[5]"), "{e}");

            // Chunks off the run's grid (half the run's chunk size).
            let e = push(&mut c, chunks_sized(&id, 0, &s, samples, &good, 2048))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            assert!(e.message().contains("chunk 0 covers floats 0..512"), "{e}");

            // A corrupt byte in the last chunk, after the others were reduced (with the opposite
            // sign, so a trace of it in the result would show).
            let mut msgs = chunks_msg(&id, 0, &s, samples, &vec![-1e-3f32; total as usize]);
            assert!(msgs.len() > 2);
            let last = msgs.len() - 1;
            let mut p = msgs[last].payload.to_vec();
            p[0] ^= 1;
            msgs[last].payload = p.into();
            let e = push(&mut c, msgs).await.unwrap_err();
            assert_eq!(e.code(), Code::DataLoss, "{e}");

            // Pulling in another encoding than the run's wire.
            let e = capsnet_worker::pull(&mut c, &id, None, Encoding::Bf16, total)
                .await
                .err()
                .unwrap();
            assert!(e.to_string().contains("serves parameters as F32"), "{e}");

            let mut msgs = chunks_msg(&id, 0, &s, samples, &good);
            let mut p = msgs[1].payload.to_vec();
            p[0] ^= 1;
            msgs[1].payload = p.into();
            let e = push(&mut c, msgs).await.unwrap_err();
            assert_eq!(e.code(), Code::DataLoss, "{e}");

            let st = c
                .rpc()
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(st.round, 0, "a rejected update changed the round");

            // The slot is still free: the valid update is accepted and closes round 0.
            push(&mut c, chunks_msg(&id, 0, &s, samples, &good))
                .await
                .unwrap();
            let next = capsnet_worker::pull(&mut c, &id, Some(0), Encoding::F32, total)
                .await
                .unwrap();
            assert_eq!(next.order.round, 1);
            // Adam's first step moves every parameter by lr against the gradient's sign: only
            // the valid update was used.
            for (i, (a, b)) in pulled.params.iter().zip(&next.params).enumerate() {
                assert!((b - a + 1e-3).abs() < 1e-6, "float {i}: {a} -> {b}");
            }
            // Now round 0 is stale.
            let e = push(&mut c, chunks_msg(&id, 0, &s, samples, &good))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
            assert!(e.message().contains("current round is 1"), "{e}");
            // Finish the run.
            let o = next.order;
            push(&mut c, chunks_msg(&id, 1, &s, o.end - o.start, &good))
                .await
                .unwrap();
        });
        coord.expect_success(Duration::from_secs(60));
    }
}

/// A worker that joins and pulls before the plan exists (the fleet is still joining) waits,
/// and gets its work as soon as the last expected worker joins: no pull is left behind.
#[test]
fn a_pull_before_the_epoch_is_planned_is_answered_when_it_starts() {
    use capsnet_proto::{Encoding, pb};
    use capsnet_worker::Client;
    let (_tmp, mut coord, url) = start(
        64,
        &[
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--expect-workers",
            "2",
            "--start-timeout",
            "600s",
            "--heartbeat",
            "10s",
        ],
    )
    .server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let join = |name: &'static str| {
            let url = url.clone();
            async move {
                let mut c = Client::connect(&url, common::TOKEN, None).await.unwrap();
                let j = c
                    .rpc()
                    .join(pb::JoinRequest {
                        name: name.into(),
                        rank_hint: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let total = capsnet_proto::RunSettings::try_from(j.config.unwrap())
                    .unwrap()
                    .layout()
                    .total() as u64;
                (c, j.worker_id, total)
            }
        };
        let (mut a, a_id, total) = join("early").await;
        let early = tokio::spawn(async move {
            capsnet_worker::pull(&mut a, &a_id, None, Encoding::F32, total)
                .await
                .unwrap()
                .order
        });
        // The early pull is waiting: there is no plan yet.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!early.is_finished(), "a pull was answered before the plan");
        let _late = join("late").await;
        let order = tokio::time::timeout(Duration::from_secs(20), early)
            .await
            .expect("the early pull was never answered")
            .unwrap();
        assert!(order.participate && order.round == 0, "{order:?}");
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}
