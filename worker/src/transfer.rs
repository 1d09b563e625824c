//! Moving tensors: pulling a round's parameters and work order, pushing an update (whole, or
//! chunk by chunk as the backward pass makes them final).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use capsnet_core::{BatchStats, GradReady};
use capsnet_proto::frame;
use capsnet_proto::wire::{
    Assembler, BufPool, ChunkIn, EncodedChunk, Grid, GridCrc, chunk_encoder, encode_pooled,
};
use capsnet_proto::{Encoding, RunSettings, pb};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::body::Body;

use crate::client::{Client, Peer};
use crate::error::{Result, WorkerError};

/// Parameters and work order of one round.
pub struct Pulled {
    pub order: pb::WorkOrder,
    pub params: Vec<f32>,
}

/// Pulls the parameters of the first round after `after` (checked chunk by chunk), on the
/// run's chunk `grid` ([`RunSettings::grid`]).
pub async fn pull(
    client: &mut Client,
    id: &str,
    after: Option<u64>,
    enc: Encoding,
    grid: &Grid,
) -> Result<Pulled> {
    let mut params = vec![0.0f32; grid.last().map_or(0, |r| r.end)];
    let order = pull_into(client, id, after, enc, grid, &mut params).await?;
    Ok(Pulled { order, params })
}

/// [`pull`] into a buffer the caller keeps across rounds (its length is the model's size).
/// A stream the coordinator began early and then aborted (a range it sent was reduced again
/// because an update failed) is pulled again: the second pull gets the final parameters.
pub async fn pull_into(
    client: &mut Client,
    id: &str,
    after: Option<u64>,
    enc: Encoding,
    grid: &Grid,
    params: &mut [f32],
) -> Result<pb::WorkOrder> {
    pull_changes_into(client, id, after, enc, grid, params, false)
        .await
        .map(|(order, _)| order)
}

/// [`pull_into`]; with `holds` (`params` holds the parameters of round `after` exactly as they
/// were pulled) the chunks may come as their change from those ([`wire::delta_decode`]). A
/// pull tried again asks for whole chunks: the first may have written some of the new ones.
/// Returns the order and the payload bytes received (of every try).
pub async fn pull_changes_into(
    client: &mut Client,
    id: &str,
    after: Option<u64>,
    enc: Encoding,
    grid: &Grid,
    params: &mut [f32],
    holds: bool,
) -> Result<(pb::WorkOrder, u64)> {
    let mut req = pb::PullRequest {
        worker_id: id.to_string(),
        after_round: after,
        encoding: enc as i32,
        layout: None,
        cannot_reach: None,
        delta: holds && after.is_some(),
        shm: false,
    };
    let mut tries = 0;
    let received = std::sync::atomic::AtomicU64::new(0);
    loop {
        match pull_stream(client, &req, grid, params, &received).await {
            Err(WorkerError::Rpc(s)) if s.code() == Code::Aborted && tries < 3 => {
                tracing::debug!(status = %s.message(), "pulling again");
                tries += 1;
                req.delta = false;
            }
            r => return r.map(|order| (order, received.into_inner())),
        }
    }
}

/// Checks parameter chunk `c` (of a stream encoded as `enc`) and decodes it into `params` at
/// its place: a delta (which the pull must have asked for) is first rebuilt from what `params`
/// holds there. A delta that does not rebuild the chunk the reducer sent means this worker's
/// parameters were not the ones it took them to be: ABORTED, to pull the whole chunks again.
fn take_chunk(
    asm: &mut Assembler,
    c: &pb::ParamChunk,
    (enc, asked): (Encoding, bool),
    (grid, place): (&Grid, &Grid),
    params: &mut [f32],
    rebuilt: &mut Vec<u8>,
    shared: Option<&[u8]>,
) -> Result<usize> {
    let stale = |e: capsnet_proto::ProtoError| {
        WorkerError::Rpc(tonic::Status::aborted(format!(
            "a parameter chunk sent as a change does not rebuild from this worker's \
             parameters ({e}); pulling them whole"
        )))
    };
    let payload: &[u8] = if c.delta {
        if !asked {
            return Err(tonic::Status::data_loss(
                "a parameter chunk came as a change, which this pull did not ask for",
            )
            .into());
        }
        let old = grid
            .binary_search_by_key(&c.offset, |r| r.start as u64)
            .ok()
            .and_then(|i| params.get(place.get(i)?.clone()))
            .ok_or_else(|| {
                tonic::Status::data_loss(format!(
                    "a parameter chunk at offset {} is not on this run's grid",
                    c.offset
                ))
            })?;
        capsnet_proto::wire::delta_decode(&c.payload, old, enc, rebuilt).map_err(stale)?;
        rebuilt
    } else {
        shared.unwrap_or(&c.payload)
    };
    let chunk = ChunkIn {
        payload,
        ..ChunkIn::from(c)
    };
    let (i, _) = match asm.check(chunk) {
        Err(e) if c.delta => return Err(stale(e)),
        r => r?,
    };
    let to = &mut params[place[i].clone()];
    capsnet_core::simd::with_avx2(
        #[inline(always)]
        || capsnet_proto::wire::decode_into(payload, enc, to),
    )?;
    Ok(i)
}

/// One parameter stream, checked chunk by chunk into `params` (its chunks in any order); the
/// last chunk carries the work order.
async fn pull_stream(
    client: &mut Client,
    req: &pb::PullRequest,
    grid: &Grid,
    params: &mut [f32],
    received: &std::sync::atomic::AtomicU64,
) -> Result<pb::WorkOrder> {
    let body = Body::new(http_body_util::Full::new(frame::frame(req)));
    let mut stream = client.call(frame::PULL_PATH, body).await?;
    let first: pb::ParamChunk = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::data_loss("empty parameter stream"))?;
    if grid.last().map_or(0, |r| r.end) != params.len() {
        return Err(WorkerError::Internal(
            "the parameter buffer does not match the grid",
        ));
    }
    let enc = Encoding::try_from(first.encoding).unwrap_or(Encoding::Unspecified);
    let mut asm = Assembler::new(grid.clone(), first.total_len, enc)?;
    let mut order = None;
    let mut next = Some(first);
    let mut rebuilt = vec![];
    while let Some(c) = next {
        received.fetch_add(c.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // One coordinator's grid is in the vector's order: each chunk's place is its range.
        take_chunk(
            &mut asm,
            &c,
            (enc, req.delta),
            (grid, grid),
            params,
            &mut rebuilt,
            None,
        )?;
        order = c.work.or(order);
        next = stream.message().await?;
    }
    stream.status().await?;
    asm.finish()?;
    let order = order
        .ok_or_else(|| tonic::Status::data_loss("the parameters came without a work order"))?;
    if order.start > order.end {
        return Err(capsnet_proto::ProtoError::Invalid(format!(
            "work order of round {} starts at sample {} after its end {}",
            order.round, order.start, order.end
        ))
        .into());
    }
    Ok(order)
}

