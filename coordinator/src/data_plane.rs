//! The two bulk RPCs, PullParams and PushUpdate, served ahead of tonic's generated router with
//! messages framed by hand ([`capsnet_proto::frame`]): a parameter chunk leaves as its small
//! head and the round's shared payload, and an update chunk's payload is the memory its HTTP/2
//! frame was read into, so no payload passes through a codec buffer. A pull made while its round
//! is still being reduced streams each range as soon as it is reduced ([`speculate`]: full
//! duplex). Every other path goes to the router. Same wire format, same token check, same status
//! codes.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use capsnet_proto::frame::{self, InProcess, Messages, PULL_PATH, PUSH_PATH};
use capsnet_proto::wire::EncodedChunk;
use capsnet_proto::{Encoding, pb};
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::actor::{Published, PullReply};
use crate::auth::TokenCheck;
use crate::service::Service;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Routes the bulk RPCs to [`Service`] and everything else to `inner`.
#[derive(Clone)]
pub(crate) struct DataPlane<S> {
    pub inner: S,
    pub svc: Service,
    pub auth: TokenCheck,
}

impl<S: NamedService> NamedService for DataPlane<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<Body>> for DataPlane<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<B>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        if path == PULL_PATH || path == PUSH_PATH {
            let (svc, auth) = (self.svc.clone(), self.auth.clone());
            Box::pin(async move {
                Ok(serve(svc, auth, req)
                    .await
                    .unwrap_or_else(Status::into_http))
            })
        } else {
            let routed = self.inner.call(req);
            Box::pin(async move { Ok(routed.await?.map(Body::new)) })
        }
    }
}

/// The bulk RPCs of `svc` for callers in this process ([`InProcess`]): the same token check,
/// the same handling and answers as over the network, without a socket.
pub(crate) fn in_process(svc: Service, auth: TokenCheck, url: String) -> InProcess {
    let svc = Service {
        in_process: true,
        ..svc
    };
    InProcess::new(url, move |req| {
        let (svc, auth) = (svc.clone(), auth.clone());
        Box::pin(async move {
            let path = req.uri().path();
            if path != PULL_PATH && path != PUSH_PATH {
                let s = Status::unimplemented(format!("{path} is not served in process"));
                return s.into_http();
            }
            serve(svc, auth, req)
                .await
                .unwrap_or_else(Status::into_http)
        })
    })
}

/// The frames of a pull's answer, shared between its body (which hyper polls as the peer's
/// flow control allows) and a watchdog that lets go of them when the peer stops reading.
struct Pending {
    frames: std::collections::VecDeque<Bytes>,
    /// Frames handed to hyper so far.
    taken: u64,
    stalled: bool,
}

/// A pull's response body: the frames, then an OK status. Yields without any task switch or
/// timer per frame; see [`watch_stall`].
struct PullBody {
    pending: Arc<std::sync::Mutex<Pending>>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for PullBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let next = match self.pending.lock() {
            Ok(p) if p.stalled => {
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the worker stopped reading its parameters",
                ))));
            }
            Ok(mut p) => {
                let f = p.frames.pop_front();
                p.taken += u64::from(f.is_some());
                f
            }
            Err(_) => return Poll::Ready(Some(Err(Status::internal("pull state poisoned")))),
        };
        Poll::Ready(match next {
            Some(b) => Some(Ok(Frame::data(b))),
            None => self.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }
}

/// Drops the frames of a pull whose peer took none of them for a whole `stall` period (the
/// round's buffers it holds are freed), and ends when the body is gone.
async fn watch_stall(pending: std::sync::Weak<std::sync::Mutex<Pending>>, stall: Duration) {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(stall).await;
        let Some(p) = pending.upgrade() else { return };
        let Ok(mut p) = p.lock() else { return };
        if p.frames.is_empty() {
            return;
        }
        if p.taken == last {
            p.frames.clear();
            p.stalled = true;
            return;
        }
        last = p.taken;
    }
}

