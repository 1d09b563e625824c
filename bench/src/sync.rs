//! `capsnet bench sync`: full gradient-sync rounds (every worker pushes its update, the
//! coordinator reduces and applies it, every worker pulls the new parameters) through a real
//! coordinator on loopback, with synthetic workers that compute nothing. With reducers the
//! coordinator only runs the rounds: the first `reducers` workers each serve one (the
//! co-located layout of `capsnet launch --reducers`), which reduces and applies its span.

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
    /// Reducers served in the first workers (0: the coordinator reduces everything).
    pub reducers: usize,
    /// The coordinator and the reducers serve unix sockets instead of loopback TCP ports (as
    /// `capsnet launch` has them).
    pub unix: bool,
    /// The run's parameters are pulled as their changes from the last round's
    /// (`--delta-pulls`).
    pub delta: bool,
}

/// The result of one setting.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncRow {
    pub workers: usize,
    /// Reducers served in the workers (0: the coordinator reduces).
    pub reducers: usize,
    /// "coordinator", "colocated" (a reducer in every worker) or "sharded" (in some).
    pub layout: &'static str,
    /// How workers reach the reducers: "tcp" (loopback) or "unix" (sockets).
    pub transport: &'static str,
    pub wire: &'static str,
    pub delta_pulls: bool,
    pub floats: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mb_per_s_per_worker: f64,
    /// What the coordinator moves (None with reducers: it moves no tensors).
    pub mb_per_s_coordinator: Option<f64>,
    /// Peak resident memory of the setting (coordinator and workers, one process), MiB.
    pub peak_rss_mib: f64,
    /// CPU time per timed round of the whole setting (coordinator, reducers, workers: all
    /// threads of this process), ms; None without an untimed round to start from.
    pub cpu_ms_per_round: Option<f64>,
}

/// Per round: the earliest push start and the latest end of the next pull, over all workers,
/// and the CPU time this process had used by then.
type Spans = Arc<Mutex<BTreeMap<u64, (Instant, Instant, Duration)>>>;

/// CPU time used by this process, all threads together.
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// The update every synthetic worker sends: small values, so that Adam's steps stay finite.
fn synthetic_update(total: usize) -> Arc<[f32]> {
    (0..total)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
        .collect()
}

/// Records one worker's round: from the start of its push to the end of its next pull.
fn record(spans: &Spans, round: u64, start: Instant) -> Result<()> {
    let (now, cpu) = (Instant::now(), process_cpu());
    let mut m = spans
        .lock()
        .map_err(|_| BenchError::Panicked("a synthetic worker"))?;
    let e = m.entry(round).or_insert((start, now, cpu));
    e.0 = e.0.min(start);
    e.1 = e.1.max(now);
    e.2 = e.2.max(cpu);
    Ok(())
}

/// Sends a heartbeat every `every` until dropped, as a real worker does: a slow round (4
/// workers on 2 cores) must not get a synthetic worker marked unhealthy.
fn heartbeats(
    client: &Client,
    id: &str,
    every: Duration,
) -> tokio_util::task::AbortOnDropHandle<()> {
    let (mut c, id) = (client.clone(), id.to_string());
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let _ = c
                .rpc()
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: id.clone(),
                })
                .await;
        }
    }))
}

/// Connects and joins as synthetic worker `rank`: the client, the run's settings, the id.
async fn join(url: &str, token: &str, rank: usize) -> Result<(Client, RunSettings, String)> {
    let mut client = Client::connect(url, token, None).await?;
    let joined = client
        .rpc()
        .join(pb::JoinRequest {
            name: format!("synthetic-{rank}"),
            rank_hint: Some(rank as u32),
        })
        .await?
        .into_inner();
    let s = RunSettings::try_from(joined.config.unwrap_or_default())?;
    Ok((client, s, joined.worker_id))
}

/// Leaves the run (best effort: it ends anyway).
async fn leave(client: &mut Client, id: &str) {
    let _ = client
        .rpc()
        .leave(pb::LeaveRequest {
            worker_id: id.to_string(),
        })
        .await;
}

