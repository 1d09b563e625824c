//! A reducer of a sharded run (`capsnet reducer`): it owns one span of the grid, its
//! parameters and optimizer state (ZeRO-1), takes the workers' updates of that span, reduces
//! them range by range as they stream in and serves the span's new parameters. The coordinator
//! keeps the rounds: a control session ([`pb::reducers_client`]) on which it assigns the span
//! with its state, opens rounds with their members, tells which updates to drop or scale,
//! closes a round over a member set in two phases (Close, then Commit in the next Open, or
//! Discard) and gathers the span's state for evaluation and checkpoints.
//!
//! The same [`Service`] and data plane as the coordinator's serve the pushes and pulls, with
//! the same checks, token and TLS; [`ShardActor`] stands in for the coordinator's actor: one
//! thread owns the span's state and handles one message at a time.

use std::ops::Range;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use capsnet_core::optim::Adam;
use capsnet_proto::wire::{self, Grid};
use capsnet_proto::{RunSettings, SyncMode, pb};
use pb::reducer_order::Order;
use pb::reducer_report::Report;
use tokio::sync::{oneshot, watch};

use crate::actor::{Msg, Progress, Published, PullReply};
use crate::error::{CoordinatorError, Result};
use crate::metrics::{Metrics, unix_now};
use crate::reduce::{Closed, Kept, Reducer, Source};
use crate::{TlsFiles, conn, service};

/// Floats per state piece on the control session (4 MiB of f32 per vector at most).
pub(crate) const PIECE: usize = 1 << 20;
/// The largest message on the control session: a piece of three vectors and its fields.
pub(crate) const SESSION_MESSAGE: usize = 3 * 4 * PIECE + (64 << 10);

/// What a reducer process needs.
#[derive(Clone, Debug)]
pub struct ReducerConfig {
    /// The coordinator's URL.
    pub coordinator: String,
    pub token: capsnet_proto::Token,
    /// The URL workers reach this reducer at (`http://host:port`, `https://` with TLS).
    pub advertise: String,
    /// A name for the logs and the coordinator's status.
    pub name: String,
    /// Threads of the reduction.
    pub threads: usize,
    /// Serve workers over TLS with this certificate and key (and CA of client certificates).
    pub tls: Option<TlsFiles>,
    /// Reach the coordinator over TLS: the CA (PEM) of its certificate, a client identity,
    /// and the name to verify.
    pub coordinator_tls: Option<CoordinatorTls>,
    /// Give up when the coordinator cannot be reached for this long.
    pub give_up_after: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Bytes each accepted TCP connection buffers each way (0: the kernel's autotuning).
    pub socket_buffer: usize,
    /// Where to leave the handle for in-process calls (a reducer served inside a worker).
    pub local: Option<capsnet_proto::frame::LocalReducer>,
    /// What the reducer counts; the caller serves it (`--metrics-listen`).
    pub metrics: ReducerMetrics,
}

/// A reducer's Prometheus metrics (`capsnet_reducer_*`: rounds committed, round times, the
/// span it owns, updates completed and aborted, gathers, sessions, bytes, connections), for
/// whoever serves them.
#[derive(Clone)]
pub struct ReducerMetrics(Arc<Metrics>);

impl ReducerMetrics {
    pub fn new() -> Self {
        ReducerMetrics(Metrics::reducer())
    }

    /// The OpenMetrics text of every metric (for `/metrics`).
    pub fn encode(&self) -> String {
        self.0.encode()
    }
}

impl Default for ReducerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReducerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReducerMetrics")
    }
}

#[derive(Clone, Debug)]
pub struct CoordinatorTls {
    pub ca: std::path::PathBuf,
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub domain: Option<String>,
}

/// How a reducer's life ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReducerOutcome {
    /// Rounds it committed.
    pub rounds: u64,
    /// The coordinator said training is over.
    pub finished: bool,
}

/// The state of the span the coordinator assigned.
struct Span {
    settings: RunSettings,
    grid: Grid,
    span: Range<usize>,
    /// The span's first float.
    base: usize,
    layout: u64,
    outer: Option<(f32, f32)>,
    params: Vec<f32>,
    /// Adam's moments and step (grad mode), over the span's floats.
    adam: Adam,
    /// The outer optimizer's momentum (params mode with it).
    outer_m: Vec<f32>,
    /// Floats of the assigned state received so far.
    filled: usize,
    ready: bool,
    reducer: Reducer,
    /// The open round, its members (by index) and the ones it waits for.
    round: u64,
    members: Vec<pb::RoundMember>,
    expected: Vec<usize>,
    /// Each member's loss (from its update's head).
    losses: std::collections::BTreeMap<usize, f64>,
    /// A closed round waiting for Commit or Discard.
    closed: Option<Closed>,
}

