//! Typed `snapshot.storage.k8s.io/v1` objects: VolumeSnapshot, VolumeSnapshotContent and
//! VolumeSnapshotClass.
//!
//! k8s-openapi carries only the core API, and these are CustomResourceDefinitions installed with
//! the CSI snapshot controller. Field names and optionality follow the v1 API types of
//! kubernetes-csi/external-snapshotter (`client/apis/volumesnapshot/v1/types.go`); the CRDs are
//! installed by the cluster, so no schema is derived here (`schema = "disabled"`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// API group of the snapshot objects.
pub const GROUP: &str = "snapshot.storage.k8s.io";
/// API version of the snapshot objects this crate speaks.
pub const VERSION: &str = "v1";

/// Spec of a [`VolumeSnapshot`]: a request to snapshot a PVC (or to bind a pre-existing content).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// Where the snapshot comes from; exactly one member is set.
    pub source: VolumeSnapshotSource,
    /// The class to use; unset means the driver's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// Source of a [`VolumeSnapshot`]; exactly one of the two names is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// PVC in the snapshot's namespace to take a new snapshot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// Pre-existing VolumeSnapshotContent to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// Status of a [`VolumeSnapshot`], mirrored by the snapshot controller from its content.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// The VolumeSnapshotContent this snapshot is bound to, once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage system took the point-in-time snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether a volume can be restored from the snapshot; unset means unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Minimum size of a volume restored from this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    /// Last error seen while creating the snapshot; cleared on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// The VolumeGroupSnapshot this snapshot belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// An error the snapshot controller or the CSI sidecar reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    /// When the error was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// The error text; it may be logged, so it carries no secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether a content and its storage snapshot go away with the bound VolumeSnapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletionPolicy {
    /// Delete the content and the storage snapshot.
    #[default]
    Delete,
    /// Keep the content and the storage snapshot.
    Retain,
}

/// Spec of a [`VolumeSnapshotContent`]: the snapshot as the storage system holds it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    status = "VolumeSnapshotContentStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The VolumeSnapshot bound to this content.
    pub volume_snapshot_ref: ObjectReference,
    /// What happens to the content when its VolumeSnapshot is deleted.
    pub deletion_policy: DeletionPolicy,
    /// CSI driver that made the snapshot.
    pub driver: String,
    /// Class the snapshot was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// Source volume handle or pre-existing snapshot handle.
    pub source: VolumeSnapshotContentSource,
    /// Volume mode of the source volume (`Filesystem` or `Block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
}

/// Source of a [`VolumeSnapshotContent`]; exactly one handle is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    /// CSI handle of the volume to snapshot (dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    /// CSI handle of an existing snapshot (pre-provisioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

/// Status of a [`VolumeSnapshotContent`], written by the CSI snapshotter sidecar.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// CSI snapshot handle on the storage system; the SnapshotMetadata API takes it as base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Creation time in nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Size in bytes a restored volume needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// Whether the snapshot can be restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Last error seen while creating the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// Handle of the group snapshot this snapshot is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// A class of snapshots for one CSI driver. Unlike most objects it has no `spec`: its fields sit
/// at the top level, which is why it has a hand-written [`kube::Resource`] impl. Strata only reads
/// classes (cluster administrators create them), so the type carries no `apiVersion`/`kind` fields
/// and serializing it does not produce an object the API server would accept for creation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// CSI driver that handles snapshots of this class.
    pub driver: String,
    /// Driver-specific parameters, opaque to Kubernetes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// What happens to contents made through this class when their VolumeSnapshot is deleted.
    pub deletion_policy: DeletionPolicy,
}

impl kube::Resource for VolumeSnapshotClass {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "VolumeSnapshotClass".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "volumesnapshotclasses".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn snapshot_status_parses_the_api_servers_shape() {
        let snapshot: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"source": {"persistentVolumeClaimName": "data"},
                     "volumeSnapshotClassName": "csi-hostpath-snapclass"},
            "status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": false,
                       "restoreSize": "1Gi", "creationTime": "2026-11-25T10:00:00Z",
                       "error": {"message": "driver timeout", "time": "2026-11-25T10:00:01Z"}}
        }))
        .unwrap();
        let status = snapshot.status.unwrap();
        assert_eq!(status.ready_to_use, Some(false));
        assert_eq!(status.restore_size, Some(Quantity("1Gi".into())));
        assert_eq!(
            status.error.unwrap().message.as_deref(),
            Some("driver timeout")
        );
        assert_eq!(
            snapshot.spec.source.persistent_volume_claim_name.as_deref(),
            Some("data")
        );
    }

    #[test]
    fn content_and_class_parse_and_route_cluster_scoped() {
        let content: VolumeSnapshotContent = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {"volumeSnapshotRef": {"name": "s", "namespace": "ns"},
                     "deletionPolicy": "Retain", "driver": "hostpath.csi.k8s.io",
                     "source": {"volumeHandle": "vol-1"}, "sourceVolumeMode": "Filesystem"},
            "status": {"snapshotHandle": "snap-1", "restoreSize": 1073741824, "readyToUse": true,
                       "creationTime": 1764064800000000000i64}
        }))
        .unwrap();
        assert_eq!(content.spec.deletion_policy, DeletionPolicy::Retain);
        assert_eq!(content.status.unwrap().restore_size, Some(1 << 30));
        assert_eq!(
            VolumeSnapshotContent::url_path(&(), None),
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
        );

        let class: VolumeSnapshotClass = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": "c"}, "driver": "ebs.csi.aws.com", "deletionPolicy": "Delete",
            "parameters": {"tagSpecification_1": "team=storage"}
        }))
        .unwrap();
        assert_eq!(class.driver, "ebs.csi.aws.com");
        assert_eq!(
            VolumeSnapshotClass::url_path(&(), None),
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses"
        );
        assert_eq!(
            VolumeSnapshot::url_path(&(), Some("ns")),
            "/apis/snapshot.storage.k8s.io/v1/namespaces/ns/volumesnapshots"
        );
    }

    #[test]
    fn unknown_deletion_policy_is_rejected() {
        let err = serde_json::from_value::<DeletionPolicy>(json!("Recycle"));
        assert!(err.is_err());
    }
}
