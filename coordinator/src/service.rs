//! The gRPC service: streams chunks in and out, checks them, and asks the actor for the rest.

use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use capsnet_proto::frame::Messages;
use capsnet_proto::wire::{Assembler, Bounds, ChunkIn, Scan, scan};
use capsnet_proto::{Encoding, pb};
use futures_util::Stream;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::actor::{Msg, Progress, Published, PullReply};
use crate::error::CoordinatorError;

/// How long a reducer holds an update from a worker id it does not know for the coordinator's
/// order that may name it (a member that joined again).
const REJOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// No value of an update may be larger than this: a gradient (or a parameter) of 1e15 is
/// already absurd, and squares of larger ones overflow Adam's f32 second moment to infinity,
/// which freezes those parameters for good.
pub(crate) const MAX_ABS: f32 = 1e15;

/// How far a parameter can move in one round of params mode: Adam moves each by at most
/// about lr x (1 - beta1) / sqrt(1 - beta2) per step (3.2 lr with the paper's betas), so
/// `--sync-every` local steps stay within 10 x lr each; with bf16 on the wire both ends are
/// rounded to 8 bits of mantissa, hence the relative part.
pub(crate) fn params_delta(cfg: &crate::CoordinatorConfig) -> (f32, f32) {
    params_delta_of(&cfg.train.adam, cfg.sync_every, cfg.wire)
}

/// [`params_delta`] of Adam's config, `--sync-every` and the wire encoding.
pub(crate) fn params_delta_of(
    a: &capsnet_core::optim::AdamConfig,
    sync_every: usize,
    wire: Encoding,
) -> (f32, f32) {
    let per_step = a.lr * ((1.0 - a.beta1) / (1.0 - a.beta2).sqrt()).max(1.0);
    let rel = match wire {
        Encoding::Bf16 => 1.0 / 64.0,
        _ => 1e-6,
    };
    (3.0 * per_step * sync_every as f32, rel)
}

/// Requests that may wait for the actor at once, per lane.
pub(crate) struct Lanes {
    pub control: tokio::sync::Semaphore,
    pub data: tokio::sync::Semaphore,
}

impl Default for Lanes {
    fn default() -> Self {
        Lanes {
            control: tokio::sync::Semaphore::new(256),
            data: tokio::sync::Semaphore::new(1024),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Service {
    pub lanes: Arc<Lanes>,
    /// How long a pull may go unread, or a push without its next chunk (`--stall-timeout`).
    pub stall: std::time::Duration,
    /// Updates are parameters (params mode), measured by their distance from the round's.
    pub params_mode: bool,
    /// Params mode: how far (absolute, relative) a pushed parameter may be from the round's.
    pub params_delta: Option<(f32, f32)>,
    pub tx: mpsc::Sender<Msg>,
    pub published: watch::Receiver<Arc<Published>>,
    /// The open round's reduced ranges, for pulls that stream them early.
    pub progress: watch::Receiver<Progress>,
    pub num_floats: u64,
    pub layout_hash: u64,
    pub names: Arc<Vec<(String, Range<usize>)>>,
    /// The run's chunk grid: update chunk `i` must cover exactly `grid[i]`.
    pub grid: Arc<Vec<Range<usize>>>,
    /// For each chunk of the grid, the floats of the flat vector it holds
    /// ([`capsnet_proto::RunSettings::placement`]).
    pub place: Arc<Vec<Range<usize>>>,
    /// Heartbeats are stamped here before they queue for the actor.
    pub liveness: crate::liveness::Liveness,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// A reducer's open round: an update for a round it has not opened yet (its order is on
    /// the way from the coordinator) waits for it, up to `stall`. None on the coordinator.
    pub opened: Option<watch::Receiver<u64>>,
    /// This copy serves callers in this process ([`crate::data_plane::in_process`]): what it
    /// moves is not counted as wire bytes.
    pub in_process: bool,
    /// A reducer on a unix socket: the regions of shared memory its workers on this machine
    /// push payloads in (`UpdateChunk.shm`), opened once each. None: payloads come inline.
    pub shm: Option<Arc<capsnet_shm::Readers>>,
}

/// Tells the actor to forget an update whose stream ended early or failed (also when the
/// client went away and the handler was dropped mid-stream).
struct AbortOnDrop {
    tx: mpsc::Sender<Msg>,
    worker_id: String,
    member: usize,
    round: u64,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Abort {
                worker_id: std::mem::take(&mut self.worker_id),
                member: self.member,
                round: self.round,
            });
        }
    }
}

