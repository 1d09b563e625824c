//! The coordinator's errors, and the one place they become gRPC statuses.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown worker id {0}; join again")]
    UnknownWorker(String),
    #[error("update for round {got}, the current round is {current}")]
    StaleRound { got: u64, current: u64 },
    #[error("worker {0} is not a member of this epoch; it gets a shard from the next epoch")]
    NotMember(String),
    #[error("worker {0} already sent its update for round {1}")]
    Duplicate(String, u64),
    #[error("{0}")]
    BadUpdate(String),
    #[error("corrupt update: {0}")]
    Corrupt(String),
    #[error("training is finished")]
    Finished,
    #[error("coordinator is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Core(#[from] capsnet_core::CoreError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<capsnet_proto::ProtoError> for CoordinatorError {
    fn from(e: capsnet_proto::ProtoError) -> Self {
        match e {
            capsnet_proto::ProtoError::Checksum { .. } => CoordinatorError::Corrupt(e.to_string()),
            other => CoordinatorError::BadUpdate(other.to_string()),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::UnknownWorker(_) => Code::NotFound,
            CoordinatorError::StaleRound { .. } | CoordinatorError::NotMember(_) => {
                Code::FailedPrecondition
            }
            CoordinatorError::Duplicate(..) => Code::AlreadyExists,
            CoordinatorError::BadUpdate(_) => Code::InvalidArgument,
            CoordinatorError::Corrupt(_) => Code::DataLoss,
            CoordinatorError::Finished | CoordinatorError::ShuttingDown => Code::Unavailable,
            CoordinatorError::Core(_) | CoordinatorError::Config(_) | CoordinatorError::Io(_) => {
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}
