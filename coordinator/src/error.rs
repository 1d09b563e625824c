//! The coordinator's errors, and the one place they become gRPC statuses.

use std::path::PathBuf;

use capsnet_proto::ProtoError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown worker id {0}; join again")]
    UnknownWorker(String),
    #[error("update for round {got}, the current round is {current}")]
    StaleRound { got: u64, current: u64 },
    #[error("worker {name} is not a member of this epoch; it gets a shard from the next epoch")]
    NotMember { name: String },
    #[error("worker {name} already sent its update for round {round}")]
    Duplicate { name: String, round: u64 },
    /// A reducer dropped an update while it streamed in (its span was assigned anew, or the
    /// coordinator gave up on the update): the worker's next work order says what to do.
    #[error(
        "update for round {round} dropped by this reducer (its span was assigned anew, or the \
         coordinator dropped the update); ask for the work order again"
    )]
    Dropped { round: u64 },
    /// An update whose content does not fit the round (sample count, names, sizes).
    #[error("{0}")]
    BadUpdate(String),
    /// A request field out of range (a round past the open one, say).
    #[error("{0}")]
    InvalidArgument(String),
    /// Too many requests or peers at once: shed, the client retries later.
    #[error("{0}")]
    Overloaded(String),
    #[error("invalid worker name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A message or tensor stream that breaks the protocol (a checksum mismatch included).
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("training is finished")]
    Finished,
    /// Not able to serve this yet (a reducer whose span's state has not arrived); retry.
    #[error("{0}")]
    NotReady(String),
    /// The coordinator's session of a reducer: an order that breaks the protocol, or the
    /// coordinator gone for longer than the reducer waits.
    #[error("reducer: {0}")]
    Session(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Core(#[from] capsnet_core::CoreError),
    /// A configuration value out of range or flags that do not fit together.
    #[error("{0}")]
    Config(String),
    /// A file named by a flag (TLS certificate, key or CA) that cannot be read.
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{0} panicked")]
    Panicked(&'static str),
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl CoordinatorError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            what: what.into(),
            source,
        }
    }

    /// True for a configuration error (exit 2: retrying cannot help); see
    /// [`capsnet_core::CoreError::is_config`].
    pub fn is_config(&self) -> bool {
        match self {
            CoordinatorError::Config(_)
            | CoordinatorError::ReadFile { .. }
            | CoordinatorError::Tls(_) => true,
            CoordinatorError::Core(e) => e.is_config(),
            _ => false,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::UnknownWorker(_) => Code::NotFound,
            CoordinatorError::StaleRound { .. }
            | CoordinatorError::NotMember { .. }
            | CoordinatorError::Dropped { .. } => Code::FailedPrecondition,
            CoordinatorError::Duplicate { .. } => Code::AlreadyExists,
            CoordinatorError::Proto(ProtoError::Checksum { .. }) => Code::DataLoss,
            CoordinatorError::BadUpdate(_)
            | CoordinatorError::InvalidName { .. }
            | CoordinatorError::InvalidArgument(_)
            | CoordinatorError::Proto(_) => Code::InvalidArgument,
            CoordinatorError::Overloaded(_) => Code::ResourceExhausted,
            CoordinatorError::Finished
            | CoordinatorError::ShuttingDown
            | CoordinatorError::NotReady(_) => Code::Unavailable,
            CoordinatorError::Session(_) => Code::FailedPrecondition,
            CoordinatorError::Core(_)
            | CoordinatorError::Config(_)
            | CoordinatorError::ReadFile { .. }
            | CoordinatorError::Tls(_)
            | CoordinatorError::Io { .. }
            | CoordinatorError::Serve(_)
            | CoordinatorError::Task { .. }
            | CoordinatorError::Panicked(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
