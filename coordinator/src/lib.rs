//! capsnet-coordinator: the server of synchronous data-parallel training.
//!
//! # Layout
//! - [`config`]: [`CoordinatorConfig`], the training flags plus sync mode, deadlines, security.
//! - [`plan`]: which samples each member of a round works on: what is left of the epoch, lost
//!   work redone first (pure data structures).
//! - `actor`: the round state machine, on one thread: members and their states, updates,
//!   averaging in member order, Adam, evaluation and checkpoints in the background.
//! - `liveness`: heartbeat stamps and closed connections, recorded outside the actor.
//! - `conn`: accepted connections: limits, the first-request deadline, close reports.
//! - `metrics`: Prometheus metrics for `--metrics-listen`.
//! - `health`: the health service's liveness and readiness answers.
//! - `reduce`: one round's updates, averaged and stepped range by range while they stream in.
//! - `service`: the tonic service; streams and checks chunks, hands each to the actor.
//! - `data_plane`: serves the two bulk RPCs ahead of tonic's router, payloads framed by hand.
//! - [`auth`]: the bearer-token interceptor.
//! - [`error`]: [`CoordinatorError`] and its mapping to gRPC statuses (the only one).
//!
//! [`serve`] takes a bound listener and a shutdown future, so tests run it on port 0.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use capsnet_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

mod actor;
pub mod auth;
pub mod config;
mod conn;
mod data_plane;
pub mod error;
mod health;
mod liveness;
mod metrics;
pub mod plan;
mod reduce;
mod service;
mod shard;

pub use actor::Outcome;
pub use config::{CoordinatorConfig, OuterOptimizer, TlsFiles};
pub use error::{CoordinatorError, Result};
pub use shard::{CoordinatorTls, ReducerConfig, ReducerMetrics, ReducerOutcome, serve_reducer};

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| CoordinatorError::ReadFile {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    // A peer that opens a connection and never finishes its handshake is dropped.
    Ok(tls.timeout(conn::FIRST_REQUEST_WITHIN))
}

/// Concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 32;
/// Streams a peer may have reset (or that failed) before the connection is closed.
const MAX_RESETS: usize = 32;
/// The largest request of the small RPCs (join, heartbeat, leave, status) and of the health
/// service, and the largest Status answer (a few hundred bytes per worker).
const SMALL_MESSAGE: usize = 16 << 10;
const HEALTH_MESSAGE: usize = 1 << 10;
const STATUS_MESSAGE: usize = 16 << 20;

/// How long a request may take to be answered (a whole push included): twice the round
/// deadline, and at least two minutes.
fn request_timeout(cfg: &CoordinatorConfig) -> Duration {
    (2 * cfg.round_timeout).max(Duration::from_secs(120))
}

/// How many bytes one HTTP/2 connection may have in flight to the coordinator or a reducer
/// before they are read: with a 16 MiB window per stream, what bounds the memory a peer's
/// unread data costs.
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// The HTTP/2 server of the coordinator and of a reducer, every request answered within
/// `timeout`.
fn server(timeout: Duration, tls: Option<ServerTlsConfig>) -> Result<Server> {
    let mut builder = Server::builder()
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        // A 1 MiB chunk in one or two HTTP/2 frames instead of 64 of the default 16 KiB.
        .max_frame_size(Some(2 << 20))
        // A peer that stops answering pings is dropped within 30 s.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Bounds per connection (tonic's default passes "no limit" down to hyper): streams at
        // once (a worker uses four: heartbeat, pull, push, status), streams the peer reset or
        // that failed before they were accepted, header bytes.
        .max_concurrent_streams(Some(MAX_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(MAX_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_RESETS))
        .http2_max_header_list_size(Some(16 << 10))
        // Every request, a whole push included, is answered within this or fails.
        .timeout(timeout);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(CoordinatorError::Tls)?;
    }
    Ok(builder)
}

/// Where a coordinator or reducer listens: a TCP address, or a unix socket (`unix:/path`: only
/// processes of this machine reach it, without the TCP/IP stack; capsnet launch's).
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: tokio::net::UnixListener,
        file: SocketFile,
    },
}

/// A unix socket's file, removed when this is dropped (with the server's stream of
/// connections).
pub struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

pub use capsnet_proto::unix::UNIX_PREFIX;

