//! The single-process training that distributed runs are compared with: the same model, data,
//! seed and epoch plan as the run, read back from its `config.json`.

use std::path::Path;

use capsnet_core::Params;
use capsnet_core::data::{self, Dataset, Split};
use capsnet_core::net::{self, Net, NetWorkspace};
use capsnet_core::rng::Rng;
use capsnet_core::train::TrainConfig;

pub struct Reference {
    pub cfg: TrainConfig,
    pub model: Net,
    ds: Dataset,
    /// Members and samples per member per round of the run.
    members: usize,
    per_round: usize,
    perm: Vec<usize>,
    grads: Params,
    ws: NetWorkspace,
}

impl Reference {
    /// The run in `run` on the training split in `data`, for `workers` members named
    /// `worker-0`.. that each take `per_round` samples a round, in epoch 0.
    pub fn of_run(run: &Path, data: &Path, workers: usize, per_round: usize) -> Reference {
        let cfg: TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap())
                .unwrap();
        let model = Net::new(&cfg.model, cfg.baseline.as_ref()).unwrap();
        let size = cfg.inputs().data_size(cfg.model.image_size);
        let ds = data::load_split_for(data, Split::Train, 10, size).unwrap();
        let perm = data::epoch_permutation(ds.len(), cfg.seed, 0);
        let grads = Params::zeros(model.layout());
        Reference {
            cfg,
            model,
            ds,
            members: workers,
            per_round,
            perm,
            grads,
            ws: NetWorkspace::new(),
        }
    }

    /// The parameters the run started from.
    pub fn init(&self) -> Params {
        self.model.init_params(self.cfg.seed)
    }

    /// The samples member `k` trains on in round `r` (no member lost or added).
    pub fn work(&self, k: usize, r: u64) -> Vec<usize> {
        capsnet_coordinator::plan::steady_work(self.perm.len(), self.members, self.per_round, k, r)
            .map(|p| self.perm[p])
            .collect()
    }

    /// The gradient of the loss (labels masking the decoder; no shifts, or the run's pairs;
    /// the CNN's dropout keyed by sample as in training) at `params` over the batch of samples
    /// `idx` of epoch 0.
    pub fn gradient(&mut self, params: &Params, idx: &[usize]) -> &Params {
        assert_eq!(self.cfg.max_shift, 0, "the reference draws no shifts");
        // Pairs are drawn from the seed, the epoch and the sample alone: `rng` goes unused.
        let mut rng = Rng::new(0);
        let (seed, inputs) = (self.cfg.seed, self.cfg.inputs());
        let batch = inputs.training_batch(&self.ds, idx, &mut rng, seed, 0);
        let keys = net::sample_keys(seed, 0, idx);
        self.model
            .train_batch(params, &batch, &keys, &mut self.grads, &mut self.ws)
            .unwrap();
        &self.grads
    }

    /// Fails unless training moved most parameters from their initial values (a reference that
    /// barely trained would make any comparison pass). The tiny CNN has ReLU units that never
    /// fire on the synthetic images, so for it every tensor must move, and a quarter of all.
    pub fn assert_trained(&self, params: &Params) {
        let init = self.init();
        let moved = params
            .data
            .iter()
            .zip(&init.data)
            .filter(|(a, b)| a != b)
            .count();
        let (part, what) = match self.model {
            Net::Caps(_) => (2, "half"),
            Net::Cnn(_) => (4, "a quarter"),
        };
        assert!(
            moved > params.data.len() / part,
            "the reference barely trained ({moved} of {} parameters moved, want {what})",
            params.data.len()
        );
        for (spec, p) in params.iter() {
            assert!(
                p.iter().zip(&init.data[spec.range()]).any(|(a, b)| a != b),
                "the reference never moved {}",
                spec.name
            );
        }
    }
}

/// The largest difference between two vectors.
pub fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}
