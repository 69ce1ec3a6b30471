//! The `Restore` resource: bring an application backup back into the cluster.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::backup::VolumeStatus;
use super::target::LocalReference;
use crate::status::{Condition, Phase, Progress};

/// Restore a completed Backup (same namespace): recreate its PVCs, fill them with datamover
/// Jobs, then apply its objects, with namespaces and storage classes mapped.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "Restore",
    namespaced,
    status = "RestoreStatus",
    shortname = "str",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".spec.backupRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// The Backup to restore; it must be Completed.
    pub backup_ref: LocalReference,
    /// Source namespace to restore-into namespace, e.g. `{shop: shop-copy}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_mapping: BTreeMap<String, String>,
    /// Source StorageClass to target StorageClass, for PVCs and StatefulSet claim templates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage_class_mapping: BTreeMap<String, String>,
    /// Whether objects that already exist are left alone (`Skip`) or applied over (`Update`).
    #[serde(default)]
    pub existing_objects: ExistingObjects,
    /// VolumeSnapshotClass of the staging snapshots through which Filesystem volumes are
    /// restored; default: the class of the staging PVC's CSI driver, chosen as a Backup does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_class_name: Option<String>,
}

/// What to do with objects that already exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExistingObjects {
    /// Leave them as they are.
    #[default]
    Skip,
    /// Server-side apply over them.
    Update,
}

/// Where a Restore stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The run's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Observations: `Validated`, `VolumesRestored`, `DatamoverSlots` (volumes waiting for a
    /// node under the controller's bound), `ObjectsApplied`, `StagingCleanedUp` (Filesystem
    /// volumes only), `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Volumes and bytes restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The application backup id restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Each restored volume, with the volume backup it was filled from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
    /// Objects applied and skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects_applied: Option<u32>,
    /// Objects left alone because they existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects_skipped: Option<u32>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
