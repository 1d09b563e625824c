//! Accepted connections, bounded before a byte of them is read (anyone who can reach the port
//! gets this far, token or not):
//!
//! - at most `--max-connections` at once, and `--max-connections-per-ip` from one address
//!   (connections to a unix socket, from processes of this machine, count only against the
//!   first); more are closed as soon as they are accepted (the peer sees a reset and retries);
//! - each must send its first request within [`FIRST_REQUEST_WITHIN`] of being accepted (its
//!   TLS handshake, HTTP/2 preface and request headers included), or it is closed; after that,
//!   HTTP/2 keepalive pings close a peer that stops answering;
//! - its close is reported to [`Liveness`] (a worker whose process died is noticed at once).
//!
//! Requests mark their connection as having spoken through [`Marked`], which wraps every
//! service the server routes to.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::liveness::{Liveness, OnClose};

/// A new connection must have sent a whole request by then.
pub(crate) const FIRST_REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// Refused connections are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Table {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Whether each open connection has sent a request.
    spoke: HashMap<SocketAddr, Arc<AtomicBool>>,
    /// The key of the last connection to the unix socket (see [`Conns::admit_unix`]).
    unix_key: u16,
    refused: u64,
    logged: Option<Instant>,
}

/// The open connections and their limits.
#[derive(Clone)]
pub(crate) struct Conns {
    table: Arc<Mutex<Table>>,
    max_total: usize,
    max_per_ip: usize,
    liveness: Liveness,
    metrics: Arc<crate::metrics::Metrics>,
    /// Bytes each accepted TCP connection may buffer each way (0: the kernel's autotuning).
    socket_buffer: usize,
}

/// Caps a connection's send and receive buffers at `bytes` (Linux doubles the figure for its
/// bookkeeping). Bounded buffers bound what each connection has in flight: on a link whose
/// switch queues deeply, connections that share it then share it evenly, instead of one
/// running seconds of queue ahead of the others (a round waits for the last of them).
/// Best effort: a socket that refuses keeps the kernel's sizes.
pub(crate) fn set_socket_buffers(stream: &TcpStream, bytes: usize) {
    let s = socket2::SockRef::from(stream);
    if let Err(e) = s
        .set_send_buffer_size(bytes)
        .and_then(|()| s.set_recv_buffer_size(bytes))
    {
        tracing::debug!(error = %e, "socket buffers left as the kernel sized them");
    }
}

/// The socket buffer sizes `--socket-buffer` takes: 0 (the kernel's), or 16 KiB to 64 MiB.
pub(crate) fn check_socket_buffer(bytes: usize) -> std::result::Result<(), String> {
    if bytes == 0 || (16 << 10..=64 << 20).contains(&bytes) {
        Ok(())
    } else {
        Err(format!(
            "socket buffer of {bytes} bytes: 0 (the kernel's autotuning) or 16 KiB to 64 MiB"
        ))
    }
}

impl Conns {
    pub fn new(
        max_total: usize,
        max_per_ip: usize,
        liveness: Liveness,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Conns {
            table: Arc::default(),
            max_total,
            max_per_ip,
            liveness,
            metrics,
            socket_buffer: 0,
        }
    }

    /// Caps each accepted TCP connection's send and receive buffers at `bytes` (0: the
    /// kernel's autotuning), see [`set_socket_buffers`].
    pub fn with_socket_buffer(mut self, bytes: usize) -> Self {
        self.socket_buffer = bytes;
        self
    }

    /// Takes an accepted connection in, or closes it (None) when a limit is reached.
    pub fn admit(&self, stream: TcpStream) -> Option<Conn> {
        if self.socket_buffer > 0 {
            set_socket_buffers(&stream, self.socket_buffer);
        }
        let peer = stream.peer_addr().ok()?;
        let local = stream.local_addr().ok();
        self.admit_as(Stream::Tcp(stream), peer, local, true)
    }

    /// Takes a connection to the unix socket in, or closes it (None) at `--max-connections`.
    /// Such a peer has no address: it is known by one of `0.0.0.0`, which no TCP peer has,
    /// and a port not taken by another open one (the per-address limit does not apply).
    pub fn admit_unix(&self, stream: UnixStream) -> Option<Conn> {
        let peer = {
            let mut t = self.table.lock().ok()?;
            let free = (1..=u16::MAX)
                .map(|i| t.unix_key.wrapping_add(i))
                .find(|&k| k != 0 && !t.spoke.contains_key(&SocketAddr::from(([0, 0, 0, 0], k))))?;
            t.unix_key = free;
            SocketAddr::from(([0, 0, 0, 0], free))
        };
        self.admit_as(Stream::Unix(stream), peer, None, false)
    }

