//! The actor's API: the messages the gRPC handlers send it, and what it publishes to them.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use capsnet_core::train::EvalReport;
use capsnet_proto::wire::EncodedChunk;
use capsnet_proto::{Encoding, WorkerState, pb};
use tokio::sync::oneshot;

use crate::error::Result;

/// The parameters of a round as served to workers: encoded once, in the run's wire encoding,
/// on the run's chunk grid.
pub(crate) struct Published {
    pub round: u64,
    /// The grid chunks served: the whole grid, or a reducer's span (`chunks` holds these).
    pub span: std::ops::Range<usize>,
    pub finished: bool,
    pub total_len: u64,
    pub encoding: Encoding,
    pub chunks: Arc<Vec<EncodedChunk>>,
    /// The reduction that produced each chunk (0: encoded from the state, not reduced).
    pub generations: Arc<Vec<u64>>,
    /// A reducer's: the layout id of its span's assignment (0 elsewhere).
    pub layout: u64,
}

impl Published {
    /// Before the actor has loaded anything.
    pub fn placeholder() -> Self {
        Published {
            round: 0,
            span: 0..0,
            finished: false,
            total_len: 0,
            encoding: Encoding::F32,
            chunks: Arc::new(vec![]),
            generations: Arc::new(vec![]),
            layout: 0,
        }
    }
}

/// The next round's parameters as far as the open round has reduced them, for pulls that
/// stream them early (full duplex). Provisional: a range is final only once the round closes
/// with the same generation.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// The open round: these are the parameters of `round + 1`.
    pub round: u64,
    pub chunks: Vec<Option<(u64, EncodedChunk)>>,
}

impl Progress {
    pub fn empty(round: u64, n: usize) -> Self {
        Progress {
            round,
            chunks: vec![None; n],
        }
    }
}

pub(crate) enum PullReply {
    Ready(pb::WorkOrder, Arc<Published>),
    Wait,
}

pub(crate) enum Msg {
    Join {
        name: String,
        rank_hint: Option<u32>,
        reply: oneshot::Sender<Result<pb::JoinResponse>>,
    },
    Pull {
        worker_id: String,
        after_round: Option<u64>,
        /// GetWork: the work order only (a sharded run's parameters come from its reducers),
        /// and the layout the worker knows, if any.
        work_only: Option<Option<u64>>,
        /// GetWork: the reducer the worker says it cannot reach.
        cannot_reach: Option<String>,
        reply: oneshot::Sender<Result<PullReply>>,
    },
    /// The first chunk of an update arrived: checks the round, membership and sample count
    /// before the rest is read; replies with the member index the chunks go to.
    Begin {
        worker_id: String,
        round: u64,
        /// The grid chunks the stream takes (a reducer refuses a stream of a span it no
        /// longer owns).
        span: std::ops::Range<usize>,
        samples: u64,
        loss: f64,
        encoding: Encoding,
        reply: oneshot::Sender<Result<usize>>,
    },
    /// A checked chunk `index` of the run's grid.
    Chunk {
        member: usize,
        round: u64,
        index: usize,
        payload: Bytes,
    },
    /// Every chunk arrived and the whole checked out. `sum_sq`: the sum of squares of its
    /// values (params mode: of their distances from the round's parameters).
    End {
        member: usize,
        round: u64,
        sum_sq: f64,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// The update of `worker_id` failed or its stream was dropped: forget it.
    Abort {
        worker_id: String,
        member: usize,
        round: u64,
    },
    Touch {
        worker_id: String,
        reply: oneshot::Sender<Result<(u64, WorkerState)>>,
    },
    Leave {
        worker_id: String,
        reply: oneshot::Sender<Result<()>>,
    },
    Status {
        reply: oneshot::Sender<pb::StatusResponse>,
    },
    /// Whether the run can make progress, for the readiness check.
    Probe { reply: oneshot::Sender<Readiness> },
    /// Checkpoint now and stop (SIGTERM).
    Shutdown {
        reply: oneshot::Sender<Result<Option<PathBuf>>>,
    },
    /// Coordinator: a reducer opened its session; its orders go to `orders`. Replies with the
    /// session's id.
    ReducerJoined {
        hello: pb::ReducerHello,
        orders: tokio::sync::mpsc::UnboundedSender<pb::ReducerOrder>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Coordinator: what a reducer reported on its session.
    Report {
        session: u64,
        report: pb::reducer_report::Report,
    },
    /// Coordinator: a reducer's session ended.
    ReducerLost { session: u64 },
    /// Reducer: an order from the coordinator.
    Order(Box<pb::reducer_order::Order>),
    /// Reducer: a new session with the coordinator; reports go to `reports`.
    Session {
        reports: tokio::sync::mpsc::UnboundedSender<pb::ReducerReport>,
    },
}

/// What the readiness check needs of the actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Waiting for `--expect-workers` (or `--start-timeout`) before the first round.
    Starting,
    /// A round is open with live members.
    Training,
    /// The run started, but no worker is live.
    WaitingForWorkers,
    Finished,
}

/// What the run ended with.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub rounds: u64,
    pub finished: bool,
    pub last_eval: Option<EvalReport>,
    pub checkpoint: Option<PathBuf>,
    /// Why the final (or shutdown) checkpoint could not be written, when it could not: the
    /// process must not exit 0 then.
    pub checkpoint_failed: Option<String>,
}
