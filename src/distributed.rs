//! `capsnet coordinator` and `capsnet worker`: flags to configs, the async runtime, and the
//! stop signal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use capsnet_core::train::{self, TrainConfig};
use clap::Args;

use crate::args::{
    DataArgs, OuterArg, SyncArg, TokenArgs, TrainFlags, WireArg, parse_bytes, parse_duration,
    parse_duration_or_zero,
};
use crate::exit::ConfigError;

#[derive(Args, Clone)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub flags: TrainFlags,
    /// Where config.json, metrics.jsonl and checkpoints go.
    #[arg(long, env = "CAPSNET_RUN_DIR", default_value = "runs/coordinator")]
    pub run_dir: PathBuf,
    /// Continue from the newest checkpoint in --run-dir (fresh start if there is none).
    #[arg(long, env = "CAPSNET_RESUME")]
    pub resume: bool,
    /// Address to listen on: host:port (port 0 picks a free port; the address is logged) or
    /// unix:/path, a unix socket for workers and reducers of this machine (no TLS; the token
    /// is still checked; the socket file is removed when it stops).
    #[arg(long, env = "CAPSNET_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// What workers send: gradients (default) or parameters after local steps.
    #[arg(long, env = "CAPSNET_SYNC", value_enum, default_value = "grad")]
    pub sync: SyncArg,
    /// Local steps per round with --sync params.
    #[arg(long, env = "CAPSNET_SYNC_EVERY", default_value_t = 1)]
    pub sync_every: usize,
    /// With --sync params: `nesterov` treats each round's averaged change of the parameters as
    /// a pseudo-gradient for Nesterov momentum (DiLoCo, Douillard et al. 2023), which keeps the
    /// accuracy of synchronous training at much larger --sync-every.
    #[arg(
        long,
        env = "CAPSNET_OUTER_OPTIMIZER",
        value_enum,
        default_value = "none"
    )]
    pub outer_optimizer: OuterArg,
    /// The outer optimizer's learning rate (1 with momentum 0 is plain averaging).
    #[arg(long, env = "CAPSNET_OUTER_LR", default_value_t = 0.7)]
    pub outer_lr: f32,
    /// The outer optimizer's momentum.
    #[arg(long, env = "CAPSNET_OUTER_MOMENTUM", default_value_t = 0.9)]
    pub outer_momentum: f32,
    /// A round closes at this deadline with --min-workers updates; the rest are marked unhealthy.
    #[arg(long, env = "CAPSNET_ROUND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub round_timeout: Duration,
    #[arg(long, env = "CAPSNET_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: usize,
    /// Start training when this many workers joined [default: --min-workers].
    #[arg(long, env = "CAPSNET_EXPECT_WORKERS")]
    pub expect_workers: Option<usize>,
    /// Start anyway after this long with at least --min-workers.
    #[arg(long, env = "CAPSNET_START_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub start_timeout: Duration,
    /// Evaluate on the test set (and checkpoint) every N rounds; 0: at the end of each epoch.
    #[arg(long, env = "CAPSNET_EVAL_EVERY", default_value_t = 0)]
    pub eval_every: u64,
    /// Worker heartbeat interval; three missed ones mark a worker unhealthy.
    #[arg(long, env = "CAPSNET_HEARTBEAT", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Encoding of updates on the wire (the coordinator keeps fp32 master weights).
    #[arg(long, env = "CAPSNET_WIRE", value_enum, default_value = "f32")]
    pub wire: WireArg,
    /// Bytes per streamed chunk [default: 1 MiB; 256 KiB with --reducers, where the last
    /// range reduced crosses each reducer's link once per worker after the rest]
    #[arg(long, env = "CAPSNET_CHUNK_BYTES")]
    pub chunk_bytes: Option<usize>,
    #[command(flatten)]
    pub token: TokenArgs,
    /// TLS certificate (PEM); with --tls-key, the coordinator serves TLS.
    #[arg(long, env = "CAPSNET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must be signed by (mutual TLS).
    #[arg(long, env = "CAPSNET_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Exit once training is finished and workers were told; false keeps serving (status,
    /// health) until SIGTERM, as a Kubernetes Deployment expects.
    #[arg(long, env = "CAPSNET_EXIT_WHEN_DONE", default_value_t = true, action = clap::ArgAction::Set)]
    pub exit_when_done: bool,
    /// Give stragglers (updates over twice the round's median on average, or three rounds
    /// missed in a row) no work, but every 10th round, where they are measured again.
    #[arg(long, env = "CAPSNET_DROP_STRAGGLERS")]
    pub drop_stragglers: bool,
    /// Scale an update whose norm (--sync params: distance from the round's parameters) is
    /// over 100x the median of the recent accepted ones down to that limit, instead of
    /// rejecting it.
    #[arg(long, env = "CAPSNET_CLIP_UPDATES")]
    pub clip_updates: bool,
    /// A pull the worker does not read, or a push whose next chunk does not come, for this
    /// long is dropped (its buffers and its slot in the round are freed).
    #[arg(long, env = "CAPSNET_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    #[arg(long, env = "CAPSNET_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Connections open at once from one IP address (a kubelet, a worker and a metrics
    /// scraper use a few each).
    #[arg(long, env = "CAPSNET_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,
    /// Bytes each accepted TCP connection may buffer each way (SO_SNDBUF and SO_RCVBUF), 0 for
    /// the kernel's autotuning. 64KiB keeps the connections that share a deeply queued link
    /// even (on an emulated 1 Gbit/s LAN it took 2-20% off most rounds); leave 0 on fast or
    /// long links, where a connection needs more in flight.
    #[arg(long, env = "CAPSNET_SOCKET_BUFFER", default_value = "0", value_parser = parse_bytes)]
    pub socket_buffer: usize,
    /// Workers the coordinator keeps track of at once, live or gone (gone ones are forgotten
    /// after 10 minutes, or sooner to make room); a join past it is refused while all are live.
    #[arg(long, env = "CAPSNET_MAX_WORKERS", default_value_t = 4096)]
    pub max_workers: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (rounds, round and sync times, members
    /// by state, heartbeat ages, stragglers, bytes by wire encoding, evaluation, timestamps of
    /// the last round and checkpoint).
    #[arg(long, env = "CAPSNET_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Reducer processes (`capsnet reducer`, or `capsnet worker --serve-reducer`) that own
    /// spans of the parameters and their optimizer state: updates and parameters move between
    /// workers and reducers, not through this process. Training starts once this many
    /// reducers joined; 0 reduces everything here.
    #[arg(long, env = "CAPSNET_REDUCERS", default_value_t = 0)]
    pub reducers: usize,
    /// With --reducers: gather the parameters and optimizer state from the reducers at least
    /// this often (besides each evaluation and checkpoint). A reducer that dies rolls the run
    /// back to the last gather; 0 gathers only for evaluations and checkpoints.
    #[arg(long, env = "CAPSNET_GATHER_EVERY", default_value = "60s", value_parser = parse_duration_or_zero)]
    pub gather_every: Duration,
    /// --sync grad: send new parameters to the workers as their change from the last round's,
    /// which the workers hold: lossless, about 3/4 of the bytes of f32 parameters and 1/2 of
    /// bf16's, for a pass over them on each side.
    #[arg(long, env = "CAPSNET_DELTA_PULLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub delta_pulls: bool,
    /// Write the bound address to this file once listening (for tests and scripts that listen
    /// on port 0).
    #[arg(long, hide = true)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct WorkerArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "CAPSNET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    #[command(flatten)]
    data: DataArgs,
    /// Stable name; a worker restarted under the same name gets its shard back
    /// [default: worker-<rank>, or the host name].
    #[arg(long, env = "CAPSNET_WORKER_NAME")]
    name: Option<String>,
    /// Preferred rank (Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX is used when unset).
    #[arg(long, env = "CAPSNET_RANK")]
    rank: Option<u32>,
    /// Threads [default: the cores available].
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Exit with an error when the coordinator stays unreachable this long.
    #[arg(long, env = "CAPSNET_GIVE_UP_AFTER", default_value = "5m", value_parser = parse_duration)]
    give_up_after: Duration,
    #[command(flatten)]
    token: TokenArgs,
    /// CA (PEM) of the coordinator's certificate: connect with TLS.
    #[arg(long, env = "CAPSNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[arg(
        long,
        env = "CAPSNET_TLS_CERT",
        requires = "tls_ca",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Server name to verify in the coordinator's certificate [default: the URL's host].
    #[arg(long, env = "CAPSNET_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (updates sent and used, compute and
    /// sync time per round, images/s, bytes by wire encoding, joins, the last loss).
    #[arg(long, env = "CAPSNET_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Send the whole gradient only once the backward pass is done, instead of each range as
    /// soon as it is final (--sync grad; for measuring what the overlap hides).
    #[arg(long, env = "CAPSNET_NO_OVERLAP")]
    no_overlap: bool,
    /// Also serve a reducer of a sharded run (coordinator --reducers) on this address, in this
    /// process (the co-located layout: one reducer per worker machine); `unix:/path` serves a
    /// unix socket, which only workers of this machine reach (capsnet launch uses one).
    #[arg(long, env = "CAPSNET_SERVE_REDUCER")]
    serve_reducer: Option<String>,
    /// The URL workers reach this process's reducer at [default: http://ADDR of
    /// --serve-reducer when it names a host; unix:/path for a unix socket].
    #[arg(long, env = "CAPSNET_REDUCER_ADVERTISE", requires = "serve_reducer")]
    reducer_advertise: Option<String>,
    /// TLS certificate and key (PEM) the reducer serves with (its advertised URL is then
    /// https://); workers check it against their --tls-ca.
    #[arg(
        long,
        env = "CAPSNET_REDUCER_TLS_CERT",
        requires = "serve_reducer",
        requires = "reducer_tls_key"
    )]
    reducer_tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_REDUCER_TLS_KEY", requires = "reducer_tls_cert")]
    reducer_tls_key: Option<PathBuf>,
    /// CA (PEM) that the client certificates of workers pushing to this reducer must be signed
    /// by (mutual TLS).
    #[arg(
        long,
        env = "CAPSNET_REDUCER_TLS_CLIENT_CA",
        requires = "reducer_tls_cert"
    )]
    reducer_tls_client_ca: Option<PathBuf>,
    /// Write the reducer's URL to this file once it listens (tests and scripts).
    #[arg(long, hide = true, requires = "serve_reducer")]
    reducer_ready_file: Option<PathBuf>,
    /// The reducer's --socket-buffer: bytes each TCP connection to it may buffer each way (0:
    /// the kernel's autotuning; see `capsnet reducer --help`).
    #[arg(long, env = "CAPSNET_REDUCER_SOCKET_BUFFER", default_value = "0", value_parser = parse_bytes)]
    reducer_socket_buffer: usize,
    /// The name to check in every reducer's certificate (https:// reducers, with --tls-ca)
    /// [default: each reducer's host, from its URL]. With one certificate for all the reducers
    /// of a fleet (a Kubernetes Secret), the name it carries.
    #[arg(long, env = "CAPSNET_REDUCER_TLS_DOMAIN", requires = "tls_ca")]
    reducer_tls_domain: Option<String>,
}

