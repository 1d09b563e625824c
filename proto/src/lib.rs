//! capsnet-proto: the `capsnet.v1` gRPC protocol.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/capsnet/v1/capsnet.proto` by `build.rs` (never edited).
//! - [`wire`]: tensors as streams of chunks: f32/bf16 encoding, CRC-32 checksums, and an
//!   [`wire::Assembler`] that checks and decodes a stream as it arrives.
//! - [`RunSettings`]: the run configuration a worker receives, converted from its message with
//!   `TryFrom` (conversions live here, at the edge).
#![forbid(unsafe_code)]

use capsnet_core::optim::AdamConfig;
use capsnet_core::{CapsNetConfig, ParamLayout};

pub mod frame;
pub mod wire;

/// Generated protocol code.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("capsnet.v1");
}

pub use pb::{Encoding, SyncMode, WorkerState};

/// What can be wrong with a message or a tensor stream.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("{0}")]
    Invalid(String),
    #[error("chunk at offset {offset}: {reason}")]
    Chunk { offset: u64, reason: String },
    #[error("checksum mismatch {what}: sent {sent:08x}, received data hashes to {got:08x}")]
    Checksum { what: String, sent: u32, got: u32 },
    #[error("tensor has {got} floats, the model has {expected}")]
    Size { expected: u64, got: u64 },
}

pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// FNV-1a over the names, shapes and offsets of a layout: two processes agree on it exactly
/// when their tensors are named, shaped and ordered alike.
pub fn layout_hash(layout: &ParamLayout) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    };
    for s in layout.specs() {
        eat(s.name.as_bytes());
        eat(&[0]);
        for d in &s.shape {
            eat(&(*d as u64).to_le_bytes());
        }
        eat(&(s.offset as u64).to_le_bytes());
    }
    h
}

/// The positions in the epoch's permutation of `epoch_len` samples that a work order covers.
/// An order that starts after its end or past the epoch is refused, never sliced.
pub fn work_range(order: &pb::WorkOrder, epoch_len: usize) -> Result<std::ops::Range<usize>> {
    let (start, end) = (order.start, order.end.min(epoch_len as u64));
    if order.start > order.end || start >= end {
        return Err(ProtoError::Invalid(format!(
            "work order of round {} covers samples {}..{} of an epoch of {epoch_len}",
            order.round, order.start, order.end
        )));
    }
    // Both are at most `epoch_len`, a usize.
    Ok(start as usize..end as usize)
}

/// The run configuration as the worker uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    pub model: CapsNetConfig,
    pub adam: AdamConfig,
    pub batch_size: usize,
    pub seed: u64,
    pub sync_mode: SyncMode,
    pub sync_every: usize,
    pub max_shift: usize,
    pub layout_hash: u64,
    pub wire: Encoding,
    pub chunk_bytes: usize,
    pub heartbeat_ms: u64,
    pub train_len: u64,
    /// The run uses only the first N training images.
    pub train_limit: Option<u64>,
}

impl RunSettings {
    pub fn layout(&self) -> ParamLayout {
        ParamLayout::for_config(&self.model)
    }

    pub fn to_message(&self) -> Result<pb::RunConfig> {
        let layout = self.layout();
        let json = |v: &dyn Fn() -> serde_json::Result<String>| {
            v().map_err(|e| ProtoError::Invalid(e.to_string()))
        };
        Ok(pb::RunConfig {
            model_json: json(&|| serde_json::to_string(&self.model))?,
            adam_json: json(&|| serde_json::to_string(&self.adam))?,
            batch_size: self.batch_size as u32,
            seed: self.seed,
            sync_mode: self.sync_mode as i32,
            sync_every: self.sync_every as u32,
            max_shift: self.max_shift as u32,
            num_floats: layout.total() as u64,
            tensors: layout
                .specs()
                .iter()
                .map(|s| pb::TensorSpec {
                    name: s.name.clone(),
                    shape: s.shape.iter().map(|&d| d as u64).collect(),
                    offset: s.offset as u64,
                })
                .collect(),
            layout_hash: self.layout_hash,
            wire: self.wire as i32,
            chunk_bytes: self.chunk_bytes as u32,
            heartbeat_ms: self.heartbeat_ms as u32,
            train_len: self.train_len,
            train_limit: self.train_limit,
        })
    }
}

impl TryFrom<pb::RunConfig> for RunSettings {
    type Error = ProtoError;

