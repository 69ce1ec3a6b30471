//! Restoring a Filesystem volume through a Block staging volume.
//!
//! A volume backup holds the raw bytes of the device (the backup datamover reads a Block-mode
//! claim made from the snapshot), so a restore writes raw bytes too. A Filesystem claim cannot
//! be opened as a device, so its restore takes a detour through the storage system:
//!
//! 1. [`create_staging`]: an empty Block-mode staging PVC (the claim's StorageClass, after
//!    mapping, and at least the backed-up size), filled by the ordinary restore datamover;
//! 2. [`provision`]: once the datamover succeeded, a VolumeSnapshot of the staging PVC (its class
//!    chosen as a Backup chooses, or the Restore's `snapshotClassName`); once it is ready, its
//!    VolumeSnapshotContent is annotated to allow a volume mode change (KEP-3141, "Prevent
//!    unauthorised volume mode conversion": the external-provisioner refuses a Filesystem claim
//!    from a Block volume's snapshot otherwise), and the claim itself is created from it, in its
//!    own mode;
//! 3. [`clean_up_once_bound`]: the snapshot must outlive the provisioning of the claim's volume,
//!    which is done when the claim is `Bound`; then the staging PVC and snapshot are deleted. With
//!    an `Immediate` StorageClass that is soon after creation; with `WaitForFirstConsumer` the
//!    provisioner waits for the first pod using the claim, which exists only once the Restore
//!    applied the workloads, so the Restore stays `Finishing`, with condition `StagingCleanedUp`
//!    False (reason `WaitingForBinding`), until then.
//!
//! Every object has the deterministic name of its role for the (Restore, namespace, claim) key:
//! the staging PVC is [`Role::Volume`], its snapshot [`Role::Snapshot`], so each step finds what
//! an earlier, interrupted reconcile made; the volume's [`Staging`] status records the step.

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{Api, Client};

use super::volumes::{Temporaries, claim_taken, cleanup, create_claim, restored_by, snapshot_age};
use crate::crd::{Staging, VolumeStatus};
use crate::error::{Error, Result};
use crate::status::quantity_bytes;
use strata_csi::client::{
    allow_volume_mode_change, create_or_get_pvc, create_or_get_snapshot, snapshot_class_for_pvc,
};
use strata_csi::{
    Role, SnapshotLimits, SnapshotState, VolumeKey, claim_from_snapshot, staging_pvc,
    staging_snapshot, waited_state,
};

/// Whether a volume's claim is restored through a staging volume: it is not `Block`.
pub fn needs_staging(volume_mode: &str) -> bool {
    volume_mode != "Block"
}

/// Whether `volume`'s staging PVC is filled and its claim not yet made from the snapshot.
pub fn awaits_snapshot(volume: &VolumeStatus) -> bool {
    volume.done
        && matches!(
            volume.staging,
            Some(Staging::Filling | Staging::Snapshotting)
        )
}

/// Whether `volume`'s claim was made from its staging snapshot and the staging objects wait
/// for it to be bound.
pub fn awaits_binding(volume: &VolumeStatus) -> bool {
    volume.staging == Some(Staging::Binding)
}

fn request(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// The larger of `a` and `b` when both parse as sizes; `a` otherwise.
fn larger<'a>(a: Option<&'a Quantity>, b: Option<&'a Quantity>) -> Option<&'a Quantity> {
    match (a, b) {
        (Some(x), Some(y)) => match (quantity_bytes(&x.0), quantity_bytes(&y.0)) {
            (Some(bx), Some(by)) if by > bx => Some(y),
            _ => Some(x),
        },
        (None, y) => y,
        (x, None) => x,
    }
}

/// Raises `claim`'s storage request to `size_bytes` (the backed-up volume's size) when it asks
/// for less or cannot be read: a volume provisioned larger than its request (EBS rounds 1500Mi
/// up to 2Gi) restored through a provisioner that gives exactly what is asked would be a device
/// too small for the restore, which refuses it.
pub(crate) fn request_at_least(claim: &mut PersistentVolumeClaim, size_bytes: Option<u64>) {
    let Some(size) = size_bytes else {
        return;
    };
    let wanted = Quantity(size.to_string());
    let grown = larger(request(claim), Some(&wanted)).cloned();
    if grown.as_ref() == request(claim) && grown.is_some() {
        return;
    }
    let requests = claim
        .spec
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
        .requests
        .get_or_insert_with(Default::default);
    requests.insert("storage".to_owned(), grown.unwrap_or(wanted));
}

/// Check that `claim`'s name is free (or taken by this run's earlier reconcile) and create the
/// Block staging PVC for `key`, as large as the backed-up volume (`size_bytes`, its provisioned
/// capacity) or the claim's request, whichever is larger. Returns the staging PVC's name.
pub async fn create_staging(
    client: &Client,
    key: &VolumeKey,
    claim: &PersistentVolumeClaim,
    size_bytes: Option<u64>,
    run: &str,
) -> Result<String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &key.namespace);
    let existing = claims.get_opt(&key.pvc).await.map_err(Error::kube(format!(
        "get PVC {}/{}",
        key.namespace, key.pvc
    )))?;
    if existing.is_some_and(|c| !restored_by(&c, run)) {
        return Err(claim_taken(&key.namespace, &key.pvc));
    }
    let backed_up = size_bytes.map(|b| Quantity(b.to_string()));
    let size = larger(request(claim), backed_up.as_ref())
        .cloned()
        .ok_or_else(|| Error::InvalidSpec {
            what: "archived PVC",
            reason: format!(
                "{}/{} has no spec.resources.requests.storage",
                key.namespace, key.pvc
            ),
        })?;
    let staging = staging_pvc(key, claim, size);
    create_or_get_pvc(client, &staging)
        .await
        .map_err(Error::csi(format!("staging PVC of {}", key.pvc)))?;
    Ok(key.name(Role::Volume))
}

