//! A worker's metrics, in the Prometheus/OpenMetrics text format at `/metrics` on
//! `--metrics-listen`: updates sent and used, compute and sync time per round, throughput,
//! bytes moved by wire encoding, joins, whether it holds a rank, the last loss, and when the
//! last update was accepted (for "this worker is stuck" alerts).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WireLabel {
    encoding: &'static str,
    /// `in` (parameters pulled) or `out` (updates pushed).
    direction: &'static str,
}

/// Every metric of a worker, updated by [`crate::run`] and encoded on each scrape.
pub struct WorkerMetrics {
    registry: Registry,
    updates: Counter,
    updates_unused: Counter,
    compute_seconds: Histogram,
    sync_seconds: Histogram,
    images_per_second: FloatGauge,
    wire_bytes: Family<WireLabel, Counter>,
    joins: Counter,
    joined: Gauge,
    loss: FloatGauge,
    last_update_timestamp: FloatGauge,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    pub fn new() -> Arc<Self> {
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let m = WorkerMetrics {
            registry: Registry::default(),
            updates: Counter::default(),
            updates_unused: Counter::default(),
            compute_seconds: seconds(),
            sync_seconds: seconds(),
            images_per_second: FloatGauge::default(),
            wire_bytes: Family::default(),
            joins: Counter::default(),
            joined: Gauge::default(),
            loss: FloatGauge::default(),
            last_update_timestamp: FloatGauge::default(),
        };
        let mut registry = Registry::with_prefix("capsnet_worker");
        let r = &mut registry;
        r.register("updates", "Updates the coordinator used", m.updates.clone());
        r.register(
            "updates_unused",
            "Updates the coordinator no longer needed (the round closed without them)",
            m.updates_unused.clone(),
        );
        r.register(
            "compute_seconds",
            "Time of each round's training step",
            m.compute_seconds.clone(),
        );
        r.register(
            "sync_seconds",
            "Time from the end of a step to the next round's parameters (push and pull)",
            m.sync_seconds.clone(),
        );
        r.register(
            "images_per_second",
            "Samples of the last round over its step and sync time",
            m.images_per_second.clone(),
        );
        r.register(
            "wire_bytes",
            "Payload bytes of parameters pulled (in) and updates pushed (out) over the network \
             (not the span of a reducer served in this process)",
            m.wire_bytes.clone(),
        );
        r.register(
            "joins",
            "Times the worker joined (again after the coordinator restarted or forgot it)",
            m.joins.clone(),
        );
        r.register(
            "joined",
            "1 while the worker is a member with a rank, 0 while it is joining",
            m.joined.clone(),
        );
        r.register("loss", "Training loss of the last update", m.loss.clone());
        r.register(
            "last_update_timestamp_seconds",
            "When the coordinator last used an update of this worker (Unix time)",
            m.last_update_timestamp.clone(),
        );
        Arc::new(WorkerMetrics { registry, ..m })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        capsnet_proto::metrics_http::encode(&self.registry)
    }

    pub(crate) fn joined(&self, yes: bool) {
        if yes {
            self.joins.inc();
        }
        self.joined.set(i64::from(yes));
    }

    pub(crate) fn wire(
        &self,
        encoding: capsnet_proto::Encoding,
        direction: &'static str,
        floats: u64,
    ) {
        let bytes = floats * capsnet_proto::wire::bytes_per_float(encoding) as u64;
        self.wire_bytes(encoding, direction, bytes);
    }

    /// `bytes` of payload in `encoding` moved in `direction` (parameters pulled as their
    /// changes are fewer bytes than their floats).
    pub(crate) fn wire_bytes(
        &self,
        encoding: capsnet_proto::Encoding,
        direction: &'static str,
        bytes: u64,
    ) {
        let name = match encoding {
            capsnet_proto::Encoding::Bf16 => "bf16",
            _ => "f32",
        };
        self.wire_bytes
            .get_or_create(&WireLabel {
                encoding: name,
                direction,
            })
            .inc_by(bytes);
    }

    /// One round: its step took `compute`, pushing its update and pulling the next
    /// parameters `sync`; `used` says whether the coordinator took the update.
    pub(crate) fn round(
        &self,
        samples: u64,
        loss: f64,
        compute: Duration,
        sync: Duration,
        used: bool,
    ) {
        self.compute_seconds.observe(compute.as_secs_f64());
        self.sync_seconds.observe(sync.as_secs_f64());
        let t = (compute + sync).as_secs_f64();
        if t > 0.0 {
            self.images_per_second.set(samples as f64 / t);
        }
        self.loss.set(loss);
        if used {
            self.updates.inc();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_update_timestamp.set(now);
        } else {
            self.updates_unused.inc();
        }
    }
}