/// Where each span of a sharded run's grid lives, as a work order says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub id: u64,
    /// Each reducer's URL and its grid chunks, in grid order.
    pub owners: Vec<(String, Range<usize>)>,
}

impl Layout {
    /// The layout of `order`, checked: spans that tile a grid of `chunks` chunks, owners with
    /// http(s) URLs.
    pub fn of(order: &pb::WorkOrder, chunks: usize) -> Result<Self> {
        let owners: Vec<(String, Range<usize>)> = order
            .reducers
            .iter()
            .map(|o| {
                (
                    o.address.clone(),
                    o.first_chunk as usize..o.end_chunk as usize,
                )
            })
            .collect();
        let bad = |why: String| {
            WorkerError::from(capsnet_proto::ProtoError::Invalid(format!(
                "work order of round {}: {why}",
                order.round
            )))
        };
        let tiles = owners.first().is_some_and(|o| o.1.start == 0)
            && owners.last().is_some_and(|o| o.1.end == chunks)
            && owners.windows(2).all(|w| w[0].1.end == w[1].1.start)
            && owners.iter().all(|o| !o.1.is_empty());
        if !tiles {
            return Err(bad(format!(
                "its reducers' spans do not tile the grid of {chunks} chunks"
            )));
        }
        if let Some((a, _)) = owners.iter().find(|(a, _)| {
            !(a.starts_with("http://") || a.starts_with("https://") || a.starts_with("unix:/"))
        }) {
            return Err(bad(format!(
                "reducer address {a:?} is not an http(s):// or unix:/ URL"
            )));
        }
        Ok(Layout {
            id: order.layout,
            owners,
        })
    }

    pub fn spans(&self) -> Vec<Range<usize>> {
        self.owners.iter().map(|(_, s)| s.clone()).collect()
    }
}

/// Connections to a sharded run's reducers, by address, kept across rounds.
pub struct Reducers {
    clients: std::collections::HashMap<String, Client>,
    token: String,
    tls: Option<crate::ClientTls>,
    local: Option<capsnet_proto::frame::LocalReducer>,
    /// A reducer this worker could not reach, told to the coordinator with each work order
    /// asked for until a connection to it succeeds again ([`Reducers::recheck`]).
    unreachable: Option<Unreachable>,
    /// Payload bytes pulled over the network since [`Reducers::take_received`] was last asked.
    received: Arc<std::sync::atomic::AtomicU64>,
}

/// A reducer that could not be reached: when to try it again, after how many failed tries.
struct Unreachable {
    url: String,
    tries: u32,
    next: tokio::time::Instant,
}

/// Whether a reducer's failure with `code` may mean that it cannot be reached from here: no
/// connection, a broken one, a certificate that does not verify, bytes that arrived damaged,
/// a server there that does not serve a reducer (UNIMPLEMENTED). Refusals that say the run
/// moved on (a new layout or round), that judge the request, or that ask to retry later
/// (RESOURCE_EXHAUSTED: the reducer is there, and busy) do not.
fn may_be_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DataLoss
            | Code::Unimplemented
    )
}

