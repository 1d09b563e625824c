//! `GET /metrics` over plain HTTP/1.x for `--metrics-listen` (coordinator and workers): one
//! request per connection, each bounded in size and time, a few served at once. What is served
//! is the caller's (the OpenMetrics text its registry encodes on each scrape).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Encodes the current metrics (called on each scrape).
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// The OpenMetrics text of every metric in `registry` (empty if one cannot be encoded).
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// An [`Exposition`] that can sit in a config (its `Debug` does not call it).
#[derive(Clone)]
pub struct Source(pub Exposition);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metrics::Source")
    }
}

/// Several expositions served as one (a worker and the reducer in its process): each text
/// without its closing `# EOF` line, then one `# EOF`.
pub fn join(parts: Vec<Exposition>) -> Exposition {
    Arc::new(move || {
        let mut out = String::new();
        for p in &parts {
            let text = p();
            let body = text.strip_suffix("# EOF\n").unwrap_or(&text);
            out.push_str(body);
        }
        out.push_str("# EOF\n");
        out
    })
}

/// The longest request line and headers a scrape may send, and how long it may take.
const MAX_REQUEST: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the kernel's accept queue.
const MAX_SCRAPES: usize = 8;

/// Serves `GET /metrics` (HTTP/1.x, one request per connection) until `shutdown` resolves.
/// Each request is bounded in size and time, and at most a few are served at once.
pub async fn serve(
    listener: TcpListener,
    metrics: Exposition,
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

async fn answer(conn: &mut tokio::net::TcpStream, metrics: &Exposition) -> std::io::Result<()> {
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
            metrics(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_expositions_end_in_one_eof() {
        let a: Exposition = Arc::new(|| "# TYPE a counter\na_total 1\n# EOF\n".to_string());
        let b: Exposition = Arc::new(|| "# TYPE b gauge\nb 2\n# EOF\n".to_string());
        let text = join(vec![a, b])();
        assert_eq!(
            text,
            "# TYPE a counter\na_total 1\n# TYPE b gauge\nb 2\n# EOF\n"
        );
        assert_eq!(join(vec![])(), "# EOF\n");
    }
}
