//! The two answers of the `grpc.health.v1.Health` service (no token needed; the kubelet's
//! probes ask it):
//!
//! | service | SERVING while | probe |
//! |---|---|---|
//! | `""` (the process) | the round thread answered within the last [`WEDGED_AFTER`] | liveness |
//! | `capsnet.v1.Coordinator` | the run can make progress: a round is open with live workers, or training finished, and the round thread answers within [`ANSWER_WITHIN`] | readiness |
//!
//! So a coordinator that waits for its first workers or for a worker to come back is live but
//! not ready (the Service publishes not-ready addresses, so workers still reach it), and one
//! whose round thread stopped answering is restarted by its liveness probe.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::actor::{Msg, Readiness};

/// The readiness service's name: the coordinator's gRPC service.
pub(crate) const READY: &str = "capsnet.v1.Coordinator";
/// How often the round thread is asked.
const EVERY: Duration = Duration::from_secs(1);
/// An answer later than this counts as none.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// No answer for this long: the process is not live either.
const WEDGED_AFTER: Duration = Duration::from_secs(60);

/// Sets both services from the round thread's answers, every [`EVERY`], until aborted.
pub(crate) async fn watch(reporter: HealthReporter, tx: mpsc::Sender<Msg>) {
    let mut answered = Instant::now();
    let mut shown: Option<(bool, bool)> = None;
    loop {
        let (reply, rx) = oneshot::channel();
        let state = match tx.send(Msg::Probe { reply }) {
            Ok(()) => tokio::time::timeout(ANSWER_WITHIN, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        if state.is_some() {
            answered = Instant::now();
        }
        let ready = matches!(state, Some(Readiness::Training | Readiness::Finished));
        let live = answered.elapsed() < WEDGED_AFTER;
        if shown != Some((live, ready)) {
            match state {
                Some(s) if !ready => {
                    tracing::info!(state = ?s, "not ready: no round can make progress")
                }
                None => tracing::warn!(
                    silent_for = ?answered.elapsed(),
                    live,
                    "not ready: the round thread does not answer"
                ),
                Some(_) => tracing::info!("ready"),
            }
            reporter.set_service_status(READY, status(ready)).await;
            reporter.set_service_status("", status(live)).await;
            shown = Some((live, ready));
        }
        tokio::time::sleep(EVERY).await;
    }
}

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