/// How long a check that a reducer can be reached again may take (connecting, TLS and
/// HTTP/2 handshakes, and a heartbeat).
const RECHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Reducers {
    /// Reducers reached with `token` and, with TLS, the CA and client identity of `tls`; the
    /// name checked in their certificates is `domain`, or else each reducer's host.
    /// The reducer in `local` (one served in this process) is called in process.
    pub fn new(
        token: &str,
        tls: Option<&crate::ClientTls>,
        domain: Option<&str>,
        local: Option<capsnet_proto::frame::LocalReducer>,
    ) -> Self {
        Reducers {
            local,
            unreachable: None,
            received: Arc::default(),
            clients: Default::default(),
            token: token.to_string(),
            tls: tls.map(|t| crate::ClientTls {
                domain: domain.map(str::to_string),
                ..t.clone()
            }),
        }
    }

    /// Payload bytes pulled from reducers over the network (not from one in this process)
    /// since the last call: fewer than the floats' with delta pulls.
    pub fn take_received(&self) -> u64 {
        self.received.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// The floats of `grid` that cross the network under `layout`: all of them, less the spans
    /// of a reducer served in this process and of one this worker pushes to through shared
    /// memory (none without a layout: the coordinator's path).
    pub fn network_floats(&self, layout: Option<&Layout>, grid: &Grid) -> u64 {
        let total = grid.last().map_or(0, |r| r.end);
        let shared = |a: &String| {
            (self.clients.get(a))
                .and_then(Client::shm)
                .is_some_and(|m| m.pushes())
        };
        let local: usize = layout
            .into_iter()
            .flat_map(|l| &l.owners)
            .filter(|(a, _)| self.local.as_ref().is_some_and(|l| l.get(a).is_some()) || shared(a))
            .filter_map(|(_, span)| {
                let (first, last) = (grid.get(span.start)?, grid.get(span.end.checked_sub(1)?)?);
                Some(last.end - first.start)
            })
            .sum();
        total.saturating_sub(local) as u64
    }

    /// The last round failed on the reducer at `url` in a way that says it may not be
    /// reachable from here (no connection, a broken one, a certificate that does not verify).
    pub fn failed(&mut self, url: &str, code: Code) {
        if may_be_unreachable(code) {
            self.clients.remove(url);
            self.unreachable = Some(Unreachable {
                url: url.to_string(),
                tries: 0,
                next: tokio::time::Instant::now(),
            });
        }
    }

    /// The reducer this worker cannot reach, if any, after checking once more when its pause
    /// is over (it doubles with each failed try, as [`crate::lifecycle`]'s does) that it
    /// answers: a new connection, then a heartbeat (worker `id`) through its token check and
    /// its reducer thread, so that a server that accepts connections and fails every call
    /// still counts as unreachable. A success forgets it, and keeps the connection.
    pub async fn recheck(&mut self, id: &str) -> Option<String> {
        let u = self.unreachable.as_mut()?;
        if tokio::time::Instant::now() >= u.next {
            let (url, token, tls) = (&u.url, &self.token, self.tls.as_ref());
            let probe = async {
                let mut c = Client::connect_to(Peer::Reducer, url, token, tls)
                    .await
                    .map_err(|e| e.to_string())?;
                let beat = pb::HeartbeatRequest {
                    worker_id: id.to_string(),
                };
                match c.rpc().heartbeat(beat).await {
                    Ok(_) => Ok(c),
                    Err(s) if !may_be_unreachable(s.code()) => Ok(c),
                    Err(s) => Err(format!("its heartbeat failed: {s}")),
                }
            };
            match tokio::time::timeout(RECHECK_TIMEOUT, probe).await {
                Ok(Ok(c)) => {
                    tracing::info!(reducer = %u.url, "the reducer can be reached again");
                    self.clients.insert(u.url.clone(), c);
                    self.unreachable = None;
                    return None;
                }
                Ok(Err(error)) => {
                    tracing::debug!(reducer = %u.url, %error, "still cannot reach the reducer")
                }
                Err(_) => {
                    tracing::debug!(reducer = %u.url, "still cannot reach the reducer: timed out")
                }
            }
            u.tries = u.tries.saturating_add(1);
            u.next = tokio::time::Instant::now() + crate::lifecycle::backoff(u.tries);
        }
        Some(u.url.clone())
    }

    /// Forgets an unreachable reducer that `layout` no longer names.
    fn keep_unreachable_of(&mut self, layout: &Layout) {
        if let Some(u) = &self.unreachable
            && !layout.owners.iter().any(|(a, _)| *a == u.url)
        {
            self.unreachable = None;
        }
    }

    /// A client of each owner of `layout`, in its order (connecting to new ones; forgetting
    /// the ones it no longer names).
    pub async fn clients(&mut self, layout: &Layout) -> Result<Vec<Client>> {
        self.clients
            .retain(|a, _| layout.owners.iter().any(|(o, _)| o == a));
        let mut out = Vec::with_capacity(layout.owners.len());
        for (a, _) in &layout.owners {
            let local = self.local.as_ref().and_then(|l| l.get(a));
            let c = match self.clients.get(a) {
                // A reducer of this process that started serving after it was first reached
                // over the network is called in process from now on; one that stopped serving
                // is reached over the network again (where a stopped one refuses).
                Some(c) if c.is_in_process() == local.is_some() => c.clone(),
                _ => {
                    let c = match local {
                        Some(l) => Client::local(l, &self.token)?,
                        None => {
                            Client::connect_to(Peer::Reducer, a, &self.token, self.tls.as_ref())
                                .await
                                .map_err(|e| from_reducer(a, e))?
                        }
                    };
                    self.clients.insert(a.clone(), c.clone());
                    c
                }
            };
            out.push(c);
        }
        Ok(out)
    }
}

/// Pulls the parameters of the round after `want.after` from every span's owner into
/// `params`, all spans at once, each checked as a stream of its own; returns the round they
/// are of.
pub async fn pull_spans(
    clients: Vec<Client>,
    layout: &Layout,
    want: Want<'_>,
    params: &mut [f32],
    received: &std::sync::atomic::AtomicU64,
) -> Result<u64> {
    let Want {
        id,
        after,
        enc,
        grid,
        place,
        holds,
    } = want;
    // The layout tells a reducer whose spans moved since to refuse the pull.
    let req = pb::PullRequest {
        worker_id: id.to_string(),
        after_round: after,
        encoding: enc as i32,
        layout: Some(layout.id),
        cannot_reach: None,
        delta: holds && after.is_some(),
        shm: false,
    };
    if grid.last().map_or(0, |r| r.end) != params.len() || place.len() != grid.len() {
        return Err(WorkerError::Internal(
            "the parameter buffer does not match the grid",
        ));
    }
    // Every span's chunks land all over the flat vector (a sharded grid is striped): the
    // streams, polled by this one task, take turns decoding into it.
    let out = std::sync::Mutex::new(params);
    let mut pulls = vec![];
    for ((url, span), mut c) in layout.owners.iter().zip(clients) {
        // The reducer of this process hands its chunks over whole: no wire to spare.
        let req = pb::PullRequest {
            delta: req.delta && !c.is_in_process(),
            shm: c.shm().is_some_and(|m| m.pulls()),
            ..req.clone()
        };
        let out = &out;
        pulls.push(async move {
            pull_span(&mut c, req, grid, place, span.clone(), (out, received))
                .await
                .map_err(|e| from_reducer(url, e))
        });
    }
    let rounds = futures_util::future::try_join_all(pulls).await?;
    match rounds.first() {
        Some(&r) if rounds.iter().all(|&x| x == r) => Ok(r),
        _ => Err(tonic::Status::aborted(format!(
            "the reducers served parameters of different rounds ({rounds:?}); pull again"
        ))
        .into()),
    }
}

/// One span's parameters, pulled again when the reducer aborted an early stream or was not
/// ready (a moment after it was assigned its span).
async fn pull_span(
    client: &mut Client,
    mut req: pb::PullRequest,
    grid: &Grid,
    place: &Grid,
    span: Range<usize>,
    out: (&std::sync::Mutex<&mut [f32]>, &std::sync::atomic::AtomicU64),
) -> Result<u64> {
    let mut tries = 0u32;
    loop {
        match pull_span_stream(client, &req, grid, place, span.clone(), out).await {
            Err(WorkerError::Rpc(s))
                if matches!(s.code(), Code::Aborted | Code::Unavailable) && tries < 20 =>
            {
                tracing::debug!(status = %s.message(), "pulling the span again");
                tries += 1;
                // The first try may have written some of the new chunks; a chunk in shared
                // memory that did not check out was overwritten before it was read.
                req.delta = false;
                req.shm = false;
                tokio::time::sleep(std::time::Duration::from_millis(25 * u64::from(tries))).await;
            }
            r => return r,
        }
    }
}

async fn pull_span_stream(
    client: &mut Client,
    req: &pb::PullRequest,
    grid: &Grid,
    place: &Grid,
    span: Range<usize>,
    (out, received): (&std::sync::Mutex<&mut [f32]>, &std::sync::atomic::AtomicU64),
) -> Result<u64> {
    let body = Body::new(http_body_util::Full::new(frame::frame(req)));
    let mut stream = client.call(frame::PULL_PATH, body).await?;
    let first: pb::ParamChunk = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::data_loss("empty parameter stream"))?;
    let round = first.round;
    let enc = Encoding::try_from(first.encoding).unwrap_or(Encoding::Unspecified);
    let mut asm = Assembler::span(grid.clone(), span.clone(), first.total_len, enc)?;
    // From the reducer of this process: its chunks never crossed a wire.
    if client.is_in_process() {
        asm = asm.in_process();
    }
    let mut next = Some(first);
    let (mut rebuilt, mut copied) = (vec![], vec![]);
    while let Some(c) = next {
        if c.round != round {
            return Err(tonic::Status::data_loss("the round changed mid-stream").into());
        }
        if !client.is_in_process() {
            received.fetch_add(c.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // A payload in the reducer's shared memory is copied out first, and checked as copied.
        let shared = match &c.shm {
            None => None,
            Some(at) => {
                let m = client.shm().filter(|_| req.shm).ok_or_else(|| {
                    tonic::Status::data_loss(
                        "a parameter chunk in shared memory, which this pull did not ask for",
                    )
                })?;
                copy_shared(m, at, c.offset, (grid, span.clone(), enc), &mut copied)?;
                Some(&copied[..])
            }
        };
        {
            let mut params = out
                .lock()
                .map_err(|_| WorkerError::Internal("a parameter pull panicked"))?;
            let taken = take_chunk(
                &mut asm,
                &c,
                (enc, req.delta),
                (grid, place),
                &mut params,
                &mut rebuilt,
                shared,
            );
            match taken {
                Err(WorkerError::Proto(e)) if shared.is_some() => {
                    return Err(tonic::Status::aborted(format!(
                        "a parameter chunk in shared memory does not check out ({e}): it was \
                         written again before it was read; pulling over the socket"
                    ))
                    .into());
                }
                r => r?,
            };
        }
        if shared.is_some()
            && let Some(m) = client.shm()
            && !m
                .peer_reads
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                "a reducer of this machine: parameters come from its shared memory, updates \
                 go in this worker's"
            );
        }
        next = stream.message().await?;
    }
    stream.status().await?;
    asm.finish()?;
    Ok(round)
}

