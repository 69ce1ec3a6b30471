//! Building a VolumeSnapshot of a PVC and reading where it stands.
//!
//! A dynamically taken snapshot names its source PVC in `spec.source.persistentVolumeClaimName`
//! and its class in `spec.volumeSnapshotClassName`; the snapshot controller fills `status`:
//! `boundVolumeSnapshotContentName` once bound, `readyToUse` once the storage system cut it,
//! `error` while creation fails (the controller keeps retrying and clears it on success).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::error::{Error, Result};
use crate::naming::{Role, VolumeKey};
use crate::types::{VolumeSnapshot, VolumeSnapshotSource, VolumeSnapshotSpec};

/// The VolumeSnapshot Strata creates for `key`'s PVC with class `class`.
pub fn volume_snapshot(key: &VolumeKey, class: &str) -> VolumeSnapshot {
    snapshot_of(key, &key.pvc, class)
}

/// The VolumeSnapshot of `key`'s staging PVC (the [`Role::Volume`] claim a restore fills before
/// the claim itself is made from this snapshot), under the same name [`volume_snapshot`] gives.
pub fn staging_snapshot(key: &VolumeKey, class: &str) -> VolumeSnapshot {
    snapshot_of(key, &key.name(Role::Volume), class)
}

fn snapshot_of(key: &VolumeKey, pvc: &str, class: &str) -> VolumeSnapshot {
    VolumeSnapshot {
        metadata: ObjectMeta {
            name: Some(key.name(Role::Snapshot)),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels(Role::Snapshot)),
            owner_references: key.owner_references(),
            ..Default::default()
        },
        spec: VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some(pvc.to_owned()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: Some(class.to_owned()),
        },
        status: None,
    }
}

/// A ready snapshot: what a PVC made from it and the changed-block client need.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadySnapshot {
    /// The bound VolumeSnapshotContent.
    pub content: String,
    /// Minimum size of a volume restored from it, when the driver reports one.
    pub restore_size: Option<Quantity>,
}

/// Where a snapshot stands.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SnapshotState {
    /// Not ready yet; `error` is the controller's last `status.error.message`, if any.
    Pending {
        /// The reported error, which the controller may still recover from.
        error: Option<String>,
    },
    /// Bound and ready to use.
    Ready(ReadySnapshot),
}

/// Read `snapshot`'s status. Ready means `readyToUse: true` and a bound content.
pub fn snapshot_state(snapshot: &VolumeSnapshot) -> SnapshotState {
    let Some(status) = snapshot.status.as_ref() else {
        return SnapshotState::Pending { error: None };
    };
    match (
        status.ready_to_use,
        &status.bound_volume_snapshot_content_name,
    ) {
        (Some(true), Some(content)) if !content.is_empty() => SnapshotState::Ready(ReadySnapshot {
            content: content.clone(),
            restore_size: status.restore_size.clone(),
        }),
        _ => SnapshotState::Pending {
            error: status.error.as_ref().map(|e| {
                e.message
                    .clone()
                    .unwrap_or_else(|| "error without message".to_owned())
            }),
        },
    }
}

/// The snapshot's state, with a reported `status.error` turned into [`Error::SnapshotFailed`].
pub fn ready_or_failed(snapshot: &VolumeSnapshot) -> Result<Option<ReadySnapshot>> {
    match snapshot_state(snapshot) {
        SnapshotState::Ready(ready) => Ok(Some(ready)),
        SnapshotState::Pending { error: None } => Ok(None),
        SnapshotState::Pending {
            error: Some(message),
        } => Err(Error::SnapshotFailed {
            namespace: snapshot.metadata.namespace.clone().unwrap_or_default(),
            name: snapshot.metadata.name.clone().unwrap_or_default(),
            message,
        }),
    }
}

