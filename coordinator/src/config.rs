//! The coordinator's configuration.

use std::path::PathBuf;
use std::time::Duration;

use capsnet_core::train::TrainConfig;
use capsnet_proto::{Encoding, SyncMode, Token};

use crate::error::{CoordinatorError, Result};

/// Certificate files for TLS; with `client_ca`, clients must present a certificate it signed.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Model, optimizer, data, run dir, per-worker batch size, epochs, seed, checkpoints.
    pub train: TrainConfig,
    pub sync_mode: SyncMode,
    /// Local steps per round in params mode.
    pub sync_every: usize,
    /// A round closes at this deadline with at least `min_workers` updates.
    pub round_timeout: Duration,
    pub min_workers: usize,
    /// Training starts when this many workers joined (or `start_timeout` passed with at least
    /// `min_workers`).
    pub expect_workers: usize,
    pub start_timeout: Duration,
    /// Evaluate (and checkpoint) every this many rounds; 0: at the end of each epoch only.
    pub eval_every: u64,
    pub heartbeat: Duration,
    pub wire: Encoding,
    pub chunk_bytes: usize,
    /// Redacted in `Debug`.
    pub token: Token,
    pub tls: Option<TlsFiles>,
    pub resume: bool,
    /// Stop serving once training is finished (and workers had time to hear it); otherwise
    /// serve until the shutdown future resolves.
    pub exit_when_done: bool,
    /// Give stragglers no work (but every 10th round, to measure them again).
    pub drop_stragglers: bool,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Scale an update whose norm is far beyond the recent ones down to the limit, instead of
    /// rejecting it.
    pub clip_updates: bool,
    /// Open connections at once, and from one IP address; more are closed when accepted.
    pub max_connections: usize,
    /// Bytes each accepted TCP connection buffers each way (0: the kernel's autotuning;
    /// [`crate::conn::set_socket_buffers`]).
    pub socket_buffer: usize,
    pub max_connections_per_ip: usize,
    /// Workers the registry holds (live, or gone and not yet forgotten).
    pub max_workers: usize,
    /// `--sync params` only: treat each round's averaged change as a pseudo-gradient for
    /// Nesterov momentum (DiLoCo) instead of taking the average as the new parameters.
    pub outer: Option<OuterOptimizer>,
    /// A pull not read, or a push without its next chunk, for this long is dropped.
    pub stall_timeout: Duration,
    /// Reducer processes that own spans of the grid (0: this process reduces everything).
    pub reducers: usize,
    /// With reducers: gather the state from them at least this often (besides each evaluation
    /// and checkpoint), since a reducer that dies rolls the run back to the last gather;
    /// zero gathers only for evaluations and checkpoints.
    pub gather_every: Duration,
    /// Grad mode: also encode new parameters as their change from the last round's, which
    /// workers that hold those pull instead (lossless; fewer bytes, more CPU).
    pub delta_pulls: bool,
}

/// The outer optimizer of `--sync params` (DiLoCo, Douillard et al. 2023): Nesterov momentum
/// on the pseudo-gradient `params - average`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterOptimizer {
    pub lr: f32,
    pub momentum: f32,
}

