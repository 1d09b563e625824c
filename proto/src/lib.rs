//! capsnet-proto: the `capsnet.v1` gRPC protocol.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/capsnet/v1/capsnet.proto` by `build.rs` (never edited).
//! - [`wire`]: tensors as streams of chunks: f32/bf16 encoding, CRC-32 checksums, and an
//!   [`wire::Assembler`] that checks and decodes a stream as it arrives.
//! - [`metrics_http`]: the `/metrics` responder of `--metrics-listen`.
//! - [`RunSettings`]: the run configuration a worker receives, converted from its message with
//!   `TryFrom` (conversions live here, at the edge). The config types come from
//!   `capsnet-config`, so speaking the protocol needs no BLAS.
#![forbid(unsafe_code)]

use capsnet_config::{AdamConfig, CapsNetConfig, CnnConfig, LrSchedule, ParamLayout};

pub mod frame;
pub mod metrics_http;
pub mod shared;
pub mod unix;
pub mod wire;

/// Generated protocol code.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("capsnet.v1");
}

pub use pb::{Encoding, SyncMode, WorkerState};

/// Limits a worker puts on the run config a coordinator sends, so that a broken or hostile
/// coordinator cannot make it allocate without bound (the model's own sizes are bounded by
/// [`CapsNetConfig::validate`]).
pub const MAX_BATCH: u64 = 1 << 16;
pub const MAX_SYNC_EVERY: u64 = 1 << 20;
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;
pub const MAX_TRAIN_LEN: u64 = 1 << 32;
/// 4 GiB of f32 for the prediction vectors of one batch.
pub const MAX_BATCH_VOTES: u64 = 1 << 30;

/// A bearer token. Its `Debug` shows no secret, so the configs that hold one can be printed
/// and logged whole.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into())
    }

    /// The secret itself, for the one place that sends or compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<redacted>)")
    }
}

impl From<String> for Token {
    fn from(s: String) -> Self {
        Token(s)
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Token(s.to_string())
    }
}

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

/// The hash a run's config and updates carry: [`layout_hash`], and for a sharded run also
/// that its grid is striped ([`wire::stripe_order`]). A process that does not lay the chunks
/// out the same way (an older build) then refuses the run config instead of reading every
/// chunk at the wrong place.
pub fn run_layout_hash(layout: &ParamLayout, sharded: bool) -> u64 {
    let h = layout_hash(layout);
    if sharded {
        (h ^ 0x7374_7269_7065_6431).wrapping_mul(0x0000_0100_0000_01B3) // "striped1"
    } else {
        h
    }
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
    /// Training images go at random places on a canvas of this side (`--canvas`).
    pub canvas: Option<usize>,
    /// The CNN baseline, trained instead of the capsule network of `model`.
    pub baseline: Option<CnnConfig>,
    /// Training samples are overlapping pairs shifted by up to this many pixels (`--multi`).
    pub multi: Option<usize>,
    /// Reducers own the grid's spans: work orders come from GetWork, parameters and updates
    /// move to and from each span's owner.
    pub sharded: bool,
    /// Grad mode: new parameters may be pulled as their change from the last round's
    /// ([`wire::delta_encode`]).
    pub delta_pulls: bool,
}

impl RunSettings {
    pub fn layout(&self) -> ParamLayout {
        match &self.baseline {
            Some(b) => ParamLayout::for_cnn(b),
            None => ParamLayout::for_config(&self.model),
        }
    }

    /// The run's chunk grid: every parameter and update stream is cut into these ranges. One
    /// coordinator's run cuts the flat vector in order; a sharded run lays the same chunks out
    /// in [`wire::stripe_order`] (a reducer's span holds a share of every layer), and
    /// [`Self::placement`] says where each chunk's floats lie in the flat vector.
    pub fn grid(&self) -> wire::Grid {
        self.grids().0
    }

