//! capsnet-config: what a run is made of, without the math: the network's sizes, Adam's
//! hyper-parameters and the tensor layout. `capsnet-core` computes with them; `capsnet-proto`
//! sends them; neither drags BLAS into a program that only speaks the protocol.
//!
//! # Layout
//! - [`model`]: [`CapsNetConfig`], every size of the network (defaults = the paper), its FLOPs.
//! - [`cnn`]: [`CnnConfig`], the paper's CNN baseline (with max pooling), its FLOPs.
//! - [`adam`]: [`AdamConfig`] and the learning-rate schedule.
//! - [`layout`]: [`ParamLayout`], the named tensors in one flat vector.
#![forbid(unsafe_code)]

pub mod adam;
pub mod cnn;
pub mod layout;
pub mod model;

pub use adam::{AdamConfig, LrSchedule};
pub use cnn::CnnConfig;
pub use layout::{ParamLayout, ParamSpec};
pub use model::CapsNetConfig;

/// A configuration value out of range, named in the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;
