//! capsnet-worker: one replica of the model that trains on its shard of the data.
//!
//! # Layout
//! - [`WorkerConfig`]: where the coordinator is, credentials, data, threads, overlap.
//! - [`run`]: the worker's life: connect and join (with retry and backoff), then per round pull
//!   the parameters and work order, compute off the async runtime, push the update (with
//!   overlap: each chunk as the backward pass makes it final, the next round pulled meanwhile);
//!   rejoin when the coordinator restarts; leave when training is finished or on shutdown.
//!   [`Phase`] names where it is in that loop for the logs; the loop itself is not yet a state
//!   machine.
//! - `transfer`: [`pull`], [`push`], [`push_chunks`] and the sender that feeds a push from the
//!   backward pass.
//! - `replica`: the model, data and buffers a worker computes with.
//! - `error`: [`WorkerError`] and which errors are configuration errors (exit 2).
//! - [`client`]: a connected, authenticated gRPC client.
//! - [`identity`]: the worker's name and preferred rank when the operator gives none.
//! - [`metrics`]: what `--metrics-listen` serves.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsnet_proto::wire::BufPool;
use capsnet_proto::{RunSettings, SyncMode, pb};
use tonic::Code;

pub mod client;
mod error;
mod identity;
pub mod metrics;
mod replica;
mod transfer;

pub use client::{Client, ClientTls};
pub use error::{Result, WorkerError};
pub use identity::identity;
pub use metrics::WorkerMetrics;
pub use transfer::{
    Layout, Pulled, Reducers, SharedFloats, Update, Want, fetch, pull, pull_into, push,
    push_chunks, push_spans,
};

use replica::Replica;
use transfer::{ChunkSender, used};

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `http://host:port` or `https://host:port`.
    pub coordinator: String,
    /// Redacted in `Debug`.
    pub token: capsnet_proto::Token,
    pub data_dir: PathBuf,
    /// Stable name; a worker restarted under the same name gets its rank and shard back.
    pub name: String,
    pub rank_hint: Option<u32>,
    pub threads: usize,
    /// Give up when the coordinator cannot be reached for this long.
    pub give_up_after: Duration,
    pub tls: Option<ClientTls>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// More metrics served at the same address after the worker's (the reducer in this
    /// process).
    pub more_metrics: Option<capsnet_proto::metrics_http::Source>,
    /// Grad mode: send each chunk of the gradient as soon as the backward pass has made it
    /// final, while the rest of the pass runs (compute/sync overlap).
    pub overlap: bool,
    /// The name checked in every reducer's certificate (None: each reducer's host).
    pub reducer_tls_domain: Option<String>,
    /// A reducer served in this process (`--serve-reducer`): its span is pushed to and pulled
    /// from it in process, without a socket.
    pub local_reducer: Option<capsnet_proto::frame::LocalReducer>,
}

/// The worker's side of its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and joining (again after a coordinator restart).
    Joining,
    /// Has a rank; pulling, computing and pushing rounds.
    Working,
    /// Training is over or the worker was told to stop; it left.
    Stopped,
}

/// How a worker's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerOutcome {
    pub rounds: u64,
    pub finished: bool,
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

/// Connects and joins, retrying with exponential backoff (100 ms to 5 s) for up to
/// `give_up_after`.
async fn join(cfg: &WorkerConfig) -> Result<(Client, pb::JoinResponse)> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut client =
                Client::connect(&cfg.coordinator, cfg.token.expose(), cfg.tls.as_ref()).await?;
            let req = pb::JoinRequest {
                name: cfg.name.clone(),
                rank_hint: cfg.rank_hint,
            };
            let resp = client.rpc().join(req).await?.into_inner();
            Ok::<_, WorkerError>((client, resp))
        };
        match attempt.await {
            Ok(ok) => return Ok(ok),
            Err(WorkerError::Rpc(s)) if !retryable(s.code()) => return Err(WorkerError::Rpc(s)),
            // A bad address, TLS file or token does not get better by waiting.
            Err(e) if e.is_config() => return Err(e),
            Err(e) => {
                if started.elapsed() >= cfg.give_up_after {
                    return Err(WorkerError::Unreachable {
                        url: cfg.coordinator.clone(),
                        waited: started.elapsed(),
                        last: e.to_string(),
                    });
                }
                tracing::debug!(error = %e, ?delay, "coordinator not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs the worker until training is finished (`Ok(finished = true)`) or `shutdown` resolves
/// (it leaves first).
pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<WorkerOutcome> {
    let metrics = WorkerMetrics::new();
    let server = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Listen { addr, source })?;
            if let Ok(a) = l.local_addr() {
                tracing::info!(address = %a, "metrics at http://{a}/metrics");
            }
            let m = metrics.clone();
            let mut parts: Vec<capsnet_proto::metrics_http::Exposition> =
                vec![Arc::new(move || m.encode())];
            parts.extend(cfg.more_metrics.iter().map(|s| s.0.clone()));
            Some(AbortOnDrop(tokio::spawn(
                capsnet_proto::metrics_http::serve(
                    l,
                    capsnet_proto::metrics_http::join(parts),
                    std::future::pending(),
                ),
            )))
        }
        None => None,
    };
    let out = train(&cfg, &metrics, shutdown).await;
    drop(server);
    out
}

