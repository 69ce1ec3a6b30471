//! Finding the SnapshotMetadata service of a snapshot's CSI driver.
//!
//! A CSI driver that supports changed-block tracking advertises its service with a cluster-scoped
//! `SnapshotMetadataService` object (group `cbt.storage.k8s.io`, version `v1beta1`) named after
//! the driver (KEP-3314, "The SnapshotMetadataService CR"). The driver of a snapshot is the
//! `spec.driver` of its bound VolumeSnapshotContent, and the CSI handle a delta takes as its base
//! is the base snapshot content's `status.snapshotHandle` (the `base_snapshot_id` of
//! `GetMetadataDeltaRequest`).

use k8s_openapi::ByteString;
use kube::{Api, Client, CustomResource};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::{VolumeSnapshot, VolumeSnapshotContent};

/// Spec of a [`SnapshotMetadataService`]: how to reach and trust a driver's service. Fields
/// follow `client/apis/snapshotmetadataservice/v1beta1/types.go` of
/// kubernetes-csi/external-snapshot-metadata.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cbt.storage.k8s.io",
    version = "v1beta1",
    kind = "SnapshotMetadataService",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMetadataServiceSpec {
    /// Audience the service expects in the `security_token` of each call.
    pub audience: String,
    /// TCP endpoint of the gRPC service, `host:port`.
    pub address: String,
    /// PEM bundle of the certificate authority that signed the service's certificate.
    pub ca_cert: ByteString,
}

/// The SnapshotMetadataService of CSI driver `driver`, or [`Error::NoMetadataService`] when the
/// driver advertises none (or the CRD is not installed).
pub async fn metadata_service(client: &Client, driver: &str) -> Result<SnapshotMetadataService> {
    match Api::<SnapshotMetadataService>::all(client.clone())
        .get(driver)
        .await
    {
        Ok(service) => Ok(service),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::NoMetadataService {
            driver: driver.to_owned(),
        }),
        Err(source) => Err(Error::Kube {
            operation: format!("get SnapshotMetadataService {driver}"),
            source,
        }),
    }
}

/// The VolumeSnapshotContent bound to snapshot `namespace/name`.
pub async fn bound_content(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<VolumeSnapshotContent> {
    let snapshot = Api::<VolumeSnapshot>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(Error::kube(format!(
            "get VolumeSnapshot {namespace}/{name}"
        )))?;
    let content = snapshot
        .status
        .and_then(|s| s.bound_volume_snapshot_content_name)
        .ok_or_else(|| Error::MissingField {
            kind: "VolumeSnapshot",
            name: format!("{namespace}/{name}"),
            what: "status.boundVolumeSnapshotContentName",
        })?;
    Api::<VolumeSnapshotContent>::all(client.clone())
        .get(&content)
        .await
        .map_err(Error::kube(format!("get VolumeSnapshotContent {content}")))
}

/// The CSI snapshot handle of `content` (`status.snapshotHandle`).
pub fn snapshot_handle(content: &VolumeSnapshotContent) -> Result<&str> {
    content
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.as_deref())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::MissingField {
            kind: "VolumeSnapshotContent",
            name: content.metadata.name.clone().unwrap_or_default(),
            what: "status.snapshotHandle",
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn parses_the_upstream_example_and_routes_cluster_scoped() {
        // The shape of deploy/example/csi-driver/testdata/snapshotmetadataservice.yaml upstream;
        // caCert is base64 in JSON, as for any []byte field.
        let service: SnapshotMetadataService = serde_json::from_value(json!({
            "apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
            "metadata": {"name": "hostpath.csi.k8s.io"},
            "spec": {"address": "csi-snapshot-metadata.default:6443",
                     "caCert": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
                     "audience": "test-backup-client"}
        }))
        .unwrap();
        assert_eq!(service.spec.ca_cert.0, b"-----BEGIN CERTIFICATE-----\n");
        assert_eq!(service.spec.audience, "test-backup-client");
        assert_eq!(
            SnapshotMetadataService::url_path(&(), None),
            "/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices"
        );
    }

    #[test]
    fn a_content_without_handle_is_reported() {
        let content: VolumeSnapshotContent = serde_json::from_value(json!({
            "metadata": {"name": "snapcontent-1"},
            "spec": {"volumeSnapshotRef": {"name": "s"}, "deletionPolicy": "Delete",
                     "driver": "d", "source": {"volumeHandle": "v"}},
            "status": {"readyToUse": false}
        }))
        .unwrap();
        assert!(matches!(
            snapshot_handle(&content),
            Err(Error::MissingField { what: "status.snapshotHandle", name, .. }) if name == "snapcontent-1"
        ));
    }
}