#[derive(Args, Clone)]
pub struct ReducerArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "CAPSNET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Address to serve workers on; port 0 picks a free port. `unix:/path` serves a unix
    /// socket instead: workers of this machine only, without the TCP/IP stack (no TLS).
    #[arg(
        long,
        env = "CAPSNET_REDUCER_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    listen: String,
    /// The URL workers reach this reducer at [default: http(s)://ADDR of --listen when it
    /// names a host; unix:/path for a unix socket].
    #[arg(long, env = "CAPSNET_REDUCER_ADVERTISE")]
    advertise: Option<String>,
    /// A name for the logs [default: reducer-<host name>].
    #[arg(long, env = "CAPSNET_REDUCER_NAME")]
    name: Option<String>,
    /// Threads of the reduction [default: the cores available].
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// Exit with an error when the coordinator stays unreachable this long.
    #[arg(long, env = "CAPSNET_GIVE_UP_AFTER", default_value = "5m", value_parser = parse_duration)]
    give_up_after: Duration,
    #[command(flatten)]
    token: TokenArgs,
    /// TLS certificate (PEM); with --tls-key, the reducer serves TLS (and presents it to the
    /// coordinator as its client certificate).
    #[arg(long, env = "CAPSNET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CAPSNET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that workers' client certificates must be signed by (mutual TLS).
    #[arg(long, env = "CAPSNET_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// CA (PEM) of the coordinator's certificate: reach it with TLS.
    #[arg(long, env = "CAPSNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Server name to verify in the coordinator's certificate [default: the URL's host].
    #[arg(long, env = "CAPSNET_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    #[arg(long, env = "CAPSNET_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    #[arg(long, env = "CAPSNET_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Bytes each accepted TCP connection may buffer each way (SO_SNDBUF and SO_RCVBUF), 0 for
    /// the kernel's autotuning. 64KiB keeps the connections that share a deeply queued link
    /// even (on an emulated 1 Gbit/s LAN it took 2-20% off most rounds); leave 0 on fast or
    /// long links, where a connection needs more in flight.
    #[arg(long, env = "CAPSNET_SOCKET_BUFFER", default_value = "0", value_parser = parse_bytes)]
    socket_buffer: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (rounds committed and their times, the
    /// span owned, updates completed and aborted, gathers, bytes by wire encoding,
    /// connections).
    #[arg(long, env = "CAPSNET_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Write the URL it is reached at to this file once listening (tests and scripts).
    #[arg(long, hide = true)]
    ready_file: Option<PathBuf>,
}

