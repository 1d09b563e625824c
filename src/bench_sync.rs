//! `capsnet bench sync`: full gradient-sync rounds (every worker pushes its update, the
//! coordinator reduces and applies it, every worker pulls the new parameters) through a real
//! coordinator on loopback, with synthetic workers that compute nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsnet_core::CapsNetConfig;
use capsnet_core::train::TrainConfig;
use capsnet_proto::{Encoding, RunSettings, pb};
use capsnet_worker::Client;
use clap::Args;

use crate::args::{ModelSize, WireArg};

#[derive(Args)]
pub struct BenchSyncArgs {
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Wire encodings to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "f32,bf16")]
    wire: Vec<WireArg>,
    /// Timed rounds per setting.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Tensor size: the paper's model (8,215,568 floats) or the tiny one.
    #[arg(long, value_enum, default_value = "paper")]
    model: ModelSize,
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Also write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row {
    workers: usize,
    wire: &'static str,
    floats: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    mb_per_s_per_worker: f64,
    mb_per_s_coordinator: f64,
    /// Peak resident memory of the setting (coordinator and workers, one process), MiB.
    peak_rss_mib: f64,
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
    let _stop_heartbeats = AbortOnDrop(hb);
    let mut after = None;
    // The next round's parameters, pulled while the update was pushed (as a worker does).
    let mut ready = None;
    let mut puller = client.clone();
    loop {
        let o = match ready.take() {
            Some(o) => o,
            None => capsnet_worker::pull_into(&mut client, &id, after, s.wire, &mut params).await?,
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
            capsnet_worker::pull_into(&mut puller, &id, after, s.wire, &mut params),
        )?;
        let now = Instant::now();
        let mut m = spans.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let e = m.entry(o.round).or_insert((start, now));
        e.0 = e.0.min(start);
        e.1 = e.1.max(now);
        drop(m);
        ready = Some(next);
    }
}

/// Stops a background task when dropped (on every way out of a synthetic worker).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn measure(
    workers: usize,
    wire: Encoding,
    a: &BenchSyncArgs,
    model: &CapsNetConfig,
) -> Result<Row> {
    let tmp = std::env::temp_dir().join(format!(
        "capsnet-bench-sync-{}-{workers}-{}",
        std::process::id(),
        wire as i32
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = tmp.join("data");
    let rounds = a.warmup + a.rounds + 1;
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
    cfg.chunk_bytes = a.chunk_bytes;
    // Heartbeats every 500 ms (unhealthy after 1.5 s without one): a loaded machine does not
    // fail the run, and each setting still ends 1.5 s after its last round.
    cfg.heartbeat = Duration::from_millis(500);
    let spans: Spans = Arc::default();
    // Restart the peak-memory count (VmHWM) for this setting; Linux only, best effort.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rt = crate::distributed::runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
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
                            .build()?
                            .block_on(synthetic_worker(url, token, rank, spans))
                    })?,
            );
        }
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
                })
                .collect::<Result<Vec<()>>>()
        });
        joined.await.context("worker threads")??;
        server.await.context("coordinator task")??;
        Ok::<_, anyhow::Error>(())
    })?;
    let _ = std::fs::remove_dir_all(&tmp);
    let spans = spans.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut ms: Vec<f64> = spans
        .iter()
        .skip(a.warmup)
        .take(a.rounds)
        .map(|(_, (s, e))| (*e - *s).as_secs_f64() * 1e3)
        .collect();
    if ms.is_empty() {
        bail!("no rounds were timed");
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let floats = capsnet_core::ParamLayout::for_config(model).total();
    let bytes = 2.0 * floats as f64 * capsnet_proto::wire::bytes_per_float(wire) as f64;
    let per_worker = bytes / (median / 1e3) / 1e6;
    Ok(Row {
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
fn memcpy_mb_per_s(floats: usize) -> f64 {
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

pub fn run(a: BenchSyncArgs) -> Result<()> {
    if a.rounds == 0 || a.workers.is_empty() || a.workers.contains(&0) || a.wire.is_empty() {
        bail!("--rounds, --workers and --wire must be non-empty and positive");
    }
    let model = a.model.config();
    println!(
        "capsnet bench sync: {} floats per update ({:.1} MB fp32), {} timed rounds after {} warm-up, loopback",
        capsnet_core::ParamLayout::for_config(&model).total(),
        capsnet_core::ParamLayout::for_config(&model).total() as f64 * 4.0 / 1e6,
        a.rounds,
        a.warmup
    );
    println!(
        "round = every worker pushes its update, the coordinator averages and applies Adam, every worker pulls the result"
    );
    let floats = capsnet_core::ParamLayout::for_config(&model).total();
    println!("machine: {}", capsnet_core::bench::machine_summary());
    println!(
        "memcpy of {:.1} MB, one core: {:.0} MB/s (each byte of a round passes through memory at least 4 times: encode, kernel send, kernel receive, reduce or decode)",
        floats as f64 * 4.0 / 1e6,
        memcpy_mb_per_s(floats)
    );
    println!();
    println!(
        "{:>7} {:>5} {:>10} {:>9} {:>9} {:>13} {:>14} {:>9}",
        "workers",
        "wire",
        "median_ms",
        "min_ms",
        "max_ms",
        "MB/s/worker",
        "MB/s coord.",
        "peak_MiB",
    );
    let mut rows = vec![];
    for &n in &a.workers {
        for &w in &a.wire {
            let r = measure(n, w.encoding(), &a, &model)?;
            println!(
                "{:>7} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>13.0} {:>14.0} {:>9.0}",
                r.workers,
                r.wire,
                r.median_ms,
                r.min_ms,
                r.max_ms,
                r.mb_per_s_per_worker,
                r.mb_per_s_coordinator,
                r.peak_rss_mib,
            );
            rows.push(r);
        }
    }
    println!(
        "(the anchor: PyTorch's Gloo all-reduce of the same floats, scripts/reference/gloo_allreduce_bench.py on this machine; docs/benchmarks.md has earlier comparisons)"
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
