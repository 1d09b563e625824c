//! capsnet-worker: one replica of the model that trains on its shard of the data.
//!
//! # Layout
//! - [`WorkerConfig`]: where the coordinator is, credentials, data, threads, overlap.
//! - [`run`]: the worker's life, serving its metrics meanwhile.
//! - `lifecycle`: that life as a state machine: joining (connect and join with retry and
//!   backoff, load the data), working (per round: pull the parameters and work order, compute
//!   off the async runtime, push the update; with overlap each chunk as the backward pass makes
//!   it final, the next round pulled meanwhile), back to joining when the coordinator is lost,
//!   stopped (after leaving) when training is finished or on shutdown. A session holds what
//!   lives as long as one membership. [`Phase`] names the states in the logs.
//! - `transfer`: [`pull`], [`push`], [`push_chunks`] and the sender that feeds a push from the
//!   backward pass.
//! - `replica`: the model, data and buffers a worker computes with.
//! - `error`: [`WorkerError`] and which errors are configuration errors (exit 2).
//! - [`client`]: a connected, authenticated gRPC client.
//! - [`identity`]: the worker's name and preferred rank when the operator gives none.
//! - [`metrics`]: what `--metrics-listen` serves.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsnet_proto::pb;
use tonic::Code;

pub mod client;
mod error;
mod identity;
mod lifecycle;
pub mod metrics;
mod replica;
mod transfer;

pub use client::{Client, ClientTls, MAX_PUSH_PAUSE, Peer};
pub use error::{Result, WorkerError};
pub use identity::identity;
pub use metrics::WorkerMetrics;
pub use transfer::{
    Layout, Pulled, Reducers, SharedFloats, Update, Want, fetch, pull, pull_changes_into,
    pull_into, push, push_chunks, push_spans,
};

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `http://host:port` or `https://host:port`.
    pub coordinator: String,
    /// Redacted in `Debug`.
    pub token: capsnet_proto::Token,
    pub data_dir: PathBuf,
    /// Stable name; a worker restarted under the same name gets its rank and shard back.
    pub name: String,
    pub rank_hint: Option<u32>,
    pub threads: usize,
    /// Give up when the coordinator cannot be reached for this long.
    pub give_up_after: Duration,
    pub tls: Option<ClientTls>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// More metrics served at the same address after the worker's (the reducer in this
    /// process).
    pub more_metrics: Option<capsnet_proto::metrics_http::Source>,
    /// Grad mode: send each chunk of the gradient as soon as the backward pass has made it
    /// final, while the rest of the pass runs (compute/sync overlap).
    pub overlap: bool,
    /// The name checked in every reducer's certificate (None: each reducer's host).
    pub reducer_tls_domain: Option<String>,
    /// A reducer served in this process (`--serve-reducer`): its span is pushed to and pulled
    /// from it in process, without a socket.
    pub local_reducer: Option<capsnet_proto::frame::LocalReducer>,
}

/// The worker's side of its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and joining (again after a coordinator restart).
    Joining,
    /// Has a rank; pulling, computing and pushing rounds.
    Working,
    /// Training is over or the worker was told to stop; it left.
    Stopped,
}

/// How a worker's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerOutcome {
    pub rounds: u64,
    pub finished: bool,
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

/// Connects and joins, retrying with exponential backoff (100 ms to 5 s) for up to
/// `give_up_after`.
async fn join(cfg: &WorkerConfig) -> Result<(Client, pb::JoinResponse)> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut client =
                Client::connect(&cfg.coordinator, cfg.token.expose(), cfg.tls.as_ref()).await?;
            let req = pb::JoinRequest {
                name: cfg.name.clone(),
                rank_hint: cfg.rank_hint,
            };
            let resp = client.rpc().join(req).await?.into_inner();
            Ok::<_, WorkerError>((client, resp))
        };
        match attempt.await {
            Ok(ok) => return Ok(ok),
            Err(WorkerError::Rpc(s)) if !retryable(s.code()) => return Err(WorkerError::Rpc(s)),
            // A bad address, TLS file or token does not get better by waiting.
            Err(e) if e.is_config() => return Err(e),
            Err(e) => {
                if started.elapsed() >= cfg.give_up_after {
                    return Err(WorkerError::Unreachable {
                        url: cfg.coordinator.clone(),
                        waited: started.elapsed(),
                        last: e.to_string(),
                    });
                }
                tracing::debug!(error = %e, ?delay, "coordinator not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs the worker until training is finished (`Ok(finished = true)`) or `shutdown` resolves
/// (it leaves first).
pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<WorkerOutcome> {
    let metrics = WorkerMetrics::new();
    let server = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Listen { addr, source })?;
            if let Ok(a) = l.local_addr() {
                tracing::info!(address = %a, "metrics at http://{a}/metrics");
            }
            let m = metrics.clone();
            let mut parts: Vec<capsnet_proto::metrics_http::Exposition> =
                vec![Arc::new(move || m.encode())];
            parts.extend(cfg.more_metrics.iter().map(|s| s.0.clone()));
            Some(AbortOnDrop(tokio::spawn(
                capsnet_proto::metrics_http::serve(
                    l,
                    capsnet_proto::metrics_http::join(parts),
                    std::future::pending(),
                ),
            )))
        }
        None => None,
    };
    let out = lifecycle::train(&cfg, &metrics, shutdown).await;
    drop(server);
    out
}

/// Aborts a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task (it is aborted if this wait is dropped).
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_not_in_the_debug_output() {
        let cfg = WorkerConfig {
            coordinator: "http://127.0.0.1:1".into(),
            token: "secret-token-0123456789".into(),
            data_dir: "data".into(),
            name: "w".into(),
            rank_hint: None,
            threads: 1,
            give_up_after: Duration::from_secs(1),
            tls: None,
            metrics_listen: None,
            overlap: true,
            reducer_tls_domain: None,
            local_reducer: None,
            more_metrics: None,
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