/// The URL a reducer listening on `local` (`host:port` or `unix:/path`) is reached at:
/// `advertise`, else `unix:/path`, else `http(s)://local` when `local` names a host (not
/// 0.0.0.0 or ::).
fn advertised(advertise: Option<&str>, local: &str, tls: bool) -> Result<String> {
    if let Some(a) = advertise {
        return Ok(a.to_string());
    }
    if local.starts_with(capsnet_coordinator::UNIX_PREFIX) {
        return Ok(local.to_string());
    }
    let unspecified = local
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified());
    if unspecified {
        return Err(ConfigError(format!(
            "the reducer listens on {local}, which workers cannot dial: give the URL they reach \
             it at with --advertise (CAPSNET_REDUCER_ADVERTISE)"
        ))
        .into());
    }
    Ok(format!("{}://{local}", if tls { "https" } else { "http" }))
}

/// Binds a reducer's listener and makes its config from the worker's or reducer's flags.
async fn reducer_config(
    listen: &str,
    advertise: Option<&str>,
    base: capsnet_coordinator::ReducerConfig,
    ready_file: Option<&PathBuf>,
) -> Result<(
    capsnet_coordinator::Listener,
    capsnet_coordinator::ReducerConfig,
)> {
    // A port taken, an address not of this host, a socket path in use: retrying cannot help
    // (exit 2).
    let listener = capsnet_coordinator::Listener::bind(listen)
        .await
        .map_err(|e| ConfigError(format!("reducer {e}")))?;
    let local = listener.local()?;
    let advertise = advertised(advertise, &local, base.tls.is_some())?;
    if let Some(f) = ready_file {
        capsnet_core::checkpoint::write_atomic(f, advertise.as_bytes())?;
    }
    Ok((
        listener,
        capsnet_coordinator::ReducerConfig { advertise, ..base },
    ))
}

