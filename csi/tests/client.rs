//! The client helpers against an in-memory API server: idempotent creation, waiting on the
//! snapshot status, deletion honouring the content's deletionPolicy, and the annotation allowing
//! a volume mode change.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::{Value, json};
use strata_csi::client::{
    Deleted, WaitOptions, allow_volume_mode_change, create_or_get_pvc, create_or_get_snapshot,
    delete_pvc, delete_snapshot, snapshot_class_for_pvc, wait_until_ready,
};
use strata_csi::{
    ALLOW_VOLUME_MODE_CHANGE_ANNOTATION, Error, Role, VolumeKey, VolumeMode, pvc_from_snapshot,
    volume_snapshot,
};
use support::Mock;

const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const PVCS: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";

fn key() -> VolumeKey {
    VolumeKey::new("nightly", "shop", "data")
}

fn with_status(status: Value) -> Value {
    let mut snapshot = serde_json::to_value(volume_snapshot(&key(), "snapclass")).unwrap();
    snapshot["status"] = status;
    snapshot
}

fn fast() -> WaitOptions {
    WaitOptions {
        timeout: Duration::from_millis(200),
        interval: Duration::from_millis(10),
        fail_on_error: true,
    }
}

#[tokio::test]
async fn snapshot_creation_is_idempotent_and_refuses_foreign_objects() {
    let mock = Mock::default();
    let client = mock.client();
    let snapshot = volume_snapshot(&key(), "snapclass");
    let name = key().name(Role::Snapshot);
    let first = create_or_get_snapshot(&client, &snapshot).await.unwrap();
    let again = create_or_get_snapshot(&client, &snapshot).await.unwrap();
    assert_eq!(first.metadata.uid, again.metadata.uid);
    assert_eq!(
        mock.requests(),
        [
            format!("POST {SNAPSHOTS}"),
            format!("POST {SNAPSHOTS}"),
            format!("GET {SNAPSHOTS}/{name}")
        ]
    );

    let mut foreign = serde_json::to_value(&snapshot).unwrap();
    foreign["spec"]["source"]["persistentVolumeClaimName"] = json!("logs");
    mock.put(&format!("{SNAPSHOTS}/{name}"), foreign);
    let err = create_or_get_snapshot(&client, &snapshot)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                kind: "VolumeSnapshot",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn wait_returns_once_bound_and_ready() {
    let mock = Mock::default();
    let name = key().name(Role::Snapshot);
    mock.script(
        &format!("{SNAPSHOTS}/{name}"),
        vec![
            with_status(json!({})),
            with_status(json!({"readyToUse": false, "boundVolumeSnapshotContentName": "snapcontent-1"})),
            with_status(json!({"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-1", "restoreSize": "1Gi"})),
        ],
    );
    let ready = wait_until_ready(&mock.client(), "shop", &name, fast())
        .await
        .unwrap();
    assert_eq!(ready.content, "snapcontent-1");
    assert_eq!(ready.restore_size.unwrap().0, "1Gi");
    assert_eq!(mock.requests().len(), 3);
}

// The paused clock makes the timeout exact: a loaded machine cannot stretch it.
#[tokio::test(start_paused = true)]
async fn wait_surfaces_status_error_or_times_out_with_it() {
    let mock = Mock::default();
    let name = key().name(Role::Snapshot);
    let path = format!("{SNAPSHOTS}/{name}");
    let failing =
        with_status(json!({"readyToUse": false, "error": {"message": "snapshot quota exceeded"}}));
    mock.script(&path, vec![with_status(json!({})), failing]);
    match wait_until_ready(&mock.client(), "shop", &name, fast()).await {
        Err(Error::SnapshotFailed { message, .. }) => {
            assert_eq!(message, "snapshot quota exceeded")
        }
        other => panic!("expected SnapshotFailed, got {other:?}"),
    }

    let patient = WaitOptions {
        fail_on_error: false,
        ..fast()
    };
    match wait_until_ready(&mock.client(), "shop", &name, patient).await {
        Err(Error::SnapshotTimeout {
            waited, last_error, ..
        }) => {
            // Gives up at the deadline: not before it, and not a whole interval past it.
            assert!(waited <= patient.timeout, "waited {waited:?}");
            assert!(
                waited + patient.interval > patient.timeout,
                "waited {waited:?}"
            );
            assert_eq!(last_error.as_deref(), Some("snapshot quota exceeded"));
        }
        other => panic!("expected SnapshotTimeout, got {other:?}"),
    }
    let missing = wait_until_ready(&mock.client(), "shop", "absent", fast()).await;
    assert!(matches!(missing, Err(Error::Kube { .. })));
}

#[tokio::test]
async fn pvc_from_snapshot_is_created_once_and_deleted_idempotently() {
    let mock = Mock::default();
    let client = mock.client();
    let source: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data", "namespace": "shop"},
        "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    let pvc = pvc_from_snapshot(
        &key(),
        &source,
        &key().name(Role::Snapshot),
        None,
        VolumeMode::Block,
    )
    .unwrap();
    let name = key().name(Role::Volume);
    create_or_get_pvc(&client, &pvc).await.unwrap();
    create_or_get_pvc(&client, &pvc).await.unwrap();
    let stored = mock.get(&format!("{PVCS}/{name}")).unwrap();
    assert_eq!(stored["spec"]["volumeMode"], "Block");
    assert_eq!(stored["spec"]["dataSource"]["kind"], "VolumeSnapshot");

    let mut other = pvc.clone();
    other
        .spec
        .as_mut()
        .unwrap()
        .data_source
        .as_mut()
        .unwrap()
        .name = "someone-elses".into();
    assert!(matches!(
        create_or_get_pvc(&client, &other).await,
        Err(Error::Conflict {
            kind: "PersistentVolumeClaim",
            ..
        })
    ));

    assert!(delete_pvc(&client, "shop", &name).await.unwrap());
    assert!(!delete_pvc(&client, "shop", &name).await.unwrap());
    assert!(mock.get(&format!("{PVCS}/{name}")).is_none());
}