/// Copies into `out` the payload of the chunk at float `offset` (of the chunks `span` of `grid`,
/// as `enc`) that the reducer left in its shared memory at `at`. A region that cannot be read
/// here turns shared memory off for this reducer's pulls (ABORTED: pulled again over the
/// socket).
fn copy_shared(
    m: &crate::client::SharedMemory,
    at: &pb::ShmRef,
    offset: u64,
    (grid, span, enc): (&Grid, Range<usize>, Encoding),
    out: &mut Vec<u8>,
) -> Result<()> {
    let Some(i) = grid
        .binary_search_by_key(&offset, |r| r.start as u64)
        .ok()
        .filter(|i| span.contains(i))
    else {
        return Err(tonic::Status::data_loss(format!(
            "a parameter chunk at offset {offset} is not one of this span's"
        ))
        .into());
    };
    let len = grid[i].len() * capsnet_proto::wire::bytes_per_float(enc);
    let max = capsnet_proto::shared::pull_region_len(grid, span, enc);
    match capsnet_proto::shared::shm_bytes(&m.readers, at, len, max) {
        Ok(view) => {
            out.clear();
            out.extend_from_slice(&view);
            Ok(())
        }
        Err(e) => {
            m.pull_off.store(true, std::sync::atomic::Ordering::Relaxed);
            Err(tonic::Status::aborted(format!(
                "the reducer's shared memory cannot be read here ({e}); pulling over the socket"
            ))
            .into())
        }
    }
}

/// What [`fetch`] asks for: worker `id`'s order for the round after `after`, and its
/// parameters as `enc` on `grid`.
#[derive(Clone, Copy)]
pub struct Want<'a> {
    pub id: &'a str,
    pub after: Option<u64>,
    pub enc: Encoding,
    pub grid: &'a Grid,
    /// Where each chunk of the grid lies in the flat vector ([`RunSettings::placement`]).
    pub place: &'a Grid,
    /// The buffer pulled into holds the parameters of round `after` exactly as they were
    /// pulled: the first pull asks for the changes from those ([`pull_changes_into`]).
    pub holds: bool,
}

/// A sharded run's next work order (the round after `after`) and its parameters in `params`:
/// the order from the coordinator, the parameters from the reducers. With `known` (the layout
/// of the last order) the parameters are pulled at the same time as the order is asked for
/// (the reducers stream each range as soon as it is reduced); they are pulled again, with the
/// order's layout, when that changed or they were of another round. Returns the order and its
/// layout (None for an order that says training is over).
pub async fn fetch(
    coordinator: &mut Client,
    reducers: &mut Reducers,
    want: Want<'_>,
    known: Option<&Layout>,
    params: &mut [f32],
) -> Result<(pb::WorkOrder, Option<Layout>)> {
    let Want {
        id,
        after,
        enc,
        grid,
        ..
    } = want;
    // A reducer this worker cannot reach is told to the coordinator, which leaves the worker
    // out of the rounds (or drops the reducer) meanwhile; nothing is pulled early from it.
    let cannot_reach = reducers.recheck(id).await;
    let received = reducers.received.clone();
    let known = known.filter(|_| cannot_reach.is_none());
    let ask = |layout: Option<u64>| pb::PullRequest {
        worker_id: id.to_string(),
        after_round: after,
        encoding: enc as i32,
        layout,
        cannot_reach: cannot_reach.clone(),
        delta: false,
        shm: false,
    };
    let (mut order, mut early) = match known {
        Some(l) => {
            let clients = reducers.clients(l).await?;
            let mut c = coordinator.clone();
            let get = c.rpc().get_work(ask(Some(l.id)));
            let pull = pull_spans(clients, l, want, params, &received);
            tokio::pin!(get, pull);
            let mut pulled = None;
            let order = loop {
                tokio::select! {
                    o = &mut get => break o?.into_inner(),
                    p = &mut pull, if pulled.is_none() => {
                        tracing::trace!(target: "capsnet::timeline", "params pulled");
                        pulled = Some(p)
                    }
                }
            };
            tracing::trace!(target: "capsnet::timeline", round = order.round, "order");
            // The early pull is awaited only when it can still be of the order's round (after
            // a rollback it would wait for a round the reducers are far from).
            let expected = after.map_or(0, |a| a + 1);
            if pulled.is_none()
                && order.layout == l.id
                && order.round == expected
                && !order.finished
            {
                pulled = Some(pull.await);
            }
            (order, pulled.and_then(|p| p.ok()))
        }
        None => (
            coordinator.rpc().get_work(ask(None)).await?.into_inner(),
            None,
        ),
    };
    for _ in 0..10 {
        if order.finished {
            return Ok((order, None));
        }
        let layout = Layout::of(&order, grid.len())?;
        reducers.keep_unreachable_of(&layout);
        if !order.participate || (early == Some(order.round) && known == Some(&layout)) {
            return Ok((order, Some(layout)));
        }
        let clients = reducers.clients(&layout).await?;
        let before = order.round.checked_sub(1);
        // An early pull may have written some of the new chunks.
        let holds = want.holds && known.is_none() && before == after;
        match pull_spans(
            clients,
            &layout,
            Want {
                after: before,
                holds,
                ..want
            },
            params,
            &received,
        )
        .await
        {
            Ok(r) if r == order.round => return Ok((order, Some(layout))),
            Ok(r) => tracing::debug!(round = order.round, got = r, "parameters of another round"),
            Err(WorkerError::Reducer { status: s, .. })
                if matches!(
                    s.code(),
                    Code::Aborted
                        | Code::Unavailable
                        | Code::InvalidArgument
                        | Code::FailedPrecondition
                ) =>
            {
                tracing::debug!(status = %s.message(), "pulling the spans again");
            }
            Err(e) => return Err(e),
        }
        early = None;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        order = coordinator
            .rpc()
            .get_work(ask(Some(layout.id)))
            .await?
            .into_inner();
    }
    Err(WorkerError::Reducer {
        url: None,
        status: tonic::Status::unavailable(
            "the reducers did not serve the parameters of the open round",
        ),
    })
}

