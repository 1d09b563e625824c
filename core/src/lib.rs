//! capsnet-core: the capsule network of Sabour, Frosst & Hinton (2017), trained on CPUs.
//!
//! # Layout
//! - [`config`]: every size of the network ([`CapsNetConfig`], defaults = the paper), from
//!   `capsnet-config`, which the protocol shares without this crate's BLAS.
//! - [`params`]: named tensors in one flat vector (parameters, gradients, optimizer moments).
//! - [`blas`], [`conv`], [`caps`], [`loss`]: the kernels: sgemm split over rayon, im2col/col2im,
//!   squash, `u_hat`, dynamic routing, margin and reconstruction losses, each with its backward.
//! - [`model`]: [`CapsNet`], the whole forward/backward pass over a reusable [`Workspace`].
//! - [`layers`], [`cnn`]: the paper's CNN baseline ([`CnnBaseline`], [`CnnConfig`]): padded
//!   convolutions, max pooling, fully connected layers, dropout and softmax cross-entropy.
//! - [`optim`]: Adam with an exponential or cosine learning-rate schedule.
//! - [`simd`]: a hot loop compiled for AVX2 as well, picked at run time.
//! - [`data`]: IDX files, epochs, batches and the paper's shift augmentation.
//! - [`checkpoint`]: safetensors checkpoints (atomic writes, keep last N).
//! - [`run`]: one run's lifecycle (fresh start or resume, config.json, metrics, checkpoints),
//!   shared by the trainer and the coordinator.
//! - [`train`]: the single-process trainer behind `capsnet train` and `capsnet eval`.
//! - [`bench`]: the training/inference throughput benchmark behind `capsnet bench train`.
//!
//! `capsnet-core` knows nothing of networking; the worker and the coordinator build on it (the
//! protocol crate does not: it needs only `capsnet-config`).

pub mod bench;
pub mod blas;
pub mod canvas;
pub mod caps;
pub mod checkpoint;
pub mod cnn;
pub mod config;
pub mod conv;
pub mod data;
pub mod error;
pub mod inspect;
pub mod layers;
pub mod loss;
pub mod model;
pub mod multi;
pub mod net;
pub mod optim;
pub mod params;
pub mod rng;
pub mod run;
pub mod simd;
pub mod train;

pub use cnn::{CnnBaseline, CnnTimings, CnnWorkspace};
pub use config::{CapsNetConfig, CnnConfig};
pub use error::{CoreError, Result};
pub use model::{BatchStats, CapsNet, GradReady, Mask, PassOptions, Workspace};
pub use params::{ParamLayout, ParamSpec, Params};
