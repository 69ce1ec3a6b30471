//! The TLS connection to a SnapshotMetadata service.
//!
//! The service's `address` is `host:port`; its certificate must chain to the `caCert` of the
//! [`SnapshotMetadataService`] and name `host`. Only that CA is trusted (no system roots). TLS
//! runs on rustls with the aws-lc-rs provider, the one kube and object_store use, so one process
//! can hold all three clients (rustls refuses to pick a default when two providers are built in).

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::SnapshotMetadataService;
use super::proto::snapshot_metadata_client::SnapshotMetadataClient;
use crate::error::{Error, Result};

/// How long a TCP connection and TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep long streams alive through idle-timeout middleboxes and detect dead peers.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A client of the SnapshotMetadata service over TLS.
pub type MetadataClient = SnapshotMetadataClient<Channel>;

/// Connects to the service `service` advertises, trusting only its `caCert`.
pub async fn connect(service: &SnapshotMetadataService) -> Result<MetadataClient> {
    let driver = service.metadata.name.clone().unwrap_or_default();
    let invalid = |what: &'static str, reason: String| Error::BadMetadataService {
        driver: driver.clone(),
        what,
        reason,
    };
    let pem = &service.spec.ca_cert.0;
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("caCert", format!("not a PEM certificate bundle: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid("caCert", "holds no PEM certificate".to_owned()));
    }
    let address = &service.spec.address;
    let (host, _port) = address
        .rsplit_once(':')
        .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        .ok_or_else(|| invalid("address", format!("{address:?} is not HOST:PORT")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .and_then(|e| {
            e.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(host),
            )
        })
        .map_err(|e| invalid("address", format!("{address:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE)
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| Error::MetadataConnect {
            address: address.clone(),
            source,
        })?;
    Ok(SnapshotMetadataClient::new(channel))
}