/// A gRPC response whose body is `frames` followed by an OK status, let go of when the peer
/// does not read for `stall` (`--stall-timeout`).
fn stream_frames(frames: Vec<Bytes>, stall: Duration) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
    let pending = Arc::new(std::sync::Mutex::new(Pending {
        frames: frames.into(),
        taken: 0,
        stalled: false,
    }));
    tokio::spawn(watch_stall(Arc::downgrade(&pending), stall));
    grpc_response(Body::new(PullBody {
        pending,
        trailers: Some(trailers),
    }))
}

/// Resolves once the channel of an early pull stayed full, with no frame accepted, for a
/// whole `stall` period: the peer stopped reading.
async fn stalled(
    tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>,
    sent: &AtomicU64,
    stall: Duration,
) {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(stall).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last && tx.capacity() == 0 {
            return;
        }
        last = now;
    }
}

/// A gRPC response whose body is `frames` followed by an OK status.
fn respond(frames: Vec<Bytes>) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
    let body = futures_util::stream::iter(frames)
        .map(|b| Ok::<_, Status>(Frame::data(b)))
        .chain(futures_util::stream::once(async {
            Ok(Frame::trailers(trailers))
        }));
    grpc_response(Body::new(StreamBody::new(body)))
}

fn grpc_response(body: Body) -> http::Response<Body> {
    let mut resp = http::Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(frame::GRPC_CONTENT_TYPE),
    );
    resp
}

/// How a pull takes its chunks: where a chunk lies in shared memory and the pull reads that
/// (`shm`), as a reference to it; else as its change from the round before where the pull asked
/// for that (`delta`) and the chunk has one; else whole.
#[derive(Clone, Copy)]
struct Form {
    delta: bool,
    shm: bool,
}

/// The frames of one parameter chunk of round `round`; the last chunk sent carries the
/// checksum of the whole (`total_crc32`) and, from the coordinator, the work order.
fn chunk_frames(
    round: u64,
    total_len: u64,
    (encoding, form): (Encoding, Form),
    c: &EncodedChunk,
    (work, total_crc32): (Option<pb::WorkOrder>, Option<u32>),
) -> Vec<Bytes> {
    let mut fields = pb::ParamChunk {
        round,
        offset: c.offset,
        total_len,
        encoding: encoding as i32,
        payload: Bytes::new(),
        crc32: c.crc32,
        work,
        total_crc32,
        delta: false,
        shm: None,
    };
    if let Some(at) = c.shared.as_ref().filter(|_| form.shm) {
        fields.shm = Some(capsnet_proto::shared::shm_ref(at));
        return vec![frame::frame(&fields)];
    }
    let payload = match &c.delta {
        Some(d) if form.delta => {
            fields.delta = true;
            d.clone()
        }
        _ => c.payload.clone(),
    };
    frame::frame_with_payload(&fields, frame::PARAM_PAYLOAD_TAG, payload).into()
}

/// The payload bytes chunk `c` puts on the wire as `form` takes it, and those it leaves in
/// shared memory instead.
fn sent_len(c: &EncodedChunk, form: Form) -> (u64, u64) {
    match (&c.shared, &c.delta) {
        (Some(_), _) if form.shm => (0, c.payload.len() as u64),
        (_, Some(d)) if form.delta => (d.len() as u64, 0),
        _ => (c.payload.len() as u64, 0),
    }
}

impl Service {
    /// Counts what a pull sends: `(wire, shared)` payload bytes ([`sent_len`]).
    fn count_sent(&self, encoding: Encoding, (wire, shared): (u64, u64)) {
        self.count_wire(encoding, "out", wire);
        if shared > 0 {
            self.metrics.shared(encoding, "out", shared);
        }
    }
}

/// How pull `r` gets round `round`: as changes if it asked for them and holds the round before
/// (the one its changes are from; a puller further behind gets whole chunks); from shared
/// memory if it asked for that.
fn form_of(r: &pb::PullRequest, round: u64) -> Form {
    Form {
        delta: r.delta && r.after_round.and_then(|a| a.checked_add(1)) == Some(round),
        shm: r.shm,
    }
}