/// An error of the reducer at `url`, told apart from the coordinator's: a failed call becomes
/// [`WorkerError::Reducer`] with the reducer's URL in its message; other errors (a bad
/// address or TLS file) stay what they are.
pub(crate) fn from_reducer(url: &str, e: WorkerError) -> WorkerError {
    let status = match e {
        WorkerError::Rpc(st) | WorkerError::Reducer { status: st, .. } => st,
        e => return e,
    };
    let status = if status.message().starts_with(url) {
        status
    } else {
        tonic::Status::new(status.code(), format!("{url}: {}", status.message()))
    };
    WorkerError::Reducer {
        url: Some(url.to_string()),
        status,
    }
}

/// Floats shared with the stream that sends them, so that their buffer can be taken back
/// (`Arc::try_unwrap`) once it is sent.
#[derive(Clone, Debug)]
pub struct SharedFloats(pub Arc<Vec<f32>>);

impl AsRef<[f32]> for SharedFloats {
    fn as_ref(&self) -> &[f32] {
        &self.0
    }
}

/// One update to stream.
pub struct Update<V> {
    pub round: u64,
    pub samples: u64,
    pub loss: f64,
    /// The floats: owned (`Vec<f32>`, `Arc<[f32]>`), since they are encoded as they are sent.
    pub data: V,
}

/// Streams one update. Chunks are encoded as the stream is sent, so encoding one overlaps
/// sending the one before; their payloads come from `pool`, so a worker that keeps its pool
/// across rounds reuses the memory of the round before.
pub async fn push<V: AsRef<[f32]> + Send + 'static>(
    client: &mut Client,
    id: &str,
    s: &RunSettings,
    update: Update<V>,
    pool: &BufPool,
) -> Result<()> {
    let Update {
        round,
        samples,
        loss,
        data,
    } = update;
    let chunks = tokio_stream::iter(chunk_encoder(data, s.wire, s.chunk_bytes, pool));
    push_chunks(client, id, s, (round, samples, loss), 0, chunks).await
}

/// Streams an update's chunks as they come (in any order on the run's grid, the last one sent
/// carrying the checksum of the whole); `head` is its round, samples and loss, and `layout` the
/// id of the sharded layout it follows (0 without reducers).
pub async fn push_chunks(
    client: &mut Client,
    id: &str,
    s: &RunSettings,
    head: (u64, u64, f64),
    layout: u64,
    chunks: impl tokio_stream::Stream<Item = EncodedChunk> + Send + 'static,
) -> Result<()> {
    let (round, samples, loss) = head;
    let total = s.layout().total() as u64;
    let (id, wire, layout_hash) = (id.to_string(), s.wire, s.layout_hash);
    // Whether a payload went as a place in shared memory: a refusal then turns that off.
    let shared = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent_shared = shared.clone();
    let frames = futures_util::StreamExt::flat_map(chunks, move |c| {
        let mut fields = pb::UpdateChunk {
            worker_id: id.clone(),
            round,
            offset: c.offset,
            total_len: total,
            encoding: wire as i32,
            payload: Bytes::new(),
            crc32: c.crc32,
            samples,
            layout_hash,
            total_crc32: c.total_crc32,
            loss,
            layout,
            shm: None,
        };
        let pieces: Vec<Bytes> = match &c.shared {
            Some(at) => {
                sent_shared.store(true, std::sync::atomic::Ordering::Relaxed);
                fields.shm = Some(capsnet_proto::shared::shm_ref(at));
                vec![frame::frame(&fields)]
            }
            None => frame::frame_with_payload(&fields, frame::UPDATE_PAYLOAD_TAG, c.payload).into(),
        };
        futures_util::stream::iter(pieces)
    });
    let body = frames.map(|b| Ok::<_, tonic::Status>(Frame::data(b)));
    let answered = async {
        let mut resp = client
            .call(frame::PUSH_PATH, Body::new(StreamBody::new(body)))
            .await?;
        resp.message::<pb::PushResponse>()
            .await?
            .ok_or_else(|| tonic::Status::data_loss("no answer to the update"))?;
        resp.status().await?;
        Ok::<(), tonic::Status>(())
    }
    .await;
    if shared.load(std::sync::atomic::Ordering::Relaxed)
        && let Some(m) = client.shm()
    {
        match &answered {
            Ok(()) => m.push_taken(),
            Err(s) if s.code() == Code::InvalidArgument => {
                let rounds = m.push_refused(round);
                tracing::warn!(
                    status = %s.message(),
                    round,
                    rounds,
                    "a push through shared memory was refused: pushing over the socket for a while"
                );
            }
            Err(_) => {}
        }
    }
    Ok(answered?)
}

