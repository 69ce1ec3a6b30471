//! Moving the built objects through the API server, idempotently.
//!
//! Every helper tolerates a re-run: creation that meets `AlreadyExists` fetches the object of that
//! deterministic name and checks it is the one this run wants ([`Error::Conflict`] otherwise);
//! deletion of something already gone succeeds. Waiting polls with `GET`, which needs only `get`
//! permission and no watch bookmarks, at an interval the caller chooses.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::class::{choose_snapshot_class, driver_of, storage_class_name};
use crate::error::{Error, Result};
use crate::pvc::ALLOW_VOLUME_MODE_CHANGE_ANNOTATION;
use crate::snapshot::{ReadySnapshot, SnapshotState, check_adoptable, snapshot_state};
use crate::types::{DeletionPolicy, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent};

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// The CSI driver of `pvc`'s volume: its bound PersistentVolume's `spec.csi.driver`, else its
/// StorageClass's provisioner. The volume is the better witness: a migrated in-tree class
/// (EKS's `gp2` names `kubernetes.io/aws-ebs`) provisions volumes of the CSI driver
/// (`ebs.csi.aws.com`, Kubernetes docs "CSI migration"), and a statically provisioned claim
/// may have no class at all.
pub async fn driver_of_pvc(client: &Client, pvc: &PersistentVolumeClaim) -> Result<String> {
    let bound = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|n| !n.is_empty());
    if let Some(volume) = bound {
        let pv = Api::<PersistentVolume>::all(client.clone())
            .get_opt(volume)
            .await
            .map_err(Error::kube(format!("get PersistentVolume {volume}")))?;
        let driver = pv
            .and_then(|pv| pv.spec?.csi)
            .map(|csi| csi.driver)
            .filter(|d| !d.is_empty());
        if let Some(driver) = driver {
            return Ok(driver);
        }
    }
    let class_name = storage_class_name(pvc)?;
    let storage_class = Api::<StorageClass>::all(client.clone())
        .get(class_name)
        .await
        .map_err(Error::kube(format!("get StorageClass {class_name}")))?;
    Ok(driver_of(&storage_class).to_owned())
}

/// The VolumeSnapshotClass for `pvc`: finds the CSI driver of its volume
/// ([`driver_of_pvc`]), lists the classes and chooses as [`choose_snapshot_class`] does
/// (`preferred` overrides, checked).
pub async fn snapshot_class_for_pvc(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    preferred: Option<&str>,
) -> Result<VolumeSnapshotClass> {
    let driver = driver_of_pvc(client, pvc).await?;
    let classes = Api::<VolumeSnapshotClass>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list VolumeSnapshotClasses"))?
        .items;
    choose_snapshot_class(&driver, &classes, preferred).cloned()
}

/// The StorageClass a claim cloned from a snapshot of `pvc` takes: `pvc`'s own, or for a claim
/// without one, the StorageClass whose provisioner is `driver` (the cluster's default class
/// among several).
pub async fn storage_class_for_clone(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    driver: &str,
) -> Result<String> {
    if let Ok(class) = storage_class_name(pvc) {
        return Ok(class.to_owned());
    }
    let classes = Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list StorageClasses"))?
        .items;
    let is_default = |c: &&&StorageClass| {
        c.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
            .is_some_and(|v| v == "true")
    };
    let of_driver: Vec<&StorageClass> =
        classes.iter().filter(|c| c.provisioner == driver).collect();
    of_driver
        .iter()
        .find(is_default)
        .or(of_driver.first())
        .and_then(|c| c.metadata.name.clone())
        .ok_or_else(|| Error::Invalid {
            what: "storage class",
            reason: format!(
                "PVC {} has no storageClassName and no StorageClass provisions {driver}, so no \
                 claim can be made from its snapshot",
                pvc.metadata.name.as_deref().unwrap_or_default()
            ),
        })
}

/// Create `snapshot`, or return the existing one of the same name when it snapshots the same PVC.
pub async fn create_or_get_snapshot(
    client: &Client,
    snapshot: &VolumeSnapshot,
) -> Result<VolumeSnapshot> {
    let namespace = namespace_of(&snapshot.metadata);
    let name = snapshot.metadata.name.as_deref().unwrap_or_default();
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), snapshot).await {
        Ok(created) => Ok(created),
        Err(err) if is_status(&err, 409) => {
            let existing = api.get(name).await.map_err(Error::kube(format!(
                "get VolumeSnapshot {namespace}/{name}"
            )))?;
            check_adoptable(&existing, snapshot)?;
            Ok(existing)
        }
        Err(err) => Err(Error::Kube {
            operation: format!("create VolumeSnapshot {namespace}/{name}"),
            source: err,
        }),
    }
}

/// How [`wait_until_ready`] waits.
#[derive(Clone, Copy, Debug)]
pub struct WaitOptions {
    /// Give up after this long.
    pub timeout: Duration,
    /// Time between polls.
    pub interval: Duration,
    /// Fail at the first `status.error` instead of waiting for the controller's retries to
    /// succeed; when false, the last error is reported with the timeout.
    pub fail_on_error: bool,
}

impl Default for WaitOptions {
    /// Ten minutes, polling every two seconds, failing at the first reported error.
    fn default() -> Self {
        WaitOptions {
            timeout: Duration::from_secs(600),
            interval: Duration::from_secs(2),
            fail_on_error: true,
        }
    }
}

