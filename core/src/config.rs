//! Network configuration (from `capsnet-config`, which the protocol shares without BLAS).

pub use capsnet_config::cnn::CnnConfig;
pub use capsnet_config::model::{CapsNetConfig, LayerFlops};