impl Span {
    fn len(&self) -> usize {
        self.params.len()
    }

    fn kept(&self) -> Kept {
        Kept::of(self.settings.sync_mode, self.outer.is_some())
    }

    /// Runs `f` on the span's reducer with the state it reduces from and the expected members.
    fn reduce<T>(&mut self, f: impl FnOnce(&mut Reducer, &Source<'_>, &[usize]) -> T) -> T {
        let Span {
            settings,
            outer,
            params,
            adam,
            outer_m,
            reducer,
            expected,
            ..
        } = self;
        let src = Source::of(settings.sync_mode, *outer, params, adam, outer_m);
        f(reducer, &src, expected)
    }
}

/// The reducer's round thread.
pub(crate) struct ShardActor {
    threads: usize,
    /// Reduced payloads go into shared memory, for workers of this machine to read (a
    /// reducer on a unix socket).
    shared_memory: bool,
    st: Option<Span>,
    /// The settings of the first assignment go here (the server starts with them).
    started: Option<oneshot::Sender<RunSettings>>,
    reports: Option<tokio::sync::mpsc::UnboundedSender<pb::ReducerReport>>,
    published: watch::Sender<Arc<Published>>,
    progress: watch::Sender<Progress>,
    opened: watch::Sender<u64>,
    /// Set when the coordinator said training is over, or the session broke the protocol.
    done: watch::Sender<Option<std::result::Result<u64, String>>>,
    rounds: u64,
    metrics: Arc<Metrics>,
    /// When the open round opened here.
    opened_at: Instant,
}

fn f32_bytes(x: &[f32]) -> bytes::Bytes {
    wire::encode(x, capsnet_proto::Encoding::F32)
}

/// Decodes little-endian f32 `bytes` into `out` (whose length they must have).
fn read_f32(bytes: &[u8], out: &mut [f32], what: &str) -> Result<()> {
    if bytes.len() != 4 * out.len() {
        return Err(CoordinatorError::Session(format!(
            "a state piece's {what} holds {} bytes, not {} floats",
            bytes.len(),
            out.len()
        )));
    }
    wire::decode_into(bytes, capsnet_proto::Encoding::F32, out).map_err(CoordinatorError::from)
}

/// The span's state as pieces of at most [`PIECE`] floats: parameters, and the optimizer
/// state `m` and `v` (empty when not kept), from float `base` of the flat vector on.
pub(crate) fn pieces(
    round: u64,
    base: usize,
    params: &[f32],
    m: &[f32],
    v: &[f32],
) -> Vec<pb::StatePiece> {
    (0..params.len())
        .step_by(PIECE)
        .map(|at| {
            let r = at..(at + PIECE).min(params.len());
            let part = |x: &[f32]| {
                if x.is_empty() {
                    bytes::Bytes::new()
                } else {
                    f32_bytes(&x[r.clone()])
                }
            };
            pb::StatePiece {
                round,
                offset: (base + at) as u64,
                params: f32_bytes(&params[r.clone()]),
                m: part(m),
                v: part(v),
            }
        })
        .collect()
}

/// Copies a state piece into the vectors of the span that starts at float `base` (with `m`
/// and `v` empty when not kept); returns the floats it covered.
pub(crate) fn fill(
    p: &pb::StatePiece,
    base: usize,
    params: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<usize> {
    let n = p.params.len() / 4;
    let at = usize::try_from(p.offset)
        .ok()
        .and_then(|o| o.checked_sub(base))
        .filter(|&at| n > 0 && at + n <= params.len())
        .ok_or_else(|| {
            CoordinatorError::Session(format!(
                "a state piece of {n} floats at {} lies outside the span [{base}, {})",
                p.offset,
                base + params.len()
            ))
        })?;
    read_f32(&p.params, &mut params[at..at + n], "parameters")?;
    if !m.is_empty() {
        read_f32(&p.m, &mut m[at..at + n], "first moment")?;
    }
    if !v.is_empty() {
        read_f32(&p.v, &mut v[at..at + n], "second moment")?;
    }
    Ok(n)
}

impl ShardActor {
    fn report(&self, r: Report) {
        if let Some(tx) = &self.reports {
            let _ = tx.send(pb::ReducerReport { report: Some(r) });
        }
    }

    /// Runs until every sender is gone or training is over.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            if let Err(e) = self.handle(msg) {
                tracing::error!(error = %e, "the coordinator's order breaks the protocol");
                self.done.send_replace(Some(Err(e.to_string())));
                return;
            }
            if self.done.borrow().is_some() {
                return;
            }
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<()> {
        let not_here = || {
            CoordinatorError::InvalidArgument(
                "this is a reducer: joins, leaves and status go to the coordinator".into(),
            )
        };
        match msg {
            Msg::Session { reports } => self.reports = Some(reports),
            Msg::Order(o) => self.order(*o)?,
            Msg::Pull {
                after_round, reply, ..
            } => {
                let _ = reply.send(self.pull(after_round));
            }
            Msg::Begin {
                worker_id,
                round,
                span,
                samples,
                loss,
                encoding,
                reply,
            } => {
                let r = match self.st.as_ref() {
                    Some(st) if st.ready && st.span != span => {
                        Err(CoordinatorError::Dropped { round })
                    }
                    _ => self.begin(&worker_id, round, samples, loss, encoding),
                };
                let _ = reply.send(r);
            }
            Msg::Chunk {
                member,
                round,
                index,
                payload,
            } => {
                if let Some(st) = self.st.as_mut().filter(|s| s.round == round && s.ready) {
                    if st.reduce(|r, src, expected| r.chunk(member, index, payload, expected, src))
                    {
                        self.show_progress(index);
                    }
                }
            }
            Msg::End {
                member,
                round,
                sum_sq,
                reply,
            } => {
                let r = match self.st.as_mut() {
                    // Its slot went with a new assignment of the span, or an abort.
                    Some(st) if st.round == round && !st.reducer.has(member) => {
                        Err(CoordinatorError::Dropped { round })
                    }
                    Some(st) if st.round == round => st.reducer.end(member).map(|()| {
                        let loss = st.losses.get(&member).copied().unwrap_or(0.0);
                        (round, loss)
                    }),
                    st => Err(CoordinatorError::StaleRound {
                        got: round,
                        current: st.map_or(0, |s| s.round),
                    }),
                };
                if let Ok((_, loss)) = r {
                    self.metrics.updates.inc();
                    tracing::trace!(target: "capsnet::timeline", round, member, "update complete");
                    self.report(Report::Complete(pb::MemberDone {
                        round,
                        member: member as u32,
                        sum_sq,
                        loss,
                    }));
                }
                let _ = reply.send(r.map(|(round, _)| round));
            }
            Msg::Abort {
                worker_id,
                member,
                round,
            } => {
                let Some(st) = self.st.as_mut() else {
                    return Ok(());
                };
                // A stream of a member's former id (it joined again since) leaves the update of
                // its new id alone.
                let current = st
                    .members
                    .iter()
                    .any(|m| m.index as usize == member && m.worker_id == worker_id);
                if current && st.round == round && !st.reducer.complete(member) {
                    if st.reducer.has(member) {
                        self.metrics.updates_aborted.inc();
                    }
                    let forgotten = st.reducer.abort(member);
                    for i in forgotten {
                        self.show_progress(i);
                    }
                    self.report(Report::Aborted(pb::MemberRef {
                        round,
                        member: member as u32,
                    }));
                }
            }
            Msg::Join { reply, .. } => {
                let _ = reply.send(Err(not_here()));
            }
            // A worker's check that this reducer answers (it could not reach it): the round
            // open here; the worker's state is the coordinator's to say.
            Msg::Touch { reply, .. } => {
                let round = self.st.as_ref().map_or(0, |s| s.round);
                let _ = reply.send(Ok((round, pb::WorkerState::Unspecified)));
            }
            Msg::Leave { reply, .. } => {
                let _ = reply.send(Err(not_here()));
            }
            Msg::Status { reply } => drop(reply),
            Msg::Probe { reply } => drop(reply),
            // A reducer stops on its own signal, not on a message.
            Msg::Shutdown { reply } => {
                let _ = reply.send(Ok(None));
            }
            Msg::ReducerJoined { reply, .. } => {
                let _ = reply.send(Err(not_here()));
            }
            Msg::Report { .. } | Msg::ReducerLost { .. } => {}
        }
        Ok(())
    }

    fn pull(&self, after: Option<u64>) -> Result<PullReply> {
        let Some(st) = self.st.as_ref().filter(|s| s.ready) else {
            return Err(CoordinatorError::NotReady(
                "this reducer has not received its span yet; retry".into(),
            ));
        };
        match after {
            // A worker may hear of the next round a moment before this reducer does.
            Some(a) if a > st.round.saturating_add(1) => {
                Err(CoordinatorError::InvalidArgument(format!(
                    "after_round {a} is past this reducer's open round {}",
                    st.round
                )))
            }
            Some(a) if a >= st.round => Ok(PullReply::Wait),
            _ => Ok(PullReply::Ready(
                pb::WorkOrder {
                    round: st.round,
                    ..Default::default()
                },
                self.published.borrow().clone(),
            )),
        }
    }

    fn begin(
        &mut self,
        id: &str,
        round: u64,
        samples: u64,
        loss: f64,
        encoding: capsnet_proto::Encoding,
    ) -> Result<usize> {
        let Some(st) = self.st.as_mut().filter(|s| s.ready) else {
            return Err(CoordinatorError::NotReady(
                "this reducer has not received its span yet".into(),
            ));
        };
        if round != st.round {
            return Err(CoordinatorError::StaleRound {
                got: round,
                current: st.round,
            });
        }
        let m = st
            .members
            .iter()
            .find(|m| m.worker_id == id)
            .ok_or_else(|| CoordinatorError::NotMember { name: id.into() })?;
        let k = m.index as usize;
        if st.reducer.has(k) {
            return Err(CoordinatorError::Duplicate {
                name: id.into(),
                round,
            });
        }
        if !loss.is_finite() || loss < 0.0 {
            return Err(CoordinatorError::BadUpdate(format!(
                "update's loss {loss} is not a finite non-negative number"
            )));
        }
        if samples != m.samples || samples == 0 {
            return Err(CoordinatorError::BadUpdate(format!(
                "update covers {samples} samples, this round's work order has {}",
                m.samples
            )));
        }
        st.losses.insert(k, loss);
        st.reducer.begin(k, samples, loss, encoding);
        Ok(k)
    }

    /// Shows early pulls what range `index` of the open round is now.
    fn show_progress(&self, index: usize) {
        let Some(st) = &self.st else { return };
        let now = st.reducer.reduced(index).map(|(g, c)| (g, c.clone()));
        let (round, at) = (st.round, index - st.span.start);
        self.progress.send_if_modified(|p| {
            if p.round != round || at >= p.chunks.len() {
                return false;
            }
            p.chunks[at] = now;
            true
        });
    }

    fn publish(&self, chunks: Vec<wire::EncodedChunk>, generations: Vec<u64>) {
        let Some(st) = &self.st else { return };
        self.published.send_replace(Arc::new(Published {
            round: st.round,
            span: st.span.clone(),
            finished: false,
            total_len: st.grid.last().map_or(0, |r| r.end) as u64,
            encoding: st.settings.wire,
            chunks: Arc::new(chunks),
            generations: Arc::new(generations),
            layout: st.layout,
        }));
        self.progress
            .send_replace(Progress::empty(st.round, st.span.len()));
    }

    fn order(&mut self, o: Order) -> Result<()> {
        match o {
            Order::Assign(a) => self.assign(a)?,
            Order::State(p) => {
                let Some(st) = self.st.as_mut() else {
                    return Err(CoordinatorError::Session("state before any span".into()));
                };
                if st.ready {
                    return Err(CoordinatorError::Session(
                        "state after the span was whole".into(),
                    ));
                }
                let (m, v): (&mut [f32], &mut [f32]) = match st.kept() {
                    Kept::AdamMoments => (&mut st.adam.m, &mut st.adam.v),
                    Kept::Momentum => (&mut st.outer_m, &mut []),
                    Kept::Nothing => (&mut [], &mut []),
                };
                st.filled += fill(&p, st.base, &mut st.params, m, v)?;
                if st.filled == st.len() {
                    st.ready = true;
                    let chunks =
                        wire::encode_span(&st.params, &st.grid, st.span.clone(), st.settings.wire);
                    let n = chunks.len();
                    let (round, layout) = (st.round, st.layout);
                    tracing::info!(
                        round,
                        chunks = ?st.span,
                        floats = st.len(),
                        layout = st.layout,
                        "span assigned"
                    );
                    self.publish(chunks, vec![0; n]);
                    self.opened.send_replace(round);
                    self.report(Report::Ready(pb::SpanReady { round, layout }));
                } else if st.filled > st.len() {
                    return Err(CoordinatorError::Session("more state than the span".into()));
                }
            }
            Order::Open(o) => {
                tracing::trace!(target: "capsnet::timeline", round = o.round, commit = o.commit, "open");
                if o.commit {
                    self.commit()?;
                }
                let Some(st) = self.st.as_mut().filter(|s| s.ready) else {
                    return Err(CoordinatorError::Session(
                        "a round opened before a span".into(),
                    ));
                };
                st.round = o.round;
                self.opened_at = Instant::now();
                st.members = o.members;
                st.expected = o.expected.iter().map(|&k| k as usize).collect();
                st.losses.clear();
                st.reducer.clear();
                st.closed = None;
                let n = st.span.len();
                self.progress.send_replace(Progress::empty(o.round, n));
                // Commits publish the new round's parameters; a round opened again (planned anew)
                // keeps them.
                if self.published.borrow().round != o.round {
                    self.published.send_modify(|_| {});
                }
                self.opened.send_replace(o.round);
            }
            Order::Expect(e) => {
                if let Some(st) = self.st.as_mut().filter(|s| s.round == e.round) {
                    st.expected = e.members.iter().map(|&k| k as usize).collect();
                }
            }
            Order::Abort(a) => {
                if let Some(st) = self.st.as_mut().filter(|s| s.round == a.round) {
                    if st.reducer.has(a.member as usize) {
                        self.metrics.updates_aborted.inc();
                    }
                    for i in st.reducer.abort(a.member as usize) {
                        self.show_progress(i);
                    }
                }
            }
            Order::Rescale(r) => {
                if let Some(st) = self.st.as_mut().filter(|s| s.round == r.round) {
                    for i in st.reducer.rescale(r.member as usize, r.factor) {
                        self.show_progress(i);
                    }
                }
            }
            Order::Close(c) => {
                tracing::trace!(target: "capsnet::timeline", round = c.round, "close");
                let Some(st) = self.st.as_mut().filter(|s| s.round == c.round && s.ready) else {
                    return Err(CoordinatorError::Session(format!(
                        "close of round {}, which is not open here",
                        c.round
                    )));
                };
                let members: Vec<usize> = c.members.iter().map(|&k| k as usize).collect();
                st.closed = st.reduce(|r, src, _| r.close_over(&members, src));
                let finite = st.closed.as_ref().is_some_and(|c| c.finite);
                if st.closed.is_none() {
                    tracing::error!(
                        round = c.round,
                        ?members,
                        "told to close over members whose updates are not all here"
                    );
                }
                tracing::trace!(target: "capsnet::timeline", round = c.round, "closed");
                self.metrics
                    .round_seconds
                    .observe(self.opened_at.elapsed().as_secs_f64());
                self.report(Report::Closed(pb::RoundClosed {
                    round: c.round,
                    finite,
                }));
            }
            Order::Discard(d) => {
                if let Some(st) = self.st.as_mut().filter(|s| s.round == d.round) {
                    st.closed = None;
                    st.reducer.clear();
                    let n = st.span.len();
                    self.progress.send_replace(Progress::empty(d.round, n));
                }
            }
            Order::Gather(g) => {
                let Some(st) = self.st.as_ref().filter(|s| s.ready) else {
                    return Err(CoordinatorError::Session("gather before a span".into()));
                };
                let (m, v): (&[f32], &[f32]) = match st.kept() {
                    Kept::AdamMoments => (&st.adam.m, &st.adam.v),
                    Kept::Momentum => (&st.outer_m, &[]),
                    Kept::Nothing => (&[], &[]),
                };
                for p in pieces(g.round, st.base, &st.params, m, v) {
                    self.report(Report::State(p));
                }
                self.metrics.gathers.inc();
            }
            Order::Rejoin(j) => {
                let Some(st) = self.st.as_mut().filter(|s| s.round == j.round) else {
                    return Ok(());
                };
                let k = j.member as usize;
                if let Some(m) = st.members.iter_mut().find(|m| m.index == j.member) {
                    m.worker_id = j.worker_id;
                }
                // An update the former process left half-sent is forgotten (one it completed
                // stays: the same order gives the same update).
                if st.reducer.has(k) && !st.reducer.complete(k) {
                    self.metrics.updates_aborted.inc();
                    st.losses.remove(&k);
                    for i in st.reducer.abort(k) {
                        self.show_progress(i);
                    }
                }
                // Wakes streams of the new id that came before this order.
                self.opened.send_modify(|_| {});
            }
            Order::Finish(_) => {
                tracing::info!(rounds = self.rounds, "training finished");
                self.done.send_replace(Some(Ok(self.rounds)));
            }
        }
        Ok(())
    }

    /// The closed round's new state becomes the span's state and is served.
    fn commit(&mut self) -> Result<()> {
        let Some(st) = self.st.as_mut() else {
            return Err(CoordinatorError::Session("commit before a span".into()));
        };
        let Some(closed) = st.closed.take() else {
            return Err(CoordinatorError::Session(format!(
                "commit of round {}, which was not closed here",
                st.round
            )));
        };
        std::mem::swap(&mut st.params, &mut st.reducer.next_params);
        match st.kept() {
            Kept::AdamMoments => {
                std::mem::swap(&mut st.adam.m, &mut st.reducer.next_m);
                std::mem::swap(&mut st.adam.v, &mut st.reducer.next_v);
                st.adam.step += 1;
            }
            Kept::Momentum => std::mem::swap(&mut st.outer_m, &mut st.reducer.next_m),
            Kept::Nothing => {}
        }
        st.round += 1;
        self.rounds += 1;
        self.metrics.rounds.inc();
        self.metrics.last_round_timestamp.set(unix_now());
        self.publish(closed.chunks, closed.generations);
        Ok(())
    }

    fn assign(&mut self, a: pb::AssignSpan) -> Result<()> {
        let settings = RunSettings::try_from(a.config.unwrap_or_default())?;
        if let Some(st) = &self.st
            && st.settings != settings
        {
            return Err(CoordinatorError::Session(
                "the coordinator's run changed (another model or settings); restart this \
                 reducer"
                    .into(),
            ));
        }
        let grid = settings.grid();
        let span = a.first_chunk as usize..a.end_chunk as usize;
        if span.is_empty() || span.end > grid.len() {
            return Err(CoordinatorError::Session(format!(
                "chunks {span:?} are not a span of the run's {} chunks",
                grid.len()
            )));
        }
        if let Some(tx) = self.started.take() {
            let _ = tx.send(settings.clone());
        }
        let base = grid[span.start].start;
        let len = grid[span.end - 1].end - base;
        let outer = a.outer_lr.map(|lr| (lr, a.outer_momentum));
        let kept = Kept::of(settings.sync_mode, outer.is_some());
        let reducer = Reducer::new(
            grid.clone(),
            span.clone(),
            settings.wire,
            kept,
            self.threads,
            settings.delta_pulls && settings.sync_mode == SyncMode::Grad,
        )?;
        let reducer = if self.shared_memory {
            reducer.with_shared_memory()
        } else {
            reducer
        };
        let mut adam = Adam::new(
            settings.adam.clone(),
            if kept == Kept::AdamMoments { len } else { 0 },
        );
        adam.step = a.step;
        self.metrics.assignments.inc();
        self.metrics.span_floats.set(len as i64);
        self.st = Some(Span {
            outer_m: if kept == Kept::Momentum {
                vec![0.0; len]
            } else {
                vec![]
            },
            settings,
            grid,
            span,
            base,
            layout: a.layout,
            outer,
            params: vec![0.0; len],
            adam,
            filled: 0,
            ready: false,
            reducer,
            round: a.round,
            members: vec![],
            expected: vec![],
            losses: Default::default(),
            closed: None,
        });
        Ok(())
    }
}

/// One session with the coordinator: says hello, hands every order to the actor. Ok(true)
/// when the coordinator said training is over.
async fn session(cfg: &ReducerConfig, tx: &mpsc::Sender<Msg>, since: &mut Instant) -> Result<bool> {
    let url = &cfg.coordinator;
    let channel = connect(cfg).await?;
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", cfg.token.expose())
        .parse()
        .map_err(|_| CoordinatorError::Config("the token is not ASCII".into()))?;
    let mut client = pb::reducers_client::ReducersClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        },
    )
    .max_decoding_message_size(SESSION_MESSAGE)
    .max_encoding_message_size(SESSION_MESSAGE);
    let (rtx, rrx) = tokio::sync::mpsc::unbounded_channel();
    let _ = rtx.send(pb::ReducerReport {
        report: Some(Report::Hello(pb::ReducerHello {
            address: cfg.advertise.clone(),
            name: cfg.name.clone(),
        })),
    });
    tx.send(Msg::Session { reports: rtx })
        .map_err(|_| CoordinatorError::ShuttingDown)?;
    let mut orders = client
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rrx))
        .await
        .map_err(|s| CoordinatorError::Session(format!("{url}: {}", s.message())))?
        .into_inner();
    tracing::info!(coordinator = %url, "session with the coordinator open");
    cfg.metrics.0.sessions.inc();
    *since = Instant::now();
    loop {
        let order = orders
            .message()
            .await
            .map_err(|s| CoordinatorError::Session(format!("{url}: {}", s.message())))?;
        *since = Instant::now();
        let Some(order) = order.and_then(|o| o.order) else {
            return Ok(false);
        };
        let finish = matches!(order, Order::Finish(_));
        tx.send(Msg::Order(Box::new(order)))
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        if finish {
            return Ok(true);
        }
    }
}

