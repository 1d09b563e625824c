//! The worker's life as a state machine ([`State`]): joining (connect, join, load the data),
//! working (one round per transition, in a [`Session`] that holds what lives as long as one
//! membership: the client, the heartbeat, the parameter buffers, the reducers), and stopped.
//! A lost coordinator sends it back to joining; training's end or the stop signal to stopped,
//! after it leaves.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsnet_proto::wire::{BufPool, Grid};
use capsnet_proto::{RunSettings, SyncMode, pb};
use tonic::Code;

use crate::replica::Replica;
use crate::transfer::{
    self, ChunkSender, SharedFloats, Update, pull_changes_into, push, push_chunks, used,
};
use crate::{
    AbortOnDrop, Client, Phase, Result, WorkerConfig, WorkerError, WorkerMetrics, WorkerOutcome,
    join, retryable,
};

/// Where the worker is; [`train`] moves it one transition at a time.
enum State {
    /// Connecting and joining (again, after the coordinator was lost).
    Joining,
    /// A member: rounds until the session ends.
    Working(Box<Session>),
    /// Done: training is over, or the worker was told to stop (it left first).
    Stopped(WorkerOutcome),
}

/// How a round ended.
enum Next {
    /// On to the next round (also after one this worker had no part in).
    Round,
    /// Training is over (`finished`) or the worker was told to stop: leave.
    Leave { finished: bool },
}

/// One membership: from a join until the coordinator is lost or training ends.
struct Session {
    client: Client,
    id: String,
    settings: RunSettings,
    grid: Grid,
    /// Where each chunk of the grid lies in the flat vector.
    place: Grid,
    /// Payload buffers for two updates: the one being sent and the next.
    pool: BufPool,
    /// Floats of the model.
    total: u64,
    /// Heartbeats in the background from the moment of the join (loading the data can take
    /// longer than the coordinator waits for one); `lost` turns true when one is answered
    /// NotFound (the coordinator forgot this worker).
    _heartbeat: AbortOnDrop<()>,
    lost: tokio::sync::watch::Receiver<bool>,
    /// The last round whose order this worker saw.
    after: Option<u64>,
    /// The last round failed on a reducer: wait ([`backoff`]) before the next.
    retry: bool,
    /// The parameters of the round, pulled into the same buffer every round, and the work
    /// order that came with them when they were pulled beside the last push.
    pulled: Vec<f32>,
    ready: Option<pb::WorkOrder>,
    /// With overlap, the next round's parameters are pulled while this round's are still in
    /// use: into this second buffer.
    second: Vec<f32>,
    /// A sharded run: where each span lives (from the last work order), and connections to
    /// the reducers.
    layout: Option<transfer::Layout>,
    reducers: transfer::Reducers,
}

