//! The model replica a worker computes with, kept across rounds and rejoins.

use std::sync::Arc;

use capsnet_core::data::{self, Dataset, Split};
use capsnet_core::net::{self, Net, NetWorkspace};
use capsnet_core::optim::Adam;
use capsnet_core::rng::Rng;
use capsnet_core::train::Inputs;
use capsnet_core::{GradReady, Params};
use capsnet_proto::{RunSettings, SyncMode, pb};

use crate::WorkerConfig;
use crate::error::{Result, WorkerError};

/// What the worker computes with, kept across rounds (and across rejoins with the same config).
pub(crate) struct Replica {
    pub(crate) settings: RunSettings,
    model: Net,
    train: Arc<Dataset>,
    ws: NetWorkspace,
    grads: Params,
    /// Local optimizer of params mode.
    adam: Option<Adam>,
    /// The buffer of the last update sent, for the next one.
    spare: Option<Vec<f32>>,
    pool: rayon::ThreadPool,
}

impl Replica {
    pub(crate) fn new(settings: RunSettings, cfg: &WorkerConfig) -> Result<Self> {
        let model = Net::new(&settings.model, settings.baseline.as_ref())?;
        let inputs = Inputs::new(settings.max_shift, settings.canvas, settings.multi);
        let mut train = data::load_split_for(
            &cfg.data_dir,
            Split::Train,
            settings.model.classes,
            inputs.data_size(settings.model.image_size),
        )?;
        if let Some(n) = settings.train_limit {
            train.truncate(n as usize);
        }
        if train.len() as u64 != settings.train_len {
            return Err(WorkerError::DataMismatch {
                data_dir: cfg.data_dir.clone(),
                local: train.len() as u64,
                coordinator: settings.train_len,
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .build()
            .map_err(|source| capsnet_core::CoreError::ThreadPool {
                threads: cfg.threads.max(1),
                source,
            })?;
        Ok(Replica {
            grads: Params::zeros(model.layout()),
            model,
            train: Arc::new(train),
            ws: NetWorkspace::new(),
            adam: None,
            spare: None,
            pool,
            settings,
        })
    }

    /// Runs a work order on the pulled `params`: the gradient of the batch (grad mode) or up to
    /// `sync_every` local Adam steps (params mode). Returns (update, samples, mean loss).
    ///
    /// No 33 MB buffer is allocated per round: the update is written to the buffer of an earlier
    /// update ([`Replica::recycle`]), and `params` is left holding a buffer for the next pull.
    ///
    /// In grad mode, `ready` hears which chunks of the gradient are final as the backward pass
    /// goes (see [`GradReady`]).
    pub(crate) fn compute(
        &mut self,
        order: &pb::WorkOrder,
        params: &mut Vec<f32>,
        ready: &mut (dyn GradReady + Send),
    ) -> Result<(Vec<f32>, u64, f64)> {
        let n = params.len();
        let spare = self
            .spare
            .take()
            .filter(|v| v.len() == n)
            .unwrap_or_else(|| vec![0.0; n]);
        let s = &self.settings;
        let pulled = std::mem::take(params);
        let mut p = Params::from_flat(self.model.layout(), pulled)?;
        let perm = data::epoch_permutation(self.train.len(), s.seed, order.epoch);
        let indices = &perm[capsnet_proto::work_range(order, perm.len())?];
        // Augmentation keyed by (round, first position): independent of which process computes.
        let mut rng = Rng::derive(
            s.seed,
            "augment-round",
            order.round.wrapping_mul(1 << 32) ^ order.start,
        );
        let inputs = Inputs::new(s.max_shift, s.canvas, s.multi);
        let (model, ws, grads, train, pool) = (
            &self.model,
            &mut self.ws,
            &mut self.grads,
            &self.train,
            &self.pool,
        );
        match s.sync_mode {
            SyncMode::Params => {
                let adam = self
                    .adam
                    .get_or_insert_with(|| Adam::new(s.adam.clone(), p.data.len()));
                let mut loss = 0.0;
                let mut steps = 0;
                for batch_idx in indices.chunks(s.batch_size) {
                    let batch =
                        inputs.training_batch(train, batch_idx, &mut rng, s.seed, order.epoch);
                    let keys = net::sample_keys(s.seed, order.epoch, batch_idx);
                    let st = pool.install(|| model.train_batch(&p, &batch, &keys, grads, ws))?;
                    pool.install(|| adam.update(&mut p.data, &grads.data))?;
                    loss += st.total_loss();
                    steps += 1;
                }
                *params = spare;
                Ok((p.data, indices.len() as u64, loss / steps.max(1) as f64))
            }
            _ => {
                let batch = inputs.training_batch(train, indices, &mut rng, s.seed, order.epoch);
                let keys = net::sample_keys(s.seed, order.epoch, indices);
                let st =
                    pool.install(|| model.train_batch_ready(&p, &batch, &keys, grads, ws, ready))?;
                *params = p.data;
                let update = std::mem::replace(&mut grads.data, spare);
                Ok((update, indices.len() as u64, st.total_loss()))
            }
        }
    }

    /// Takes back the buffer of a sent update, for the next one.
    pub(crate) fn recycle(&mut self, update: Vec<f32>) {
        self.spare = Some(update);
    }
}