pub fn reducer(a: ReducerArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(train::default_threads);
    if threads == 0 {
        return Err(ConfigError("threads must be at least 1".into()).into());
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(capsnet_coordinator::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: a.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let coordinator_tls = a
        .tls_ca
        .as_ref()
        .map(|ca| capsnet_coordinator::CoordinatorTls {
            ca: ca.clone(),
            cert: a.tls_cert.clone().zip(a.tls_key.clone()),
            domain: a.tls_domain.clone(),
        });
    let name = a.name.clone().unwrap_or_else(|| {
        let (host, _) = capsnet_worker::identity(None, None);
        format!("reducer-{host}")
    });
    let base = capsnet_coordinator::ReducerConfig {
        coordinator: a.coordinator.clone(),
        token: a.token.token()?.into(),
        advertise: String::new(),
        name,
        threads,
        tls,
        coordinator_tls,
        give_up_after: a.give_up_after,
        max_connections: a.max_connections,
        max_connections_per_ip: a.max_connections_per_ip,
        socket_buffer: a.socket_buffer,
        local: None,
        metrics: capsnet_coordinator::ReducerMetrics::new(),
    };
    let out = runtime()?.block_on(async {
        let stop = shutdown_signal();
        let metrics = match a.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| ConfigError(format!("--metrics-listen {addr}: {e}")))?;
                if let Ok(a) = l.local_addr() {
                    tracing::info!(address = %a, "metrics at http://{a}/metrics");
                }
                let m = base.metrics.clone();
                Some(tokio::spawn(capsnet_proto::metrics_http::serve(
                    l,
                    std::sync::Arc::new(move || m.encode()),
                    std::future::pending(),
                )))
            }
            None => None,
        };
        let (listener, cfg) = reducer_config(
            &a.listen,
            a.advertise.as_deref(),
            base,
            a.ready_file.as_ref(),
        )
        .await?;
        let out = capsnet_coordinator::serve_reducer(listener, cfg, stop).await;
        if let Some(m) = metrics {
            m.abort();
        }
        anyhow::Ok(out?)
    })?;
    if !out.finished {
        println!("reducer: {} rounds committed, stopped", out.rounds);
        return Err(crate::exit::Stopped.into());
    }
    println!(
        "reducer: {} rounds committed, training finished",
        out.rounds
    );
    Ok(())
}

