//! The one error type of capsnet-core.

use std::path::PathBuf;

/// Everything that can go wrong in capsnet-core. Each variant names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file that exists but is not what it should be (bad magic, truncated, ...).
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    /// The Fashion-MNIST preset was asked for but the Debian package is not installed.
    #[error(
        "dataset {name} not found at {path}: install it with `sudo apt-get install dataset-fashion-mnist` \
         (or run scripts/setup), or point --data-dir at a folder with the IDX files"
    )]
    DatasetMissing { name: String, path: PathBuf },
    /// A configuration value out of range.
    #[error("invalid config: {0}")]
    Config(String),
    /// A tensor with the wrong shape for an operation.
    #[error("shape mismatch in {op}: expected {expected:?}, got {got:?}")]
    Shape {
        op: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A checkpoint or tensor file that does not match the model.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: safetensors: {source}")]
    SafeTensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CoreError::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CoreError::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
