//! The `Backup` resource: one backup run of an application into a Target.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::target::LocalReference;
use crate::selection::ApplicationSelection;
use crate::status::{Condition, Phase, Progress};

/// Back up an application of the Backup's namespace: its objects (as a metadata archive) and
/// its volumes (CSI snapshot, then a datamover Job per volume writing a QCOW2 backup).
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "stb",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".status.progress.volumesDone"}"#,
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".status.backupId"}"#,
    printcolumn = r#"{"name":"Expired","type":"string","jsonPath":".status.conditions[?(@.type==\"Expired\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// What to back up.
    pub application: ApplicationSelection,
    /// The Target (same namespace) to write to.
    pub target_ref: LocalReference,
    /// Name of the application in the target; backups of one name form its history. Defaults
    /// to the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
    )]
    pub application_name: Option<String>,
    /// Full (a new base image per volume) or Incremental (an overlay on each volume's latest
    /// backup; full when a volume has none).
    #[serde(default)]
    pub mode: BackupMode,
    /// How many application backups of the application to keep; older ones expire (their
    /// Backups get condition Expired), and the volume backups no kept application backup
    /// names are folded into their children.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// VolumeSnapshotClass to use instead of the one chosen for each volume's CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_class_name: Option<String>,
    /// When to delete the temporary snapshots, PVCs and Jobs.
    #[serde(default)]
    pub cleanup: CleanupPolicy,
    /// Which of the application's PVCs have their data backed up (all by default). An excluded
    /// PVC stays in the metadata like any object, so a restore recreates it empty, as a new
    /// claim is provisioned (a cache, a scratch volume).
    #[serde(default, skip_serializing_if = "VolumeFilter::is_empty")]
    pub volumes: VolumeFilter,
    /// At most this many of the Backup's volumes are copied at once: each needs a full-size
    /// clone of its snapshot and a datamover pod, against quotas and node attach limits. The
    /// controller's default (4) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel_volumes: Option<u32>,
    /// What deleting the Backup does to its application backup in the target: Retain (the
    /// default) keeps it; Delete removes it, and the volume backups only it names, before the
    /// Backup goes (the names of Velero's and VolumeSnapshotContent's policies).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a Backup does to the data it wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// The application backup stays in the target, restorable with the CLI or a Backup that
    /// names it again.
    #[default]
    Retain,
    /// The application backup is deleted from the target, and each volume backup no other
    /// application backup names is folded into its child or deleted; the Backup's finalizer
    /// stays until that succeeded.
    Delete,
}

/// PVC names to back up: `include` (all when empty), less `exclude`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeFilter {
    /// Only these PVCs (by name); every PVC of the application when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Not these PVCs (by name), even when included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl VolumeFilter {
    /// Whether the filter selects every PVC.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether PVC `name` has its data backed up.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|n| n == name))
            && !self.exclude.iter().any(|n| n == name)
    }
}

/// Full or incremental.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BackupMode {
    /// A full base image of every volume.
    Full,
    /// An overlay on each volume's latest backup.
    #[default]
    Incremental,
}

/// Retention of application backups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Application backups to keep, at least one.
    #[schemars(range(min = 1))]
    pub keep_last: u32,
}

/// When temporary objects are deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CleanupPolicy {
    /// When the run completes or fails.
    #[default]
    Always,
    /// Only when it completes; a failed run keeps them for inspection.
    OnSuccess,
    /// Never.
    Never,
}

/// Where a Backup stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The run's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Observations: `Discovered`, `VolumesLocked`, `SnapshotsReady`, `ChangedBlockTracking`,
    /// `VolumesCopied`, `Committed`, `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Volumes and bytes copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The application backup id in the target, once committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The application's name in the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Each volume of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One volume of a Backup or Restore run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The (source, for a backup; restored, for a restore) PVC.
    pub pvc: String,
    /// The volume's name in the target.
    pub volume: String,
    /// Provisioned size in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The volume's latest backup id before this run's datamover started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_backup_id: Option<String>,
    /// The volume backup this run wrote (backup) or read (restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Whether its datamover finished.
    #[serde(default)]
    pub done: bool,
    /// Its datamover was started (a Backup runs at most `maxParallelVolumes` at once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
    /// Backup: how its datamover finds what changed since the previous backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_source: Option<ChangeSource>,
    /// Backup with `ChangedBlocks`: the base VolumeSnapshot the changes are listed against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// Backup with `Digests`: why changed blocks could not be listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests_reason: Option<String>,
    /// Restore only: how far a Filesystem volume restored through a Block staging volume got;
    /// unset for a volume filled in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<Staging>,
}

/// How a backup datamover finds the changed data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ChangeSource {
    /// No comparison: a full base image.
    Full,
    /// Reads the whole volume and compares cluster digests with the latest backup (or takes a
    /// full one when the volume has none).
    Digests,
    /// Asks the CSI driver's SnapshotMetadata service for the blocks changed since the base
    /// snapshot (KEP-3314) and reads only those; compares digests instead if that call fails.
    ChangedBlocks,
}

/// The steps of restoring a Filesystem volume through a Block staging volume: the datamover
/// writes the raw bytes into a Block staging PVC, a snapshot is taken of it, and the restored
/// PVC is provisioned from that snapshot in Filesystem mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Staging {
    /// The datamover is filling the staging PVC.
    Filling,
    /// The staging PVC is being snapshotted.
    Snapshotting,
    /// The PVC was created from the staging snapshot; the snapshot stays until it is Bound.
    Binding,
    /// The PVC is Bound; the staging snapshot and PVC are deleted.
    CleanedUp,
}