/// A published round's chunks not in `sent` (indexed by chunk), in grid order.
fn unsent<'a>(snapshot: &'a Published, sent: &'a [bool]) -> impl Iterator<Item = &'a EncodedChunk> {
    (snapshot.chunks.iter().enumerate())
        .filter(|(i, _)| !sent.get(*i).copied().unwrap_or(false))
        .map(|(_, c)| c)
}

/// Bytes of a published round's chunks not in `sent`, as they go out.
fn payload_bytes(snapshot: &Published, sent: &[bool], form: Form) -> (u64, u64) {
    unsent(snapshot, sent)
        .map(|c| sent_len(c, form))
        .fold((0, 0), |(w, s), (a, b)| (w + a, s + b))
}

/// The frames of a published round's chunks not in `sent`, in grid order (as changes from the
/// round before where `delta` asks for them); the last carries the work order and the checksum
/// of the whole (the same whatever order the chunks went in).
fn round_frames(
    snapshot: &Published,
    sent: &[bool],
    order: pb::WorkOrder,
    form: Form,
) -> Vec<Bytes> {
    let total = snapshot.chunks.last().and_then(|c| c.total_crc32);
    let rest: Vec<&EncodedChunk> = unsent(snapshot, sent).collect();
    let n = rest.len();
    let mut order = Some(order);
    rest.into_iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let last = if i + 1 == n {
                (order.take(), total)
            } else {
                (None, None)
            };
            chunk_frames(
                snapshot.round,
                snapshot.total_len,
                (snapshot.encoding, form),
                c,
                last,
            )
        })
        .collect()
}

/// Streams the parameters of the round after `r.after_round` while that round is still being
/// reduced: each range as soon as it is reduced, in the order they are reduced (a worker that
/// overlaps its push with its backward pass sends the last ranges first), all but one. When
/// the round is published, the ranges sent early must be the ones it kept (same generation);
/// then the rest follows, the last chunk with the work order and the checksum of the whole. If
/// a range sent early was reduced again (a worker's update failed after it took part), the
/// stream ends with ABORTED and the worker pulls again.
async fn speculate(
    svc: &Service,
    r: &pb::PullRequest,
    mut published: watch::Receiver<Arc<Published>>,
    tx: &mpsc::Sender<Result<Frame<Bytes>, Status>>,
    sent_frames: &AtomicU64,
) -> Result<(), Status> {
    let gone = || Status::cancelled("the worker stopped reading");
    let send = |b: Bytes| async move {
        tx.send(Ok(Frame::data(b))).await.map_err(|_| gone())?;
        sent_frames.fetch_add(1, Ordering::Relaxed);
        Ok::<(), Status>(())
    };
    let mut progress = svc.progress.clone();
    // Chunks are indexed within the served span (a reducer's; the whole grid here).
    let n = svc.span().len();
    let round = match r.after_round {
        None => 0,
        Some(a) => a
            .checked_add(1)
            .ok_or_else(|| Status::invalid_argument("after_round is the last round there is"))?,
    };
    let wire = svc.wire();
    // The coordinator's last chunk carries the work order, so one range stays back until the
    // round is published. A reducer's stream carries no order: every range goes as soon as it
    // is reduced (the last one sent with the checksum over the span), and the OK status after
    // the commit says they are final.
    let hold = usize::from(svc.serves_orders());
    // The generation of each range sent early, and the checksums sent so far.
    let mut sent: Vec<Option<u64>> = vec![None; n];
    let mut crcs = capsnet_proto::wire::GridCrc::new(n);
    let mut unsent = n;
    // The actor said "not yet" just before: ask again only once something was published.
    let mut ask = false;
    loop {
        let early: Vec<(usize, u64, EncodedChunk)> = {
            let p = progress.borrow_and_update();
            if Some(p.round) == r.after_round && p.chunks.len() == n {
                (p.chunks.iter().enumerate())
                    .filter(|(i, _)| sent[*i].is_none())
                    .filter_map(|(i, c)| c.as_ref().map(|(g, c)| (i, *g, c.clone())))
                    .take(unsent.saturating_sub(hold))
                    .collect()
            } else {
                vec![]
            }
        };
        for (i, g, c) in early {
            // Early ranges are of the round after the one the puller holds.
            let form = Form {
                delta: r.delta,
                shm: r.shm,
            };
            svc.count_sent(wire, sent_len(&c, form));
            crcs.record(
                i,
                crc32fast::Hasher::new_with_initial_len(c.crc32, c.payload.len() as u64),
            );
            // The last chunk of the stream carries the checksum over the span.
            let last = (None, crcs.total());
            for b in chunk_frames(round, svc.num_floats, (wire, form), &c, last) {
                send(b).await?;
            }
            sent[i] = Some(g);
            unsent -= 1;
        }
        if std::mem::take(&mut ask) {
            published.borrow_and_update();
            // The spans were assigned anew while this pull waited.
            if let Some(l) = r.layout.filter(|_| !svc.serves_orders()) {
                svc.same_layout(l)?;
            }
            if let PullReply::Ready(order, snapshot) = svc.ask_pull(r).await? {
                let kept = (sent.iter().enumerate())
                    .all(|(i, g)| g.is_none_or(|g| snapshot.generations.get(i) == Some(&g)));
                if !kept || snapshot.chunks.len() != n {
                    return Err(Status::aborted(
                        "parameters sent early were reduced again (an update failed after \
                         taking part); pull again",
                    ));
                }
                let done: Vec<bool> = sent.iter().map(Option::is_some).collect();
                let form = form_of(r, snapshot.round);
                svc.count_sent(wire, payload_bytes(&snapshot, &done, form));
                for b in round_frames(&snapshot, &done, order, form) {
                    send(b).await?;
                }
                return Ok(());
            }
        }
        let changed = tokio::select! {
            c = progress.changed() => c,
            c = published.changed() => { ask = true; c }
            _ = tx.closed() => return Err(gone()),
        };
        if changed.is_err() {
            return Err(Status::unavailable("the coordinator is shutting down"));
        }
    }
}