/// Runs the worker's state machine until it stops.
pub(crate) async fn train(
    cfg: &WorkerConfig,
    metrics: &WorkerMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerOutcome> {
    tokio::pin!(shutdown);
    // The model and data outlive a session: a worker that joins the same run again keeps them.
    let mut replica: Option<Replica> = None;
    let mut rounds = 0u64;
    // Failed tries in a row (a session lost, a reducer failed): each waits longer before the
    // next, so a fault that persists (a reducer whose certificate does not verify, one that
    // refuses every call) costs a bounded rate of calls, not a loop.
    let mut failures = 0u32;
    // A reducer the last session could not reach, for the next one to check first.
    let mut unreachable: Option<(String, Code)> = None;
    let mut state = State::Joining;
    loop {
        state = match state {
            State::Joining => {
                tracing::info!(phase = ?Phase::Joining, coordinator = %cfg.coordinator, "joining");
                let pause = backoff(failures);
                tokio::select! {
                    r = async { tokio::time::sleep(pause).await; join(cfg).await } => {
                        let (client, joined) = r?;
                        let mut s = Session::start(cfg, metrics, client, joined, &mut replica).await?;
                        if let Some((url, code)) = unreachable.take() {
                            s.reducers.failed(&url, code);
                        }
                        tracing::debug!(phase = ?Phase::Working);
                        State::Working(Box::new(s))
                    }
                    _ = &mut shutdown => State::Stopped(WorkerOutcome { rounds, finished: false }),
                }
            }
            State::Working(mut s) => {
                let mut lost = s.lost.clone();
                let pause = s.retry.then(|| backoff(failures));
                let entry = s.after;
                let r = tokio::select! {
                    r = async {
                        if let Some(p) = pause {
                            tokio::time::sleep(p).await;
                        }
                        s.round(cfg, metrics, &mut replica, &mut rounds).await
                    } => r,
                    _ = lost.changed() => Err(WorkerError::Rpc(tonic::Status::not_found(
                        "coordinator forgot this worker",
                    ))),
                    _ = &mut shutdown => Ok(Next::Leave { finished: false }),
                };
                s.retry = false;
                if r.is_err() {
                    failures = failures.saturating_add(1);
                }
                match r {
                    Ok(Next::Round) => {
                        failures = 0;
                        State::Working(s)
                    }
                    Ok(Next::Leave { finished }) => {
                        metrics.joined(false);
                        s.leave().await;
                        tracing::info!(rounds, finished, phase = ?Phase::Stopped, "worker done");
                        State::Stopped(WorkerOutcome { rounds, finished })
                    }
                    Err(WorkerError::Rpc(st))
                        if st.code() == Code::NotFound || retryable(st.code()) =>
                    {
                        tracing::warn!(status = %st, retry_in = ?backoff(failures), "lost the coordinator; joining again");
                        metrics.joined(false);
                        State::Joining
                    }
                    // The coordinator sees the reducer's loss (the spans move, the run rolls
                    // back) or not (a connection broke): either way the next work order says
                    // what to do, the same round again or another one. A step that did not
                    // end took the model replica with it: that needs a new session.
                    // A reducer that refuses this worker's token or certificate keeps
                    // refusing it: stop, as a coordinator's refusal does.
                    Err(WorkerError::Reducer { url, status })
                        if matches!(
                            status.code(),
                            Code::Unauthenticated | Code::PermissionDenied
                        ) =>
                    {
                        metrics.joined(false);
                        return Err(WorkerError::Reducer { url, status });
                    }
                    Err(WorkerError::Reducer { url, status }) if replica.is_none() => {
                        tracing::warn!(%status, retry_in = ?backoff(failures), "a reducer failed mid-step; joining again");
                        metrics.joined(false);
                        // The next session tells the coordinator if it still cannot reach it.
                        unreachable = url.map(|u| (u, status.code()));
                        State::Joining
                    }
                    Err(WorkerError::Reducer { url, status }) => {
                        tracing::warn!(%status, round = ?s.after, retry_in = ?backoff(failures), "a reducer failed; asking for the round's order again");
                        if let Some(u) = url {
                            s.reducers.failed(&u, status.code());
                        }
                        // The order this round took (or was taking) is asked for again.
                        s.after = entry;
                        s.ready = None;
                        s.retry = true;
                        State::Working(s)
                    }
                    Err(e) => {
                        metrics.joined(false);
                        return Err(e);
                    }
                }
            }
            State::Stopped(out) => return Ok(out),
        };
    }
}

impl Session {
    /// A session for the membership `joined` (on `client`): starts the heartbeats and loads
    /// the model and data into `replica` unless it holds this run's already.
    async fn start(
        cfg: &WorkerConfig,
        metrics: &WorkerMetrics,
        client: Client,
        joined: pb::JoinResponse,
        replica: &mut Option<Replica>,
    ) -> Result<Session> {
        let settings = RunSettings::try_from(joined.config.unwrap_or_default())?;
        let id = joined.worker_id.clone();
        tracing::info!(worker = %id, rank = joined.rank, round = joined.round, "joined");
        metrics.joined(true);
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let heartbeat = {
            let mut c = client.clone();
            let (id, every) = (
                id.clone(),
                Duration::from_millis(settings.heartbeat_ms.max(50)),
            );
            AbortOnDrop(tokio::spawn(async move {
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
            }))
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
            if let Err(e) = loaded.map(|r| *replica = Some(r)) {
                metrics.joined(false);
                return Err(e);
            }
        }
        let reducers = transfer::Reducers::new(
            cfg.token.expose(),
            cfg.tls.as_ref(),
            cfg.reducer_tls_domain.as_deref(),
            cfg.local_reducer.clone(),
        );
        let (grid, place) = settings.grids();
        Ok(Session {
            client,
            id,
            pool: BufPool::new(2 * grid.len()),
            total: settings.layout().total() as u64,
            grid,
            place,
            settings,
            _heartbeat: heartbeat,
            lost,
            after: None,
            retry: false,
            pulled: vec![],
            ready: None,
            second: vec![],
            layout: None,
            reducers,
        })
    }

    /// Leaves the run (best effort: the coordinator forgets a silent worker anyway).
    async fn leave(&mut self) {
        let _ = self
            .client
            .rpc()
            .leave(pb::LeaveRequest {
                worker_id: self.id.clone(),
            })
            .await;
    }

    /// One round: the work order and parameters (pulled now, or beside the last push), the
    /// step off the async runtime, the update pushed (with overlap, as the backward pass makes
    /// each range final) and the next round's parameters pulled meanwhile.
    async fn round(
        &mut self,
        cfg: &WorkerConfig,
        metrics: &WorkerMetrics,
        replica: &mut Option<Replica>,
        rounds: &mut u64,
    ) -> Result<Next> {
        let Session {
            ref mut client,
            ref id,
            ref settings,
            ref grid,
            ref place,
            ref pool,
            total,
            ref mut after,
            ref mut pulled,
            ref mut ready,
            ref mut second,
            ref mut layout,
            ref mut reducers,
            ..
        } = *self;
        let order = match ready.take() {
            Some(o) => o,
            None => {
                if pulled.len() != total as usize {
                    *pulled = vec![0.0; total as usize];
                }
                let o = if settings.sharded {
                    // Nothing is known of what the buffer holds: whole chunks.
                    let want = transfer::Want {
                        id,
                        after: *after,
                        enc: settings.wire,
                        grid,
                        place,
                        holds: false,
                    };
                    let (o, l) = transfer::fetch(client, reducers, want, None, pulled).await?;
                    *layout = l;
                    (o, reducers.take_received())
                } else {
                    pull_changes_into(client, id, *after, settings.wire, grid, pulled, false)
                        .await?
                };
                metrics.wire_bytes(settings.wire, "in", o.1);
                o.0
            }
        };
        if order.finished {
            return Ok(Next::Leave { finished: true });
        }
        *after = Some(order.round);
        if !order.participate {
            return Ok(Next::Round);
        }
        // The replica was loaded when the session started and is put back after every
        // step, also one whose push or pull failed; a step that did not end (a panic, a
        // session cancelled mid-step) takes it with it, and the next session loads it again.
        let Some(mut r) = replica.take() else {
            return Err(WorkerError::Internal("no model replica is loaded"));
        };
        let o = order.clone();
        let mut params = std::mem::take(pulled);
        // Delta pulls: a step of grad mode leaves its parameters as they were pulled, so the
        // next round's may come as their changes from these.
        let holds = settings.delta_pulls
            && settings.sync_mode == SyncMode::Grad
            && params.len() == total as usize;
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
            let urls: Vec<String> = match (&layout, settings.sharded) {
                (Some(l), true) => l.owners.iter().map(|(a, _)| a.clone()).collect(),
                _ => vec![cfg.coordinator.clone()],
            };
            let (mut snd, loss, chunks) = ChunkSender::new(
                grid.clone(),
                place.clone(),
                &spans,
                settings.wire,
                pool.clone(),
            )?;
            snd.route(&clients, order.round);
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
                let pushes =
                    chunks
                        .into_iter()
                        .zip(clients)
                        .zip(urls)
                        .map(|((chunks, mut c), url)| {
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
                                    Err(e) if sharded => Err(transfer::from_reducer(&url, e)),
                                    r => r,
                                }
                            }
                        });
                let all = futures_util::future::try_join_all(pushes).await?;
                tracing::trace!(target: "capsnet::timeline", round = head.0, "pushed");
                Ok(all.into_iter().all(|u| u))
            })));
            sender = Some(snd);
            // The next parameters stream into the second buffer while this step runs on
            // these: the changes are taken from a copy of them.
            if holds {
                second.resize(params.len(), 0.0);
                second.copy_from_slice(&params);
            }
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
            *replica = Some(r);
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
                let mut next_params = std::mem::take(second);
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
                            id,
                            after: *after,
                            enc: settings.wire,
                            grid,
                            place,
                            holds,
                        };
                        let (o, l) = transfer::fetch(
                            &mut puller,
                            reducers,
                            want,
                            layout.as_ref(),
                            &mut next_params,
                        )
                        .await?;
                        tracing::trace!(target: "capsnet::timeline", round = o.round, "fetched");
                        Ok::<_, WorkerError>((o, l, reducers.take_received()))
                    } else {
                        let (o, bytes) = pull_changes_into(
                            &mut puller,
                            id,
                            *after,
                            settings.wire,
                            grid,
                            &mut next_params,
                            holds,
                        )
                        .await?;
                        Ok((o, None, bytes))
                    }
                };
                // A push or pull that fails does not cut the step short: the step's end
                // puts the replica back, so that the session goes on (the round's order is
                // asked for again) instead of joining again to load the model. A step that
                // fails stops the transfers at once.
                let ((params, update, samples, loss, computed), (used, (next, next_layout, got))) = {
                    let comms = async { tokio::try_join!(pushing, pulling) };
                    tokio::pin!(compute, comms);
                    tokio::select! {
                        c = &mut compute => (c?, comms.await?),
                        t = &mut comms => {
                            let c = compute.await;
                            let t = t?;
                            (c?, t)
                        }
                    }
                };
                // What crossed the network: the spans not served in this process.
                metrics.wire(
                    settings.wire,
                    "out",
                    reducers.network_floats(layout.as_ref(), grid),
                );
                if settings.sharded {
                    *layout = next_layout;
                }
                metrics.wire_bytes(settings.wire, "in", got);
                *second = params;
                *pulled = next_params;
                (used, next, Some(update), samples, loss, computed)
            }
            None => {
                let (params, update, samples, loss, computed) = compute.await?;
                *pulled = params;
                let data = SharedFloats(Arc::new(update));
                let update = Update {
                    round: order.round,
                    samples,
                    loss,
                    data: data.clone(),
                };
                // Full duplex: the next round's parameters stream in while the update
                // streams out (the coordinator sends each range once it is reduced).
                let pushing =
                    async { used(order.round, push(client, id, settings, update, pool).await) };
                let pulling =
                    pull_changes_into(&mut puller, id, *after, settings.wire, grid, pulled, holds);
                let (used, (next, got)) = tokio::try_join!(pushing, pulling)?;
                metrics.wire(settings.wire, "out", total);
                metrics.wire_bytes(settings.wire, "in", got);
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
            *rounds += 1;
            tracing::debug!(round = order.round, loss, "update accepted");
        }
        *ready = Some(next);
        Ok(Next::Round)
    }
}

/// The pause before the next try after `failures` failed ones in a row: none, then 100 ms
/// doubling to 5 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 1).min(6)).min(Duration::from_secs(5)),
    }
}