impl Service {
    /// The payload of the update chunk at float `offset` that a worker of this machine left in
    /// its shared memory at `at` (it must send no bytes besides): a view of it, which the
    /// chunk's checks then read like bytes from the socket. A region that is not one (not a
    /// sealed memfd, another id, larger than a worker's for this span) is refused.
    fn shared_payload(
        &self,
        at: &pb::ShmRef,
        offset: u64,
        enc: Encoding,
        inline: &[u8],
    ) -> Result<Bytes, Status> {
        let refuse = |why: String| {
            Status::invalid_argument(format!("update chunk at offset {offset}: {why}"))
        };
        let Some(readers) = &self.shm else {
            return Err(refuse(
                "no payloads in shared memory here (only a reducer on a unix socket takes them)"
                    .into(),
            ));
        };
        if !inline.is_empty() {
            return Err(refuse("a payload both inline and in shared memory".into()));
        }
        let bpf = capsnet_proto::wire::bytes_per_float(enc) as u64;
        let span = self.span();
        // A span is a run of consecutive chunks: its floats lie between its ends.
        let span_bytes = (self.grid[span.end - 1].end - self.grid[span.start].start) as u64 * bpf;
        // Not a chunk of the span: no bytes, which the chunk's checks refuse by name.
        let Some(len) = (self
            .grid
            .binary_search_by_key(&offset, |r| r.start as u64)
            .ok())
        .filter(|i| span.contains(i))
        .map(|i| self.grid[i].len() * bpf as usize) else {
            return Ok(Bytes::new());
        };
        let max = capsnet_proto::shared::PUSH_SLOTS as u64 * span_bytes;
        capsnet_proto::shared::shm_bytes(readers, at, len, max).map_err(|e| refuse(e.to_string()))
    }

    /// Counts `bytes` of `encoding` as having crossed the network (`direction` in or out),
    /// unless this copy serves callers in this process.
    pub fn count_wire(&self, encoding: Encoding, direction: &str, bytes: u64) {
        if !self.in_process {
            self.metrics.wire(encoding, direction, bytes);
        }
    }

    /// Asks the actor on the data lane (pulls and updates of members).
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, Status> {
        self.ask_in(&self.lanes.data, make).await
    }

    /// Asks the actor on the control lane (join, heartbeat, leave, status), which a flood
    /// fills without holding up the data lane; heartbeats are stamped before they queue.
    async fn ask_control<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, Status> {
        self.ask_in(&self.lanes.control, make).await
    }