/// A synthetic worker of a sharded run: work orders from the coordinator, each span pushed to
/// and pulled from its reducer (the worker's own in process, as `capsnet worker
/// --serve-reducer` does), the next round's parameters pulled while the update is pushed.
async fn sharded_worker(
    url: String,
    token: String,
    rank: usize,
    local: Option<capsnet_proto::frame::LocalReducer>,
    spans: Spans,
) -> Result<()> {
    let (mut client, s, id) = join(&url, &token, rank).await?;
    let total = s.layout().total();
    let update = synthetic_update(total);
    let (mut params, mut next) = (vec![0.0f32; total], vec![0.0f32; total]);
    let grid = s.grid();
    let pool = capsnet_proto::wire::BufPool::new(2 * grid.len());
    let _heartbeats = heartbeats(&client, &id, Duration::from_millis(s.heartbeat_ms.max(50)));
    let mut reducers = capsnet_worker::Reducers::new(&token, None, None, local);
    let place = s.placement();
    let want = |after| capsnet_worker::Want {
        id: &id,
        after,
        enc: s.wire,
        grid: &grid,
        place: &place,
        holds: s.delta_pulls,
    };
    let (mut order, mut layout) =
        capsnet_worker::fetch(&mut client, &mut reducers, want(None), None, &mut params).await?;
    loop {
        let Some(l) = layout.as_ref().filter(|_| !order.finished) else {
            leave(&mut client, &id).await;
            return Ok(());
        };
        let after = Some(order.round);
        if !order.participate {
            (order, layout) =
                capsnet_worker::fetch(&mut client, &mut reducers, want(after), None, &mut params)
                    .await?;
            continue;
        }
        let start = Instant::now();
        let u = capsnet_worker::Update {
            round: order.round,
            samples: order.end - order.start,
            loss: 0.0,
            data: update.clone(),
        };
        let clients = reducers.clients(l).await?;
        let mut puller = client.clone();
        // As a worker does: the next parameters stream into a copy of these, as changes.
        if s.delta_pulls {
            next.copy_from_slice(&params);
        }
        let (_, (o, next_layout)) = tokio::try_join!(
            capsnet_worker::push_spans(clients, l, &id, &s, u, &pool),
            capsnet_worker::fetch(&mut puller, &mut reducers, want(after), Some(l), &mut next),
        )?;
        record(&spans, order.round, start)?;
        std::mem::swap(&mut params, &mut next);
        (order, layout) = (o, next_layout);
    }
}

async fn synthetic_worker(url: String, token: String, rank: usize, spans: Spans) -> Result<()> {
    let (mut client, s, id) = join(&url, &token, rank).await?;
    let total = s.layout().total();
    let update = synthetic_update(total);
    let mut params = vec![0.0f32; total];
    let grid = s.grid();
    let pool = capsnet_proto::wire::BufPool::new(64);
    let _heartbeats = heartbeats(&client, &id, Duration::from_millis(s.heartbeat_ms.max(50)));
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
            leave(&mut client, &id).await;
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
        let (_, (next, _)) = tokio::try_join!(
            capsnet_worker::push(&mut client, &id, &s, u, &pool),
            // The update is not these parameters: they are still as they were pulled.
            capsnet_worker::pull_changes_into(
                &mut puller,
                &id,
                after,
                s.wire,
                &grid,
                &mut params,
                s.delta_pulls,
            ),
        )?;
        record(&spans, o.round, start)?;
        ready = Some(next);
    }
}

