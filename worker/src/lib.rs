//! capsnet-worker: one replica of the model that trains on its shard of the data.
//!
//! # Layout
//! - [`WorkerConfig`]: where the coordinator is, credentials, data, threads.
//! - [`run`]: the worker's life: connect and join (with retry and backoff), then per round pull
//!   the parameters and work order, compute off the async runtime, push the update; rejoin when
//!   the coordinator restarts; leave when training is finished or on shutdown. [`Phase`] names
//!   where it is in that loop for the logs; the loop itself is not yet a state machine.
//! - [`client`]: a connected, authenticated gRPC client.
//! - [`identity`]: the worker's name and preferred rank when the operator gives none.
//! - [`metrics`]: what `--metrics-listen` serves.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capsnet_core::data::{self, Dataset, Split};
use capsnet_core::net::{self, Net, NetWorkspace};
use capsnet_core::optim::Adam;
use capsnet_core::rng::Rng;
use capsnet_core::train::Inputs;
use capsnet_core::{BatchStats, GradReady, Params};
use capsnet_proto::frame;
use capsnet_proto::wire::{
    Assembler, BufPool, ChunkIn, EncodedChunk, Grid, GridCrc, chunk_encoder, encode_pooled,
};
use capsnet_proto::{Encoding, RunSettings, SyncMode, pb};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::body::Body;

pub mod client;
mod identity;
pub mod metrics;

