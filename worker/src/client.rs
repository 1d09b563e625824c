//! A connected gRPC client that sends the bearer token with every call.

use std::path::PathBuf;
use std::time::Duration;

use capsnet_proto::frame::{GRPC_CONTENT_TYPE, InProcess, MAX_MESSAGE, Messages};
use capsnet_proto::pb::coordinator_client::CoordinatorClient;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::{Result, WorkerError};

/// `e` and each of its sources, joined with `: `.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// TLS files of a client: the CA that signed the coordinator's certificate, and for mutual TLS
/// the client's own certificate and key.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub domain: Option<String>,
}

#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The generated client for the small RPCs, and the channel itself for the two bulk streams,
/// whose messages are framed by hand ([`capsnet_proto::frame`]).
#[derive(Clone)]
pub struct Client {
    rpc: CoordinatorClient<InterceptedService<Channel, Auth>>,
    channel: Channel,
    /// The bulk RPCs of a reducer in this process, called without a socket.
    local: Option<InProcess>,
    /// `scheme://authority` of the coordinator.
    origin: String,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    /// A peer on this machine (a unix socket): payloads may pass in shared memory.
    shm: Option<std::sync::Arc<SharedMemory>>,
}

/// The longest pause, in rounds, of pushes through shared memory after refusals in a row.
pub const MAX_PUSH_PAUSE: u64 = 1024;

/// Payloads in shared memory with a peer of this machine ([`capsnet_shm`]), kept with its
/// client across rounds.
pub struct SharedMemory {
    /// The peer's regions this worker read parameters from.
    pub readers: capsnet_shm::Readers,
    /// Parameters from the peer's shared memory were read here: it speaks it, and shares this
    /// machine's processes, so pushes to it go there too.
    pub peer_reads: std::sync::atomic::AtomicBool,
    /// Reading the peer's shared memory failed: pull payloads inline from now on.
    pub pull_off: std::sync::atomic::AtomicBool,
    /// Pushes through shared memory the peer refused in a row (reset by one it took), and the
    /// round from which pushes may go through shared memory again: 1, 2, 4 ... rounds after
    /// the last refusal, at most [`MAX_PUSH_PAUSE`]. A transient refusal (a region replaced at
    /// a reassignment) costs a round; a peer that keeps refusing is asked rarely. `u64::MAX`:
    /// never (no region could be made here).
    push_refusals: std::sync::atomic::AtomicU32,
    /// The round of the last refusal: a round's refusals (of several streams) count once.
    push_refused_round: std::sync::atomic::AtomicU64,
    push_paused_until: std::sync::atomic::AtomicU64,
    /// The round whose update is being routed ([`SharedMemory::route_round`]).
    push_round: std::sync::atomic::AtomicU64,
    /// The region this worker pushes to the peer in, made for a span of so many bytes.
    push: std::sync::Mutex<Option<(usize, std::sync::Arc<capsnet_shm::Writer>)>>,
}

impl SharedMemory {
    fn new() -> Self {
        SharedMemory {
            // A reducer keeps one region at a time (two across a reassignment).
            readers: capsnet_shm::Readers::new(4),
            peer_reads: Default::default(),
            pull_off: Default::default(),
            push_refusals: Default::default(),
            push_refused_round: std::sync::atomic::AtomicU64::new(u64::MAX),
            push_paused_until: Default::default(),
            push_round: Default::default(),
            push: Default::default(),
        }
    }