/// Binds a loopback port (or the unix socket `socket`) for the reducer of synthetic worker
/// `rank` and returns it serving there until the coordinator says training is over, its bulk
/// RPCs also in `local`. It reduces on `threads` threads: the worker's share of the cores, as
/// `capsnet launch` gives each worker (`--threads`, which its reducer uses too).
async fn co_located_reducer(
    url: &str,
    token: &str,
    rank: usize,
    threads: usize,
    local: capsnet_proto::frame::LocalReducer,
    socket: Option<std::path::PathBuf>,
) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
    let at = match &socket {
        Some(p) => format!("{}{}", capsnet_coordinator::UNIX_PREFIX, p.display()),
        None => "127.0.0.1:0".to_string(),
    };
    let listener = capsnet_coordinator::Listener::bind(&at).await?;
    let address = listener.local()?;
    let advertise = if listener.is_unix() {
        address
    } else {
        format!("http://{address}")
    };
    let cfg = capsnet_coordinator::ReducerConfig {
        coordinator: url.to_string(),
        token: token.to_string().into(),
        advertise,
        name: format!("reducer-{rank}"),
        threads,
        tls: None,
        coordinator_tls: None,
        give_up_after: Duration::from_secs(30),
        max_connections: 64,
        max_connections_per_ip: 64,
        socket_buffer: 0,
        local: Some(local),
        metrics: Default::default(),
    };
    Ok(async move {
        capsnet_coordinator::serve_reducer(listener, cfg, std::future::pending()).await?;
        Ok(())
    })
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
    if s.reducers > s.workers {
        return Err(BenchError::Settings(format!(
            "{} reducers with {} workers: the reducers are served in the workers",
            s.reducers, s.workers
        )));
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
    cfg.reducers = s.reducers;
    cfg.delta_pulls = s.delta;
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
        let (listener, url) = if s.unix {
            let at = format!(
                "{}{}",
                capsnet_coordinator::UNIX_PREFIX,
                tmp.join("coordinator.sock").display()
            );
            (capsnet_coordinator::Listener::bind(&at).await?, at)
        } else {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(io("binding a loopback port"))?;
            let url = format!("http://{}", l.local_addr().map_err(io("reading the port"))?);
            (l.into(), url)
        };
        let server = tokio::spawn(capsnet_coordinator::serve(
            listener,
            cfg,
            std::future::pending(),
        ));
        // Each worker on its own thread and runtime, as a worker process would be: the OS
        // shares the cores between the coordinator and the workers, and a worker's encoding
        // does not queue behind the coordinator's tasks (or the other way round).
        // Far more than any setting takes on a slow machine (the paper model's 4-worker
        // rounds take well under a second on 2 cores).
        let limit = Duration::from_secs(120 + 10 * rounds as u64);
        let mut threads = vec![];
        let share = (capsnet_core::train::default_threads() / workers).max(1);
        for rank in 0..workers {
            let (url, token, spans) = (url.clone(), token.clone(), spans.clone());
            let sharded = s.reducers > 0;
            let reducer = rank < s.reducers;
            let socket = s.unix.then(|| tmp.join(format!("reducer-{rank}.sock")));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("synthetic-{rank}"))
                    .spawn(move || {
                        // A worker that serves a reducer gets the two I/O threads of a
                        // `capsnet worker` process; the others one.
                        let rt = if reducer {
                            tokio::runtime::Builder::new_multi_thread()
                                .worker_threads(2)
                                .enable_all()
                                .build()
                        } else {
                            tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                        };
                        let rt = rt.map_err(io("starting a worker runtime"))?;
                        let work = async move {
                            if !sharded {
                                return synthetic_worker(url, token, rank, spans).await;
                            }
                            let local = reducer.then(capsnet_proto::frame::LocalReducer::default);
                            let served = match &local {
                                Some(slot) => Some(tokio::spawn(
                                    co_located_reducer(
                                        &url,
                                        &token,
                                        rank,
                                        share,
                                        slot.clone(),
                                        socket,
                                    )
                                    .await?,
                                )),
                                None => None,
                            };
                            sharded_worker(url, token, rank, local, spans).await?;
                            if let Some(r) = served {
                                r.await.map_err(|source| BenchError::Task {
                                    what: "a reducer",
                                    source,
                                })??;
                            }
                            Ok(())
                        };
                        // A run that stalls (a synthetic worker failed, and the others wait
                        // for rounds that cannot close) ends with an error, not a hang; the
                        // runtime's tasks, its reducer among them, go with it.
                        rt.block_on(async {
                            tokio::time::timeout(limit, work)
                                .await
                                .unwrap_or(Err(BenchError::Stalled(limit)))
                        })
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
        .map(|(_, (s, e, _))| (*e - *s).as_secs_f64() * 1e3)
        .collect();
    // CPU from the end of the last untimed round to the end of the last timed one.
    let ends: Vec<Duration> = spans.values().map(|v| v.2).collect();
    let cpu_ms_per_round = match (s.warmup.checked_sub(1), ends.len()) {
        (Some(first), n) if n > s.warmup => {
            let last = (s.warmup + s.rounds - 1).min(n - 1);
            let timed = (last - first) as f64;
            Some(ends[last].saturating_sub(ends[first]).as_secs_f64() * 1e3 / timed)
        }
        _ => None,
    };
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
        reducers: s.reducers,
        layout: match s.reducers {
            0 => "coordinator",
            r if r == workers => "colocated",
            _ => "sharded",
        },
        transport: match s.unix {
            false => "tcp",
            true => "unix",
        },
        wire: if wire == Encoding::Bf16 {
            "bf16"
        } else {
            "f32"
        },
        delta_pulls: s.delta,
        floats,
        median_ms: median,
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        mb_per_s_per_worker: per_worker,
        mb_per_s_coordinator: (s.reducers == 0).then_some(per_worker * workers as f64),
        peak_rss_mib: capsnet_core::bench::peak_rss_mib().unwrap_or(f64::NAN),
        cpu_ms_per_round,
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