    fn admit_as(
        &self,
        stream: Stream,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        per_ip: bool,
    ) -> Option<Conn> {
        let spoke = Arc::new(AtomicBool::new(false));
        {
            let mut t = self.table.lock().ok()?;
            let from_ip = if per_ip {
                t.per_ip.get(&peer.ip()).copied().unwrap_or(0)
            } else {
                0
            };
            if t.total >= self.max_total || from_ip >= self.max_per_ip {
                t.refused += 1;
                self.metrics.connections_refused.inc();
                if t.logged.is_none_or(|l| l.elapsed() >= REFUSAL_LOG_EVERY) {
                    tracing::warn!(
                        %peer,
                        open = t.total,
                        from_this_address = from_ip,
                        refused_so_far = t.refused,
                        "connection refused: --max-connections or --max-connections-per-ip reached"
                    );
                    t.logged = Some(Instant::now());
                }
                return None;
            }
            t.total += 1;
            if per_ip {
                *t.per_ip.entry(peer.ip()).or_default() += 1;
            }
            t.spoke.insert(peer, spoke.clone());
            self.metrics.connections.set(t.total as i64);
        }
        Some(Conn {
            stream,
            info: TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(peer),
            },
            spoke,
            deadline: Box::pin(tokio::time::sleep(FIRST_REQUEST_WITHIN)),
            _slot: Slot {
                conns: self.clone(),
                peer,
                per_ip,
            },
            _on_close: self.liveness.on_close(peer),
        })
    }

    /// A request arrived on the connection from `peer`.
    fn spoke(&self, peer: SocketAddr) {
        if let Ok(t) = self.table.lock()
            && let Some(f) = t.spoke.get(&peer)
        {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// A connection's place in the table, given back when the connection is dropped.
struct Slot {
    conns: Conns,
    peer: SocketAddr,
    per_ip: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.conns.table.lock() {
            t.total = t.total.saturating_sub(1);
            let ip = self.peer.ip();
            if self.per_ip
                && let Some(n) = t.per_ip.get_mut(&ip)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.per_ip.remove(&ip);
                }
            }
            t.spoke.remove(&self.peer);
            self.conns.metrics.connections.set(t.total as i64);
        }
    }
}

/// An accepted stream: TCP, or a unix socket's.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted connection that holds its slot, must speak in time, and reports its close.
pub(crate) struct Conn {
    stream: Stream,
    /// Its addresses as the server's services see them (a unix socket's peer: its key).
    info: TcpConnectInfo,
    spoke: Arc<AtomicBool>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _slot: Slot,
    _on_close: OnClose,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Until its first request, the deadline wakes the reader; once passed, reading fails
        // and the server closes the connection.
        if !self.spoke.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the first 10 s",
            )));
        }
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// A service that marks the connection of each request it sees as having spoken.
#[derive(Clone)]
pub(crate) struct Marked<S> {
    pub inner: S,
    pub conns: Conns,
}

impl<S: NamedService> NamedService for Marked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<B>> for Marked<S>
where
    S: tower_service::Service<http::Request<B>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        if let Some(p) = peer {
            self.conns.spoke(p);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_gets_the_buffers_asked_for() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let size = |s: &TcpStream| {
            let r = socket2::SockRef::from(s);
            (r.send_buffer_size().unwrap(), r.recv_buffer_size().unwrap())
        };
        set_socket_buffers(&server, 64 << 10);
        // Linux keeps twice the figure for its bookkeeping; the other end keeps its own.
        assert_eq!(size(&server), (128 << 10, 128 << 10));
        assert_ne!(size(&client), size(&server));
    }

    #[test]
    fn socket_buffers_are_zero_or_of_a_sane_size() {
        for ok in [0, 16 << 10, 64 << 10, 64 << 20] {
            assert!(check_socket_buffer(ok).is_ok(), "{ok}");
        }
        for bad in [1, 4096, (16 << 10) - 1, (64 << 20) + 1] {
            let e = check_socket_buffer(bad).unwrap_err();
            assert!(e.contains(&format!("{bad} bytes")), "{e}");
        }
    }
}