/// Streams one whole update of a sharded run, each span to its owner in `clients` (in the
/// order of `layout`), all at once; chunks are encoded on a blocking thread as the streams send
/// the ones before. Returns whether every reducer used it ([`used`]).
pub async fn push_spans(
    clients: Vec<Client>,
    layout: &Layout,
    id: &str,
    s: &RunSettings,
    update: Update<Arc<[f32]>>,
    pool: &BufPool,
) -> Result<bool> {
    let (grid, place) = s.grids();
    let (mut sender, _loss, chunks) =
        ChunkSender::new(grid, place, &layout.spans(), s.wire, pool.clone())?;
    sender.route(&clients, update.round);
    let Update {
        round,
        samples,
        loss,
        data,
    } = update;
    let encode = tokio::task::spawn_blocking(move || sender.send_all(loss, &data));
    let pushes = chunks
        .into_iter()
        .zip(clients)
        .map(|(chunks, mut c)| async move {
            let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks);
            used(
                round,
                push_chunks(&mut c, id, s, (round, samples, loss), layout.id, chunks).await,
            )
        });
    let all = futures_util::future::try_join_all(pushes).await?;
    encode.await.map_err(|source| WorkerError::Task {
        what: "encoding the update",
        source,
    })?;
    Ok(all.into_iter().all(|u| u))
}

/// Hands each chunk of the gradient to a push stream as soon as the backward pass has made it
/// final (compute/sync overlap): the last ranges of the flat vector (the decoder's, the digit
/// capsules') go out while the primary capsules' backward pass still runs. Encoded on the
/// computing thread into buffers of the worker's pool. There is one stream per span of the grid
/// (one per reducer; today one, the coordinator's, of the whole grid), each a stream of its
/// span whose last chunk sent carries the checksum over the span.
pub(crate) struct ChunkSender {
    grid: Grid,
    /// Where each chunk's floats lie in the flat vector ([`RunSettings::placement`]).
    place: Grid,
    /// The chunks in the order of their floats in the flat vector.
    by_place: Vec<usize>,
    wire: Encoding,
    pool: BufPool,
    /// Chunks `by_place[..pending]` are not sent yet (they are sent from the last one down).
    pending: usize,
    /// The stream of each span, and the span each chunk belongs to.
    outs: Vec<SpanOut>,
    owner: Vec<usize>,
    /// The first chunk's loss, which the update's head carries.
    loss: Option<tokio::sync::oneshot::Sender<f64>>,
}

/// One push stream: the chunks `span` of the grid.
struct SpanOut {
    span: Range<usize>,
    crc: GridCrc,
    tx: tokio::sync::mpsc::Sender<EncodedChunk>,
    /// False once the stream is gone (the update was refused): encode nothing more for it.
    open: bool,
    /// False for the stream to the reducer of this process, whose chunks cross no wire: no
    /// checksums computed (it does not check them).
    checksummed: bool,
    /// The payloads go into this region of shared memory, from this byte on (the slot of the
    /// round), the span's chunks in order; the stream says where they lie.
    shared: Option<(Arc<capsnet_shm::Writer>, usize)>,
}

impl ChunkSender {
    /// A sender of the chunks of `grid` (chunk `i` holding the flat vector's floats
    /// `place[i]`) to one stream per span of `spans`, which tile the grid in order; the
    /// receivers come in the same order.
    pub(crate) fn new(
        grid: Grid,
        place: Grid,
        spans: &[Range<usize>],
        wire: Encoding,
        pool: BufPool,
    ) -> Result<(
        Self,
        tokio::sync::oneshot::Receiver<f64>,
        Vec<tokio::sync::mpsc::Receiver<EncodedChunk>>,
    )> {
        let n = grid.len();
        if place.len() != n
            || place
                .iter()
                .zip(grid.iter())
                .any(|(p, g)| p.len() != g.len())
        {
            return Err(WorkerError::Internal(
                "the placement does not match the grid",
            ));
        }
        let mut by_place: Vec<usize> = (0..n).collect();
        by_place.sort_by_key(|&i| place[i].start);
        let tiles = spans.first().is_some_and(|s| s.start == 0)
            && spans.last().is_some_and(|s| s.end == n)
            && spans.windows(2).all(|w| w[0].end == w[1].start)
            && spans.iter().all(|s| !s.is_empty());
        if !tiles {
            return Err(WorkerError::Config(format!(
                "the spans {spans:?} do not tile a grid of {n} chunks"
            )));
        }
        let mut owner = vec![0; n];
        let mut outs = vec![];
        let mut rxs = vec![];
        for (k, span) in spans.iter().enumerate() {
            owner[span.clone()].fill(k);
            // Room for every chunk: the computing thread never waits for the network.
            let (tx, rx) = tokio::sync::mpsc::channel(span.len());
            outs.push(SpanOut {
                span: span.clone(),
                crc: GridCrc::new(span.len()),
                tx,
                open: true,
                checksummed: true,
                shared: None,
            });
            rxs.push(rx);
        }
        let (loss_tx, loss_rx) = tokio::sync::oneshot::channel();
        let sender = ChunkSender {
            pending: n,
            grid,
            place,
            by_place,
            wire,
            pool,
            outs,
            owner,
            loss: Some(loss_tx),
        };
        Ok((sender, loss_rx, rxs))
    }
}

impl ChunkSender {
    /// Span `k`'s stream goes to the reducer of this process: its chunks go without
    /// checksums.
    pub(crate) fn in_process(&mut self, k: usize) {
        if let Some(out) = self.outs.get_mut(k) {
            out.checksummed = false;
        }
    }

    /// Streams the spans to `clients` (one per span, in order) for round `round`: to the
    /// reducer of this process without checksums, to one of this machine that reads this
    /// worker's shared memory through it ([`crate::client::SharedMemory::push_region`]).
    pub(crate) fn route(&mut self, clients: &[Client], round: u64) {
        let bpf = capsnet_proto::wire::bytes_per_float(self.wire);
        for (k, c) in clients.iter().enumerate() {
            if c.is_in_process() {
                self.in_process(k);
                continue;
            }
            let Some(out) = self.outs.get_mut(k) else {
                continue;
            };
            // A span is a run of consecutive chunks: its floats lie between its ends.
            let floats = self.grid[out.span.end - 1].end - self.grid[out.span.start].start;
            let slot = (round % capsnet_proto::shared::PUSH_SLOTS as u64) as usize;
            if let Some(m) = c.shm() {
                m.route_round(round);
            }
            if let Some(w) = c.shm().and_then(|m| m.push_region(floats * bpf)) {
                out.shared = Some((w, slot * floats * bpf));
            }
        }
    }