    /// Whether pushes go through shared memory (once a region is made for them) in the round
    /// being routed.
    pub fn pushes(&self) -> bool {
        self.pushes_in(self.push_round.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether the update of `round` would go through shared memory: parameters from the
    /// peer's shared memory were read here, and pushes are not paused after a refusal.
    pub fn pushes_in(&self, round: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.peer_reads.load(Relaxed) && round >= self.push_paused_until.load(Relaxed)
    }

    /// The update of `round` is being routed.
    pub fn route_round(&self, round: u64) {
        (self.push_round).store(round, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peer refused a push of `round` through shared memory: pushes go over the socket
    /// for the next 1, 2, 4 ... rounds (this one's is pushed again over the socket). Returns
    /// the rounds paused.
    pub fn push_refused(&self, round: u64) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let k = match self.push_refused_round.swap(round, Relaxed) == round {
            true => self.push_refusals.load(Relaxed).saturating_sub(1),
            false => self.push_refusals.fetch_add(1, Relaxed),
        };
        let k = k.min(MAX_PUSH_PAUSE.ilog2());
        let pause = 1u64 << k;
        let until = round.saturating_add(pause);
        // Never earlier than a pause already set (or "never").
        self.push_paused_until.fetch_max(until, Relaxed);
        pause
    }

    /// The peer took a push through shared memory.
    pub fn push_taken(&self) {
        self.push_refusals
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether pulls ask for payloads in shared memory.
    pub fn pulls(&self) -> bool {
        !self.pull_off.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The region to push a span of `span_bytes` in ([`capsnet_proto::shared::PUSH_SLOTS`]
    /// rounds of it), if pushes go through shared memory: parameters from the peer's shared
    /// memory were read here, pushes are not paused after a refusal, and a region could be made
    /// (one is made anew when the span's size changed).
    pub fn push_region(&self, span_bytes: usize) -> Option<std::sync::Arc<capsnet_shm::Writer>> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.pushes() || span_bytes == 0 {
            return None;
        }
        let mut held = self.push.lock().ok()?;
        if let Some((_, w)) = held.as_ref().filter(|(n, _)| *n == span_bytes) {
            return Some(w.clone());
        }
        match capsnet_shm::Writer::create(capsnet_proto::shared::PUSH_SLOTS * span_bytes) {
            Ok(w) => {
                *held = Some((span_bytes, w.clone()));
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no shared memory for pushes: they go over the socket");
                self.push_paused_until.store(u64::MAX, Relaxed);
                None
            }
        }
    }
}

/// Whom a [`Client`] dials: its errors name it and say what to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Coordinator,
    Reducer,
}

/// A URL whose scheme does not match the worker's TLS settings (a worker reaches every peer
/// over TLS exactly when it has `--tls-ca`): the configuration error that names the peer.
fn scheme_error(peer: Peer, url: &str, uri: &http::Uri, tls: bool) -> Option<WorkerError> {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let why = match (peer, uri.scheme_str(), tls) {
        (Peer::Coordinator, Some("http"), true) => format!(
            "--tls-ca is set, but the coordinator URL {url} is http://, which would not \
             encrypt anything: use https://{authority}"
        ),
        (Peer::Coordinator, Some("https"), false) => format!(
            "the coordinator URL {url} is https://: give the CA of its certificate with --tls-ca"
        ),
        (Peer::Reducer, Some("http"), true) => format!(
            "reducer {url} serves plaintext, but this worker reaches its coordinator over TLS \
             (--tls-ca): the reducers must serve TLS too (capsnet reducer --tls-cert \
             --tls-key, or worker --reducer-tls-cert --reducer-tls-key)"
        ),
        (Peer::Reducer, Some("https"), false) => format!(
            "reducer {url} serves TLS: give the CA of its certificate with --tls-ca (and reach \
             the coordinator over TLS too)"
        ),
        _ => return None,
    };
    Some(WorkerError::Config(why))
}

use capsnet_proto::unix::UnixConnector;
pub use capsnet_proto::unix::{UNIX_ORIGIN, UNIX_PREFIX};

impl Client {
    /// A client of the coordinator at `url`.
    pub async fn connect(url: &str, token: &str, tls: Option<&ClientTls>) -> Result<Self> {
        Self::connect_to(Peer::Coordinator, url, token, tls).await
    }

    /// A client of `peer` at `url`. A URL of the other scheme than `tls` asks for is a
    /// configuration error; before a plaintext connection carries the token, the server must
    /// answer HTTP/2 in clear. `unix:/path` is dialed as a unix socket of this machine,
    /// without TLS whatever `tls` says (nothing leaves the machine; who may connect is the
    /// socket file's permissions' and the token's to say).
    pub async fn connect_to(
        peer: Peer,
        url: &str,
        token: &str,
        tls: Option<&ClientTls>,
    ) -> Result<Self> {
        let unix = capsnet_proto::unix::socket_path(url)
            .transpose()
            .map_err(WorkerError::Config)?;
        let mut ep = Endpoint::from_shared(if unix.is_some() {
            UNIX_ORIGIN.to_string()
        } else {
            url.to_string()
        })
        .map_err(|source| WorkerError::Address {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(2 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
        let uri = ep.uri().clone();
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| WorkerError::TokenNotAscii)?;
        if let Some(path) = unix {
            let channel = ep
                .connect_with_connector(UnixConnector(path))
                .await
                .map_err(|e| {
                    WorkerError::Rpc(Status::unavailable(format!("{url}: {}", error_chain(&e))))
                })?;
            return Ok(Client {
                rpc: CoordinatorClient::with_interceptor(channel.clone(), Auth(value.clone()))
                    .max_decoding_message_size(MAX_MESSAGE),
                channel,
                local: None,
                origin: UNIX_ORIGIN.to_string(),
                authorization: value,
                shm: Some(std::sync::Arc::new(SharedMemory::new())),
            });
        }
        if let Some(e) = scheme_error(peer, url, &uri, tls.is_some()) {
            return Err(e);
        }
        if uri.scheme_str() == Some("http") {
            check_plaintext(peer, url, &uri).await?;
        }
        if let Some(t) = tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| WorkerError::ReadFile {
                    path: p.clone(),
                    source,
                })
            };
            let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&t.ca)?));
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(d) = &t.domain {
                c = c.domain_name(d.clone());
            }
            ep = ep.tls_config(c).map_err(WorkerError::Tls)?;
        }
        // tonic's transport error says only "transport error": the cause (refused, a
        // certificate that does not name the host, ...) is in its sources.
        let channel = ep
            .connect()
            .await
            .map_err(|e| WorkerError::Rpc(Status::unavailable(error_chain(&e))))?;
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str())
        );
        Ok(Client {
            rpc: CoordinatorClient::with_interceptor(channel.clone(), Auth(value.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            channel,
            local: None,
            origin,
            authorization: value,
            shm: None,
        })
    }

    /// A client of the reducer served in this process: its bulk RPCs ([`Client::call`]) are
    /// handed to it without a socket, with the token as over the network. Only those: its
    /// channel for the small RPCs ([`Client::rpc`]) would dial the advertised URL lazily,
    /// without TLS or the plaintext check of [`Client::connect`], so nothing calls them.
    pub fn local(local: InProcess, token: &str) -> Result<Self> {
        let url = if local.url.starts_with(UNIX_PREFIX) {
            UNIX_ORIGIN.to_string()
        } else {
            local.url.clone()
        };
        let ep = Endpoint::from_shared(url.clone())
            .map_err(|source| WorkerError::Address { url, source })?;
        let uri = ep.uri().clone();
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| WorkerError::TokenNotAscii)?;
        let channel = ep.connect_lazy();
        Ok(Client {
            rpc: CoordinatorClient::with_interceptor(channel.clone(), Auth(value.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            channel,
            local: Some(local),
            shm: None,
            origin: format!(
                "{}://{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str())
            ),
            authorization: value,
        })
    }

    /// Shared memory with the peer, where it is on this machine (a unix socket).
    pub fn shm(&self) -> Option<&std::sync::Arc<SharedMemory>> {
        self.shm.as_ref()
    }

    /// Whether the bulk RPCs are calls in this process.
    pub fn is_in_process(&self) -> bool {
        self.local.is_some()
    }

    pub fn rpc(&mut self) -> &mut CoordinatorClient<InterceptedService<Channel, Auth>> {
        &mut self.rpc
    }

    /// Starts a call of the data plane (`path` is [`PULL_PATH`](capsnet_proto::frame::PULL_PATH)
    /// or [`PUSH_PATH`](capsnet_proto::frame::PUSH_PATH)) with `body` as its request messages;
    /// returns the response's messages, or the status of a response that carries none.
    pub async fn call(&mut self, path: &str, body: Body) -> Result<Messages<Body>, Status> {
        let mut req = http::Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("{}{path}", self.origin)
            .parse()
            .map_err(|e| Status::internal(format!("request URI: {e}")))?;
        let h = req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
        );
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_bytes(self.authorization.as_bytes())
                .map_err(|e| Status::internal(format!("token header: {e}")))?,
        );
        let resp = match &self.local {
            Some(l) => l.call(req).await,
            None => {
                std::future::poll_fn(|cx| self.channel.poll_ready(cx))
                    .await
                    .map_err(|e| Status::from_error(e.into()))?;
                self.channel
                    .call(req)
                    .await
                    .map_err(|e| Status::from_error(e.into()))?
            }
        };
        // A call that failed before any message answers with its status in the headers.
        if let Some(s) = Status::from_header_map(resp.headers())
            && s.code() != tonic::Code::Ok
        {
            return Err(s);
        }
        if resp.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "the coordinator answered HTTP {}",
                resp.status()
            )));
        }
        Ok(Messages::new(resp.into_body()))
    }
}

