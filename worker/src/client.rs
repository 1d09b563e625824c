//! A connected gRPC client that sends the bearer token with every call.

use std::path::PathBuf;
use std::time::Duration;

use capsnet_proto::frame::{GRPC_CONTENT_TYPE, MAX_MESSAGE, Messages};
use capsnet_proto::pb::coordinator_client::CoordinatorClient;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::{Result, WorkerError};

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
    /// `scheme://authority` of the coordinator.
    origin: String,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl Client {
    pub async fn connect(url: &str, token: &str, tls: Option<&ClientTls>) -> Result<Self> {
        let mut ep = Endpoint::from_shared(url.to_string())
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
        let channel = ep
            .connect()
            .await
            .map_err(|e| WorkerError::Rpc(Status::unavailable(e.to_string())))?;
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| WorkerError::TokenNotAscii)?;
        let uri = ep.uri();
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str())
        );
        Ok(Client {
            rpc: CoordinatorClient::with_interceptor(channel.clone(), Auth(value.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            channel,
            origin,
            authorization: value,
        })
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
        std::future::poll_fn(|cx| self.channel.poll_ready(cx))
            .await
            .map_err(|e| Status::from_error(e.into()))?;
        let resp = self
            .channel
            .call(req)
            .await
            .map_err(|e| Status::from_error(e.into()))?;
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