    /// For each chunk of [`Self::grid`], the floats of the model's flat vector it holds (the
    /// grid itself, unless the run is sharded).
    pub fn placement(&self) -> wire::Grid {
        self.grids().1
    }

    /// [`Self::grid`] and [`Self::placement`].
    pub fn grids(&self) -> (wire::Grid, wire::Grid) {
        let natural = wire::Assembler::grid(self.layout().total(), self.wire, self.chunk_bytes);
        if self.sharded {
            wire::reorder(&natural, &wire::stripe_order(natural.len()))
        } else {
            (natural.clone(), natural)
        }
    }

    pub fn to_message(&self) -> Result<pb::RunConfig> {
        let layout = self.layout();
        Ok(pb::RunConfig {
            model: Some(pb::ModelConfig::try_from(&self.model)?),
            adam: Some(pb::AdamConfig::from(&self.adam)),
            batch_size: narrow("batch size", self.batch_size)?,
            seed: self.seed,
            sync_mode: self.sync_mode as i32,
            sync_every: narrow("sync_every", self.sync_every)?,
            max_shift: narrow("max shift", self.max_shift)?,
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
            chunk_bytes: narrow("chunk bytes", self.chunk_bytes)?,
            heartbeat_ms: narrow("heartbeat (ms)", self.heartbeat_ms)?,
            train_len: self.train_len,
            train_limit: self.train_limit,
            canvas: self.canvas.map(|c| narrow("canvas", c)).transpose()?,
            multi: self.multi.map(|c| narrow("pair shift", c)).transpose()?,
            baseline: self
                .baseline
                .as_ref()
                .map(pb::CnnConfig::try_from)
                .transpose()?,
            sharded: self.sharded,
            delta_pulls: self.delta_pulls,
        })
    }
}

/// A config value as the `uint32` of its field, refused (not wrapped) when it does not fit.
fn narrow<T: Copy + std::fmt::Display + TryInto<u32>>(what: &str, v: T) -> Result<u32> {
    v.try_into()
        .map_err(|_| ProtoError::Invalid(format!("run config: {what} {v} does not fit in 32 bits")))
}

impl TryFrom<&CapsNetConfig> for pb::ModelConfig {
    type Error = ProtoError;

    fn try_from(c: &CapsNetConfig) -> Result<Self> {
        Ok(pb::ModelConfig {
            image_size: narrow("image_size", c.image_size)?,
            in_channels: narrow("in_channels", c.in_channels)?,
            conv1_channels: narrow("conv1_channels", c.conv1_channels)?,
            conv1_kernel: narrow("conv1_kernel", c.conv1_kernel)?,
            primary_types: narrow("primary_types", c.primary_types)?,
            primary_dim: narrow("primary_dim", c.primary_dim)?,
            primary_kernel: narrow("primary_kernel", c.primary_kernel)?,
            primary_stride: narrow("primary_stride", c.primary_stride)?,
            classes: narrow("classes", c.classes)?,
            digit_dim: narrow("digit_dim", c.digit_dim)?,
            routing_iters: narrow("routing_iters", c.routing_iters)?,
            decoder_hidden: c
                .decoder_hidden
                .iter()
                .map(|&h| narrow("decoder_hidden", h))
                .collect::<Result<_>>()?,
            recon_weight: c.recon_weight,
            m_pos: c.m_pos,
            m_neg: c.m_neg,
            lambda_neg: c.lambda_neg,
            squash_eps: c.squash_eps,
        })
    }
}

impl TryFrom<&CnnConfig> for pb::CnnConfig {
    type Error = ProtoError;

    fn try_from(c: &CnnConfig) -> Result<Self> {
        let all = |what: &str, v: &[usize]| -> Result<Vec<u32>> {
            v.iter().map(|&x| narrow(what, x)).collect()
        };
        Ok(pb::CnnConfig {
            image_size: narrow("image_size", c.image_size)?,
            in_channels: narrow("in_channels", c.in_channels)?,
            conv_channels: all("conv_channels", &c.conv_channels)?,
            kernel: narrow("kernel", c.kernel)?,
            pool_after: c.pool_after.clone(),
            fc_hidden: all("fc_hidden", &c.fc_hidden)?,
            classes: narrow("classes", c.classes)?,
            dropout: c.dropout,
        })
    }
}