/// How long the plaintext check waits to connect and for the first answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Before a token goes out in clear: the server at `uri` must answer the HTTP/2 preface (sent
/// alone, without any request or token) with an HTTP/2 frame. A `peer` that serves TLS
/// answers with a TLS alert or closes the connection; sending it requests would put the token
/// on the wire unencrypted, to a server that cannot even read them.
async fn check_plaintext(peer: Peer, url: &str, uri: &http::Uri) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unavailable = |why: String| WorkerError::Rpc(Status::unavailable(format!("{url}: {why}")));
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(80);
    let mut conn =
        tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect((host, port)))
            .await
            .map_err(|_| unavailable("connecting timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
    // The client preface and an empty SETTINGS frame (RFC 9113, 3.4).
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    conn.write_all(PREFACE)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut head = [0u8; 9];
    let mut got = 0;
    let read = async {
        while got < head.len() {
            match conn.read(&mut head[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    let _ = tokio::time::timeout(CHECK_TIMEOUT, read).await;
    // A TLS record: alert (21) or handshake (22), version 3.x.
    let tls = got >= 2 && matches!(head[0], 21 | 22) && head[1] == 3;
    if tls {
        let (who, serves) = match peer {
            Peer::Coordinator => ("the coordinator", "--tls-cert"),
            Peer::Reducer => ("the reducer", "--tls-cert or --reducer-tls-cert"),
        };
        return Err(WorkerError::Config(format!(
            "{who} at {url} answered with TLS: it serves TLS ({serves}), so use https:// with \
             --tls-ca. The token was not sent."
        )));
    }
    if got == 0 {
        return Err(unavailable(
            "closed the connection or stayed silent instead of answering HTTP/2 (if it serves \
             TLS, use https:// with --tls-ca); the token was not sent"
                .into(),
        ));
    }
    // An HTTP/2 server sends SETTINGS (type 4) first.
    if got < head.len() || head[3] != 4 {
        return Err(unavailable(format!(
            "the first {got} bytes of the answer are not an HTTP/2 SETTINGS frame: {:02x?}",
            &head[..got]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unix socket's URL names an absolute path; one where nothing listens is unavailable,
    /// and the error names the URL.
    #[tokio::test]
    async fn a_unix_socket_url_names_an_absolute_path() {
        let config = |peer, url: &str| {
            let r = futures_util::FutureExt::now_or_never(Client::connect_to(peer, url, "t", None));
            match r {
                Some(Err(e)) => (e.is_config(), e.to_string()),
                _ => (false, String::new()),
            }
        };
        for peer in [Peer::Coordinator, Peer::Reducer] {
            let (is, e) = config(peer, "unix:run/r.sock");
            assert!(is && e.contains("must be absolute"), "{e}");
        }
        let dir = std::env::temp_dir().join(format!("capsnet-client-test-{}", std::process::id()));
        let url = format!("unix:{}/nobody.sock", dir.display());
        let Err(WorkerError::Rpc(s)) = Client::connect_to(Peer::Reducer, &url, "t", None).await
        else {
            panic!("{url} connected");
        };
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains(&url), "{s}");
    }

    /// A worker reaches every peer over TLS exactly when it has `--tls-ca`: a URL of the other
    /// scheme is a configuration error (exit 2) that names the peer and what to set.
    #[test]
    fn a_peer_of_the_other_scheme_is_a_configuration_error_that_names_it() {
        let err = |peer, url: &str, tls| {
            let uri: http::Uri = url.parse().unwrap();
            scheme_error(peer, url, &uri, tls).map(|e| (e.is_config(), e.to_string()))
        };
        let (config, e) = err(Peer::Reducer, "http://10.0.0.7:50052", true).unwrap();
        assert!(config, "{e}");
        assert!(
            e.contains("reducer http://10.0.0.7:50052 serves plaintext"),
            "{e}"
        );
        assert!(e.contains("--reducer-tls-cert"), "{e}");
        let (config, e) = err(Peer::Reducer, "https://10.0.0.7:50052", false).unwrap();
        assert!(
            config && e.contains("reducer https://10.0.0.7:50052 serves TLS"),
            "{e}"
        );
        assert!(e.contains("--tls-ca"), "{e}");
        let (config, e) = err(Peer::Coordinator, "http://c:50051", true).unwrap();
        assert!(
            config && e.contains("the coordinator URL http://c:50051"),
            "{e}"
        );
        assert!(e.contains("use https://c:50051"), "{e}");
        let (config, e) = err(Peer::Coordinator, "https://c:50051", false).unwrap();
        assert!(
            config && e.contains("the coordinator URL https://c:50051 is https://"),
            "{e}"
        );
        for peer in [Peer::Coordinator, Peer::Reducer] {
            assert_eq!(err(peer, "https://10.0.0.7:50052", true), None);
            assert_eq!(err(peer, "http://10.0.0.7:50052", false), None);
        }
    }

    /// A server behind a plaintext URL that answers the HTTP/2 preface with TLS is named as
    /// the peer it is, and the worker's token never reaches it.
    #[tokio::test]
    async fn a_tls_answer_to_plaintext_names_the_peer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut c, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 64];
                let _ = c.read(&mut buf).await;
                // A TLS alert record (level fatal, protocol version).
                let _ = c.write_all(&[21, 3, 3, 0, 2, 2, 70]).await;
            }
        });
        let url = format!("http://{addr}");
        for (peer, who) in [
            (Peer::Reducer, "the reducer at"),
            (Peer::Coordinator, "the coordinator at"),
        ] {
            let e = Client::connect_to(peer, &url, "t", None)
                .await
                .err()
                .unwrap();
            let text = e.to_string();
            assert!(e.is_config(), "{text}");
            assert!(
                text.contains(&format!("{who} {url} answered with TLS")),
                "{text}"
            );
        }
        server.await.unwrap();
    }
}
