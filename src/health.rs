//! `capsnet health`: asks a coordinator's `grpc.health.v1` service whether it is SERVING, for
//! probes that run a command (a container's HEALTHCHECK, an exec probe, a script) where the
//! kubelet's own gRPC probe is not available. Exits 0 when SERVING, 1 otherwise.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::args::parse_duration;

#[derive(Args)]
pub struct HealthArgs {
    /// The coordinator's address, host:port or unix:/path (plaintext; the health service
    /// needs no token).
    #[arg(long, default_value = "127.0.0.1:50051")]
    address: String,
    /// "" for the process (liveness), `capsnet.v1.Coordinator` for readiness.
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this long (connecting included).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
}

pub fn run(a: HealthArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let status = rt.block_on(async {
        tokio::time::timeout(a.timeout, check(&a.address, &a.service))
            .await
            .with_context(|| format!("{} did not answer within {:?}", a.address, a.timeout))?
    })?;
    let name = if a.service.is_empty() {
        "the coordinator"
    } else {
        a.service.as_str()
    };
    match status {
        ServingStatus::Serving => {
            println!("{name} at {}: SERVING", a.address);
            Ok(())
        }
        other => bail!("{name} at {}: {}", a.address, other.as_str_name()),
    }
}

async fn check(address: &str, service: &str) -> Result<ServingStatus> {
    use capsnet_proto::unix::{UNIX_ORIGIN, UnixConnector, socket_path};
    let channel = match socket_path(address) {
        Some(path) => {
            let path = path.map_err(|e| anyhow::anyhow!("--address {e}"))?;
            tonic::transport::Endpoint::from_static(UNIX_ORIGIN)
                .connect_with_connector(UnixConnector(path))
                .await
                .with_context(|| format!("connecting to {address}"))?
        }
        None => {
            let url = format!("http://{address}");
            tonic::transport::Endpoint::from_shared(url.clone())
                .with_context(|| format!("--address {address}"))?
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?
        }
    };
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .with_context(|| format!("asking {address} for the health of {service:?}"))?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
}
