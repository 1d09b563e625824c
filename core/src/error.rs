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
    /// A network or optimizer config value out of range (checked by `capsnet-config`).
    #[error(transparent)]
    InvalidConfig(#[from] capsnet_config::ConfigError),
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
    /// The thread pool could not be started (a resource limit: retrying may help).
    #[error("cannot start {threads} threads: {source}")]
    ThreadPool {
        threads: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// The training loss stopped being finite.
    #[error("loss became {loss} at step {step}; lower --lr")]
    Diverged { step: u64, loss: f64 },
    /// A label outside `0..classes` in a batch.
    #[error("label {label} out of range for {classes} classes")]
    Label { label: usize, classes: usize },
    /// A benchmark setting run in a child process that failed or printed no result.
    #[error("{what}: {reason}")]
    Subprocess { what: String, reason: String },
    /// Parameters or gradients laid out for another network than the model's.
    #[error("{what} do not match the model's layout")]
    LayoutMismatch { what: &'static str },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    /// True for a configuration error: a bad flag or value, a missing or malformed data set, an
    /// input that cannot be used. Retrying cannot help, so the binary exits 2 (and Kubernetes'
    /// pod failure policy fails the Job at once); every other error exits 1.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            CoreError::Config(_)
                | CoreError::InvalidConfig(_)
                | CoreError::DatasetMissing { .. }
                | CoreError::Data { .. }
                | CoreError::Label { .. }
                // With the same seed and flags it diverges again: only a lower --lr helps.
                | CoreError::Diverged { .. }
        )
    }

    pub(crate) fn thread_pool(threads: usize, source: rayon::ThreadPoolBuildError) -> Self {
        CoreError::ThreadPool { threads, source }
    }
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