impl CoordinatorConfig {
    pub fn new(train: TrainConfig, token: impl Into<Token>) -> Self {
        CoordinatorConfig {
            train,
            sync_mode: SyncMode::Grad,
            sync_every: 1,
            round_timeout: Duration::from_secs(60),
            min_workers: 1,
            expect_workers: 1,
            start_timeout: Duration::from_secs(30),
            eval_every: 0,
            heartbeat: Duration::from_millis(1000),
            wire: Encoding::F32,
            chunk_bytes: capsnet_proto::wire::DEFAULT_CHUNK_BYTES,
            token: token.into(),
            tls: None,
            resume: false,
            exit_when_done: true,
            drop_stragglers: false,
            metrics_listen: None,
            clip_updates: false,
            max_connections: 1024,
            max_connections_per_ip: 64,
            socket_buffer: 0,
            delta_pulls: false,
            max_workers: 4096,
            outer: None,
            stall_timeout: Duration::from_secs(30),
            reducers: 0,
            gather_every: Duration::from_secs(60),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        let bad = |m: &str| Err(CoordinatorError::Config(m.into()));
        if self.sync_mode == SyncMode::Unspecified {
            return bad("sync mode must be grad or params");
        }
        if self.sync_every == 0 {
            return bad("sync-every must be at least 1");
        }
        if self.sync_mode == SyncMode::Grad && self.sync_every != 1 {
            return bad("sync-every applies to --sync params only");
        }
        if self.min_workers == 0 {
            return bad("min-workers must be at least 1");
        }
        if self.expect_workers < self.min_workers {
            return bad("expect-workers must be at least min-workers");
        }
        if self.round_timeout.is_zero() || self.heartbeat.is_zero() {
            return bad("round timeout and heartbeat interval must be positive");
        }
        crate::conn::check_socket_buffer(self.socket_buffer).map_err(CoordinatorError::Config)?;
        if self.chunk_bytes < 1024 || self.chunk_bytes > 4 << 20 {
            return bad("chunk size must be between 1 KiB and 4 MiB");
        }
        // These travel to workers as uint32 fields of the run config.
        let wire_u32 = [
            ("batch size", self.train.batch_size as u128),
            ("sync-every", self.sync_every as u128),
            ("max shift", self.train.max_shift as u128),
            ("heartbeat (ms)", self.heartbeat.as_millis()),
        ];
        if let Some((name, _)) = wire_u32.iter().find(|(_, v)| *v > u128::from(u32::MAX)) {
            return Err(CoordinatorError::Config(format!(
                "{name} must be at most {}",
                u32::MAX
            )));
        }
        if self.stall_timeout < Duration::from_millis(100) {
            return bad("--stall-timeout must be at least 100ms");
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return bad("--max-connections and --max-connections-per-ip must be at least 1");
        }
        if let Some(o) = self.outer {
            if self.sync_mode != SyncMode::Params {
                return bad("--outer-optimizer applies to --sync params only");
            }
            if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= 10.0) {
                return bad("--outer-lr must be in (0, 10]");
            }
            if !(0.0..1.0).contains(&o.momentum) {
                return bad("--outer-momentum must be in [0, 1)");
            }
        }
        if !(1..=1 << 20).contains(&self.max_workers) {
            return bad("--max-workers must be between 1 and 1048576");
        }
        if self.token.len() < 16 {
            return bad("the token must be at least 16 characters");
        }
        if self.reducers > 1024 {
            return bad("--reducers must be at most 1024");
        }
        if self.reducers > 0 && self.train.ema_decay.is_some() {
            return bad(
                "--ema-decay needs the parameters of every round in one place; it does not go \
                 with --reducers",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CoordinatorConfig {
        CoordinatorConfig::new(TrainConfig::default(), "0123456789abcdef")
    }

    #[test]
    fn the_token_is_not_in_the_debug_output() {
        let text = format!("{:?}", cfg());
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("token: Token(<redacted>)"), "{text}");
        assert_eq!(cfg().token.expose(), "0123456789abcdef");
    }

    #[test]
    fn values_sent_as_u32_are_refused_before_anything_starts() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.train.batch_size = 1 << 33;
        let e = c.validate().unwrap_err();
        assert!(e.is_config() && e.to_string().contains("batch size"), "{e}");
        let mut c = cfg();
        c.heartbeat = Duration::from_secs(5_000_000);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("heartbeat"), "{e}");
    }

    /// The outer optimizer needs params mode and sane settings.
    #[test]
    fn the_outer_optimizer_is_checked() {
        let nesterov = |lr, momentum| Some(OuterOptimizer { lr, momentum });
        let mut c = cfg();
        c.outer = nesterov(0.7, 0.9);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--sync params only"), "{e}");
        c.sync_mode = SyncMode::Params;
        assert!(c.validate().is_ok());
        for (lr, momentum, want) in [
            (0.0, 0.9, "--outer-lr"),
            (f32::NAN, 0.9, "--outer-lr"),
            (0.7, 1.0, "--outer-momentum"),
            (0.7, -0.1, "--outer-momentum"),
        ] {
            c.outer = nesterov(lr, momentum);
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains(want), "{lr} {momentum}: {e}");
        }
    }

    #[test]
    fn the_registry_bound_is_checked() {
        for (n, ok) in [(0, false), (1, true), (4096, true), ((1 << 20) + 1, false)] {
            let mut c = cfg();
            c.max_workers = n;
            match c.validate() {
                Ok(()) => assert!(ok, "{n} was accepted"),
                Err(e) => assert!(!ok && e.to_string().contains("--max-workers"), "{n}: {e}"),
            }
        }
    }
}
