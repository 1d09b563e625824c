//! What can go wrong in a worker, and how the process should exit for it.

use std::path::PathBuf;
use std::time::Duration;

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
    /// A reducer of a sharded run failed (it died, the connection did, or it could not be
    /// reached): the worker asks the coordinator for the round's order again. `url` names the
    /// reducer when the failure was one reducer's.
    #[error("reducer: {status}")]
    Reducer {
        url: Option<String>,
        status: tonic::Status,
    },
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
            | WorkerError::Reducer { .. }
            | WorkerError::Unreachable { .. }
            | WorkerError::Proto(_)
            | WorkerError::Internal(_)
            | WorkerError::Task { .. } => false,
        }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