impl Listener {
    /// Binds `address`: `unix:/absolute/path` or `host:port`. A socket file left at that path
    /// by a process that is gone is replaced; a live one, or a file that is no socket, is an
    /// error.
    pub async fn bind(address: &str) -> Result<Self> {
        let Some(path) = address.strip_prefix(UNIX_PREFIX) else {
            let l = TcpListener::bind(address)
                .await
                .map_err(|e| CoordinatorError::io(format!("address {address}"), e))?;
            return Ok(Listener::Tcp(l));
        };
        let path = std::path::PathBuf::from(path);
        if !path.is_absolute() {
            return Err(CoordinatorError::Config(format!(
                "{address}: a unix socket's path must be absolute (unix:/dir/name.sock)"
            )));
        }
        // sun_path holds 108 bytes with the closing NUL.
        if path.as_os_str().len() > 107 {
            return Err(CoordinatorError::Config(format!(
                "{address}: a unix socket's path may be at most 107 bytes long"
            )));
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(CoordinatorError::Config(format!(
                    "{address}: the file exists and is not a socket"
                )));
            }
            if tokio::net::UnixStream::connect(&path).await.is_ok() {
                return Err(CoordinatorError::Config(format!(
                    "{address}: a server listens on this socket already"
                )));
            }
            std::fs::remove_file(&path)
                .map_err(|e| CoordinatorError::io(format!("removing the stale {address}"), e))?;
        }
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| CoordinatorError::io(format!("address {address}"), e))?;
        Ok(Listener::Unix {
            listener,
            file: SocketFile(path),
        })
    }

    /// The address it listens on: `host:port`, or `unix:/path`.
    pub fn local(&self) -> Result<String> {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .map_err(|e| CoordinatorError::io("reading the listener's address", e)),
            Listener::Unix { file, .. } => Ok(format!("{UNIX_PREFIX}{}", file.0.display())),
        }
    }

    /// Whether it is a unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, Listener::Unix { .. })
    }
}

