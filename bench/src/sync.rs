//! `capsnet bench sync`: full gradient-sync rounds (every worker pushes its update, the
//! coordinator reduces and applies it, every worker pulls the new parameters) through a real
//! coordinator on loopback, with synthetic workers that compute nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsnet_core::CapsNetConfig;
use capsnet_core::train::TrainConfig;
use capsnet_proto::{Encoding, RunSettings, pb};
use capsnet_worker::Client;

use crate::{BenchError, Result};

/// One setting: how many synthetic workers, which wire encoding, how many rounds.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    pub workers: usize,
    pub wire: Encoding,
    /// Timed rounds, after `warmup` untimed ones.
    pub rounds: usize,
    pub warmup: usize,
    /// The tensor: the layout of this network.
    pub model: CapsNetConfig,
    pub chunk_bytes: usize,
}

/// The result of one setting.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncRow {
    pub workers: usize,
    pub wire: &'static str,
    pub floats: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mb_per_s_per_worker: f64,
    pub mb_per_s_coordinator: f64,
    /// Peak resident memory of the setting (coordinator and workers, one process), MiB.
    pub peak_rss_mib: f64,
}

/// Per round: the earliest push start and the latest end of the next pull, over all workers.
type Spans = Arc<Mutex<BTreeMap<u64, (Instant, Instant)>>>;

async fn synthetic_worker(url: String, token: String, rank: usize, spans: Spans) -> Result<()> {
    let mut client = Client::connect(&url, &token, None).await?;
    let joined = client
        .rpc()
        .join(pb::JoinRequest {
            name: format!("synthetic-{rank}"),
            rank_hint: Some(rank as u32),
        })
        .await?
        .into_inner();
    let s = RunSettings::try_from(joined.config.unwrap_or_default())?;
    let id = joined.worker_id;
    let total = s.layout().total();
    let update: Arc<[f32]> = (0..total)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
        .collect();
    let mut params = vec![0.0f32; total];
    let grid = s.grid();
    let pool = capsnet_proto::wire::BufPool::new(64);
    // Heartbeats in the background, as a real worker sends them: a slow round (4 workers on
    // 2 cores) must not get a synthetic worker marked unhealthy.
    let hb = {
        let (mut c, id) = (client.clone(), id.clone());
        let every = Duration::from_millis(s.heartbeat_ms.max(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = c
                    .rpc()
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: id.clone(),
                    })
                    .await;
            }
        })
    };
    let _stop_heartbeats = tokio_util::task::AbortOnDropHandle::new(hb);
    let mut after = None;
    // The next round's parameters, pulled while the update was pushed (as a worker does).
    let mut ready = None;
    let mut puller = client.clone();
    loop {
        let o = match ready.take() {
            Some(o) => o,
            None => {
                capsnet_worker::pull_into(&mut client, &id, after, s.wire, &grid, &mut params)
                    .await?
            }
        };
        if o.finished {
            let _ = client
                .rpc()
                .leave(pb::LeaveRequest {
                    worker_id: id.clone(),
                })
                .await;
            return Ok(());
        }
        after = Some(o.round);
        if !o.participate {
            continue;
        }
        let start = Instant::now();
        let u = capsnet_worker::Update {
            round: o.round,
            samples: o.end - o.start,
            loss: 0.0,
            data: update.clone(),
        };
        let (_, next) = tokio::try_join!(
            capsnet_worker::push(&mut client, &id, &s, u, &pool),
            capsnet_worker::pull_into(&mut puller, &id, after, s.wire, &grid, &mut params),
        )?;
        let now = Instant::now();
        let mut m = spans
            .lock()
            .map_err(|_| BenchError::Panicked("a synthetic worker"))?;
        let e = m.entry(o.round).or_insert((start, now));
        e.0 = e.0.min(start);
        e.1 = e.1.max(now);
        drop(m);
        ready = Some(next);
    }
}