impl TryFrom<pb::CnnConfig> for CnnConfig {
    type Error = ProtoError;

    /// Every size widened to `usize`, then the whole config checked.
    fn try_from(m: pb::CnnConfig) -> Result<Self> {
        if m.conv_channels.len() > capsnet_config::cnn::MAX_LAYERS
            || m.fc_hidden.len() > capsnet_config::cnn::MAX_LAYERS
        {
            return Err(ProtoError::Invalid(
                "run config: baseline: too many layers".into(),
            ));
        }
        let c = CnnConfig {
            image_size: m.image_size as usize,
            in_channels: m.in_channels as usize,
            conv_channels: m.conv_channels.iter().map(|&x| x as usize).collect(),
            kernel: m.kernel as usize,
            pool_after: m.pool_after,
            fc_hidden: m.fc_hidden.iter().map(|&x| x as usize).collect(),
            classes: m.classes as usize,
            dropout: m.dropout,
        };
        c.validate()
            .map_err(|e| ProtoError::Invalid(format!("run config: baseline: {e}")))?;
        Ok(c)
    }
}

/// Floats of activations per image the CNN keeps for its backward pass (convolutions' outputs).
fn cnn_activations(c: &CnnConfig) -> u64 {
    let sides = c.sides();
    c.conv_channels
        .iter()
        .enumerate()
        .map(|(l, &cout)| (cout * sides[l] * sides[l]) as u64)
        .sum()
}

impl TryFrom<pb::ModelConfig> for CapsNetConfig {
    type Error = ProtoError;

    /// Every size widened to `usize`, then the whole config checked.
    fn try_from(m: pb::ModelConfig) -> Result<Self> {
        let c = caps_config_unchecked(m);
        c.validate()
            .map_err(|e| ProtoError::Invalid(format!("run config: model: {e}")))?;
        Ok(c)
    }
}

/// The capsule config of a message, sizes widened to `usize`, not checked: a CNN run uses only
/// its input side and classes, which may be too small for the capsule network's convolutions.
fn caps_config_unchecked(m: pb::ModelConfig) -> CapsNetConfig {
    CapsNetConfig {
        image_size: m.image_size as usize,
        in_channels: m.in_channels as usize,
        conv1_channels: m.conv1_channels as usize,
        conv1_kernel: m.conv1_kernel as usize,
        primary_types: m.primary_types as usize,
        primary_dim: m.primary_dim as usize,
        primary_kernel: m.primary_kernel as usize,
        primary_stride: m.primary_stride as usize,
        classes: m.classes as usize,
        digit_dim: m.digit_dim as usize,
        routing_iters: m.routing_iters as usize,
        decoder_hidden: m.decoder_hidden.iter().map(|&h| h as usize).collect(),
        recon_weight: m.recon_weight,
        m_pos: m.m_pos,
        m_neg: m.m_neg,
        lambda_neg: m.lambda_neg,
        squash_eps: m.squash_eps,
    }
}

impl From<&AdamConfig> for pb::AdamConfig {
    fn from(a: &AdamConfig) -> Self {
        pb::AdamConfig {
            lr: a.lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            schedule: match a.schedule {
                LrSchedule::Exponential => pb::LrSchedule::Exponential,
                LrSchedule::Cosine => pb::LrSchedule::Cosine,
            } as i32,
            decay_rate: a.decay_rate,
            decay_steps: a.decay_steps,
        }
    }
}

impl TryFrom<pb::AdamConfig> for AdamConfig {
    type Error = ProtoError;

