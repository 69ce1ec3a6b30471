//! Changed-block tracking across Backups: the base snapshot each volume keeps, and whether the
//! next incremental's datamover can list its changes against it (KEP-3314, `GetMetadataDelta`).
//!
//! `GetMetadataDelta` needs the CSI handle of a snapshot the storage system still holds, taken
//! when the volume's latest backup was. So when a Backup commits, the snapshot each volume was
//! read from stays, as that volume's *base*: labelled [`LABEL_BASE`] (the PVC), annotated with
//! the volume backup taken from it ([`ANNOTATION_BACKUP`]), its CSI handle
//! ([`ANNOTATION_HANDLE`], the content's `status.snapshotHandle`), CSI driver
//! ([`ANNOTATION_DRIVER`]) and the uid of the PVC it was taken of ([`ANNOTATION_PVC_UID`]: a
//! PVC deleted and made again under the same name is another volume, whose changes cannot be
//! listed against this one's snapshot). Its owner becomes the PVC instead of the Backup that
//! made it: the next incremental needs the base after this Backup is gone (deleted by a
//! person, or by a schedule's history limit), so the Backup's garbage collection must not take
//! it; with the PVC as its owner, deleting the volume deletes its base. Only then is the
//! volume's previous base deleted, so a failed run never leaves a volume without one.
//!
//! The record lives on the snapshot, not in the target's manifests: a handle means something
//! only in the cluster and storage system that made it and only while the snapshot exists, so
//! it disappears with the snapshot; a restore into another cluster finds no stale handle; and
//! one list call finds base, handle and backup id together. A base is kept only when the driver
//! has a SnapshotMetadataService, so drivers without changed-block tracking keep no snapshots.
//!
//! Nothing is left forever: each commit of a volume deletes its older bases, and deleting the
//! PVC deletes its base (garbage collection); a PVC made again under the same name compares
//! digests, as above. Retention never removes a volume's latest backup, but deleting a Backup
//! with `deletionPolicy: Delete` may remove it (when no child stands on it); a base naming any
//! backup but the latest is never used, so such a base only waits for the next commit.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::error::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use strata_csi::client::delete_snapshot;
use strata_csi::metadata::{ChangedBlocksBase, bound_content, metadata_service, snapshot_handle};
use strata_csi::naming::label_value;
use strata_csi::{VolumeSnapshot, VolumeSnapshotContent};

/// Label of a base snapshot: the PVC it is the base of (as a label value).
pub const LABEL_BASE: &str = "strata.io/cbt-base";
/// Annotation of a base snapshot: the volume backup taken from it.
pub const ANNOTATION_BACKUP: &str = "strata.io/cbt-backup";
/// Annotation of a base snapshot: its CSI snapshot handle.
pub const ANNOTATION_HANDLE: &str = "strata.io/cbt-snapshot-handle";
/// Annotation of a base snapshot: the CSI driver that made it.
pub const ANNOTATION_DRIVER: &str = "strata.io/cbt-driver";
/// Annotation of a base snapshot: the uid of the PVC it was taken of.
pub const ANNOTATION_PVC_UID: &str = "strata.io/cbt-pvc-uid";

/// How an incremental's datamover finds the changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Ask the SnapshotMetadata service for the changes since `base` (from base snapshot
    /// `snapshot`).
    ChangedBlocks {
        /// The base VolumeSnapshot.
        snapshot: String,
        /// Its handle and backup.
        base: ChangedBlocksBase,
    },
    /// Compare digests with the latest backup (or take a full one when there is none); why
    /// changed blocks are not used.
    Digests(String),
}

/// The plan for PVC `namespace/pvc` (uid `pvc_uid`) of CSI driver `driver`, whose latest
/// backup is `latest`.
pub async fn plan(
    client: &Client,
    namespace: &str,
    (pvc, pvc_uid): (&str, Option<&str>),
    driver: &str,
    latest: Option<&str>,
) -> Result<Plan> {
    let Some(latest) = latest else {
        return Ok(Plan::Digests("the volume has no backup yet".into()));
    };
    match metadata_service(client, driver).await {
        Ok(_) => {}
        Err(strata_csi::Error::NoMetadataService { .. }) => {
            return Ok(Plan::Digests(format!(
                "CSI driver {driver} has no SnapshotMetadataService"
            )));
        }
        // A refusal (RBAC) or an unreachable API makes the backup slower, never fail.
        Err(err) => return Ok(Plan::Digests(err.to_string())),
    }
    let bases = bases_of(client, namespace, pvc).await?;
    let Some(base) = bases
        .iter()
        .find(|s| annotation(s, ANNOTATION_BACKUP) == Some(latest))
    else {
        return Ok(Plan::Digests(format!(
            "no base snapshot of backup {latest} remains"
        )));
    };
    let name = base.metadata.name.clone().unwrap_or_default();
    let ready = base.status.as_ref().and_then(|s| s.ready_to_use) == Some(true);
    if !ready || base.metadata.deletion_timestamp.is_some() {
        return Ok(Plan::Digests(format!(
            "base snapshot {name} is not ready to use"
        )));
    }
    if annotation(base, ANNOTATION_DRIVER) != Some(driver) {
        return Ok(Plan::Digests(format!(
            "base snapshot {name} was made by another CSI driver"
        )));
    }
    if annotation(base, ANNOTATION_PVC_UID) != pvc_uid {
        return Ok(Plan::Digests(format!(
            "base snapshot {name} was taken of an earlier PVC named {pvc}"
        )));
    }
    match annotation(base, ANNOTATION_HANDLE).filter(|h| !h.is_empty()) {
        Some(handle) => Ok(Plan::ChangedBlocks {
            snapshot: name,
            base: ChangedBlocksBase {
                snapshot_handle: handle.to_owned(),
                backup: latest.to_owned(),
            },
        }),
        None => Ok(Plan::Digests(format!(
            "the CSI handle of base snapshot {name} is unknown"
        ))),
    }
}

