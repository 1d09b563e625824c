//! Metrics for operators, in the Prometheus/OpenMetrics text format at `/metrics` on
//! `--metrics-listen`: rounds and their times, throughput, members by state, each worker's
//! heartbeat age, update latency, pace and straggler mark, bytes moved by wire encoding, the last evaluation,
//! and timestamps of the last round and checkpoint (for "training is stuck" alerts). A reducer
//! serves its own subset under `capsnet_reducer_` ([`Metrics::reducer`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WireLabel {
    pub encoding: String,
    /// `in` (updates received) or `out` (parameters served).
    pub direction: String,
}

/// Every metric, updated where the event happens (the actor, the data plane) and encoded on
/// each scrape.
pub(crate) struct Metrics {
    registry: Registry,
    pub rounds: Counter,
    pub round_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub images_per_second: FloatGauge,
    pub members: Family<StateLabel, Gauge>,
    pub heartbeat_age_seconds: Family<WorkerLabel, FloatGauge>,
    pub pace: Family<WorkerLabel, FloatGauge>,
    pub update_seconds: Family<WorkerLabel, Histogram>,
    pub straggler: Family<WorkerLabel, Gauge>,
    pub cut_off: Family<WorkerLabel, Gauge>,
    pub wire_bytes: Family<WireLabel, Counter>,
    /// Payload bytes that passed through shared memory instead (a reducer's workers on its
    /// machine).
    pub shared_bytes: Family<WireLabel, Counter>,
    pub test_accuracy: FloatGauge,
    pub test_margin_loss: FloatGauge,
    pub test_reconstruction_loss: FloatGauge,
    pub last_round_timestamp: FloatGauge,
    pub last_checkpoint_timestamp: FloatGauge,
    pub waiting_for_workers: Gauge,
    pub updates_rejected: Counter,
    pub updates_clipped: Counter,
    pub rounds_discarded: Counter,
    pub checkpoint_failures: Counter,
    pub connections: Gauge,
    pub connections_refused: Counter,
    /// A reducer's: floats of the span it owns, spans assigned to it, updates completed and
    /// aborted here, gathers sent, sessions opened with the coordinator.
    pub span_floats: Gauge,
    pub assignments: Counter,
    pub updates: Counter,
    pub updates_aborted: Counter,
    pub gathers: Counter,
    pub sessions: Counter,
}