/// The connections accepted on `listener` (see [`incoming`]); those of a unix socket take a
/// slot of `conns` without an address, and its file is removed once the stream is dropped.
fn incoming_any(
    listener: Listener,
    conns: conn::Conns,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<conn::Conn>> + Send>> {
    match listener {
        Listener::Tcp(l) => Box::pin(incoming(l, conns)),
        Listener::Unix { listener, file } => {
            let accepted = tokio_stream::wrappers::UnixListenerStream::new(listener);
            Box::pin(tokio_stream::StreamExt::filter_map(accepted, move |c| {
                let _file = &file;
                match c {
                    Ok(s) => conns.admit_unix(s).map(Ok),
                    Err(e) => Some(Err(e)),
                }
            }))
        }
    }
}

/// The connections accepted on `listener`: TCP_NODELAY on each (the builder's own setting only
/// applies to listeners it binds: a round's small messages, the end of an update or a pull
/// request, must not wait for Nagle and delayed ACKs); each takes a slot of `conns` or is
/// closed at once, must send a request within 10 s, and reports its close, so a peer whose
/// process died is known at once (see conn).
fn incoming(
    listener: TcpListener,
    conns: conn::Conns,
) -> impl tokio_stream::Stream<Item = std::io::Result<conn::Conn>> {
    tokio_stream::StreamExt::filter_map(
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        move |c| match c {
            Ok(s) => conns.admit(s).map(Ok),
            Err(e) => Some(Err(e)),
        },
    )
}

/// Serves until training is finished (then exits after workers had time to hear it) or until
/// `shutdown` resolves (then writes a checkpoint first). Returns how the run ended.
pub async fn serve(
    listener: impl Into<Listener>,
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Outcome> {
    cfg.validate()?;
    let listener = listener.into();
    if listener.is_unix() && cfg.tls.is_some() {
        return Err(CoordinatorError::Config(
            "a coordinator on a unix socket serves it without TLS (it does not leave the machine)"
                .into(),
        ));
    }
    let tls = cfg.tls.as_ref().map(tls_config).transpose()?;
    let (pub_tx, pub_rx) = watch::channel(Arc::new(actor::Published::placeholder()));
    let (progress_tx, progress_rx) = watch::channel(actor::Progress::empty(0, 0));
    let actor_cfg = cfg.clone();
    let liveness = liveness::Liveness::default();
    let actor_liveness = liveness.clone();
    let metrics = metrics::Metrics::new();
    let actor_metrics = metrics.clone();
    // Bound before the (possibly long) start, so that a bad address fails at once.
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| CoordinatorError::io(format!("--metrics-listen {addr}"), e))?,
        ),
        None => None,
    };
    let actor = tokio::task::spawn_blocking(move || {
        actor::Actor::new(
            actor_cfg,
            pub_tx,
            progress_tx,
            actor_liveness,
            actor_metrics,
        )
    })
    .await
    .map_err(|source| CoordinatorError::Task {
        what: "starting the round actor",
        source,
    })??;
    let model_layout = capsnet_core::net::layout_for(&cfg.train.model, cfg.train.baseline.as_ref());
    let names = model_layout
        .specs()
        .iter()
        .map(|s| (s.name.clone(), s.range()))
        .collect();
    let (tx, rx) = mpsc::channel();
    let (grid, place) = (actor.grid(), actor.place());
    let actor_thread = std::thread::Builder::new()
        .name("capsnet-rounds".into())
        .spawn(move || actor.run(rx))
        .map_err(|e| CoordinatorError::io("starting the round thread", e))?;
    let params_mode = cfg.sync_mode == capsnet_proto::SyncMode::Params;
    let svc = service::Service {
        lanes: Arc::default(),
        stall: cfg.stall_timeout,
        params_mode,
        params_delta: params_mode.then(|| service::params_delta(&cfg)),
        tx: tx.clone(),
        published: pub_rx.clone(),
        progress: progress_rx,
        num_floats: model_layout.total() as u64,
        layout_hash: capsnet_proto::run_layout_hash(&model_layout, cfg.reducers > 0),
        names: Arc::new(names),
        grid,
        place,
        liveness: liveness.clone(),
        metrics: metrics.clone(),
        opened: None,
        in_process: false,
        shm: None,
    };
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, "metrics at http://{a}/metrics");
        }
        let m = metrics.clone();
        tokio::spawn(capsnet_proto::metrics_http::serve(
            l,
            Arc::new(move || m.encode()),
            std::future::pending(),
        ))
    });
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status(health::READY, tonic_health::ServingStatus::NotServing)
        .await;
    let health_watch = tokio::spawn(health::watch(health, tx.clone()));
    let check = auth::TokenCheck::new(cfg.token.expose());
    let interceptor = check.clone();
    let conns = conn::Conns::new(
        cfg.max_connections,
        cfg.max_connections_per_ip,
        liveness.clone(),
        metrics.clone(),
    )
    .with_socket_buffer(cfg.socket_buffer);
    let svc_reducers = svc.clone();
    let session_check = check.clone();
    // The RPCs tonic decodes carry no tensors (those go through the data plane): tiny limits.
    let small = pb::coordinator_server::CoordinatorServer::new(svc.clone())
        .max_decoding_message_size(SMALL_MESSAGE)
        .max_encoding_message_size(STATUS_MESSAGE);
    let grpc = conn::Marked {
        inner: data_plane::DataPlane {
            inner: tonic::service::interceptor::InterceptedService::new(small, move |r| {
                interceptor.check(r)
            }),
            svc,
            auth: check,
        },
        conns: conns.clone(),
    };
    let health_svc = conn::Marked {
        inner: health_svc.max_decoding_message_size(HEALTH_MESSAGE),
        conns: conns.clone(),
    };
    // Reducer sessions carry span state: larger messages, same token.
    let reducers = conn::Marked {
        inner: tonic::service::interceptor::InterceptedService::new(
            pb::reducers_server::ReducersServer::new(svc_reducers)
                .max_decoding_message_size(shard::SESSION_MESSAGE)
                .max_encoding_message_size(shard::SESSION_MESSAGE),
            move |r| session_check.check(r),
        ),
        conns: conns.clone(),
    };

    // Stop on the external signal (after a checkpoint), or once training finished and the
    // workers had a few heartbeats to hear it.
    let grace = (3 * cfg.heartbeat).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let exit_when_done = cfg.exit_when_done;
    let stopper = {
        let tx = tx.clone();
        let mut finished = pub_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {
                    let (reply, done) = oneshot::channel();
                    if tx.send(actor::Msg::Shutdown { reply }).is_ok() {
                        match done.await {
                            Ok(Ok(Some(p))) => tracing::info!(checkpoint = %p.display(), "stopped by signal"),
                            Ok(Err(e)) => tracing::error!(error = %e, "checkpoint on shutdown failed"),
                            _ => {}
                        }
                    }
                }
                _ = async {
                    if !exit_when_done {
                        return std::future::pending::<()>().await;
                    }
                    while !finished.borrow_and_update().finished {
                        if finished.changed().await.is_err() { break; }
                    }
                    tokio::time::sleep(grace).await;
                } => {}
            }
            let _ = stop_tx.send(());
        })
    };
    drop(tx);

    let local = listener.local()?;
    tracing::info!(address = %local, tls = tls.is_some(), "coordinator listening");
    let mut builder = server(request_timeout(&cfg), tls)?;
    let served = builder
        .add_service(health_svc)
        .add_service(reducers)
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming_any(listener, conns), async {
            let _ = stop_rx.await;
        })
        .await;
    stopper.abort();
    health_watch.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    served.map_err(CoordinatorError::Serve)?;
    let outcome = tokio::task::spawn_blocking(move || actor_thread.join())
        .await
        .map_err(|source| CoordinatorError::Task {
            what: "waiting for the round thread",
            source,
        })?
        .map_err(|_| CoordinatorError::Panicked("the round thread"))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// `unix:` addresses: absolute, short enough, not a file that is no socket, not a socket
    /// served already; a stale socket file is replaced, and the file goes with the listener.
    #[tokio::test]
    async fn a_unix_socket_address_is_checked_and_its_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let err = |r: Result<Listener>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = err(Listener::bind("unix:relative.sock").await);
        assert!(e.contains("must be absolute"), "{e}");
        let e = err(Listener::bind(&format!("unix:/{}", "a".repeat(120))).await);
        assert!(e.contains("at most 107 bytes"), "{e}");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let e = err(Listener::bind(&format!("unix:{}", plain.display())).await);
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"x");
        let path = dir.path().join("r.sock");
        let address = format!("unix:{}", path.display());
        let l = Listener::bind(&address).await.unwrap();
        assert!(l.is_unix());
        assert_eq!(l.local().unwrap(), address);
        let e = err(Listener::bind(&address).await);
        assert!(e.contains("listens on this socket already"), "{e}");
        drop(l);
        assert!(!path.exists());
        // A socket file whose server is gone (std's listener leaves its file behind).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = Listener::bind(&address).await.unwrap();
        assert_eq!(l.local().unwrap(), address);
    }
}