/// Aborts a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task (it is aborted if this wait is dropped).
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn train(
    cfg: &WorkerConfig,
    metrics: &WorkerMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerOutcome> {
    tokio::pin!(shutdown);
    let mut replica: Option<Replica> = None;
    let mut rounds = 0u64;
    loop {
        tracing::info!(phase = ?Phase::Joining, coordinator = %cfg.coordinator, "joining");
        let (mut client, joined) = tokio::select! {
            r = join(cfg) => r?,
            _ = &mut shutdown => return Ok(WorkerOutcome { rounds, finished: false }),
        };
        let settings = RunSettings::try_from(joined.config.unwrap_or_default())?;
        let id = joined.worker_id.clone();
        tracing::info!(worker = %id, rank = joined.rank, round = joined.round, "joined");
        metrics.joined(true);
        // Heartbeats in the background from the moment we joined (loading the data can take
        // longer than the coordinator waits for a heartbeat); a NotFound means it forgot us.
        let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
        let hb = {
            let mut c = client.clone();
            let (id, every) = (
                id.clone(),
                Duration::from_millis(settings.heartbeat_ms.max(50)),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match c
                        .rpc()
                        .heartbeat(pb::HeartbeatRequest {
                            worker_id: id.clone(),
                        })
                        .await
                    {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::NotFound => {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(s) => tracing::debug!(status = %s, "heartbeat failed"),
                    }
                }
            })
        };
        if replica.as_ref().is_none_or(|r| r.settings != settings) {
            let (s, c) = (settings.clone(), cfg.clone());
            let loaded = tokio::task::spawn_blocking(move || Replica::new(s, &c))
                .await
                .map_err(|source| WorkerError::Task {
                    what: "loading data",
                    source,
                })
                .and_then(|r| r);
            match loaded {
                Ok(r) => replica = Some(r),
                Err(e) => {
                    hb.abort();
                    return Err(e);
                }
            }
        }
        tracing::debug!(phase = ?Phase::Working);
        let mut after: Option<u64> = None;
        // The parameters of the round, pulled into the same buffer every round, and the work
        // order that came with them when they were pulled beside the last push.
        let mut pulled: Vec<f32> = vec![];
        // With overlap, the next round's parameters are pulled while this round's are still in
        // use: into this second buffer.
        let mut second: Vec<f32> = vec![];
        let mut ready: Option<pb::WorkOrder> = None;
        // A sharded run: where each span lives (from the last work order), and connections to
        // the reducers.
        let mut layout: Option<transfer::Layout> = None;
        let mut reducers = transfer::Reducers::new(
            cfg.token.expose(),
            cfg.tls.as_ref(),
            cfg.reducer_tls_domain.as_deref(),
            cfg.local_reducer.clone(),
        );
        // Payload buffers for two updates: the one being sent and the next.
        let grid = settings.grid();
        let pool = BufPool::new(2 * grid.len());
        let total = settings.layout().total() as u64;
        let result: Result<Option<bool>> = loop {
            let step = async {
                let order = match ready.take() {
                    Some(o) => o,
                    None => {
                        if pulled.len() != total as usize {
                            pulled = vec![0.0; total as usize];
                        }
                        let o = if settings.sharded {
                            let want = transfer::Want {
                                id: &id,
                                after,
                                enc: settings.wire,
                                grid: &grid,
                            };
                            let (o, l) = transfer::fetch(
                                &mut client,
                                &mut reducers,
                                want,
                                None,
                                &mut pulled,
                            )
                            .await?;
                            layout = l;
                            o
                        } else {
                            pull_into(&mut client, &id, after, settings.wire, &grid, &mut pulled)
                                .await?
                        };
                        metrics.wire(
                            settings.wire,
                            "in",
                            reducers.network_floats(layout.as_ref(), &grid),
                        );
                        o
                    }
                };
                if order.finished {
                    return Ok(Some(true));
                }
                after = Some(order.round);
                if !order.participate {
                    return Ok(None);
                }
                // The replica was loaded above, before the loop, and is put back after every
                // step; a failed step ends the session.
                let Some(mut r) = replica.take() else {
                    return Err(WorkerError::Internal("no model replica is loaded"));
                };
                let o = order.clone();
                let mut params = std::mem::take(&mut pulled);
                let started = Instant::now();
                tracing::trace!(target: "capsnet::timeline", round = order.round, "compute");
                // Overlap (grad mode): each chunk goes out as soon as the backward pass has
                // made it final, on a stream that runs beside the computation. A sharded run
                // always sends through the chunk sender (one stream per reducer), the whole
                // update at the end without overlap.
                let overlap = cfg.overlap && settings.sync_mode == SyncMode::Grad;
                let (mut sender, mut early) = (None, None);
                if overlap || settings.sharded {
                    let spans = match (&layout, settings.sharded) {
                        (Some(l), true) => l.spans(),
                        (None, true) => {
                            return Err(WorkerError::Internal("no reducer layout"));
                        }
                        _ => std::iter::once(0..grid.len()).collect(),
                    };
                    let clients = match (&layout, settings.sharded) {
                        (Some(l), true) => reducers.clients(l).await?,
                        _ => vec![client.clone()],
                    };
                    let (mut snd, loss, chunks) =
                        ChunkSender::new(grid.clone(), &spans, settings.wire, pool.clone())?;
                    for (k, c) in clients.iter().enumerate() {
                        if c.is_in_process() {
                            snd.in_process(k);
                        }
                    }
                    let range = capsnet_proto::work_range(&order, settings.train_len as usize)?;
                    let head = (order.round, range.len() as u64);
                    let (id, s) = (id.clone(), settings.clone());
                    let sharded = settings.sharded;
                    let layout_id = layout.as_ref().map_or(0, |l| l.id);
                    early = Some(AbortOnDrop(tokio::spawn(async move {
                        // No loss: the computation failed before its backward pass began.
                        let Ok(loss) = loss.await else {
                            return Ok(false);
                        };
                        // One stream per span (one in all without reducers).
                        let pushes = chunks.into_iter().zip(clients).map(|(chunks, mut c)| {
                            let (id, s) = (id.clone(), s.clone());
                            async move {
                                let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks);
                                let pushed = push_chunks(
                                    &mut c,
                                    &id,
                                    &s,
                                    (head.0, head.1, loss),
                                    layout_id,
                                    chunks,
                                )
                                .await;
                                match used(head.0, pushed) {
                                    // A reducer, not the coordinator, failed.
                                    Err(WorkerError::Rpc(st))
                                        if sharded && retryable(st.code()) =>
                                    {
                                        Err(WorkerError::Reducer(st))
                                    }
                                    r => r,
                                }
                            }
                        });
                        let all = futures_util::future::try_join_all(pushes).await?;
                        tracing::trace!(target: "capsnet::timeline", round = head.0, "pushed");
                        Ok(all.into_iter().all(|u| u))
                    })));
                    sender = Some(snd);
                }
                let compute = async {
                    let (r, params, out) = tokio::task::spawn_blocking(move || {
                        let out = match sender.as_mut() {
                            Some(snd) if overlap => r.compute(&o, &mut params, snd),
                            Some(snd) => {
                                let out = r.compute(&o, &mut params, &mut ());
                                if let Ok((update, _, loss)) = &out {
                                    snd.send_all(*loss, update);
                                }
                                out
                            }
                            None => r.compute(&o, &mut params, &mut ()),
                        };
                        // The push stream ends once its last chunk is sent.
                        drop(sender);
                        (r, params, out)
                    })
                    .await
                    .map_err(|source| WorkerError::Task {
                        what: "training step",
                        source,
                    })?;
                    replica = Some(r);
                    tracing::trace!(target: "capsnet::timeline", "computed");
                    let (update, samples, loss) = out?;
                    Ok::<_, WorkerError>((params, update, samples, loss, Instant::now()))
                };
                let mut puller = client.clone();
                let (used, next, update, samples, loss, computed) = match early {
                    Some(task) => {
                        // The next round's parameters stream in (into the second buffer) from
                        // the moment its first ranges are reduced, while this round's
                        // computation and its sending still run.
                        let mut next_params = std::mem::take(&mut second);
                        if next_params.len() != total as usize {
                            next_params = vec![0.0; total as usize];
                        }
                        let pushing = async {
                            task.join().await.map_err(|source| WorkerError::Task {
                                what: "sending the update",
                                source,
                            })?
                        };
                        let pulling = async {
                            if settings.sharded {
                                let want = transfer::Want {
                                    id: &id,
                                    after,
                                    enc: settings.wire,
                                    grid: &grid,
                                };
                                let (o, l) = transfer::fetch(
                                    &mut puller,
                                    &mut reducers,
                                    want,
                                    layout.as_ref(),
                                    &mut next_params,
                                )
                                .await?;
                                tracing::trace!(target: "capsnet::timeline", round = o.round, "fetched");
                                Ok::<_, WorkerError>((o, l))
                            } else {
                                let o = pull_into(
                                    &mut puller,
                                    &id,
                                    after,
                                    settings.wire,
                                    &grid,
                                    &mut next_params,
                                )
                                .await?;
                                Ok((o, None))
                            }
                        };
                        let ((params, update, samples, loss, computed), used, (next, next_layout)) =
                            tokio::try_join!(compute, pushing, pulling)?;
                        // What crossed the network: the spans not served in this process.
                        metrics.wire(
                            settings.wire,
                            "out",
                            reducers.network_floats(layout.as_ref(), &grid),
                        );
                        if settings.sharded {
                            layout = next_layout;
                        }
                        metrics.wire(
                            settings.wire,
                            "in",
                            reducers.network_floats(layout.as_ref(), &grid),
                        );
                        second = params;
                        pulled = next_params;
                        (used, next, Some(update), samples, loss, computed)
                    }
                    None => {
                        let (params, update, samples, loss, computed) = compute.await?;
                        pulled = params;
                        let data = SharedFloats(Arc::new(update));
                        let update = Update {
                            round: order.round,
                            samples,
                            loss,
                            data: data.clone(),
                        };
                        // Full duplex: the next round's parameters stream in while the update
                        // streams out (the coordinator sends each range once it is reduced).
                        let pushing = async {
                            used(
                                order.round,
                                push(&mut client, &id, &settings, update, &pool).await,
                            )
                        };
                        let pulling =
                            pull_into(&mut puller, &id, after, settings.wire, &grid, &mut pulled);
                        let (used, next) = tokio::try_join!(pushing, pulling)?;
                        metrics.wire(settings.wire, "out", total);
                        metrics.wire(settings.wire, "in", total);
                        // The stream that sent the update is done with it by now (or else it
                        // is left to be freed, and the next update gets a fresh buffer).
                        (
                            used,
                            next,
                            Arc::try_unwrap(data.0).ok(),
                            samples,
                            loss,
                            computed,
                        )
                    }
                };
                metrics.round(samples, loss, computed - started, computed.elapsed(), used);
                if let (Some(r), Some(v)) = (replica.as_mut(), update) {
                    r.recycle(v);
                }
                if used {
                    rounds += 1;
                    tracing::debug!(round = order.round, loss, "update accepted");
                }
                ready = Some(next);
                Ok(None)
            };
            let r = tokio::select! {
                r = step => r,
                _ = lost.changed() => Err(WorkerError::Rpc(tonic::Status::not_found("coordinator forgot this worker"))),
                _ = &mut shutdown => Ok(Some(false)),
            };
            match r {
                Ok(None) => continue,
                Ok(Some(finished)) => break Ok(Some(finished)),
                Err(WorkerError::Rpc(s)) if s.code() == Code::NotFound || retryable(s.code()) => {
                    tracing::warn!(status = %s, "lost the coordinator; joining again");
                    break Ok(None);
                }
                // The coordinator sees the reducer's loss (the spans move, the run rolls back)
                // or not (a connection broke): either way the next work order says what to
                // do, the same round again or another one.
                // (A step cut short takes the model replica with it: that needs a new session.)
                Err(WorkerError::Reducer(s)) if replica.is_none() => {
                    tracing::warn!(status = %s, "a reducer failed mid-step; joining again");
                    break Ok(None);
                }
                Err(WorkerError::Reducer(s)) => {
                    tracing::warn!(status = %s, round = ?after, "a reducer failed mid-update; asking for the round's order again");
                    after = after.and_then(|r| r.checked_sub(1));
                    ready = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => break Err(e),
            }
        };
        hb.abort();
        metrics.joined(false);
        match result {
            Ok(Some(finished)) => {
                let _ = client
                    .rpc()
                    .leave(pb::LeaveRequest {
                        worker_id: id.clone(),
                    })
                    .await;
                tracing::info!(rounds, finished, phase = ?Phase::Stopped, "worker done");
                return Ok(WorkerOutcome { rounds, finished });
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_not_in_the_debug_output() {
        let cfg = WorkerConfig {
            coordinator: "http://127.0.0.1:1".into(),
            token: "secret-token-0123456789".into(),
            data_dir: "data".into(),
            name: "w".into(),
            rank_hint: None,
            threads: 1,
            give_up_after: Duration::from_secs(1),
            tls: None,
            metrics_listen: None,
            overlap: true,
            reducer_tls_domain: None,
            local_reducer: None,
            more_metrics: None,
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