pub use client::{Client, ClientTls};
pub use identity::identity;
pub use metrics::WorkerMetrics;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A configuration value out of range or flags that do not fit together.
    #[error("{0}")]
    Config(String),
    #[error("coordinator address {url:?}: {source}")]
    Address {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A file named by a flag (TLS CA, certificate or key) that cannot be read.
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("--metrics-listen {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the token must be printable ASCII")]
    TokenNotAscii,
    /// This machine's training set differs from the coordinator's.
    #[error(
        "{} holds {local} training images, the coordinator's data has {coordinator}; every worker needs the same data set",
        data_dir.display()
    )]
    DataMismatch {
        data_dir: PathBuf,
        local: u64,
        coordinator: u64,
    },
    #[error(transparent)]
    Core(#[from] capsnet_core::CoreError),
    #[error("coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("cannot reach the coordinator at {url} for {waited:?}: {last}")]
    Unreachable {
        url: String,
        waited: Duration,
        last: String,
    },
    #[error(transparent)]
    Proto(#[from] capsnet_proto::ProtoError),
    /// A broken invariant of this crate (a bug, not bad input).
    #[error("internal: {0}")]
    Internal(&'static str),
    /// A blocking task (loading data, a training step) that panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl WorkerError {
    /// True for a configuration error (exit 2: retrying cannot help; Kubernetes fails the Job
    /// at once); see [`capsnet_core::CoreError::is_config`].
    pub fn is_config(&self) -> bool {
        match self {
            WorkerError::Config(_)
            | WorkerError::Address { .. }
            | WorkerError::ReadFile { .. }
            | WorkerError::Tls(_)
            | WorkerError::Listen { .. }
            | WorkerError::TokenNotAscii
            | WorkerError::DataMismatch { .. } => true,
            WorkerError::Core(e) => e.is_config(),
            WorkerError::Rpc(_)
            | WorkerError::Unreachable { .. }
            | WorkerError::Proto(_)
            | WorkerError::Internal(_)
            | WorkerError::Task { .. } => false,
        }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

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
    /// Grad mode: send each chunk of the gradient as soon as the backward pass has made it
    /// final, while the rest of the pass runs (compute/sync overlap).
    pub overlap: bool,
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
    let req = pb::PullRequest {
        worker_id: id.to_string(),
        after_round: after,
        encoding: enc as i32,
    };
    let mut tries = 0;
    loop {
        match pull_stream(client, &req, grid, params).await {
            Err(WorkerError::Rpc(s)) if s.code() == Code::Aborted && tries < 3 => {
                tracing::debug!(status = %s.message(), "pulling again");
                tries += 1;
            }
            r => return r,
        }
    }
}

/// One parameter stream, checked chunk by chunk into `params` (its chunks in any order); the
/// last chunk carries the work order.
async fn pull_stream(
    client: &mut Client,
    req: &pb::PullRequest,
    grid: &Grid,
    params: &mut [f32],
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
    let mut asm = Assembler::new(
        grid.clone(),
        first.total_len,
        Encoding::try_from(first.encoding).unwrap_or(Encoding::Unspecified),
    )?;
    let mut order = None;
    let mut next = Some(first);
    while let Some(c) = next {
        asm.accept(ChunkIn::from(&c), params)?;
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
    push_chunks(client, id, s, (round, samples, loss), chunks).await
}

/// Streams an update's chunks as they come (in any order on the run's grid, the last one sent
/// carrying the checksum of the whole); `head` is its round, samples and loss.
pub async fn push_chunks(
    client: &mut Client,
    id: &str,
    s: &RunSettings,
    head: (u64, u64, f64),
    chunks: impl tokio_stream::Stream<Item = EncodedChunk> + Send + 'static,
) -> Result<()> {
    let (round, samples, loss) = head;
    let total = s.layout().total() as u64;
    let (id, wire, layout_hash) = (id.to_string(), s.wire, s.layout_hash);
    let frames = futures_util::StreamExt::flat_map(chunks, move |c| {
        let fields = pb::UpdateChunk {
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
        };
        futures_util::stream::iter(frame::frame_with_payload(
            &fields,
            frame::UPDATE_PAYLOAD_TAG,
            c.payload,
        ))
    });
    let body = frames.map(|b| Ok::<_, tonic::Status>(Frame::data(b)));
    let mut resp = client
        .call(frame::PUSH_PATH, Body::new(StreamBody::new(body)))
        .await?;
    resp.message::<pb::PushResponse>()
        .await?
        .ok_or_else(|| tonic::Status::data_loss("no answer to the update"))?;
    resp.status().await?;
    Ok(())
}

/// Hands each chunk of the gradient to the push stream as soon as the backward pass has made
/// it final (compute/sync overlap): the last ranges of the flat vector (the decoder's, the
/// digit capsules') go out while the primary capsules' backward pass still runs. Encoded on
/// the computing thread into buffers of the worker's pool.
struct ChunkSender {
    grid: Grid,
    wire: Encoding,
    pool: BufPool,
    /// Chunks `[0, pending)` are not sent yet (they are sent from the last one down).
    pending: usize,
    crc: GridCrc,
    /// The first chunk's loss, which the update's head carries.
    loss: Option<tokio::sync::oneshot::Sender<f64>>,
    tx: tokio::sync::mpsc::Sender<EncodedChunk>,
    /// False once the push stream is gone (the update was refused): encode nothing more.
    open: bool,
}

impl ChunkSender {
    fn new(
        grid: Grid,
        wire: Encoding,
        pool: BufPool,
    ) -> (
        Self,
        tokio::sync::oneshot::Receiver<f64>,
        tokio::sync::mpsc::Receiver<EncodedChunk>,
    ) {
        let n = grid.len();
        // Room for every chunk: the computing thread never waits for the network.
        let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
        let (loss_tx, loss_rx) = tokio::sync::oneshot::channel();
        let sender = ChunkSender {
            pending: n,
            crc: GridCrc::new(n),
            grid,
            wire,
            pool,
            loss: Some(loss_tx),
            tx,
            open: true,
        };
        (sender, loss_rx, rx)
    }
}

impl GradReady for ChunkSender {
    fn ready(&mut self, stats: &BatchStats, from: usize, tail: &[f32]) {
        if let Some(l) = self.loss.take() {
            let _ = l.send(stats.total_loss());
        }
        while self.open && self.pending > 0 && self.grid[self.pending - 1].start >= from {
            let i = self.pending - 1;
            let r = self.grid[i].clone();
            let payload = encode_pooled(&tail[r.start - from..r.end - from], self.wire, &self.pool);
            let mut h = crc32fast::Hasher::new();
            h.update(&payload);
            self.crc.record(i, h.clone());
            let chunk = EncodedChunk {
                offset: r.start as u64,
                crc32: h.finalize(),
                payload,
                total_crc32: self.crc.total(),
            };
            self.open = self.tx.blocking_send(chunk).is_ok();
            self.pending = i;
        }
    }
}

/// What the worker computes with, kept across rounds (and across rejoins with the same config).
struct Replica {
    settings: RunSettings,
    model: Net,
    train: Arc<Dataset>,
    ws: NetWorkspace,
    grads: Params,
    /// Local optimizer of params mode.
    adam: Option<Adam>,
    /// The buffer of the last update sent, for the next one.
    spare: Option<Vec<f32>>,
    pool: rayon::ThreadPool,
}

impl Replica {
    fn new(settings: RunSettings, cfg: &WorkerConfig) -> Result<Self> {
        let model = Net::new(&settings.model, settings.baseline.as_ref())?;
        let inputs = Inputs::new(settings.max_shift, settings.canvas, settings.multi);
        let mut train = data::load_split_for(
            &cfg.data_dir,
            Split::Train,
            settings.model.classes,
            inputs.data_size(settings.model.image_size),
        )?;
        if let Some(n) = settings.train_limit {
            train.truncate(n as usize);
        }
        if train.len() as u64 != settings.train_len {
            return Err(WorkerError::DataMismatch {
                data_dir: cfg.data_dir.clone(),
                local: train.len() as u64,
                coordinator: settings.train_len,
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .build()
            .map_err(|source| capsnet_core::CoreError::ThreadPool {
                threads: cfg.threads.max(1),
                source,
            })?;
        Ok(Replica {
            grads: Params::zeros(model.layout()),
            model,
            train: Arc::new(train),
            ws: NetWorkspace::new(),
            adam: None,
            spare: None,
            pool,
            settings,
        })
    }

    /// Runs a work order on the pulled `params`: the gradient of the batch (grad mode) or up to
    /// `sync_every` local Adam steps (params mode). Returns (update, samples, mean loss).
    ///
    /// No 33 MB buffer is allocated per round: the update is written to the buffer of an earlier
    /// update ([`Replica::recycle`]), and `params` is left holding a buffer for the next pull.
    ///
    /// In grad mode, `ready` hears which chunks of the gradient are final as the backward pass
    /// goes (see [`GradReady`]).
    fn compute(
        &mut self,
        order: &pb::WorkOrder,
        params: &mut Vec<f32>,
        ready: &mut (dyn GradReady + Send),
    ) -> Result<(Vec<f32>, u64, f64)> {
        let n = params.len();
        let spare = self
            .spare
            .take()
            .filter(|v| v.len() == n)
            .unwrap_or_else(|| vec![0.0; n]);
        let s = &self.settings;
        let pulled = std::mem::take(params);
        let mut p = Params::from_flat(self.model.layout(), pulled)?;
        let perm = data::epoch_permutation(self.train.len(), s.seed, order.epoch);
        let indices = &perm[capsnet_proto::work_range(order, perm.len())?];
        // Augmentation keyed by (round, first position): independent of which process computes.
        let mut rng = Rng::derive(
            s.seed,
            "augment-round",
            order.round.wrapping_mul(1 << 32) ^ order.start,
        );
        let inputs = Inputs::new(s.max_shift, s.canvas, s.multi);
        let (model, ws, grads, train, pool) = (
            &self.model,
            &mut self.ws,
            &mut self.grads,
            &self.train,
            &self.pool,
        );
        match s.sync_mode {
            SyncMode::Params => {
                let adam = self
                    .adam
                    .get_or_insert_with(|| Adam::new(s.adam.clone(), p.data.len()));
                let mut loss = 0.0;
                let mut steps = 0;
                for batch_idx in indices.chunks(s.batch_size) {
                    let batch =
                        inputs.training_batch(train, batch_idx, &mut rng, s.seed, order.epoch);
                    let keys = net::sample_keys(s.seed, order.epoch, batch_idx);
                    let st = pool.install(|| model.train_batch(&p, &batch, &keys, grads, ws))?;
                    pool.install(|| adam.update(&mut p.data, &grads.data))?;
                    loss += st.total_loss();
                    steps += 1;
                }
                *params = spare;
                Ok((p.data, indices.len() as u64, loss / steps.max(1) as f64))
            }
            _ => {
                let batch = inputs.training_batch(train, indices, &mut rng, s.seed, order.epoch);
                let keys = net::sample_keys(s.seed, order.epoch, indices);
                let st =
                    pool.install(|| model.train_batch_ready(&p, &batch, &keys, grads, ws, ready))?;
                *params = p.data;
                let update = std::mem::replace(&mut grads.data, spare);
                Ok((update, indices.len() as u64, st.total_loss()))
            }
        }
    }

    /// Takes back the buffer of a sent update, for the next one.
    fn recycle(&mut self, update: Vec<f32>) {
        self.spare = Some(update);
    }
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
            Some(AbortOnDrop(tokio::spawn(
                capsnet_proto::metrics_http::serve(
                    l,
                    Arc::new(move || m.encode()),
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

/// Whether a sent update was used: refused as stale or as a duplicate is not an error (the
/// worker goes on with the next round).
fn used(round: u64, pushed: Result<()>) -> Result<bool> {
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
                        let o =
                            pull_into(&mut client, &id, after, settings.wire, &grid, &mut pulled)
                                .await?;
                        metrics.wire(settings.wire, "in", total);
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
                let o = order;
                let mut params = std::mem::take(&mut pulled);
                let started = Instant::now();
                // Overlap (grad mode): each chunk goes out as soon as the backward pass has
                // made it final, on a stream that runs beside the computation.
                let (mut sender, mut early) = (None, None);
                if cfg.overlap && settings.sync_mode == SyncMode::Grad {
                    let (snd, loss, chunks) =
                        ChunkSender::new(grid.clone(), settings.wire, pool.clone());
                    let range = capsnet_proto::work_range(&order, settings.train_len as usize)?;
                    let head = (order.round, range.len() as u64);
                    let (mut c, id, s) = (client.clone(), id.clone(), settings.clone());
                    early = Some(AbortOnDrop(tokio::spawn(async move {
                        // No loss: the computation failed before its backward pass began.
                        let Ok(loss) = loss.await else {
                            return Ok(false);
                        };
                        let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks);
                        used(
                            head.0,
                            push_chunks(&mut c, &id, &s, (head.0, head.1, loss), chunks).await,
                        )
                    })));
                    sender = Some(snd);
                }
                let compute = async {
                    let (r, params, out) = tokio::task::spawn_blocking(move || {
                        let out = match sender.as_mut() {
                            Some(snd) => r.compute(&o, &mut params, snd),
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
                        let pulling = pull_into(
                            &mut puller,
                            &id,
                            after,
                            settings.wire,
                            &grid,
                            &mut next_params,
                        );
                        let ((params, update, samples, loss, computed), used, next) =
                            tokio::try_join!(compute, pushing, pulling)?;
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
                metrics.wire(settings.wire, "out", total);
                metrics.wire(settings.wire, "in", total);
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

    /// The sender sends each chunk once the reported final part covers it, from the last
    /// chunk down, the last one sent carrying the checksum of the whole; the chunks assemble
    /// to the gradient, and the loss comes with the first report.
    #[test]
    fn chunks_go_out_as_the_backward_pass_makes_them_final() {
        let g: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
        let grid = Assembler::grid(10, Encoding::F32, 16);
        assert_eq!(grid.len(), 3);
        let (mut snd, loss, mut rx) =
            ChunkSender::new(grid.clone(), Encoding::F32, BufPool::new(0));
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
            let chunk = ChunkIn {
                offset: ch.offset,
                total: 10,
                encoding: Encoding::F32,
                payload: &ch.payload,
                crc32: ch.crc32,
                total_crc32: ch.total_crc32,
            };
            asm.accept(chunk, &mut out).unwrap();
        }
        asm.finish().unwrap();
        assert_eq!(out, g);
        assert_eq!(loss.blocking_recv().unwrap(), 0.75);
    }

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
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
