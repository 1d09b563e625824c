//! Metrics for operators, in the Prometheus/OpenMetrics text format at `/metrics` on
//! `--metrics-listen`: rounds and their times, throughput, members by state, each worker's
//! heartbeat age, update latency, pace and straggler mark, bytes moved by wire encoding, the last evaluation,
//! and timestamps of the last round and checkpoint (for "training is stuck" alerts).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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
    pub wire_bytes: Family<WireLabel, Counter>,
    pub test_accuracy: FloatGauge,
    pub test_margin_loss: FloatGauge,
    pub test_reconstruction_loss: FloatGauge,
    pub last_round_timestamp: FloatGauge,
    pub last_checkpoint_timestamp: FloatGauge,
    pub waiting_for_workers: Gauge,
}

/// Seconds since the Unix epoch, for the timestamp gauges.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("capsnet");
        let m = Metrics {
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
            wire_bytes: Family::default(),
            test_accuracy: FloatGauge::default(),
            test_margin_loss: FloatGauge::default(),
            test_reconstruction_loss: FloatGauge::default(),
            last_round_timestamp: FloatGauge::default(),
            last_checkpoint_timestamp: FloatGauge::default(),
            waiting_for_workers: Gauge::default(),
            registry: Registry::default(),
        };
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
        Arc::new(Metrics { registry, ..m })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn wire(&self, encoding: capsnet_proto::Encoding, direction: &str, bytes: u64) {
        let enc = match encoding {
            capsnet_proto::Encoding::Bf16 => "bf16",
            _ => "f32",
        };
        self.wire_bytes
            .get_or_create(&WireLabel {
                encoding: enc.into(),
                direction: direction.into(),
            })
            .inc_by(bytes);
    }
}

/// The longest request line and headers a scrape may send, and how long it may take.
const MAX_REQUEST: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the kernel's accept queue.
const MAX_SCRAPES: usize = 8;

/// Serves `GET /metrics` (HTTP/1.x, one request per connection) until `shutdown` resolves.
/// Each request is bounded in size and time, and at most a few are served at once.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    tokio::pin!(shutdown);
    loop {
        let (mut conn, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors, say: wait rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(&mut conn, &metrics)).await;
        });
    }
}

async fn answer(conn: &mut tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || req.len() + n > MAX_REQUEST {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let (status, kind, body) = if req.starts_with(b"GET /metrics ") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
