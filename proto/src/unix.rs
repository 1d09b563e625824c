//! Unix sockets as gRPC transports between processes of one machine: a peer's URL
//! `unix:/absolute/path` is dialed by [`UnixConnector`] (the channel itself is made for the
//! placeholder [`UNIX_ORIGIN`], since requests need an authority).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The prefix of a unix socket's URL and listening address.
pub const UNIX_PREFIX: &str = "unix:";

/// The URI of a channel over a unix socket.
pub const UNIX_ORIGIN: &str = "http://localhost";

/// The socket path of `url` if it is a unix socket's (`unix:/absolute/path`); an error that
/// names it if it is `unix:` with a relative path; None for any other URL.
pub fn socket_path(url: &str) -> Option<Result<PathBuf, String>> {
    let path = url.strip_prefix(UNIX_PREFIX)?;
    Some(if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(format!(
            "{url}: a unix socket's path must be absolute (unix:/dir/name.sock)"
        ))
    })
}

/// Dials the unix socket at its path, whatever the URI.
#[derive(Clone, Debug)]
pub struct UnixConnector(pub PathBuf);

impl tower_service::Service<http::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let s = tokio::net::UnixStream::connect(&path).await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_unix_paths_are_socket_paths() {
        assert_eq!(socket_path("http://h:1"), None);
        assert_eq!(
            socket_path("unix:/run/r.sock"),
            Some(Ok(PathBuf::from("/run/r.sock")))
        );
        assert!(
            socket_path("unix:run/r.sock")
                .is_some_and(|r| r.is_err_and(|e| e.contains("absolute")))
        );
    }
}