/// Seconds since the Unix epoch, for the timestamp gauges.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    fn unregistered() -> Self {
        Metrics {
            rounds: Counter::default(),
            round_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            images_per_second: FloatGauge::default(),
            members: Family::default(),
            heartbeat_age_seconds: Family::default(),
            pace: Family::default(),
            update_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 18))
            }),
            straggler: Family::default(),
            cut_off: Family::default(),
            wire_bytes: Family::default(),
            shared_bytes: Family::default(),
            test_accuracy: FloatGauge::default(),
            test_margin_loss: FloatGauge::default(),
            test_reconstruction_loss: FloatGauge::default(),
            last_round_timestamp: FloatGauge::default(),
            last_checkpoint_timestamp: FloatGauge::default(),
            waiting_for_workers: Gauge::default(),
            updates_rejected: Counter::default(),
            updates_clipped: Counter::default(),
            rounds_discarded: Counter::default(),
            checkpoint_failures: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            span_floats: Gauge::default(),
            assignments: Counter::default(),
            updates: Counter::default(),
            updates_aborted: Counter::default(),
            gathers: Counter::default(),
            sessions: Counter::default(),
            registry: Registry::default(),
        }
    }

    /// The coordinator's metrics (`capsnet_*`).
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("capsnet");
        let m = Self::unregistered();
        let r = &mut registry;
        r.register("rounds", "Rounds closed", m.rounds.clone());
        r.register(
            "round_seconds",
            "Time from a round's opening to its close",
            m.round_seconds.clone(),
        );
        r.register(
            "sync_seconds",
            "Time from a round's first update to its close",
            m.sync_seconds.clone(),
        );
        r.register(
            "images_per_second",
            "Samples of the last round over its time",
            m.images_per_second.clone(),
        );
        r.register("members", "Workers by state", m.members.clone());
        r.register(
            "worker_heartbeat_age_seconds",
            "Time since each worker was last heard from",
            m.heartbeat_age_seconds.clone(),
        );
        r.register(
            "worker_pace",
            "Each worker's update time over its rounds' median, averaged (1: typical)",
            m.pace.clone(),
        );
        r.register(
            "worker_update_seconds",
            "Time from a round's opening to each worker's complete update",
            m.update_seconds.clone(),
        );
        r.register(
            "worker_straggler",
            "1 for a worker marked a straggler",
            m.straggler.clone(),
        );
        r.register(
            "worker_cut_off",
            "1 for a worker that cannot reach a reducer other workers reach (it gets no work)",
            m.cut_off.clone(),
        );
        r.register(
            "wire_bytes",
            "Payload bytes of updates received (in) and parameters served (out)",
            m.wire_bytes.clone(),
        );
        r.register(
            "test_accuracy",
            "Test accuracy of the last evaluation",
            m.test_accuracy.clone(),
        );
        r.register(
            "test_margin_loss",
            "Margin loss of the last evaluation",
            m.test_margin_loss.clone(),
        );
        r.register(
            "test_reconstruction_loss",
            "Reconstruction loss of the last evaluation",
            m.test_reconstruction_loss.clone(),
        );
        r.register(
            "last_round_timestamp_seconds",
            "When the last round closed (Unix time)",
            m.last_round_timestamp.clone(),
        );
        r.register(
            "last_checkpoint_timestamp_seconds",
            "When the last checkpoint was written (Unix time)",
            m.last_checkpoint_timestamp.clone(),
        );
        r.register(
            "waiting_for_workers",
            "1 while the run has started but no worker is live",
            m.waiting_for_workers.clone(),
        );
        r.register(
            "updates_rejected",
            "Updates rejected because their norm was far beyond the recent ones",
            m.updates_rejected.clone(),
        );
        r.register(
            "updates_clipped",
            "Updates scaled down to the norm limit (--clip-updates)",
            m.updates_clipped.clone(),
        );
        r.register(
            "rounds_discarded",
            "Rounds whose new parameters were not all finite, discarded and redone",
            m.rounds_discarded.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoints that could not be written after their retries",
            m.checkpoint_failures.clone(),
        );
        r.register(
            "connections",
            "Connections open to the gRPC port",
            m.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed when accepted: --max-connections or --max-connections-per-ip reached",
            m.connections_refused.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// A reducer's metrics (`capsnet_reducer_*`): what it moves and reduces, not the run's
    /// membership or evaluation (the coordinator's).
    pub fn reducer() -> Arc<Self> {
        let mut registry = Registry::with_prefix("capsnet_reducer");
        let m = Self::unregistered();
        let r = &mut registry;
        r.register("rounds", "Rounds committed here", m.rounds.clone());
        r.register(
            "round_seconds",
            "Time from a round's opening here to its close (every member's update reduced)",
            m.round_seconds.clone(),
        );
        r.register(
            "last_round_timestamp_seconds",
            "When this reducer last committed a round (Unix time)",
            m.last_round_timestamp.clone(),
        );
        r.register(
            "span_floats",
            "Floats of the span this reducer owns (0 before the coordinator assigns one)",
            m.span_floats.clone(),
        );
        r.register(
            "assignments",
            "Spans the coordinator assigned here (more than one: a reducer was lost or the \
             coordinator restarted)",
            m.assignments.clone(),
        );
        r.register(
            "updates",
            "Workers' updates of the span completed here",
            m.updates.clone(),
        );
        r.register(
            "updates_aborted",
            "Workers' updates dropped here half-sent (the stream failed or was refused)",
            m.updates_aborted.clone(),
        );
        r.register(
            "gathers",
            "Times the span's state was sent to the coordinator (evaluation, checkpoint, gather)",
            m.gathers.clone(),
        );
        r.register(
            "coordinator_sessions",
            "Control sessions opened with the coordinator (more than one: it was reconnected)",
            m.sessions.clone(),
        );
        r.register(
            "wire_bytes",
            "Payload bytes of updates received (in) and parameters served (out) over the network",
            m.wire_bytes.clone(),
        );
        r.register(
            "shared_memory_bytes",
            "Payload bytes of updates taken from (in) and parameters left in (out) shared memory \
             for workers on the reducer's machine",
            m.shared_bytes.clone(),
        );
        r.register(
            "connections",
            "Connections open to the reducer's port",
            m.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed when accepted: --max-connections or --max-connections-per-ip reached",
            m.connections_refused.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        capsnet_proto::metrics_http::encode(&self.registry)
    }

    pub fn wire(&self, encoding: capsnet_proto::Encoding, direction: &str, bytes: u64) {
        Self::count(&self.wire_bytes, encoding, direction, bytes);
    }

    pub fn shared(&self, encoding: capsnet_proto::Encoding, direction: &str, bytes: u64) {
        Self::count(&self.shared_bytes, encoding, direction, bytes);
    }

    fn count(
        family: &Family<WireLabel, Counter>,
        encoding: capsnet_proto::Encoding,
        direction: &str,
        bytes: u64,
    ) {
        let enc = match encoding {
            capsnet_proto::Encoding::Bf16 => "bf16",
            _ => "f32",
        };
        family
            .get_or_create(&WireLabel {
                encoding: enc.into(),
                direction: direction.into(),
            })
            .inc_by(bytes);
    }
}