/// How long a run waits for a snapshot it took, each from the snapshot's creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// How long a reported `status.error` may stand before it fails the run (the snapshot
    /// controller retries and clears errors); zero fails at the first one.
    pub error_grace: Duration,
    /// How long the snapshot may be not ready, with or without an error, before it fails the
    /// run: a snapshot controller that never posts a status, or a cut that never completes,
    /// must not hold the run (and the locks it holds) forever.
    pub ready_timeout: Duration,
}

/// Where `snapshot` stands after `waited` since its creation, as a run waiting within `limits`
/// sees it: ready, still pending (with the error the controller is retrying, if any), or failed
/// with [`Error::SnapshotFailed`] (an error that outlasted the grace) or
/// [`Error::SnapshotTimeout`] (not ready within the timeout).
pub fn waited_state(
    snapshot: &VolumeSnapshot,
    waited: Duration,
    limits: SnapshotLimits,
) -> Result<SnapshotState> {
    let state = snapshot_state(snapshot);
    let SnapshotState::Pending { error } = &state else {
        return Ok(state);
    };
    let namespace = snapshot.metadata.namespace.clone().unwrap_or_default();
    let name = snapshot.metadata.name.clone().unwrap_or_default();
    match error {
        Some(message) if waited >= limits.error_grace => Err(Error::SnapshotFailed {
            namespace,
            name,
            message: message.clone(),
        }),
        _ if waited >= limits.ready_timeout => Err(Error::SnapshotTimeout {
            namespace,
            name,
            waited,
            last_error: error.clone(),
        }),
        _ => Ok(state),
    }
}