/// Keep snapshot `namespace/snapshot` of PVC `pvc`, from which volume backup `backup` was
/// taken, as the PVC's base, owned by the PVC (no longer by the Backup); false (nothing changed) when its driver has no
/// SnapshotMetadataService or its handle is unknown, so the caller deletes it as before.
pub async fn keep_as_base(
    client: &Client,
    namespace: &str,
    snapshot: &str,
    pvc: &str,
    backup: &str,
) -> Result<bool> {
    let content = match bound_content(client, namespace, snapshot).await {
        Ok(content) => content,
        Err(strata_csi::Error::Kube { source, .. }) if !is_not_found(&source) => {
            return Err(Error::kube(format!(
                "read VolumeSnapshot {namespace}/{snapshot}"
            ))(source));
        }
        Err(_) => return Ok(false),
    };
    let Some((handle, driver)) = handle_and_driver(&content) else {
        return Ok(false);
    };
    match metadata_service(client, &driver).await {
        Ok(_) => {}
        Err(strata_csi::Error::Kube { source, .. }) if !is_not_found(&source) => {
            return Err(Error::kube(format!("get SnapshotMetadataService {driver}"))(source));
        }
        Err(_) => return Ok(false),
    }
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get_opt(pvc)
        .await
        .map_err(Error::kube(format!("get PVC {namespace}/{pvc}")))?;
    let Some(claim) = claim else {
        // The PVC is gone: nothing will ask for its changes.
        return Ok(false);
    };
    // Not a controller reference: the PVC's controller (a StatefulSet, say) is not Strata's.
    let owner = OwnerReference {
        api_version: "v1".to_owned(),
        kind: "PersistentVolumeClaim".to_owned(),
        name: pvc.to_owned(),
        uid: claim.metadata.uid.clone().unwrap_or_default(),
        controller: None,
        block_owner_deletion: None,
    };
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), namespace);
    // A merge patch replaces the whole list (RFC 7386), dropping the Backup's reference.
    api.patch(
        snapshot,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "labels": {LABEL_BASE: label_value(pvc)},
            "annotations": {
                ANNOTATION_BACKUP: backup,
                ANNOTATION_HANDLE: handle,
                ANNOTATION_DRIVER: driver,
                ANNOTATION_PVC_UID: claim.metadata.uid,
            },
            "ownerReferences": [owner],
        }})),
    )
    .await
    .map_err(Error::kube(format!(
        "keep VolumeSnapshot {namespace}/{snapshot} as the base of {pvc}"
    )))?;
    Ok(true)
}

/// Delete every base of PVC `namespace/pvc` but `keep`.
pub async fn retire_bases(client: &Client, namespace: &str, pvc: &str, keep: &str) -> Result<()> {
    for base in bases_of(client, namespace, pvc).await? {
        let name = base.metadata.name.unwrap_or_default();
        if name != keep {
            delete_snapshot(client, namespace, &name)
                .await
                .map_err(Error::csi(format!(
                    "delete the previous base snapshot {namespace}/{name}"
                )))?;
        }
    }
    Ok(())
}

/// The base snapshots of PVC `namespace/pvc` (normally one; two between a commit and the
/// deletion of the older).
async fn bases_of(client: &Client, namespace: &str, pvc: &str) -> Result<Vec<VolumeSnapshot>> {
    let value = label_value(pvc);
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), namespace);
    let listed = api
        .list(&ListParams::default().labels(&format!("{LABEL_BASE}={value}")))
        .await
        .map_err(Error::kube(format!(
            "list the base snapshots of {namespace}/{pvc}"
        )))?;
    // The selector already filters; checking again keeps the answer right whatever served it.
    Ok(listed
        .items
        .into_iter()
        .filter(|s| label(s, LABEL_BASE) == Some(value.as_str()))
        .collect())
}

fn handle_and_driver(content: &VolumeSnapshotContent) -> Option<(String, String)> {
    let handle = snapshot_handle(content).ok()?.to_owned();
    Some((handle, content.spec.driver.clone()))
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

fn annotation<'a>(snapshot: &'a VolumeSnapshot, key: &str) -> Option<&'a str> {
    lookup(snapshot.metadata.annotations.as_ref(), key)
}

fn label<'a>(snapshot: &'a VolumeSnapshot, key: &str) -> Option<&'a str> {
    lookup(snapshot.metadata.labels.as_ref(), key)
}

fn lookup<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.and_then(|m| m.get(key)).map(String::as_str)
}