/// Wait until snapshot `namespace/name` is bound and ready to use.
pub async fn wait_until_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    options: WaitOptions,
) -> Result<ReadySnapshot> {
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), namespace);
    let start = Instant::now();
    let mut last_error = None;
    loop {
        let snapshot = api.get(name).await.map_err(Error::kube(format!(
            "get VolumeSnapshot {namespace}/{name}"
        )))?;
        match snapshot_state(&snapshot) {
            SnapshotState::Ready(ready) => return Ok(ready),
            SnapshotState::Pending {
                error: Some(message),
            } if options.fail_on_error => {
                return Err(Error::SnapshotFailed {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    message,
                });
            }
            SnapshotState::Pending { error } => last_error = error.or(last_error),
        }
        let waited = start.elapsed();
        if waited + options.interval > options.timeout {
            return Err(Error::SnapshotTimeout {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                waited,
                last_error,
            });
        }
        tokio::time::sleep(options.interval).await;
    }
}

/// Create `pvc`, or return the existing claim of the same name when it has the same data source.
pub async fn create_or_get_pvc(
    client: &Client,
    pvc: &PersistentVolumeClaim,
) -> Result<PersistentVolumeClaim> {
    let namespace = namespace_of(&pvc.metadata);
    let name = pvc.metadata.name.as_deref().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), pvc).await {
        Ok(created) => Ok(created),
        Err(err) if is_status(&err, 409) => {
            let existing = api.get(name).await.map_err(Error::kube(format!(
                "get PersistentVolumeClaim {namespace}/{name}"
            )))?;
            let source =
                |p: &PersistentVolumeClaim| p.spec.as_ref().and_then(|s| s.data_source.clone());
            if source(&existing) != source(pvc) {
                return Err(Error::Conflict {
                    kind: "PersistentVolumeClaim",
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    reason: format!("its dataSource is {:?}", source(&existing)),
                });
            }
            Ok(existing)
        }
        Err(err) => Err(Error::Kube {
            operation: format!("create PersistentVolumeClaim {namespace}/{name}"),
            source: err,
        }),
    }
}

/// What deleting a snapshot left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deleted {
    /// The snapshot was already gone.
    AlreadyGone,
    /// Deleted; its content (and the storage snapshot) go with it (`deletionPolicy: Delete`).
    WithContent,
    /// Deleted, but its content has `deletionPolicy: Retain`: the content and the storage
    /// snapshot stay, as their owner asked; the name is returned for the caller to report.
    ContentRetained {
        /// The retained VolumeSnapshotContent.
        content: String,
    },
}

/// Delete snapshot `namespace/name`, honouring its content's deletionPolicy: a `Retain` content
/// is left in place and reported, never force-deleted.
pub async fn delete_snapshot(client: &Client, namespace: &str, name: &str) -> Result<Deleted> {
    let api: Api<VolumeSnapshot> = Api::namespaced(client.clone(), namespace);
    let snapshot = match api.get(name).await {
        Ok(snapshot) => snapshot,
        Err(err) if is_status(&err, 404) => return Ok(Deleted::AlreadyGone),
        Err(err) => {
            return Err(Error::Kube {
                operation: format!("get VolumeSnapshot {namespace}/{name}"),
                source: err,
            });
        }
    };
    let content_name = snapshot
        .status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone());
    let policy = match &content_name {
        Some(content) => {
            let contents: Api<VolumeSnapshotContent> = Api::all(client.clone());
            match contents.get(content).await {
                Ok(c) => Some(c.spec.deletion_policy),
                Err(err) if is_status(&err, 404) => None,
                Err(err) => {
                    return Err(Error::Kube {
                        operation: format!("get VolumeSnapshotContent {content}"),
                        source: err,
                    });
                }
            }
        }
        None => None,
    };
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(err) if is_status(&err, 404) => return Ok(Deleted::AlreadyGone),
        Err(err) => {
            return Err(Error::Kube {
                operation: format!("delete VolumeSnapshot {namespace}/{name}"),
                source: err,
            });
        }
    }
    Ok(match (policy, content_name) {
        (Some(DeletionPolicy::Retain), Some(content)) => Deleted::ContentRetained { content },
        _ => Deleted::WithContent,
    })
}

/// Delete claim `namespace/name`; `Ok(false)` when it was already gone.
pub async fn delete_pvc(client: &Client, namespace: &str, name: &str) -> Result<bool> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(err) if is_status(&err, 404) => Ok(false),
        Err(err) => Err(Error::Kube {
            operation: format!("delete PersistentVolumeClaim {namespace}/{name}"),
            source: err,
        }),
    }
}

/// Annotate VolumeSnapshotContent `content` with [`ALLOW_VOLUME_MODE_CHANGE_ANNOTATION`]` = "true"`,
/// so a PVC of another volume mode than the snapshotted volume's may be made from it (KEP-3141,
/// "Prevent unauthorised volume mode conversion": the external-provisioner refuses such a claim
/// otherwise). A merge patch of that one annotation: re-running it changes nothing, and the
/// content's other annotations stay. Needs `patch` on `volumesnapshotcontents`.
pub async fn allow_volume_mode_change(client: &Client, content: &str) -> Result<()> {
    let contents: Api<VolumeSnapshotContent> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"annotations": {
        ALLOW_VOLUME_MODE_CHANGE_ANNOTATION: "true"
    }}});
    contents
        .patch(content, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!(
            "allow a volume mode change from VolumeSnapshotContent {content}"
        )))?;
    Ok(())
}