/// How long a Restore waits for a staging snapshot: its first `status.error` fails the run, and
/// so does a snapshot not ready within `ready_timeout` (`Context::snapshot_ready_timeout`).
fn staging_limits(ready_timeout: Duration) -> SnapshotLimits {
    SnapshotLimits {
        error_grace: Duration::ZERO,
        ready_timeout,
    }
}

/// Move `volume` (filled, awaiting its snapshot) on: snapshot the staging PVC and, once the
/// snapshot is ready, allow the mode change on its content and create `claim` (already labelled
/// for this run) from it. The snapshot's `status.error`, or its not being ready within
/// `ready_timeout` (see [`staging_limits`]), is an [`Error::Csi`], which fails the Restore.
#[allow(clippy::too_many_arguments)]
pub async fn provision(
    client: &Client,
    key: &VolumeKey,
    volume: &mut VolumeStatus,
    claim: PersistentVolumeClaim,
    snapshot_class: Option<&str>,
    run: &str,
    ready_timeout: Duration,
) -> Result<()> {
    let staging_name = key.name(Role::Volume);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &key.namespace);
    // The stored staging PVC names its StorageClass even when the claim left it to the default.
    let staging = claims
        .get_opt(&staging_name)
        .await
        .map_err(Error::kube(format!(
            "get PVC {}/{staging_name}",
            key.namespace
        )))?
        .ok_or_else(|| Error::InvalidSpec {
            what: "volume",
            reason: format!(
                "staging PVC {}/{staging_name} of {} disappeared",
                key.namespace, key.pvc
            ),
        })?;
    let class = snapshot_class_for_pvc(client, &staging, snapshot_class)
        .await
        .map_err(Error::csi(format!("snapshot class for {staging_name}")))?;
    let wanted = staging_snapshot(key, class.metadata.name.as_deref().unwrap_or_default());
    let operation = format!("snapshot of staging PVC {staging_name}");
    let snapshot = create_or_get_snapshot(client, &wanted)
        .await
        .map_err(Error::csi(operation.clone()))?;
    let state = waited_state(
        &snapshot,
        snapshot_age(&snapshot),
        staging_limits(ready_timeout),
    )
    .map_err(Error::csi(operation))?;
    let SnapshotState::Ready(ready) = state else {
        volume.staging = Some(Staging::Snapshotting);
        return Ok(());
    };
    allow_volume_mode_change(client, &ready.content)
        .await
        .map_err(Error::csi(format!(
            "PVC {} from its staging snapshot",
            key.pvc
        )))?;
    // The provisioner refuses a claim smaller than the snapshot's restoreSize.
    let size = larger(request(&claim), ready.restore_size.as_ref())
        .filter(|s| Some(*s) != request(&claim))
        .cloned();
    let claim = claim_from_snapshot(claim, &key.name(Role::Snapshot), size);
    create_claim(client, &claim, run).await?;
    volume.staging = Some(Staging::Binding);
    Ok(())
}