    /// A full lane sheds the request (RESOURCE_EXHAUSTED: retry later) instead of queueing
    /// it without bound.
    async fn ask_in<T>(
        &self,
        lane: &tokio::sync::Semaphore,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, Status> {
        let _queued = lane.try_acquire().map_err(|_| {
            Status::from(CoordinatorError::Overloaded(
                "too many requests are waiting for the coordinator; retry later".into(),
            ))
        })?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
        rx.await
            .map_err(|_| Status::from(CoordinatorError::ShuttingDown))
    }

    /// The run's wire encoding (the actor publishes before the service exists), the only one
    /// pulls are served in.
    pub fn wire(&self) -> Encoding {
        self.published.borrow().encoding
    }

    /// Checks a pull request's encoding against the run's wire encoding.
    pub fn check_encoding(&self, r: &pb::PullRequest) -> Result<(), Status> {
        let asked = Encoding::try_from(r.encoding)
            .map_err(|_| Status::invalid_argument(format!("unknown encoding {}", r.encoding)))?;
        let wire = self.wire();
        if asked != Encoding::Unspecified && asked != wire {
            return Err(Status::invalid_argument(format!(
                "this run serves parameters as {wire:?} (the coordinator's --wire), not {asked:?}"
            )));
        }
        Ok(())
    }

    /// Asks the actor for the parameters a pull wants: ready (work order and chunks), or not
    /// yet published.
    pub async fn ask_pull(&self, r: &pb::PullRequest) -> Result<PullReply, Status> {
        Ok(self
            .ask(|reply| Msg::Pull {
                worker_id: r.worker_id.clone(),
                after_round: r.after_round,
                work_only: None,
                cannot_reach: None,
                reply,
            })
            .await??)
    }

    /// Whether pulls carry the round's work order: the coordinator's do, a reducer's carry
    /// only the parameters of its span.
    pub fn serves_orders(&self) -> bool {
        self.opened.is_none()
    }

    /// A reducer's pull under `layout` (the work order's): waits (up to the stall timeout)
    /// for an assignment that has not reached this reducer yet, and refuses one under an
    /// older layout: the spans moved, and the worker asks for its work order again.
    pub async fn check_layout(&self, layout: Option<u64>) -> Result<(), Status> {
        let Some(want) = layout.filter(|_| !self.serves_orders()) else {
            return Ok(());
        };
        let mut published = self.published.clone();
        let _ = tokio::time::timeout(self.stall, published.wait_for(|p| p.layout >= want)).await;
        self.same_layout(want)
    }

    /// Refuses a pull under `want` once this reducer's spans were assigned under another
    /// layout.
    pub fn same_layout(&self, want: u64) -> Result<(), Status> {
        let now = self.published.borrow().layout;
        if now == want {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "this reducer's span was assigned under layout {now}, the pull names layout \
             {want}: ask for the work order again"
        )))
    }

    /// The chunks this service's parameters and updates cover: the whole grid on the
    /// coordinator, the span assigned to a reducer.
    pub fn span(&self) -> Range<usize> {
        self.published.borrow().span.clone()
    }

    /// Receives one update stream, checks every chunk and hands it to the actor.
    pub async fn push<B>(&self, stream: &mut Messages<B>) -> Result<pb::PushResponse, Status>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let first: pb::UpdateChunk = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty update stream"))?;
        // Cheap checks before reading 33 MB: the round and the layout.
        let current = self.published.borrow().round;
        // A reducer may hear of the next round a moment after a worker did (it waits for that
        // below), never of one further on: the coordinator opens a round only once every
        // reducer closed the one before.
        let ahead = self.opened.is_some() && first.round > current.saturating_add(1);
        if first.round < current || ahead {
            return Err(CoordinatorError::StaleRound {
                got: first.round,
                current,
            }
            .into());
        }
        if first.layout_hash != self.layout_hash {
            return Err(CoordinatorError::BadUpdate(
                "update's tensor names/shapes do not match the model (layout hash differs)".into(),
            )
            .into());
        }
        let enc = Encoding::try_from(first.encoding).unwrap_or(Encoding::Unspecified);
        let wire = self.wire();
        if enc != wire {
            return Err(CoordinatorError::BadUpdate(format!(
                "update encoded as {enc:?}; this run's wire is {wire:?}"
            ))
            .into());
        }
        // A reducer may get an update a moment before the coordinator's order to open its
        // round.
        if let Some(opened) = &self.opened {
            let mut opened = opened.clone();
            let want = first.round;
            let _ = tokio::time::timeout(self.stall, opened.wait_for(|&r| r >= want)).await;
            // Likewise an update under a layout whose assignment has not reached it yet; one
            // under an older layout was sent to the spans' former owners.
            let mut published = self.published.clone();
            let _ =
                tokio::time::timeout(self.stall, published.wait_for(|p| p.layout >= first.layout))
                    .await;
            if self.published.borrow().layout != first.layout {
                return Err(CoordinatorError::Dropped { round: want }.into());
            }
        }
        let span = self.span();
        let mut asm = Assembler::span(self.grid.clone(), span.clone(), first.total_len, enc)
            .map_err(CoordinatorError::from)?;
        // The worker of this process sends its own span without checksums: no wire between.
        if self.in_process {
            asm = asm.in_process();
        }
        let (worker_id, round) = (first.worker_id.clone(), first.round);
        let begin = || {
            self.ask(|reply| Msg::Begin {
                worker_id: worker_id.clone(),
                round,
                span: span.clone(),
                samples: first.samples,
                loss: first.loss,
                encoding: enc,
                reply,
            })
        };
        // A reducer may get the update of a worker that joined again a moment before the
        // coordinator's order that names its new id: it waits for the next order, once.
        let mut orders = self.opened.clone();
        if let Some(o) = orders.as_mut() {
            o.borrow_and_update();
        }
        let member = match (begin().await?, orders.as_mut()) {
            (Err(CoordinatorError::NotMember { .. }), Some(o)) => {
                let _ = tokio::time::timeout(REJOIN_WAIT, o.changed()).await;
                begin().await??
            }
            (r, _) => r?,
        };
        // From here on, any way out but a complete update makes the actor forget this one.
        let mut guard = AbortOnDrop {
            tx: self.tx.clone(),
            worker_id: worker_id.clone(),
            member,
            round,
            armed: true,
        };
        let mut next = Some(first);
        let mut received = 0;
        let mut sum_sq = 0.0f64;
        while let Some(mut c) = next {
            if c.round != round || c.worker_id != worker_id {
                return Err(CoordinatorError::BadUpdate(
                    "round or worker id changed mid-stream".into(),
                )
                .into());
            }
            // From shared memory: no byte of it crossed the network.
            let shared = c.shm.is_some();
            if let Some(at) = c.shm.take() {
                c.payload = self.shared_payload(&at, c.offset, enc, &c.payload)?;
            }
            // Any order (a worker sends each range as its gradient is final), each chunk once.
            let (index, r) = asm
                .check(ChunkIn::from(&c))
                .map_err(CoordinatorError::from)?;
            // In params mode the distance from the parameters the round started from.
            let published = self.params_mode.then(|| self.published.borrow().clone());
            let reference = published
                .as_ref()
                .filter(|p| p.round == round)
                .and_then(|p| {
                    let c = p.chunks.get(index.checked_sub(span.start)?)?;
                    Some((&c.payload[..], p.encoding))
                });
            let bounds = Bounds {
                max_abs: MAX_ABS,
                max_delta: self.params_delta,
            };
            let scanned = capsnet_core::simd::with_avx2(
                #[inline(always)]
                || scan(&c.payload, enc, reference, bounds),
            );
            match scanned {
                Scan::Ok { sum_sq: s } => sum_sq += s,
                Scan::Bad {
                    index: i,
                    value,
                    reference,
                } => {
                    let what = if !value.is_finite() {
                        format!("a non-finite value ({value})")
                    } else if value.abs() > MAX_ABS {
                        format!("a value beyond ±{MAX_ABS:e} ({value:e})")
                    } else {
                        format!(
                            "a parameter moved further than local Adam steps can ({} -> {value})",
                            reference.unwrap_or(f32::NAN)
                        )
                    };
                    return Err(CoordinatorError::BadUpdate(format!(
                        "update holds {what} at {}",
                        self.locate(r.start + i)
                    ))
                    .into());
                }
            }
            if shared {
                self.metrics.shared(enc, "in", c.payload.len() as u64);
            } else {
                self.count_wire(enc, "in", c.payload.len() as u64);
            }
            self.tx
                .send(Msg::Chunk {
                    member,
                    round,
                    index,
                    payload: c.payload,
                })
                .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
            received += 1;
            next = tokio::time::timeout(self.stall, stream.message())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no chunk for {:?} after {received} chunks: update dropped",
                        self.stall
                    ))
                })??;
        }
        asm.finish().map_err(CoordinatorError::from)?;
        let out = self
            .ask(|reply| Msg::End {
                member,
                round,
                sum_sq,
                reply,
            })
            .await?;
        guard.armed = out.is_err();
        Ok(pb::PushResponse { round: out? })
    }

    /// Names a float index of the grid as `tensor[i]` for error messages.
    fn locate(&self, at: usize) -> String {
        let Ok(j) = self.grid.binary_search_by(|r| {
            if r.end <= at {
                std::cmp::Ordering::Less
            } else if r.start > at {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) else {
            return format!("float {at}");
        };
        let i = self.place[j].start + (at - self.grid[j].start);
        match self.names.iter().find(|(_, r)| r.contains(&i)) {
            Some((n, r)) => format!("{n}[{}]", i - r.start),
            None => format!("float {i}"),
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ParamChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        let out = self
            .ask_control(|reply| Msg::Join {
                name: r.name,
                rank_hint: r.rank_hint,
                reply,
            })
            .await??;
        // Watch the connection the worker joined on from the start (its first heartbeat may
        // be a while away).
        self.liveness.beat(&out.worker_id, peer);
        Ok(Response::new(out))
    }

    type PullParamsStream = ChunkStream;

    /// Served by [`crate::data_plane`] ahead of this router.
    async fn pull_params(
        &self,
        _req: Request<pb::PullRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Err(Status::unimplemented(
            "PullParams is served by the data plane",
        ))
    }

    /// Served by [`crate::data_plane`] ahead of this router.
    async fn push_update(
        &self,
        _req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        Err(Status::unimplemented(
            "PushUpdate is served by the data plane",
        ))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let peer = req.remote_addr();
        let id = req.into_inner().worker_id;
        self.liveness.beat(&id, peer);
        let (round, state) = self
            .ask_control(|reply| Msg::Touch {
                worker_id: id,
                reply,
            })
            .await??;
        Ok(Response::new(pb::HeartbeatResponse {
            round,
            state: state as i32,
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let id = req.into_inner().worker_id;
        self.ask_control(|reply| Msg::Leave {
            worker_id: id,
            reply,
        })
        .await??;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    /// Answers once the round after `after_round` is open, with its work order; waits for
    /// the published round to change in between (the request's deadline, or the worker going
    /// away, ends the wait).
    async fn get_work(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<pb::WorkOrder>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        self.liveness.beat(&r.worker_id, peer);
        let mut published = self.published.clone();
        loop {
            published.borrow_and_update();
            let reply = self
                .ask(|reply| Msg::Pull {
                    worker_id: r.worker_id.clone(),
                    after_round: r.after_round,
                    work_only: Some(r.layout),
                    cannot_reach: r.cannot_reach.clone(),
                    reply,
                })
                .await??;
            if let PullReply::Ready(order, _) = reply {
                return Ok(Response::new(order));
            }
            if published.changed().await.is_err() {
                return Err(CoordinatorError::ShuttingDown.into());
            }
        }
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(
            self.ask_control(|reply| Msg::Status { reply }).await?,
        ))
    }
}

type OrderStream = Pin<Box<dyn Stream<Item = Result<pb::ReducerOrder, Status>> + Send>>;

#[tonic::async_trait]
impl pb::reducers_server::Reducers for Service {
    type SessionStream = OrderStream;

    /// A reducer's control session: its hello joins it to the actor, its reports go to the
    /// actor as they come, the actor's orders go out on the response; the session's end (the
    /// reducer died, or its connection did) is reported as its loss.
    async fn session(
        &self,
        req: Request<Streaming<pb::ReducerReport>>,
    ) -> Result<Response<OrderStream>, Status> {
        let mut reports = req.into_inner();
        let first = tokio::time::timeout(self.stall, reports.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello from the reducer"))??
            .ok_or_else(|| Status::invalid_argument("empty reducer session"))?;
        let Some(pb::reducer_report::Report::Hello(hello)) = first.report else {
            return Err(Status::invalid_argument(
                "a reducer session starts with its hello",
            ));
        };
        let (orders, rx) = tokio::sync::mpsc::unbounded_channel();
        let session = self
            .ask_control(|reply| Msg::ReducerJoined {
                hello,
                orders,
                reply,
            })
            .await??;
        let actor = self.tx.clone();
        // The reports are read until the orders end (the actor let go of the session, or the
        // coordinator is stopping) or their stream is dropped: then they are dropped too,
        // which closes the reducer's half of the stream, so that a graceful shutdown does not
        // wait on it.
        let (ended_tx, mut ended) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    r = reports.message() => r,
                    _ = &mut ended => break,
                };
                let Ok(Some(r)) = r else { break };
                let Some(report) = r.report else { continue };
                if actor.send(Msg::Report { session, report }).is_err() {
                    return;
                }
            }
            let _ = actor.send(Msg::ReducerLost { session });
        });
        let orders = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let out = futures_util::StreamExt::chain(
            futures_util::StreamExt::map(orders, Ok),
            futures_util::StreamExt::filter_map(
                futures_util::stream::once(async move { drop(ended_tx) }),
                |()| async { None },
            ),
        );
        Ok(Response::new(Box::pin(out)))
    }
}