/// Runs one setting: a coordinator on a loopback port and `workers` synthetic workers, each on
/// its own thread and runtime, for `warmup + rounds` rounds on synthetic data in a private
/// temporary directory (removed afterwards, also on failure).
pub fn measure(s: &SyncSettings) -> Result<SyncRow> {
    if s.workers == 0 || s.rounds == 0 {
        return Err(BenchError::Settings(
            "workers and rounds must be at least 1".into(),
        ));
    }
    let (workers, wire, model) = (s.workers, s.wire, &s.model);
    let tmp = tempfile::Builder::new()
        .prefix("capsnet-bench-sync-")
        .tempdir()
        .map_err(|source| BenchError::Io {
            what: "creating a temporary directory",
            source,
        })?;
    let tmp = tmp.path();
    let data = tmp.join("data");
    let rounds = s.warmup + s.rounds + 1;
    capsnet_core::data::write_synthetic(
        &data,
        workers * (rounds + 2),
        2,
        model.image_size,
        model.classes,
        1,
    )?;
    let train = TrainConfig {
        model: model.clone(),
        data_dir: data,
        run_dir: tmp.join("run"),
        batch_size: 1,
        max_steps: Some(rounds as u64),
        // The coordinator reduces on every core, as `capsnet coordinator` does by default.
        threads: capsnet_core::train::default_threads(),
        max_shift: 0,
        keep_checkpoints: 1,
        eval_batch_size: 2,
        ..TrainConfig::default()
    };
    let token = "bench-sync-token-0123456789".to_string();
    let mut cfg = capsnet_coordinator::CoordinatorConfig::new(train, token.clone());
    cfg.expect_workers = workers;
    cfg.min_workers = workers;
    cfg.wire = wire;
    cfg.chunk_bytes = s.chunk_bytes;
    // Heartbeats every 500 ms (unhealthy after 1.5 s without one): a loaded machine does not
    // fail the run, and each setting still ends 1.5 s after its last round.
    cfg.heartbeat = Duration::from_millis(500);
    let spans: Spans = Arc::default();
    // Restart the peak-memory count (VmHWM) for this setting; Linux only, best effort.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| BenchError::Io {
            what: "starting the async runtime",
            source,
        })?;
    rt.block_on(async {
        let io = |what| move |source| BenchError::Io { what, source };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("binding a loopback port"))?;
        let url = format!(
            "http://{}",
            listener.local_addr().map_err(io("reading the port"))?
        );
        let server = tokio::spawn(capsnet_coordinator::serve(
            listener,
            cfg,
            std::future::pending(),
        ));
        // Each worker on its own thread and runtime, as a worker process would be: the OS
        // shares the cores between the coordinator and the workers, and a worker's encoding
        // does not queue behind the coordinator's tasks (or the other way round).
        let mut threads = vec![];
        for rank in 0..workers {
            let (url, token, spans) = (url.clone(), token.clone(), spans.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("synthetic-{rank}"))
                    .spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(io("starting a worker runtime"))?
                            .block_on(synthetic_worker(url, token, rank, spans))
                    })
                    .map_err(io("starting a worker thread"))?,
            );
        }
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| BenchError::Panicked("a synthetic worker thread"))?
                })
                .collect::<Result<Vec<()>>>()
        });
        joined.await.map_err(|source| BenchError::Task {
            what: "synthetic workers",
            source,
        })??;
        server.await.map_err(|source| BenchError::Task {
            what: "coordinator",
            source,
        })??;
        Ok::<_, BenchError>(())
    })?;
    let spans = spans
        .lock()
        .map_err(|_| BenchError::Panicked("a synthetic worker"))?;
    let mut ms: Vec<f64> = spans
        .iter()
        .skip(s.warmup)
        .take(s.rounds)
        .map(|(_, (s, e))| (*e - *s).as_secs_f64() * 1e3)
        .collect();
    if ms.is_empty() {
        return Err(BenchError::NoRounds);
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let floats = capsnet_core::ParamLayout::for_config(model).total();
    let bytes = 2.0 * floats as f64 * capsnet_proto::wire::bytes_per_float(wire) as f64;
    let per_worker = bytes / (median / 1e3) / 1e6;
    Ok(SyncRow {
        workers,
        wire: if wire == Encoding::Bf16 {
            "bf16"
        } else {
            "f32"
        },
        floats,
        median_ms: median,
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        mb_per_s_per_worker: per_worker,
        mb_per_s_coordinator: per_worker * workers as f64,
        peak_rss_mib: capsnet_core::bench::peak_rss_mib().unwrap_or(f64::NAN),
    })
}

/// The machine's copy bandwidth, one core: the ceiling of any pass over the payloads (MB/s,
/// best of 5 copies of `floats` f32 between two warm buffers).
pub fn memcpy_mb_per_s(floats: usize) -> f64 {
    let src = vec![1.0f32; floats];
    let mut dst = vec![0.0f32; floats];
    let mut best = f64::MAX;
    for _ in 0..6 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    floats as f64 * 4.0 / best / 1e6
}