#[tokio::test]
async fn delete_honours_the_contents_deletion_policy() {
    let mock = Mock::default();
    let client = mock.client();
    let name = key().name(Role::Snapshot);
    let content = |policy: &str| {
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {"volumeSnapshotRef": {"name": name, "namespace": "shop"}, "deletionPolicy": policy,
                     "driver": "hostpath.csi.k8s.io", "source": {"volumeHandle": "vol-1"}}
        })
    };
    let bound =
        with_status(json!({"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-1"}));

    mock.put(&format!("{SNAPSHOTS}/{name}"), bound.clone());
    mock.put(&format!("{CONTENTS}/snapcontent-1"), content("Retain"));
    assert_eq!(
        delete_snapshot(&client, "shop", &name).await.unwrap(),
        Deleted::ContentRetained {
            content: "snapcontent-1".into()
        }
    );
    assert!(mock.get(&format!("{SNAPSHOTS}/{name}")).is_none());
    assert!(
        mock.get(&format!("{CONTENTS}/snapcontent-1")).is_some(),
        "a retained content is never deleted"
    );

    mock.put(&format!("{SNAPSHOTS}/{name}"), bound);
    mock.put(&format!("{CONTENTS}/snapcontent-1"), content("Delete"));
    assert_eq!(
        delete_snapshot(&client, "shop", &name).await.unwrap(),
        Deleted::WithContent
    );
    assert_eq!(
        delete_snapshot(&client, "shop", &name).await.unwrap(),
        Deleted::AlreadyGone
    );
    assert!(
        !mock
            .requests()
            .iter()
            .any(|r| r.starts_with("DELETE") && r.contains("volumesnapshotcontents"))
    );
}

#[tokio::test]
async fn class_for_pvc_follows_the_storage_class_provisioner() {
    let mock = Mock::default();
    let classes = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses";
    mock.put(
        "/apis/storage.k8s.io/v1/storageclasses/fast",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
               "provisioner": "ebs.csi.aws.com"}),
    );
    let class = |name: &str, driver: &str, default: bool| {
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": name, "annotations": {"snapshot.storage.kubernetes.io/is-default-class": default.to_string()}},
            "driver": driver, "deletionPolicy": "Delete"
        })
    };
    mock.put(
        &format!("{classes}/hostpath"),
        class("hostpath", "hostpath.csi.k8s.io", true),
    );
    mock.put(
        &format!("{classes}/ebs-plain"),
        class("ebs-plain", "ebs.csi.aws.com", false),
    );
    mock.put(
        &format!("{classes}/ebs-default"),
        class("ebs-default", "ebs.csi.aws.com", true),
    );
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data", "namespace": "shop"}, "spec": {"storageClassName": "fast"}
    }))
    .unwrap();
    let client = mock.client();
    let chosen = snapshot_class_for_pvc(&client, &pvc, None).await.unwrap();
    assert_eq!(chosen.metadata.name.as_deref(), Some("ebs-default"));
    let wrong = snapshot_class_for_pvc(&client, &pvc, Some("hostpath")).await;
    assert!(matches!(wrong, Err(Error::SnapshotClassMismatch { .. })));
}

#[tokio::test]
async fn volume_mode_change_is_allowed_on_the_content_alone_and_idempotently() {
    let mock = Mock::default();
    let client = mock.client();
    let path = format!("{CONTENTS}/snapcontent-1");
    mock.put(
        &path,
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1", "annotations": {"owner": "team-a"}},
            "spec": {"volumeSnapshotRef": {"name": "s", "namespace": "shop"}, "deletionPolicy": "Delete",
                     "driver": "hostpath.csi.k8s.io", "source": {"volumeHandle": "vol-1"}}
        }),
    );
    allow_volume_mode_change(&client, "snapcontent-1")
        .await
        .unwrap();
    allow_volume_mode_change(&client, "snapcontent-1")
        .await
        .unwrap();
    let content = mock.get(&path).unwrap();
    assert_eq!(
        content["metadata"]["annotations"],
        json!({"owner": "team-a", ALLOW_VOLUME_MODE_CHANGE_ANNOTATION: "true"})
    );
    assert_eq!(content["spec"]["deletionPolicy"], "Delete");
    assert_eq!(
        mock.requests(),
        [format!("PATCH {path}"), format!("PATCH {path}")]
    );

    match allow_volume_mode_change(&client, "absent").await {
        Err(err @ Error::Kube { .. }) => {
            assert!(
                err.to_string().contains("VolumeSnapshotContent absent"),
                "{err}"
            )
        }
        other => panic!("expected a Kube error, got {other:?}"),
    }
}