impl CoordinatorArgs {
    /// The coordinator's config, every value checked; `token` is the run's bearer token,
    /// `expect_workers` replaces --expect-workers (`launch` knows how many it starts).
    pub fn config(
        &self,
        token: String,
        expect_workers: Option<usize>,
    ) -> Result<capsnet_coordinator::CoordinatorConfig> {
        let mut train = TrainConfig {
            run_dir: self.run_dir.clone(),
            ..TrainConfig::default()
        };
        self.flags.overrides(true)?.apply(&mut train);
        let mut c = capsnet_coordinator::CoordinatorConfig::new(train, token);
        c.sync_mode = self.sync.mode();
        c.sync_every = self.sync_every;
        c.outer = (self.outer_optimizer == OuterArg::Nesterov).then_some(
            capsnet_coordinator::OuterOptimizer {
                lr: self.outer_lr,
                momentum: self.outer_momentum,
            },
        );
        c.round_timeout = self.round_timeout;
        c.gather_every = self.gather_every;
        c.delta_pulls = self.delta_pulls;
        c.min_workers = self.min_workers;
        c.expect_workers = expect_workers
            .or(self.expect_workers)
            .unwrap_or(self.min_workers);
        c.start_timeout = self.start_timeout;
        c.eval_every = self.eval_every;
        c.heartbeat = self.heartbeat;
        c.wire = self.wire.encoding();
        c.chunk_bytes = self.chunk_bytes.unwrap_or(if self.reducers > 0 {
            capsnet_proto::wire::SHARDED_CHUNK_BYTES
        } else {
            capsnet_proto::wire::DEFAULT_CHUNK_BYTES
        });
        c.resume = self.resume;
        c.exit_when_done = self.exit_when_done;
        c.drop_stragglers = self.drop_stragglers;
        c.metrics_listen = self.metrics_listen;
        c.clip_updates = self.clip_updates;
        c.max_connections = self.max_connections;
        c.max_connections_per_ip = self.max_connections_per_ip;
        c.socket_buffer = self.socket_buffer;
        c.max_workers = self.max_workers;
        c.stall_timeout = self.stall_timeout;
        c.reducers = self.reducers;
        c.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(capsnet_coordinator::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        c.validate()?;
        Ok(c)
    }
}

/// Serves a coordinator on `listener` until training is over or `stop` resolves; prints how
/// the run ended, each line after `prefix`. `launch` runs it too, beside its worker processes.
pub async fn serve_coordinator(
    listener: impl Into<capsnet_coordinator::Listener>,
    cfg: capsnet_coordinator::CoordinatorConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    prefix: &str,
) -> Result<capsnet_coordinator::Outcome> {
    let outcome = capsnet_coordinator::serve(listener, cfg, stop).await?;
    match &outcome.last_eval {
        Some(e) => println!(
            "{prefix}coordinator: {} rounds{}; test {e}",
            outcome.rounds,
            if outcome.finished {
                ", finished"
            } else {
                ", stopped"
            },
        ),
        None => println!("{prefix}coordinator: {} rounds, stopped", outcome.rounds),
    }
    if let Some(p) = &outcome.checkpoint {
        println!("{prefix}checkpoint: {}", p.display());
    }
    if let Some(e) = &outcome.checkpoint_failed {
        anyhow::bail!(
            "the last checkpoint could not be written ({e}); the run's newest state is lost \
             back to the previous checkpoint"
        );
    }
    Ok(outcome)
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let cfg = a.config(a.token.token()?, None)?;
    if a.listen.starts_with(capsnet_proto::unix::UNIX_PREFIX) && a.tls_cert.is_some() {
        return Err(ConfigError(format!(
            "--listen {}: a coordinator on a unix socket serves it without TLS (it does not \
             leave the machine); drop --tls-cert/--tls-key or listen on host:port",
            a.listen
        ))
        .into());
    }
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        let listener = capsnet_coordinator::Listener::bind(&a.listen)
            .await
            .map_err(|e| ConfigError(format!("--listen {}: {e}", a.listen)))?;
        let local = listener.local()?;
        if let Some(f) = &a.ready_file {
            capsnet_core::checkpoint::write_atomic(f, local.as_bytes())?;
        }
        serve_coordinator(listener, cfg, stop, "").await
    })?;
    Ok(())
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let (name, rank) = capsnet_worker::identity(a.name.clone(), a.rank);
    let tls = a.tls_ca.as_ref().map(|ca| capsnet_worker::ClientTls {
        ca: ca.clone(),
        cert: a.tls_cert.clone(),
        key: a.tls_key.clone(),
        domain: a.tls_domain.clone(),
    });
    let threads = a.threads.unwrap_or_else(train::default_threads);
    if threads == 0 {
        return Err(ConfigError("threads must be at least 1".into()).into());
    }
    let reducer_metrics = capsnet_coordinator::ReducerMetrics::new();
    let cfg = capsnet_worker::WorkerConfig {
        coordinator: a.coordinator.clone(),
        token: a.token.token()?.into(),
        data_dir: a.data.resolve()?,
        name,
        rank_hint: rank,
        threads,
        give_up_after: a.give_up_after,
        tls,
        metrics_listen: a.metrics_listen,
        overlap: !a.no_overlap,
        reducer_tls_domain: a.reducer_tls_domain.clone(),
        local_reducer: a
            .serve_reducer
            .is_some()
            .then(capsnet_proto::frame::LocalReducer::default),
        // The reducer's metrics beside the worker's, at the worker's --metrics-listen.
        more_metrics: a.serve_reducer.is_some().then(|| {
            let m = reducer_metrics.clone();
            capsnet_proto::metrics_http::Source(std::sync::Arc::new(move || m.encode()))
        }),
    };
    let Some(listen) = a.serve_reducer.clone() else {
        let out =
            runtime()?.block_on(async { capsnet_worker::run(cfg, shutdown_signal()).await })?;
        return worker_done(out);
    };
    // A reducer in this process beside the worker: same coordinator, token and CA.
    let base = capsnet_coordinator::ReducerConfig {
        coordinator: cfg.coordinator.clone(),
        token: cfg.token.clone(),
        advertise: String::new(),
        name: format!("reducer-{}", cfg.name),
        threads,
        tls: match (&a.reducer_tls_cert, &a.reducer_tls_key) {
            (Some(cert), Some(key)) => Some(capsnet_coordinator::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: a.reducer_tls_client_ca.clone(),
            }),
            _ => None,
        },
        coordinator_tls: cfg
            .tls
            .as_ref()
            .map(|t| capsnet_coordinator::CoordinatorTls {
                ca: t.ca.clone(),
                cert: t.cert.clone().zip(t.key.clone()),
                domain: t.domain.clone(),
            }),
        give_up_after: cfg.give_up_after,
        max_connections: 1024,
        max_connections_per_ip: 64,
        socket_buffer: a.reducer_socket_buffer,
        // The worker reaches its own span in process, without a socket.
        local: cfg.local_reducer.clone(),
        metrics: reducer_metrics,
    };
    let out = runtime()?.block_on(async {
        let (listener, rcfg) = reducer_config(
            &listen,
            a.reducer_advertise.as_deref(),
            base,
            a.reducer_ready_file.as_ref(),
        )
        .await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = std::sync::Arc::new(stop_tx);
        let signal = shutdown_signal();
        let stopper = tokio::spawn({
            let stop_tx = stop_tx.clone();
            async move {
                signal.await;
                let _ = stop_tx.send(true);
            }
        });
        let on_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let reducer = tokio::spawn(capsnet_coordinator::serve_reducer(
            listener,
            rcfg,
            on_stop(stop_rx.clone()),
        ));
        let out = capsnet_worker::run(cfg, on_stop(stop_rx)).await;
        // The worker is done (training over, or stopped): the reducer ends with the
        // coordinator's word that training is over, or with the stop signal. A worker that
        // failed stops its reducer too: the process exits with the error (and is restarted
        // whole) instead of serving on without its worker.
        if out.is_err() {
            let _ = stop_tx.send(true);
            let _ = reducer.await;
            stopper.abort();
            return anyhow::Ok(out?);
        }
        let reduced = reducer.await.context("the reducer task")?;
        stopper.abort();
        if let Err(e) = reduced {
            return Err(anyhow::Error::from(e).context("the reducer in this process failed"));
        }
        anyhow::Ok(out?)
    })?;
    worker_done(out)
}

fn worker_done(out: capsnet_worker::WorkerOutcome) -> Result<()> {
    if !out.finished {
        println!("worker: {} updates sent, stopped", out.rounds);
        return Err(crate::exit::Stopped.into());
    }
    println!("worker: {} updates sent, training finished", out.rounds);
    Ok(())
}

/// The async runtime of the network commands. Two threads: the gRPC I/O, per-chunk checks and
/// encoding are light; the heavy work (training steps, reductions, evaluation) runs on rayon
/// pools sized by --threads, outside the runtime.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    const IO_THREADS: usize = 2;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(IO_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (ctrl-c). The handlers are
/// installed when this is called, not when the future is first polled: a signal that comes
/// while the caller is still starting up is not lost (nor does it kill the process unhandled).
/// Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = recv(term.as_mut()) => {}
            _ = recv(int.as_mut()) => {}
        }
        tracing::info!("stop signal received");
    }
}

/// The next delivery of a signal whose handler could be installed; never without one.
async fn recv(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