    fn try_from(m: pb::AdamConfig) -> Result<Self> {
        let schedule = match pb::LrSchedule::try_from(m.schedule) {
            Ok(pb::LrSchedule::Exponential) => LrSchedule::Exponential,
            Ok(pb::LrSchedule::Cosine) => LrSchedule::Cosine,
            _ => {
                return Err(ProtoError::Invalid(format!(
                    "run config: adam: unknown learning-rate schedule {}",
                    m.schedule
                )));
            }
        };
        let a = AdamConfig {
            lr: m.lr,
            beta1: m.beta1,
            beta2: m.beta2,
            eps: m.eps,
            schedule,
            decay_rate: m.decay_rate,
            decay_steps: m.decay_steps,
        };
        a.validate()
            .map_err(|e| ProtoError::Invalid(format!("run config: adam: {e}")))?;
        Ok(a)
    }
}

impl TryFrom<pb::RunConfig> for RunSettings {
    type Error = ProtoError;

    /// Checks that the config describes a valid network whose layout matches the tensors and
    /// hash the coordinator sent.
    fn try_from(m: pb::RunConfig) -> Result<Self> {
        let bad = |s: String| ProtoError::Invalid(s);
        let model = m
            .model
            .ok_or_else(|| bad("run config: no model config".into()))?;
        let adam = AdamConfig::try_from(
            m.adam
                .ok_or_else(|| bad("run config: no Adam config".into()))?,
        )?;
        let baseline = m.baseline.map(CnnConfig::try_from).transpose()?;
        // The capsule config is the network only without a baseline.
        let model = match &baseline {
            Some(_) => caps_config_unchecked(model),
            None => CapsNetConfig::try_from(model)?,
        };
        if let Some(b) = &baseline
            && (b.image_size, b.classes) != (model.image_size, model.classes)
        {
            return Err(bad(
                "run config: the CNN baseline's input size or classes differ from the run's".into(),
            ));
        }
        let layout = match &baseline {
            Some(b) => ParamLayout::for_cnn(b),
            None => ParamLayout::for_config(&model),
        };
        let hash = run_layout_hash(&layout, m.sharded);
        if hash != m.layout_hash
            || layout.total() as u64 != m.num_floats
            || layout.specs().len() != m.tensors.len()
        {
            return Err(bad(
                "run config: the tensor layout or the grid's order does not match the model \
                 config (is the peer a build of another version?)"
                    .into(),
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
        // Upper bounds on what a worker allocates or waits for on the coordinator's word.
        let votes = match &baseline {
            Some(b) => cnn_activations(b),
            None => (model.num_primary() * model.classes * model.digit_dim) as u64,
        };
        for (name, v, max) in [
            ("batch size", u64::from(m.batch_size), MAX_BATCH),
            ("sync_every", u64::from(m.sync_every), MAX_SYNC_EVERY),
            ("chunk size", u64::from(m.chunk_bytes), MAX_CHUNK_BYTES),
            ("max shift", u64::from(m.max_shift), model.image_size as u64),
            ("training images", m.train_len, MAX_TRAIN_LEN),
            (
                if baseline.is_some() {
                    "floats of a batch's activations"
                } else {
                    "floats of a batch's prediction vectors"
                },
                u64::from(m.batch_size) * votes,
                MAX_BATCH_VOTES,
            ),
        ] {
            if v > max {
                return Err(bad(format!(
                    "run config: {name} {v} is over the limit of {max}"
                )));
            }
        }
        if let Some(c) = m.canvas
            && c as usize != model.image_size
        {
            return Err(bad(format!(
                "run config: a {c}x{c} canvas for a model of {}x{} inputs",
                model.image_size, model.image_size
            )));
        }
        if let Some(shift) = m.multi {
            if m.canvas.is_some() || m.max_shift != 0 {
                return Err(bad(
                    "run config: overlapping pairs with a canvas or a shift augmentation".into(),
                ));
            }
            if u64::from(shift) * 2 >= model.image_size as u64 || model.classes < 2 {
                return Err(bad(format!(
                    "run config: pairs shifted by {shift} for a model of {0}x{0} inputs and {1} \
                     classes",
                    model.image_size, model.classes
                )));
            }
        }
        if m.heartbeat_ms < 10 {
            return Err(bad(format!(
                "run config: a heartbeat every {} ms is too often",
                m.heartbeat_ms
            )));
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
            canvas: m.canvas.map(|c| c as usize),
            baseline,
            multi: m.multi.map(|c| c as usize),
            sharded: m.sharded,
            delta_pulls: m.delta_pulls,
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
            canvas: Some(12),
            baseline: None,
            multi: None,
            sharded: false,
            delta_pulls: true,
        }
    }

    #[test]
    fn run_config_round_trips_and_rejects_tampering() {
        let s = settings();
        let m = s.to_message().unwrap();
        assert_eq!(RunSettings::try_from(m.clone()).unwrap(), s);
        let pairs = RunSettings {
            canvas: None,
            max_shift: 0,
            multi: Some(2),
            ..settings()
        };
        let pm = pairs.to_message().unwrap();
        assert_eq!(pm.multi, Some(2));
        assert_eq!(RunSettings::try_from(pm).unwrap(), pairs);
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
        // A sharded run's hash says its grid is striped: a config of the unstriped kind (an
        // older build's) for a sharded run is refused, and so is the other way round.
        let layout = ParamLayout::for_config(&CapsNetConfig::tiny());
        let sharded = RunSettings {
            sharded: true,
            layout_hash: run_layout_hash(&layout, true),
            ..settings()
        };
        assert_ne!(sharded.layout_hash, layout_hash(&layout));
        let sm = sharded.to_message().unwrap();
        assert_eq!(RunSettings::try_from(sm.clone()).unwrap(), sharded);
        let mut old = sm.clone();
        old.layout_hash = layout_hash(&layout);
        let e = RunSettings::try_from(old).unwrap_err().to_string();
        assert!(e.contains("grid's order"), "{e}");
        let mut unsharded = sm;
        unsharded.sharded = false;
        assert!(RunSettings::try_from(unsharded).is_err());
        let mut bad = m.clone();
        bad.model.as_mut().unwrap().routing_iters = 0;
        assert!(
            RunSettings::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("routing_iters")
        );
        let mut bad = m.clone();
        bad.adam.as_mut().unwrap().schedule = 7;
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("schedule 7"), "{e}");
        let mut bad = m.clone();
        bad.adam.as_mut().unwrap().lr = -1.0;
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("adam") && e.contains("lr"), "{e}");
        let mut bad = m;
        bad.model = None;
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("no model config"), "{e}");
    }