async fn serve(
    svc: Service,
    auth: TokenCheck,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    auth.check_headers(req.headers())?;
    let pull = req.uri().path() == PULL_PATH;
    let peer = req
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|i| i.remote_addr());
    let mut msgs = Messages::new(req.into_body());
    if pull {
        let r: pb::PullRequest = msgs
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty pull request"))?;
        svc.liveness.beat(&r.worker_id, peer);
        svc.check_encoding(&r)?;
        svc.check_layout(r.layout).await?;
        let mut published = svc.published.clone();
        published.borrow_and_update();
        if let PullReply::Ready(order, snapshot) = svc.ask_pull(&r).await? {
            let form = form_of(&r, snapshot.round);
            svc.count_sent(snapshot.encoding, payload_bytes(&snapshot, &[], form));
            return Ok(stream_frames(
                round_frames(&snapshot, &[], order, form),
                svc.stall,
            ));
        }
        // Not published yet: stream the ranges as the open round reduces them (full duplex).
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let sent = AtomicU64::new(0);
            let status = tokio::select! {
                r = speculate(&svc, &r, published, &tx, &sent) => match r {
                    Ok(()) => Status::ok(""),
                    Err(s) => s,
                },
                // The peer stopped reading: let go of what it was sent (the channel's frames
                // go with the stream when it is dropped).
                () = stalled(&tx, &sent, svc.stall) => return,
            };
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_ok() {
                let _ = tx
                    .send_timeout(Ok(Frame::trailers(trailers)), svc.stall)
                    .await;
            }
        });
        Ok(grpc_response(Body::new(StreamBody::new(
            ReceiverStream::new(rx),
        ))))
    } else {
        let out = svc.push(&mut msgs).await?;
        Ok(respond(vec![frame::frame(&out)]))
    }
}