    /// Sends a whole update at once (no overlap): `loss` for the heads, then every chunk.
    pub(crate) fn send_all(&mut self, loss: f64, data: &[f32]) {
        if let Some(l) = self.loss.take() {
            let _ = l.send(loss);
        }
        self.send_final(0, data);
    }

    /// Sends every chunk not sent yet whose floats lie in the final part `from..` of the flat
    /// vector, whose floats are `tail`, last first.
    fn send_final(&mut self, from: usize, tail: &[f32]) {
        while self.pending > 0 && self.place[self.by_place[self.pending - 1]].start >= from {
            self.pending -= 1;
            let i = self.by_place[self.pending];
            let out = &mut self.outs[self.owner[i]];
            if !out.open {
                continue;
            }
            let r = self.place[i].clone();
            let values = &tail[r.start - from..r.end - from];
            if let Some((w, base)) = &out.shared {
                // Into the region, with its checksum while the bytes are in cache.
                let bpf = capsnet_proto::wire::bytes_per_float(self.wire);
                let at = base + (self.grid[i].start - self.grid[out.span.start].start) * bpf;
                let wire = self.wire;
                let written = w.write_with(at, values.len() * bpf, |b| {
                    capsnet_core::simd::with_avx2(
                        #[inline(always)]
                        || capsnet_proto::wire::encode_into(values, wire, b),
                    );
                    let mut h = crc32fast::Hasher::new();
                    h.update(b);
                    h
                });
                let Ok(h) = written else {
                    // Out of the region: cannot be, the region is sized for the span.
                    out.open = false;
                    continue;
                };
                out.crc.record(i - out.span.start, h.clone());
                let chunk = EncodedChunk {
                    offset: self.grid[i].start as u64,
                    crc32: h.finalize(),
                    payload: Bytes::new(),
                    total_crc32: out.crc.total(),
                    delta: None,
                    shared: Some(capsnet_shm::At {
                        region: w.desc().clone(),
                        offset: at as u64,
                    }),
                };
                out.open = out.tx.try_send(chunk).is_ok();
                continue;
            }
            let payload = capsnet_core::simd::with_avx2(
                #[inline(always)]
                || encode_pooled(values, self.wire, &self.pool),
            );
            let h = if out.checksummed {
                let mut h = crc32fast::Hasher::new();
                h.update(&payload);
                h
            } else {
                capsnet_proto::wire::chunk_hasher(0, payload.len())
            };
            out.crc.record(i - out.span.start, h.clone());
            let chunk = EncodedChunk {
                offset: self.grid[i].start as u64,
                crc32: h.finalize(),
                payload,
                total_crc32: out.crc.total(),
                delta: None,
                shared: None,
            };
            // Never full: the channel has room for every chunk of its span.
            out.open = out.tx.try_send(chunk).is_ok();
        }
    }
}

impl GradReady for ChunkSender {
    fn ready(&mut self, stats: &BatchStats, from: usize, tail: &[f32]) {
        if let Some(l) = self.loss.take() {
            tracing::trace!(target: "capsnet::timeline", "first chunk");
            let _ = l.send(stats.total_loss());
        }
        self.send_final(from, tail);
    }
}