/// Delete `volume`'s staging PVC and snapshot once its claim is `Bound`; `Some(phase)` of the
/// claim while it is not.
pub async fn clean_up_once_bound(
    client: &Client,
    key: &VolumeKey,
    volume: &mut VolumeStatus,
) -> Result<Option<String>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &key.namespace);
    let claim = claims
        .get_opt(&key.pvc)
        .await
        .map_err(Error::kube(format!(
            "get PVC {}/{}",
            key.namespace, key.pvc
        )))?
        .ok_or_else(|| Error::InvalidSpec {
            what: "volume",
            reason: format!(
                "PVC {}/{} disappeared before it was bound",
                key.namespace, key.pvc
            ),
        })?;
    let phase = claim
        .status
        .and_then(|s| s.phase)
        .unwrap_or_else(|| "Pending".to_owned());
    if phase != "Bound" {
        return Ok(Some(phase));
    }
    cleanup(
        client,
        |_| key.clone(),
        &key.namespace,
        std::slice::from_ref(volume),
        Temporaries::SnapshotAndClaim,
    )
    .await?;
    volume.staging = Some(Staging::CleanedUp);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::DEFAULT_SNAPSHOT_READY_TIMEOUT;

    fn quantity(q: &str) -> Quantity {
        Quantity(q.to_owned())
    }

    #[test]
    fn a_claim_asks_at_least_for_the_backed_up_size() {
        let claim = |q: Option<&str>| PersistentVolumeClaim {
            spec: Some(k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
                resources: q.map(|q| k8s_openapi::api::core::v1::VolumeResourceRequirements {
                    requests: Some([("storage".to_owned(), quantity(q))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let grown = |q: Option<&str>, size: Option<u64>| {
            let mut c = claim(q);
            request_at_least(&mut c, size);
            request(&c).cloned()
        };
        // 1500Mi provisioned as 2Gi: the restored claim asks for the 2Gi.
        assert_eq!(
            grown(Some("1500Mi"), Some(2 << 30)),
            Some(quantity("2147483648"))
        );
        assert_eq!(grown(Some("2Gi"), Some(1 << 30)), Some(quantity("2Gi")));
        assert_eq!(grown(Some("1Gi"), None), Some(quantity("1Gi")));
        assert_eq!(grown(None, Some(4096)), Some(quantity("4096")));
    }

    #[test]
    fn the_larger_size_wins_and_unparsable_ones_keep_the_first() {
        let (gi, two_gi) = (quantity("1Gi"), quantity("2147483648"));
        assert_eq!(larger(Some(&gi), Some(&two_gi)), Some(&two_gi));
        assert_eq!(larger(Some(&two_gi), Some(&gi)), Some(&two_gi));
        assert_eq!(larger(Some(&gi), Some(&quantity("1.5Gi"))), Some(&gi));
        assert_eq!(larger(None, Some(&gi)), Some(&gi));
        assert_eq!(larger(Some(&gi), None), Some(&gi));
        assert_eq!(larger(None, None), None);
    }

    #[test]
    fn only_block_claims_skip_the_staging_volume() {
        assert!(!needs_staging("Block"));
        assert!(needs_staging("Filesystem"));
        let mut volume = VolumeStatus {
            staging: Some(Staging::Filling),
            ..Default::default()
        };
        assert!(
            !awaits_snapshot(&volume),
            "not before its datamover finished"
        );
        volume.done = true;
        assert!(awaits_snapshot(&volume));
        volume.staging = Some(Staging::Binding);
        assert!(!awaits_snapshot(&volume) && awaits_binding(&volume));
        volume.staging = None;
        assert!(!awaits_snapshot(&volume) && !awaits_binding(&volume));
    }

    #[test]
    fn a_staging_snapshot_never_ready_fails_the_restore_at_the_timeout() {
        let snapshot: strata_csi::VolumeSnapshot = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "shop"},
            "spec": {"source": {"persistentVolumeClaimName": "staging"}},
            "status": {"readyToUse": false}}))
        .unwrap();
        let before = DEFAULT_SNAPSHOT_READY_TIMEOUT - Duration::from_secs(1);
        assert_eq!(
            waited_state(
                &snapshot,
                before,
                staging_limits(DEFAULT_SNAPSHOT_READY_TIMEOUT)
            )
            .unwrap(),
            SnapshotState::Pending { error: None }
        );
        let timed_out = waited_state(
            &snapshot,
            DEFAULT_SNAPSHOT_READY_TIMEOUT,
            staging_limits(DEFAULT_SNAPSHOT_READY_TIMEOUT),
        )
        .map_err(Error::csi("snapshot of staging PVC staging"))
        .unwrap_err();
        assert_eq!(timed_out.class(), crate::error::ErrorClass::Permanent);
        assert!(matches!(
            &timed_out,
            Error::Csi { source, .. } if matches!(**source, strata_csi::Error::SnapshotTimeout { .. })
        ));
    }
}
