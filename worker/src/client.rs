//! A connected gRPC client that sends the bearer token with every call.

use std::path::PathBuf;
use std::time::Duration;

use capsnet_proto::pb::coordinator_client::CoordinatorClient;
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

#[derive(Clone)]
pub struct Client(CoordinatorClient<InterceptedService<Channel, Auth>>);

impl Client {
    pub async fn connect(url: &str, token: &str, tls: Option<&ClientTls>) -> Result<Self> {
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| WorkerError::Config(format!("coordinator address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .max_frame_size(Some(2 << 20))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some(t) = tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| WorkerError::Config(format!("{}: {e}", p.display())))
            };
            let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&t.ca)?));
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(d) = &t.domain {
                c = c.domain_name(d.clone());
            }
            ep = ep
                .tls_config(c)
                .map_err(|e| WorkerError::Config(format!("TLS: {e}")))?;
        }
        let channel = ep
            .connect()
            .await
            .map_err(|e| WorkerError::Rpc(Status::unavailable(e.to_string())))?;
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| WorkerError::Config("the token must be printable ASCII".into()))?;
        Ok(Client(
            CoordinatorClient::with_interceptor(channel, Auth(value))
                .max_decoding_message_size(8 << 20),
        ))
    }

    pub fn rpc(&mut self) -> &mut CoordinatorClient<InterceptedService<Channel, Auth>> {
        &mut self.0
    }
}
