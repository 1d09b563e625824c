//! capsnet-bench: benchmarks that need a coordinator and workers together, so that neither
//! crate depends on the other and the binary only prints tables.
//!
//! # Layout
//! - [`chaos`]: real coordinator and worker processes trained under injected faults
//!   (`capsnet bench chaos`).
//! - [`plots`]: line plots in panels, PNG or SVG (`capsnet bench scale`, `capsnet plot`).
//! - [`scale`]: the time of a round projected from measured costs, by layout, link rate and
//!   worker count, as a table and a PNG plot (`capsnet bench scale`).
//! - [`sync`]: gradient-sync rounds through a real coordinator on loopback with synthetic
//!   workers (`capsnet bench sync`).
//!
//! The model's own throughput benchmark (`capsnet bench train`) is `capsnet_core::bench`.
#![forbid(unsafe_code)]

pub mod chaos;
pub mod pictures;
pub mod plots;
pub mod scale;
pub mod sync;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Core(#[from] capsnet_core::CoreError),
    #[error(transparent)]
    Coordinator(#[from] capsnet_coordinator::CoordinatorError),
    #[error("synthetic worker: {0}")]
    Worker(#[from] capsnet_worker::WorkerError),
    #[error("synthetic worker: coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Proto(#[from] capsnet_proto::ProtoError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} panicked")]
    Panicked(&'static str),
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// Settings that cannot be measured (a configuration error).
    #[error("{0}")]
    Settings(String),
    #[error("no rounds were timed")]
    NoRounds,
    #[error("a synthetic worker did not finish within {0:?}: the run stalled")]
    Stalled(std::time::Duration),
}

impl BenchError {
    /// True for settings that cannot work (exit 2), as the libraries' `is_config`.
    pub fn is_config(&self) -> bool {
        match self {
            BenchError::Settings(_) => true,
            BenchError::Core(e) => e.is_config(),
            BenchError::Coordinator(e) => e.is_config(),
            BenchError::Worker(e) => e.is_config(),
            _ => false,
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