/// Whether a sent update was used: refused as stale or as a duplicate is not an error (the
/// worker goes on with the next round).
pub(crate) fn used(round: u64, pushed: Result<()>) -> Result<bool> {
    match pushed {
        Ok(()) => Ok(true),
        Err(WorkerError::Rpc(s))
            if matches!(s.code(), Code::FailedPrecondition | Code::AlreadyExists) =>
        {
            tracing::info!(round, status = %s.message(), "update not used");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Senders = (
        ChunkSender,
        tokio::sync::oneshot::Receiver<f64>,
        Vec<tokio::sync::mpsc::Receiver<EncodedChunk>>,
    );

    /// A sender of the f32 chunks of `grid` (placed at `place` in the flat vector), one stream
    /// per span of `spans`.
    fn sender(grid: &Grid, place: &Grid, spans: &[Range<usize>]) -> Senders {
        ChunkSender::new(
            grid.clone(),
            place.clone(),
            spans,
            Encoding::F32,
            BufPool::new(0),
        )
        .unwrap()
    }

    /// Wire bytes count what crosses the network: the spans of a reducer served in this
    /// process do not, and they count again once it stops serving.
    #[test]
    fn the_own_reducers_span_is_not_network_traffic() {
        let grid = Assembler::grid(10, Encoding::F32, 16);
        let layout = Layout {
            id: 1,
            owners: vec![
                ("http://own:1".into(), 0..1),
                ("http://other:2".into(), 1..grid.len()),
            ],
        };
        let local = capsnet_proto::frame::LocalReducer::default();
        let reducers = Reducers::new("t", None, None, Some(local.clone()));
        assert_eq!(reducers.network_floats(None, &grid), 10);
        assert_eq!(reducers.network_floats(Some(&layout), &grid), 10);
        local.set(Some(capsnet_proto::frame::InProcess::new(
            "http://own:1".into(),
            |_| Box::pin(async { http::Response::new(tonic::body::Body::empty()) }),
        )));
        assert_eq!(reducers.network_floats(Some(&layout), &grid), 10 - 4);
        assert_eq!(reducers.network_floats(None, &grid), 10);
        local.set(None);
        assert_eq!(reducers.network_floats(Some(&layout), &grid), 10);
    }

    /// The sender sends each chunk once the reported final part covers it, from the last
    /// chunk down, the last one sent carrying the checksum of the whole; the chunks assemble
    /// to the gradient, and the loss comes with the first report.
    #[test]
    fn chunks_go_out_as_the_backward_pass_makes_them_final() {
        let g: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
        let grid = Assembler::grid(10, Encoding::F32, 16);
        assert_eq!(grid.len(), 3);
        let (mut snd, loss, mut rxs) = sender(&grid, &grid, std::slice::from_ref(&(0..3)));
        let mut rx = rxs.remove(0);
        let stats = BatchStats {
            samples: 2,
            margin_loss: 0.25,
            reconstruction_loss: 0.5,
            correct: 1,
        };
        let mut sent = |from: usize, snd: &mut ChunkSender| {
            snd.ready(&stats, from, &g[from..]);
            std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>()
        };
        // Floats 6.. are final: only the chunk at 8 lies wholly inside.
        let a = sent(6, &mut snd);
        assert_eq!(a.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![8]);
        assert!(a[0].total_crc32.is_none());
        let b = sent(3, &mut snd);
        assert_eq!(b.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![4]);
        let c = sent(0, &mut snd);
        assert_eq!(c.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![0]);
        assert!(c[0].total_crc32.is_some());
        assert!(sent(0, &mut snd).is_empty(), "a chunk was sent twice");
        let mut asm = Assembler::new(grid, 10, Encoding::F32).unwrap();
        let mut out = vec![0.0; 10];
        for ch in a.iter().chain(&b).chain(&c) {
            asm.accept(ChunkIn::of(ch, 10, Encoding::F32), &mut out)
                .unwrap();
        }
        asm.finish().unwrap();
        assert_eq!(out, g);
        assert_eq!(loss.blocking_recv().unwrap(), 0.75);
    }

    /// With two spans (two reducers), each stream gets its own chunks, last first, the last
    /// one sent carrying the checksum over its span; a stream that goes away stops only its
    /// own chunks; spans that do not tile the grid are refused.
    #[test]
    fn each_span_gets_its_own_stream() {
        let g: Vec<f32> = (0..20).map(|i| i as f32 * 0.25).collect();
        let grid = Assembler::grid(20, Encoding::F32, 16);
        assert_eq!(grid.len(), 5);
        let spans = capsnet_proto::wire::spans(&grid, 2).unwrap();
        let (mut snd, _loss, mut rxs) = sender(&grid, &grid, &spans);
        let stats = BatchStats::default();
        snd.ready(&stats, 0, &g);
        let mut out = vec![0.0; 20];
        for (span, rx) in spans.iter().zip(&mut rxs) {
            let got: Vec<EncodedChunk> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            let offsets: Vec<u64> = got.iter().map(|c| c.offset).collect();
            let want: Vec<u64> = span.clone().rev().map(|i| grid[i].start as u64).collect();
            assert_eq!(offsets, want);
            let mut asm = Assembler::span(grid.clone(), span.clone(), 20, Encoding::F32).unwrap();
            for ch in &got {
                asm.accept(ChunkIn::of(ch, 20, Encoding::F32), &mut out)
                    .unwrap();
            }
            asm.finish().unwrap();
        }
        assert_eq!(out, g);

        // The first span's stream is gone: the second still gets everything.
        let (mut snd, _loss, mut rxs) = sender(&grid, &grid, &spans);
        drop(rxs.remove(0));
        snd.ready(&stats, 0, &g);
        assert_eq!(
            std::iter::from_fn(|| rxs[0].try_recv().ok()).count(),
            spans[1].len()
        );
        // The second span's reducer is in this process: its chunks go without checksums
        // (an in-process assembler takes them), the first span's keep theirs.
        let (mut snd, _loss, mut rxs) = sender(&grid, &grid, &spans);
        snd.in_process(1);
        snd.ready(&stats, 0, &g);
        let mut out = vec![0.0; 20];
        for (k, (span, rx)) in spans.iter().zip(&mut rxs).enumerate() {
            let got: Vec<EncodedChunk> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            assert_eq!(got.iter().all(|c| c.crc32 == 0), k == 1);
            let mut asm = Assembler::span(grid.clone(), span.clone(), 20, Encoding::F32).unwrap();
            if k == 1 {
                asm = asm.in_process();
            }
            for ch in &got {
                asm.accept(ChunkIn::of(ch, 20, Encoding::F32), &mut out)
                    .unwrap();
            }
            asm.finish().unwrap();
        }
        assert_eq!(out, g);
        let short = 0..2;
        for bad in [vec![short], vec![0..2, 3..5], vec![0..0, 0..5], vec![]] {
            let e = ChunkSender::new(
                grid.clone(),
                grid.clone(),
                &bad,
                Encoding::F32,
                BufPool::new(0),
            );
            assert!(matches!(e, Err(WorkerError::Config(_))), "{bad:?}");
        }
        let e = ChunkSender::new(
            grid.clone(),
            grid[1..].to_vec().into(),
            &spans,
            Encoding::F32,
            BufPool::new(0),
        );
        assert!(matches!(e, Err(WorkerError::Internal(_))));
    }

    /// On a striped grid (a sharded run's) a chunk goes out once the floats it holds are
    /// final, wherever it lies on the grid: the ranges final first reach both spans' streams
    /// at once; each stream assembles to its span of the gradient in grid order, and put back
    /// in place the chunks give the gradient.
    #[test]
    fn a_striped_grid_sends_each_chunk_when_its_floats_are_final() {
        use capsnet_proto::wire::{reorder, stripe_order, to_grid_order};
        let g: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 2.0).collect();
        let natural = Assembler::grid(30, Encoding::F32, 16);
        let g = &g[..30];
        assert_eq!(natural.len(), 8);
        let (grid, place) = reorder(&natural, &stripe_order(natural.len()));
        let spans = capsnet_proto::wire::spans(&grid, 2).unwrap();
        let (mut snd, _loss, mut rxs) = sender(&grid, &place, &spans);
        let stats = BatchStats::default();
        let mut got: Vec<Vec<EncodedChunk>> = vec![vec![]; 2];
        let mut take = |rxs: &mut Vec<tokio::sync::mpsc::Receiver<EncodedChunk>>| {
            let mut now = vec![];
            for (k, rx) in rxs.iter_mut().enumerate() {
                let c: Vec<EncodedChunk> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
                now.push(c.len());
                got[k].extend(c);
            }
            now
        };
        // The last quarter of the vector (floats 22..30: natural chunks 6 and 7, which the
        // stripe order puts in different halves of the grid) is final first.
        snd.ready(&stats, 22, &g[22..]);
        assert_eq!(take(&mut rxs), vec![1, 1]);
        snd.ready(&stats, 0, g);
        assert_eq!(take(&mut rxs), vec![3, 3]);
        let mut out = vec![0.0; 30];
        for (span, chunks) in spans.iter().zip(&got) {
            let mut asm = Assembler::span(grid.clone(), span.clone(), 30, Encoding::F32).unwrap();
            for ch in chunks {
                let (i, _) = asm.check(ChunkIn::of(ch, 30, Encoding::F32)).unwrap();
                let mut v = vec![0.0; grid[i].len()];
                capsnet_proto::wire::decode_into(&ch.payload, Encoding::F32, &mut v).unwrap();
                assert_eq!(v, g[place[i].clone()], "chunk {i}");
                out[grid[i].clone()].copy_from_slice(&v);
            }
            asm.finish().unwrap();
        }
        assert_eq!(out, to_grid_order(g, &grid, &place));
    }
}