    /// Checks that the config describes a valid network whose layout matches the tensors and
    /// hash the coordinator sent.
    fn try_from(m: pb::RunConfig) -> Result<Self> {
        let bad = |s: String| ProtoError::Invalid(s);
        let model: CapsNetConfig = serde_json::from_str(&m.model_json)
            .map_err(|e| bad(format!("run config: model: {e}")))?;
        model
            .validate()
            .map_err(|e| bad(format!("run config: {e}")))?;
        let adam: AdamConfig = serde_json::from_str(&m.adam_json)
            .map_err(|e| bad(format!("run config: adam: {e}")))?;
        let layout = ParamLayout::for_config(&model);
        let hash = layout_hash(&layout);
        if hash != m.layout_hash
            || layout.total() as u64 != m.num_floats
            || layout.specs().len() != m.tensors.len()
        {
            return Err(bad(
                "run config: the tensor layout does not match the model config".into(),
            ));
        }
        for (s, t) in layout.specs().iter().zip(&m.tensors) {
            let shape: Vec<u64> = s.shape.iter().map(|&d| d as u64).collect();
            if s.name != t.name || shape != t.shape || s.offset as u64 != t.offset {
                return Err(bad(format!(
                    "run config: tensor {} does not match the model config",
                    t.name
                )));
            }
        }
        let sync_mode = SyncMode::try_from(m.sync_mode)
            .map_err(|_| bad(format!("unknown sync mode {}", m.sync_mode)))?;
        if sync_mode == SyncMode::Unspecified {
            return Err(bad("run config: sync mode unspecified".into()));
        }
        let wire =
            Encoding::try_from(m.wire).map_err(|_| bad(format!("unknown encoding {}", m.wire)))?;
        if m.batch_size == 0 || m.sync_every == 0 || m.chunk_bytes < 8 {
            return Err(bad(
                "run config: batch size, sync_every and chunk size must be positive".into(),
            ));
        }
        Ok(RunSettings {
            model,
            adam,
            batch_size: m.batch_size as usize,
            seed: m.seed,
            sync_mode,
            sync_every: m.sync_every as usize,
            max_shift: m.max_shift as usize,
            layout_hash: hash,
            wire,
            chunk_bytes: m.chunk_bytes as usize,
            heartbeat_ms: u64::from(m.heartbeat_ms),
            train_len: m.train_len,
            train_limit: m.train_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RunSettings {
        let model = CapsNetConfig::tiny();
        RunSettings {
            layout_hash: layout_hash(&ParamLayout::for_config(&model)),
            model,
            adam: AdamConfig::default(),
            batch_size: 8,
            seed: 1,
            sync_mode: SyncMode::Grad,
            sync_every: 1,
            max_shift: 2,
            wire: Encoding::Bf16,
            chunk_bytes: 1 << 20,
            heartbeat_ms: 500,
            train_len: 100,
            train_limit: Some(100),
        }
    }

    #[test]
    fn run_config_round_trips_and_rejects_tampering() {
        let s = settings();
        let m = s.to_message().unwrap();
        assert_eq!(RunSettings::try_from(m.clone()).unwrap(), s);
        let mut bad = m.clone();
        bad.tensors[2].name = "primary.kernel".into();
        assert!(
            RunSettings::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("primary.kernel")
        );
        let mut bad = m.clone();
        bad.layout_hash ^= 1;
        assert!(RunSettings::try_from(bad).is_err());
        let mut bad = m;
        bad.model_json = "{\"routing_iters\": 0}".into();
        assert!(
            RunSettings::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("routing_iters")
        );
    }

    #[test]
    fn work_range_refuses_orders_outside_the_epoch() {
        let order = |start, end| pb::WorkOrder {
            round: 3,
            start,
            end,
            participate: true,
            ..Default::default()
        };
        assert_eq!(work_range(&order(4, 8), 10).unwrap(), 4..8);
        assert_eq!(work_range(&order(4, 80), 10).unwrap(), 4..10);
        for (start, end) in [(8, 4), (10, 12), (5, 5), (u64::MAX, 3)] {
            let e = work_range(&order(start, end), 10).unwrap_err().to_string();
            assert!(e.contains(&format!("{start}..{end}")), "{e}");
        }
    }

    #[test]
    fn layout_hash_sees_names_and_shapes() {
        let a = layout_hash(&ParamLayout::for_config(&CapsNetConfig::tiny()));
        let b = layout_hash(&ParamLayout::for_config(&CapsNetConfig {
            digit_dim: 6,
            ..CapsNetConfig::tiny()
        }));
        assert_ne!(a, b);
    }
}
