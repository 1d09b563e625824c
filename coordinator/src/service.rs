//! The gRPC service: streams chunks in and out, checks them, and asks the actor for the rest.

use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use capsnet_proto::frame::Messages;
use capsnet_proto::wire::{Assembler, ChunkIn, first_non_finite};
use capsnet_proto::{Encoding, pb};
use futures_util::Stream;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::actor::{Msg, Progress, Published, PullReply};
use crate::error::CoordinatorError;

#[derive(Clone)]
pub(crate) struct Service {
    pub tx: mpsc::Sender<Msg>,
    pub published: watch::Receiver<Arc<Published>>,
    /// The open round's reduced ranges, for pulls that stream them early.
    pub progress: watch::Receiver<Progress>,
    pub num_floats: u64,
    pub layout_hash: u64,
    pub names: Arc<Vec<(String, Range<usize>)>>,
    /// The run's chunk grid: update chunk `i` must cover exactly `grid[i]`.
    pub grid: Arc<Vec<Range<usize>>>,
    /// Heartbeats are stamped here before they queue for the actor.
    pub liveness: crate::liveness::Liveness,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Tells the actor to forget an update whose stream ended early or failed (also when the
/// client went away and the handler was dropped mid-stream).
struct AbortOnDrop {
    tx: mpsc::Sender<Msg>,
    member: usize,
    round: u64,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Abort {
                member: self.member,
                round: self.round,
            });
        }
    }
}

impl Service {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, Status> {
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
                reply,
            })
            .await??)
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
        if first.round < current {
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
        let mut asm = Assembler::new(self.num_floats, first.total_len, enc)
            .map_err(CoordinatorError::from)?;
        let (worker_id, round) = (first.worker_id.clone(), first.round);
        let member = self
            .ask(|reply| Msg::Begin {
                worker_id: worker_id.clone(),
                round,
                samples: first.samples,
                loss: first.loss,
                encoding: enc,
                reply,
            })
            .await??;
        // From here on, any way out but a complete update makes the actor forget this one.
        let mut guard = AbortOnDrop {
            tx: self.tx.clone(),
            member,
            round,
            armed: true,
        };
        let mut next = Some(first);
        let mut index = 0;
        while let Some(c) = next {
            if c.round != round || c.worker_id != worker_id {
                return Err(CoordinatorError::BadUpdate(
                    "round or worker id changed mid-stream".into(),
                )
                .into());
            }
            let r = asm
                .check(ChunkIn::from(&c))
                .map_err(CoordinatorError::from)?;
            if self.grid.get(index) != Some(&r) {
                return Err(CoordinatorError::BadUpdate(format!(
                    "chunk {index} covers floats {r:?}; this run's chunks cover {:?} \
                     (chunk_bytes and wire of the run config)",
                    self.grid.get(index).cloned().unwrap_or(0..0)
                ))
                .into());
            }
            if let Some((i, x)) = first_non_finite(&c.payload, enc) {
                return Err(CoordinatorError::BadUpdate(format!(
                    "update holds a non-finite value ({x}) at {}",
                    self.locate(r.start + i)
                ))
                .into());
            }
            self.metrics.wire(enc, "in", c.payload.len() as u64);
            self.tx
                .send(Msg::Chunk {
                    member,
                    round,
                    index,
                    payload: c.payload,
                })
                .map_err(|_| Status::from(CoordinatorError::ShuttingDown))?;
            index += 1;
            next = stream.message().await?;
        }
        asm.finish().map_err(CoordinatorError::from)?;
        let out = self
            .ask(|reply| Msg::End {
                member,
                round,
                reply,
            })
            .await?;
        guard.armed = out.is_err();
        Ok(pb::PushResponse { round: out? })
    }

    /// Names a float index as `tensor[i]` for error messages.
    fn locate(&self, i: usize) -> String {
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
            .ask(|reply| Msg::Join {
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
            .ask(|reply| Msg::Touch {
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
        self.ask(|reply| Msg::Leave {
            worker_id: id,
            reply,
        })
        .await??;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(
            self.ask(|reply| Msg::Status { reply }).await?,
        ))
    }
}