    /// A CNN run's config travels typed; its layout is the CNN's, and a baseline whose input
    /// or classes differ from the run's, or whose sizes are absurd, is refused.
    #[test]
    fn a_cnn_baseline_run_config_round_trips_and_is_checked() {
        let mut s = settings();
        let cnn = CnnConfig {
            image_size: 12,
            ..CnnConfig::tiny()
        };
        s.layout_hash = layout_hash(&ParamLayout::for_cnn(&cnn));
        s.baseline = Some(cnn);
        let m = s.to_message().unwrap();
        assert!(m.tensors.iter().any(|t| t.name == "fc.2.weight"));
        assert_eq!(RunSettings::try_from(m.clone()).unwrap(), s);
        // Images too small for the capsule network's convolutions are fine for the CNN.
        let mut small = settings();
        let cnn4 = CnnConfig {
            image_size: 4,
            ..CnnConfig::tiny()
        };
        (small.model.image_size, small.canvas, small.max_shift) = (4, Some(4), 0);
        assert!(small.model.validate().is_err());
        small.layout_hash = layout_hash(&ParamLayout::for_cnn(&cnn4));
        small.baseline = Some(cnn4);
        let sm = small.to_message().unwrap();
        assert_eq!(RunSettings::try_from(sm).unwrap(), small);
        // A batch whose activations would take over 4 GiB (256 x 12 x 12 floats of conv.0
        // alone per image, 65,536 images) is refused by name, its layout being consistent.
        let mut wide = settings();
        let cnn_wide = CnnConfig {
            image_size: 12,
            conv_channels: vec![256, 4, 3],
            ..CnnConfig::tiny()
        };
        wide.layout_hash = layout_hash(&ParamLayout::for_cnn(&cnn_wide));
        wide.baseline = Some(cnn_wide);
        let mut wm = wide.to_message().unwrap();
        assert!(RunSettings::try_from(wm.clone()).is_ok());
        wm.batch_size = 1 << 16;
        let e = RunSettings::try_from(wm).unwrap_err().to_string();
        assert!(e.contains("floats of a batch's activations"), "{e}");
        let mut bad = m.clone();
        bad.baseline.as_mut().unwrap().classes = 4;
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("baseline") || e.contains("layout"), "{e}");
        let mut bad = m.clone();
        bad.baseline.as_mut().unwrap().conv_channels = vec![1; 1000];
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("too many layers"), "{e}");
        let mut bad = m;
        bad.batch_size = 1 << 20;
        bad.baseline.as_mut().unwrap().conv_channels = vec![4096, 4, 3];
        let e = RunSettings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("layout") || e.contains("activations"), "{e}");
    }

    /// A coordinator that asks for absurd sizes gets a clear refusal, not an allocation that
    /// kills the worker (or arithmetic that overflows).
    #[test]
    fn absurd_sizes_from_the_coordinator_are_refused() {
        let m = settings().to_message().unwrap();
        let refuse = |f: &dyn Fn(&mut pb::RunConfig), want: &str| {
            let mut bad = m.clone();
            f(&mut bad);
            let e = RunSettings::try_from(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        };
        refuse(&|b| b.batch_size = u32::MAX, "batch size 4294967295");
        refuse(&|b| b.sync_every = u32::MAX, "sync_every");
        refuse(&|b| b.chunk_bytes = u32::MAX, "chunk size");
        refuse(&|b| b.max_shift = 1000, "max shift");
        refuse(&|b| b.canvas = Some(1000), "canvas");
        refuse(&|b| b.multi = Some(2), "overlapping pairs with a canvas");
        refuse(
            &|b| {
                (b.canvas, b.max_shift, b.multi) = (None, 0, Some(6));
            },
            "pairs shifted by 6",
        );
        refuse(&|b| b.train_len = u64::MAX, "training images");
        refuse(&|b| b.heartbeat_ms = 0, "heartbeat");
        // Model sizes that would overflow the layout arithmetic or ask for terabytes.
        refuse(
            &|b| b.model.as_mut().unwrap().image_size = u32::MAX,
            "image_size",
        );
        refuse(
            &|b| b.model.as_mut().unwrap().decoder_hidden = vec![65537; 3],
            "decoder_hidden",
        );
        refuse(
            &|b| {
                let md = b.model.as_mut().unwrap();
                md.conv1_channels = 4096;
                md.primary_types = 4096;
            },
            "parameters",
        );
        refuse(
            &|b| b.model.as_mut().unwrap().routing_iters = 1 << 20,
            "routing_iters",
        );
    }

    #[test]
    fn sizes_that_do_not_fit_the_wire_are_refused_not_wrapped() {
        let big = RunSettings {
            batch_size: 1 << 33,
            ..settings()
        };
        let e = big.to_message().unwrap_err().to_string();
        assert!(e.contains("batch size 8589934592"), "{e}");
        let mut model = CapsNetConfig::tiny();
        model.decoder_hidden[0] = 1 << 32;
        let e = pb::ModelConfig::try_from(&model).unwrap_err().to_string();
        assert!(e.contains("decoder_hidden"), "{e}");
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