async fn connect(cfg: &ReducerConfig) -> Result<tonic::transport::Channel> {
    let url = &cfg.coordinator;
    // A coordinator of this machine on a unix socket (capsnet launch's).
    let unix = capsnet_proto::unix::socket_path(url)
        .transpose()
        .map_err(CoordinatorError::Config)?;
    let target = match unix {
        Some(_) => capsnet_proto::unix::UNIX_ORIGIN.to_string(),
        None => url.clone(),
    };
    let mut ep = tonic::transport::Endpoint::from_shared(target)
        .map_err(|e| CoordinatorError::Config(format!("--coordinator {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    match (url.starts_with("https://"), &cfg.coordinator_tls) {
        (true, None) => {
            return Err(CoordinatorError::Config(format!(
                "the coordinator URL {url} is https://: give the CA of its certificate with \
                 --tls-ca"
            )));
        }
        (false, Some(_)) => {
            return Err(CoordinatorError::Config(format!(
                "--tls-ca is set, but the coordinator URL {url} is not https://"
            )));
        }
        (true, Some(t)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| CoordinatorError::ReadFile {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let mut c = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(&t.ca)?));
            if let Some((cert, key)) = &t.cert {
                c = c.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            if let Some(d) = &t.domain {
                c = c.domain_name(d.clone());
            }
            ep = ep.tls_config(c).map_err(CoordinatorError::Tls)?;
        }
        (false, None) => {}
    }
    let connected = match unix {
        Some(path) => {
            ep.connect_with_connector(capsnet_proto::unix::UnixConnector(path))
                .await
        }
        None => ep.connect().await,
    };
    connected.map_err(|e| CoordinatorError::NotReady(format!("{url}: {e}")))
}

/// Keeps a session with the coordinator open (reconnecting with backoff) until training is
/// over, or the coordinator stayed unreachable for `give_up_after`.
async fn sessions(cfg: ReducerConfig, tx: mpsc::Sender<Msg>) -> Result<()> {
    let mut since = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match session(&cfg, &tx, &mut since).await {
            Ok(true) => return Ok(()),
            Ok(false) => tracing::warn!("the coordinator closed the session; connecting again"),
            Err(e @ (CoordinatorError::Config(_) | CoordinatorError::ReadFile { .. })) => {
                return Err(e);
            }
            Err(e) => {
                if since.elapsed() >= cfg.give_up_after {
                    return Err(CoordinatorError::Session(format!(
                        "the coordinator {} stayed unreachable for {:?}: {e}",
                        cfg.coordinator, cfg.give_up_after
                    )));
                }
                tracing::debug!(error = %e, "coordinator not reachable");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Empties a [`LocalReducer`](capsnet_proto::frame::LocalReducer) when dropped.
struct Unset(capsnet_proto::frame::LocalReducer);

impl Drop for Unset {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

/// Runs a reducer on `listener` until the coordinator says training is over (Ok, finished) or
/// `shutdown` resolves (Ok, not finished).
pub async fn serve_reducer(
    listener: crate::Listener,
    cfg: ReducerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ReducerOutcome> {
    if cfg.threads == 0 {
        return Err(CoordinatorError::Config(
            "threads must be at least 1".into(),
        ));
    }
    crate::conn::check_socket_buffer(cfg.socket_buffer).map_err(CoordinatorError::Config)?;
    let https = cfg.advertise.starts_with("https://");
    let unix = cfg.advertise.starts_with(crate::UNIX_PREFIX);
    if unix != listener.is_unix() || (unix && cfg.tls.is_some()) {
        return Err(CoordinatorError::Config(format!(
            "--advertise {}: a reducer that listens on a unix socket advertises it \
             (unix:/path), and serves it without TLS (it does not leave the machine)",
            cfg.advertise
        )));
    }
    if !unix && (!(https || cfg.advertise.starts_with("http://")) || https != cfg.tls.is_some()) {
        return Err(CoordinatorError::Config(format!(
            "--advertise {} must be an http:// URL (https:// with --tls-cert, unix:/path for a \
             unix socket)",
            cfg.advertise
        )));
    }
    let tls = cfg.tls.as_ref().map(crate::tls_config).transpose()?;
    let (pub_tx, pub_rx) = watch::channel(Arc::new(Published::placeholder()));
    let (progress_tx, progress_rx) = watch::channel(Progress::empty(0, 0));
    let (opened_tx, opened_rx) = watch::channel(0u64);
    let (done_tx, done_rx) = watch::channel(None);
    let (started_tx, started_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel();
    let actor = ShardActor {
        threads: cfg.threads,
        shared_memory: unix,
        st: None,
        started: Some(started_tx),
        reports: None,
        published: pub_tx,
        progress: progress_tx,
        opened: opened_tx,
        done: done_tx,
        rounds: 0,
        metrics: cfg.metrics.0.clone(),
        opened_at: Instant::now(),
    };
    let actor_thread = std::thread::Builder::new()
        .name("capsnet-reducer".into())
        .spawn(move || actor.run(rx))
        .map_err(|e| CoordinatorError::io("starting the reducer thread", e))?;
    let mut sessions = tokio::spawn(sessions(cfg.clone(), tx.clone()));
    let mut shutdown = Box::pin(shutdown);
    let session_ended = |r: std::result::Result<Result<()>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(source) => Some(CoordinatorError::Task {
            what: "the coordinator session",
            source,
        }),
    };
    // The server needs the run's settings: it starts with the first assignment.
    let settings = tokio::select! {
        s = started_rx => match s {
            Ok(s) => s,
            // The thread ends when the session hands it the run's end, or on an order that
            // breaks the protocol: a run that ended before it gave this reducer a span (more
            // reducers than chunks) is not a failure.
            Err(_) => {
                sessions.abort();
                let outcome = done_rx.borrow().clone();
                return match outcome {
                    Some(Ok(rounds)) => Ok(ReducerOutcome { rounds, finished: true }),
                    Some(Err(e)) => Err(CoordinatorError::Session(e)),
                    None => Err(CoordinatorError::Session("the reducer thread ended".into())),
                };
            }
        },
        r = &mut sessions => {
            return match session_ended(r) {
                Some(e) => Err(e),
                None => Ok(ReducerOutcome { rounds: 0, finished: true }),
            };
        }
        _ = &mut shutdown => return Ok(ReducerOutcome { rounds: 0, finished: false }),
    };
    let layout = settings.layout();
    let params_mode = settings.sync_mode == SyncMode::Params;
    let liveness = crate::liveness::Liveness::default();
    let metrics = cfg.metrics.0.clone();
    let svc = service::Service {
        lanes: Arc::default(),
        stall: Duration::from_secs(30),
        params_mode,
        params_delta: params_mode
            .then(|| service::params_delta_of(&settings.adam, settings.sync_every, settings.wire)),
        tx: tx.clone(),
        published: pub_rx,
        progress: progress_rx,
        num_floats: layout.total() as u64,
        layout_hash: settings.layout_hash,
        names: Arc::new(
            layout
                .specs()
                .iter()
                .map(|s| (s.name.clone(), s.range()))
                .collect(),
        ),
        grid: settings.grid(),
        place: settings.placement(),
        liveness: liveness.clone(),
        metrics: metrics.clone(),
        opened: Some(opened_rx),
        in_process: false,
        // One region per worker process of this machine that pushes here; each holds a
        // descriptor, so a peer that names many regions gets the oldest let go, not the
        // process's descriptors used up.
        shm: unix.then(|| Arc::new(capsnet_shm::Readers::new(64))),
    };
    drop(tx);
    let check = crate::auth::TokenCheck::new(cfg.token.expose());
    let interceptor = check.clone();
    let conns = conn::Conns::new(
        cfg.max_connections,
        cfg.max_connections_per_ip,
        liveness,
        metrics,
    )
    .with_socket_buffer(cfg.socket_buffer);
    // The worker beside this reducer calls its bulk RPCs without a socket, until it stops.
    let _local = cfg.local.as_ref().map(|slot| {
        slot.set(Some(crate::data_plane::in_process(
            svc.clone(),
            check.clone(),
            cfg.advertise.clone(),
        )));
        Unset(slot.clone())
    });
    let small = pb::coordinator_server::CoordinatorServer::new(svc.clone())
        .max_decoding_message_size(crate::SMALL_MESSAGE);
    let grpc = conn::Marked {
        inner: crate::data_plane::DataPlane {
            inner: tonic::service::interceptor::InterceptedService::new(small, move |r| {
                interceptor.check(r)
            }),
            svc,
            auth: check,
        },
        conns: conns.clone(),
    };
    let local = listener.local()?;
    tracing::info!(address = %local, advertised = %cfg.advertise, "reducer serving");
    let mut builder = crate::server(Duration::from_secs(300), tls)?;
    // Stop on the signal, when the coordinator says training is over, or when the session
    // gives up (or breaks the protocol).
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut done = done_rx.clone();
    let watcher = tokio::spawn(async move {
        // The second value: the session ended because the coordinator said training is over.
        let why = tokio::select! {
            _ = &mut shutdown => (None, false),
            _ = done.wait_for(Option::is_some) => (None, false),
            r = &mut sessions => (session_ended(r), true),
        };
        sessions.abort();
        let _ = stop_tx.send(());
        why
    });
    let served = builder
        .add_service(grpc)
        .serve_with_incoming_shutdown(crate::incoming_any(listener, conns), async {
            let _ = stop_rx.await;
        })
        .await;
    let (failed, over) = watcher.await.unwrap_or((None, false));
    served.map_err(CoordinatorError::Serve)?;
    if let Some(e) = failed {
        return Err(e);
    }
    // The session hands the coordinator's Finish to the reducer thread and ends: the thread
    // records it a moment later. Without this wait a finished reducer could report itself
    // stopped (exit 143, which a Job retries).
    if over {
        let mut done = done_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), done.wait_for(Option::is_some)).await;
    }
    let outcome = done_rx.borrow().clone();
    drop(actor_thread);
    match outcome {
        Some(Ok(rounds)) => Ok(ReducerOutcome {
            rounds,
            finished: true,
        }),
        Some(Err(e)) => Err(CoordinatorError::Session(e)),
        None => Ok(ReducerOutcome {
            rounds: 0,
            finished: false,
        }),
    }
}