/// Check that an existing snapshot found under `wanted`'s name was made for the same PVC, so a
/// re-run adopts its own snapshot and never someone else's.
pub fn check_adoptable(existing: &VolumeSnapshot, wanted: &VolumeSnapshot) -> Result<()> {
    let existing_source = &existing.spec.source.persistent_volume_claim_name;
    if existing_source != &wanted.spec.source.persistent_volume_claim_name {
        return Err(Error::Conflict {
            kind: "VolumeSnapshot",
            namespace: wanted.metadata.namespace.clone().unwrap_or_default(),
            name: wanted.metadata.name.clone().unwrap_or_default(),
            reason: format!("its source PVC is {existing_source:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::LABEL_ROLE;
    use serde_json::json;

    fn with_status(status: serde_json::Value) -> VolumeSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"source": {"persistentVolumeClaimName": "data"}},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn builds_the_snapshot_of_the_pvc() {
        let key = VolumeKey::new("run", "shop", "data");
        let snap = volume_snapshot(&key, "csi-snapclass");
        let value = serde_json::to_value(&snap).unwrap();
        assert_eq!(value["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(value["kind"], "VolumeSnapshot");
        assert_eq!(value["metadata"]["namespace"], "shop");
        assert_eq!(value["metadata"]["name"], key.name(Role::Snapshot));
        assert_eq!(value["metadata"]["labels"][LABEL_ROLE], "snapshot");
        assert_eq!(
            value["spec"],
            json!({"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": "csi-snapclass"})
        );
    }

    #[test]
    fn the_staging_snapshot_is_of_the_staging_claim() {
        let key = VolumeKey::new("copy", "shop-copy", "data");
        let snap = staging_snapshot(&key, "csi-snapclass");
        assert_eq!(snap.metadata.name, Some(key.name(Role::Snapshot)));
        assert_eq!(snap.metadata.namespace.as_deref(), Some("shop-copy"));
        assert_eq!(
            snap.spec.source.persistent_volume_claim_name,
            Some(key.name(Role::Volume))
        );
        assert_eq!(
            snap.spec.volume_snapshot_class_name.as_deref(),
            Some("csi-snapclass")
        );
        // A re-run adopts it; the snapshot of the claim itself under that name is not ours.
        assert!(check_adoptable(&snap.clone(), &snap).is_ok());
        assert!(check_adoptable(&volume_snapshot(&key, "csi-snapclass"), &snap).is_err());
    }

    #[test]
    fn ready_needs_ready_to_use_and_a_bound_content() {
        let ready = with_status(
            json!({"readyToUse": true, "boundVolumeSnapshotContentName": "c1", "restoreSize": "2Gi"}),
        );
        assert_eq!(
            snapshot_state(&ready),
            SnapshotState::Ready(ReadySnapshot {
                content: "c1".into(),
                restore_size: Some(Quantity("2Gi".into()))
            })
        );
        let unbound = with_status(json!({"readyToUse": true}));
        assert_eq!(
            snapshot_state(&unbound),
            SnapshotState::Pending { error: None }
        );
        let cutting =
            with_status(json!({"readyToUse": false, "boundVolumeSnapshotContentName": "c1"}));
        assert_eq!(ready_or_failed(&cutting).unwrap(), None);
    }

    #[test]
    fn status_error_becomes_a_typed_error() {
        let failed = with_status(
            json!({"readyToUse": false, "error": {"message": "rpc error: code = Internal"}}),
        );
        match ready_or_failed(&failed) {
            Err(Error::SnapshotFailed {
                namespace,
                name,
                message,
            }) => {
                assert_eq!((namespace.as_str(), name.as_str()), ("ns", "s"));
                assert_eq!(message, "rpc error: code = Internal");
            }
            other => panic!("expected SnapshotFailed, got {other:?}"),
        }
    }

    const LIMITS: SnapshotLimits = SnapshotLimits {
        error_grace: Duration::from_secs(15 * 60),
        ready_timeout: Duration::from_secs(30 * 60),
    };

    #[test]
    fn a_snapshot_never_ready_fails_at_the_ready_timeout() {
        let no_status = VolumeSnapshot {
            status: None,
            ..with_status(json!({}))
        };
        let not_ready =
            with_status(json!({"readyToUse": false, "boundVolumeSnapshotContentName": "c1"}));
        for snapshot in [&no_status, &not_ready] {
            let before = LIMITS.ready_timeout - Duration::from_secs(1);
            assert_eq!(
                waited_state(snapshot, before, LIMITS).unwrap(),
                SnapshotState::Pending { error: None }
            );
            match waited_state(snapshot, LIMITS.ready_timeout, LIMITS) {
                Err(
                    e @ Error::SnapshotTimeout {
                        waited,
                        last_error: None,
                        ..
                    },
                ) => {
                    assert_eq!(waited, LIMITS.ready_timeout);
                    assert_eq!(e.to_string(), "VolumeSnapshot ns/s not ready after 1800s");
                }
                other => panic!("expected SnapshotTimeout, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_reported_error_fails_after_its_grace_and_a_ready_snapshot_never() {
        let failing = with_status(json!({"readyToUse": false, "error": {"message": "busy"}}));
        let within = LIMITS.error_grace - Duration::from_secs(1);
        assert_eq!(
            waited_state(&failing, within, LIMITS).unwrap(),
            SnapshotState::Pending {
                error: Some("busy".into())
            }
        );
        assert!(matches!(
            waited_state(&failing, LIMITS.error_grace, LIMITS),
            Err(Error::SnapshotFailed { message, .. }) if message == "busy"
        ));
        let ready =
            with_status(json!({"readyToUse": true, "boundVolumeSnapshotContentName": "c1"}));
        assert!(matches!(
            waited_state(&ready, Duration::from_secs(86_400), LIMITS),
            Ok(SnapshotState::Ready(_))
        ));
    }

    #[test]
    fn adopting_someone_elses_snapshot_is_refused() {
        let key = VolumeKey::new("run", "ns", "data");
        let wanted = volume_snapshot(&key, "c");
        let mut other = wanted.clone();
        other.spec.source.persistent_volume_claim_name = Some("logs".into());
        assert!(
            matches!(check_adoptable(&other, &wanted), Err(Error::Conflict { reason, .. }) if reason.contains("logs"))
        );
        assert!(check_adoptable(&wanted.clone(), &wanted).is_ok());
    }
}
