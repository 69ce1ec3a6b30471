//! Restoring a Filesystem PVC through a Block staging PVC, step by step against the in-memory
//! API server: staging PVC and datamover, a snapshot of the staging PVC, its content annotated
//! to allow the mode change, the PVC made from it, and the staging objects deleted once it is
//! Bound. A Block PVC of the same application still takes the direct path. The snapshot
//! controller, Job controller and provisioner are played by the test.

mod kube_mock;

use std::io::Write;

use kube_mock::{Mock, refused_as_stale};
use serde_json::{Value, json};
use strata::csi::{ALLOW_VOLUME_MODE_CHANGE_ANNOTATION, Role};
use strata::operator::crd::{Restore, Staging};
use strata::operator::status::Phase;
use strata::operator::{Context, reconcile_backup, reconcile_restore};
use strata::target::{Target, VolumeName};

const PVCS: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const JOBS: &str = "/apis/batch/v1/namespaces/shop/jobs";
const RESTORES: &str = "/apis/strata.io/v1alpha1/namespaces/shop/restores";
const COPY_PVCS: &str = "/api/v1/namespaces/shop-copy/persistentvolumeclaims";
const COPY_SNAPSHOTS: &str =
    "/apis/snapshot.storage.k8s.io/v1/namespaces/shop-copy/volumesnapshots";
const COPY_JOBS: &str = "/apis/batch/v1/namespaces/shop-copy/jobs";

fn claim(name: &str, mode: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": "db"},
                        "finalizers": ["kubernetes.io/pvc-protection", "example.com/keep"],
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "db", "uid": "uid-of-the-source-cluster",
                                             "controller": true}]},
           "spec": {"storageClassName": "fast", "volumeMode": mode,
                    "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
           "status": {"phase": "Bound", "capacity": {"storage": "1Mi"}}})
}

fn content(name: &str) -> Value {
    json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
           "metadata": {"name": name},
           "spec": {"deletionPolicy": "Delete", "driver": "hostpath.csi.k8s.io",
                    "source": {"volumeHandle": format!("handle-{name}")},
                    "volumeSnapshotRef": {"name": "s", "namespace": "shop"}}})
}

/// Namespace `shop` with Filesystem PVC `data` and Block PVC `raw` (class `fast`), ConfigMap
/// `db-config`, all labelled `app=db`; StorageClasses `fast` and `fast-copy` of the hostpath
/// driver and its snapshot class; a Target on a local folder and Backup `nightly` of `app=db`.
fn cluster(target: &std::path::Path) -> Mock {
    let mock = Mock::default();
    mock.put(
        "/api/v1/namespaces/shop",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    mock.put(&format!("{PVCS}/data"), claim("data", "Filesystem"));
    mock.put(&format!("{PVCS}/raw"), claim("raw", "Block"));
    mock.put(
        "/api/v1/namespaces/shop/configmaps/db-config",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "db-config", "namespace": "shop", "labels": {"app": "db"}},
               "data": {"max_connections": "100"}}),
    );
    for class in ["fast", "fast-copy"] {
        mock.put(
            &format!("/apis/storage.k8s.io/v1/storageclasses/{class}"),
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                   "metadata": {"name": class}, "provisioner": "hostpath.csi.k8s.io",
                   "volumeBindingMode": "WaitForFirstConsumer"}),
        );
    }
    for name in ["content-data", "content-raw", "content-staging"] {
        mock.put(&format!("{CONTENTS}/{name}"), content(name));
    }
    mock.put_snapshot_class_target_and_backup(target);
    mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "shop-copy"},
                        "storageClassMapping": {"fast": "fast-copy"}}}),
    );
    mock
}

fn restore(mock: &Mock) -> Restore {
    serde_json::from_value(mock.get(&format!("{RESTORES}/copy")).unwrap()).unwrap()
}

/// Merge `patch` into the object at `path`, as a controller would.
fn update(mock: &Mock, path: &str, patch: Value) {
    let mut object = mock
        .get(path)
        .unwrap_or_else(|| panic!("{path} not created"));
    json_patch::merge(&mut object, &patch);
    mock.put(path, object);
}

fn complete() -> Value {
    json!({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
}

fn ready(content: &str, restore_size: &str) -> Value {
    json!({"status": {"readyToUse": true, "boundVolumeSnapshotContentName": content,
                      "restoreSize": restore_size}})
}

fn annotations(mock: &Mock, content: &str) -> Value {
    mock.get(&format!("{CONTENTS}/{content}")).unwrap()["metadata"]["annotations"].clone()
}

fn condition(status: &impl serde::Serialize, type_: &str) -> Value {
    let status = serde_json::to_value(status).unwrap();
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Run Backup `nightly` to completion, doing the datamovers' work: a full backup of a 1 MiB
/// device per volume. Checks on the way that only the Filesystem volume's snapshot content is
/// annotated for its Block datamover claim.
async fn backed_up(mock: &Mock, ctx: &Context, folder: &std::path::Path) {
    reconcile_backup(&mock.backup("nightly"), ctx)
        .await
        .unwrap();
    for pvc in ["data", "raw"] {
        let snapshot = mock
            .run_key("backups", "nightly", "shop", pvc)
            .name(Role::Snapshot);
        update(
            mock,
            &format!("{SNAPSHOTS}/{snapshot}"),
            ready(&format!("content-{pvc}"), "1Mi"),
        );
    }
    reconcile_backup(&mock.backup("nightly"), ctx)
        .await
        .unwrap();
    assert_eq!(
        annotations(mock, "content-data"),
        json!({ALLOW_VOLUME_MODE_CHANGE_ANNOTATION: "true"})
    );
    assert_eq!(annotations(mock, "content-raw"), Value::Null);
    let mut device = tempfile::NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    device.write_all(&bytes).unwrap();
    let (target, path) = (folder.to_owned(), device.path().to_owned());
    tokio::task::spawn_blocking(move || {
        let target = Target::open(target.to_str().unwrap()).unwrap();
        for volume in ["shop.data", "shop.raw"] {
            strata::backup_volume(
                &target,
                &VolumeName::new(volume).unwrap(),
                &strata::open_volume(&path).unwrap(),
                &Default::default(),
                &mut |_| {},
            )
            .unwrap();
        }
    })
    .await
    .unwrap();
    for pvc in ["data", "raw"] {
        let job = mock
            .run_key("backups", "nightly", "shop", pvc)
            .name(Role::Datamover);
        update(mock, &format!("{JOBS}/{job}"), complete());
    }
    reconcile_backup(&mock.backup("nightly"), ctx)
        .await
        .unwrap();
    let status = mock.backup("nightly").status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn filesystem_pvc_is_restored_through_a_block_staging_volume_and_a_snapshot() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    let key = mock.run_key("restores", "copy", "shop-copy", "data");
    let (staging, snapshot, job) = (
        key.name(Role::Volume),
        key.name(Role::Snapshot),
        key.name(Role::Datamover),
    );
    let raw_job = mock
        .run_key("restores", "copy", "shop-copy", "raw")
        .name(Role::Datamover);

    // 1: the Block PVC is recreated and filled in place; the Filesystem one gets an empty Block
    // staging PVC of the mapped class, and its datamover writes the staging PVC. Re-run from
    // the same (stale) object, as after a crash before the status was written: nothing doubles
    // (and the re-run's status write is refused as stale; so at every re-run below).
    let stale = restore(&mock);
    reconcile_restore(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_restore(&stale, &ctx).await);
    let mut claims = vec![staging.clone(), "raw".to_owned()];
    claims.sort();
    assert_eq!(mock.names_under(COPY_PVCS), claims);
    let staged = mock.get(&format!("{COPY_PVCS}/{staging}")).unwrap();
    assert_eq!(
        staged["spec"],
        json!({"storageClassName": "fast-copy", "accessModes": ["ReadWriteOnce"],
               "volumeMode": "Block", "resources": {"requests": {"storage": "1Mi"}}})
    );
    assert_eq!(staged["metadata"]["labels"]["strata.io/run"], "copy");
    let raw = mock.get(&format!("{COPY_PVCS}/raw")).unwrap();
    assert_eq!(raw["spec"]["volumeMode"], "Block");
    assert_eq!(raw["spec"]["storageClassName"], "fast-copy");
    // The source cluster's owner (its uid unknown here: the garbage collector would delete
    // the claim) and finalizers are not carried over.
    assert_eq!(raw["metadata"]["ownerReferences"], Value::Null, "{raw}");
    assert_eq!(raw["metadata"]["finalizers"], Value::Null, "{raw}");
    let pod_claim = |job: &str| {
        mock.get(&format!("{COPY_JOBS}/{job}")).unwrap()["spec"]["template"]["spec"]["volumes"][0]
            ["persistentVolumeClaim"]["claimName"]
            .clone()
    };
    assert_eq!(pod_claim(&job), json!(staging));
    assert_eq!(pod_claim(&raw_job), json!("raw"));
    let mut jobs = vec![job.clone(), raw_job.clone()];
    jobs.sort();
    assert_eq!(mock.names_under(COPY_JOBS), jobs);
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Copying));
    let staging_of = |status: &strata::operator::crd::RestoreStatus, pvc: &str| {
        status
            .volumes
            .iter()
            .find(|v| v.pvc == pvc)
            .unwrap()
            .staging
    };
    assert_eq!(staging_of(&status, "data"), Some(Staging::Filling));
    assert_eq!(staging_of(&status, "raw"), None);

    // 2: the datamovers succeed: a snapshot of the staging PVC, and nothing more until it is
    // ready; the Block volume is restored already.
    update(&mock, &format!("{COPY_JOBS}/{job}"), complete());
    update(&mock, &format!("{COPY_JOBS}/{raw_job}"), complete());
    let stale = restore(&mock);
    reconcile_restore(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_restore(&stale, &ctx).await);
    assert_eq!(
        mock.names_under(COPY_SNAPSHOTS),
        std::slice::from_ref(&snapshot)
    );
    let taken = mock.get(&format!("{COPY_SNAPSHOTS}/{snapshot}")).unwrap();
    assert_eq!(
        taken["spec"],
        json!({"source": {"persistentVolumeClaimName": staging},
               "volumeSnapshotClassName": "csi-hostpath-snapclass"})
    );
    assert!(mock.get(&format!("{COPY_PVCS}/data")).is_none());
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Copying));
    assert_eq!(staging_of(&status, "data"), Some(Staging::Snapshotting));
    let progress = status.progress.clone().unwrap();
    assert_eq!((progress.volumes_done, progress.volumes_total), (1, 2));
    let restored = condition(&status, "VolumesRestored");
    assert_eq!(restored["reason"], "Snapshotting");
    assert_eq!(
        restored["message"],
        "1 of 2 volumes restored; 1 waiting for the snapshot of their staging volume"
    );

    // 3: ready (the driver rounds the staging volume up to 2 MiB): the content is annotated,
    // and the PVC is made from the snapshot, Filesystem, no smaller than the snapshot.
    update(
        &mock,
        &format!("{COPY_SNAPSHOTS}/{snapshot}"),
        ready("content-staging", "2Mi"),
    );
    let stale = restore(&mock);
    let before = mock.requests().len();
    reconcile_restore(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_restore(&stale, &ctx).await);
    assert_eq!(
        annotations(&mock, "content-staging"),
        json!({ALLOW_VOLUME_MODE_CHANGE_ANNOTATION: "true"})
    );
    // Annotated before the claim exists, so the provisioner never sees it unannotated.
    let requests = mock.requests().split_off(before);
    let at = |wanted: &str| requests.iter().position(|r| r == wanted).unwrap();
    assert!(
        at(&format!("PATCH {CONTENTS}/content-staging")) < at(&format!("POST {COPY_PVCS}")),
        "{requests:#?}"
    );
    let data = mock
        .get(&format!("{COPY_PVCS}/data"))
        .expect("PVC made from the staging snapshot");
    assert_eq!(data["metadata"]["labels"]["app"], "db");
    assert_eq!(data["metadata"]["labels"]["strata.io/run"], "copy");
    assert_eq!(data["metadata"]["ownerReferences"], Value::Null, "{data}");
    assert_eq!(data["metadata"]["finalizers"], Value::Null, "{data}");
    assert_eq!(
        data["spec"],
        json!({"storageClassName": "fast-copy", "volumeMode": "Filesystem",
               "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Mi"}},
               "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                              "name": snapshot}})
    );
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Finishing));
    assert_eq!(staging_of(&status, "data"), Some(Staging::Binding));
    assert_eq!(condition(&status, "VolumesRestored")["status"], "True");
    assert!(
        mock.get("/api/v1/namespaces/shop-copy/configmaps/db-config")
            .is_none()
    );

    // 4: the workloads are applied and the Jobs deleted; the PVC waits for its first consumer
    // (WaitForFirstConsumer), so the staging snapshot and PVC stay and the Restore waits.
    let stale = restore(&mock);
    reconcile_restore(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_restore(&stale, &ctx).await);
    assert!(
        mock.get("/api/v1/namespaces/shop-copy/configmaps/db-config")
            .is_some()
    );
    assert!(mock.names_under(COPY_JOBS).is_empty());
    assert_eq!(
        mock.names_under(COPY_SNAPSHOTS),
        std::slice::from_ref(&snapshot)
    );
    assert!(mock.get(&format!("{COPY_PVCS}/{staging}")).is_some());
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Finishing));
    // The re-run from the stale object applied again and found the ConfigMap, but its status
    // write was refused: the first run's counts (the ConfigMap applied; the Namespace was made
    // with the claims and is never applied again) are not overwritten.
    assert_eq!(
        (status.objects_applied, status.objects_skipped),
        (Some(1), Some(0))
    );
    let waiting = condition(&status, "StagingCleanedUp");
    assert_eq!(
        (&waiting["status"], &waiting["reason"]),
        (&json!("False"), &json!("WaitingForBinding"))
    );
    assert!(
        waiting["message"]
            .as_str()
            .unwrap()
            .starts_with("data is Pending; "),
        "{waiting}"
    );
    let applies = |mock: &Mock| {
        mock.requests()
            .iter()
            .filter(|r| r.contains("configmaps/db-config") && r.starts_with("PATCH"))
            .count()
    };
    let applied = applies(&mock);
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    assert_eq!(applies(&mock), applied, "objects are applied once");

    // 5: a pod was scheduled and the provisioner bound the PVC: the staging objects go.
    update(
        &mock,
        &format!("{COPY_PVCS}/data"),
        json!({"status": {"phase": "Bound"}}),
    );
    let stale = restore(&mock);
    reconcile_restore(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_restore(&stale, &ctx).await);
    assert!(mock.names_under(COPY_SNAPSHOTS).is_empty());
    let mut left = vec!["data".to_owned(), "raw".to_owned()];
    left.sort();
    assert_eq!(mock.names_under(COPY_PVCS), left);
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed), "{status:?}");
    assert_eq!(staging_of(&status, "data"), Some(Staging::CleanedUp));
    assert_eq!(condition(&status, "StagingCleanedUp")["status"], "True");
    let progress = status.progress.unwrap();
    assert_eq!((progress.volumes_done, progress.bytes_done), (2, 2 << 20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_staging_snapshot_fails_the_restore_with_its_error() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    let key = mock.run_key("restores", "copy", "shop-copy", "data");
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    for pvc in ["data", "raw"] {
        let job = mock
            .run_key("restores", "copy", "shop-copy", pvc)
            .name(Role::Datamover);
        update(&mock, &format!("{COPY_JOBS}/{job}"), complete());
    }
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    update(
        &mock,
        &format!("{COPY_SNAPSHOTS}/{}", key.name(Role::Snapshot)),
        json!({"status": {"readyToUse": false,
                          "error": {"message": "rpc error: code = ResourceExhausted desc = quota"}}}),
    );
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = condition(&status, "Failed");
    assert_eq!(failed["reason"], "VolumeStepFailed");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains(&key.name(Role::Volume))
            && message.ends_with("failed: rpc error: code = ResourceExhausted desc = quota"),
        "{message}"
    );
    assert!(mock.get(&format!("{COPY_PVCS}/data")).is_none());
}

/// A Restore that fails stops its datamovers still running (they would go on writing and
/// hold their nodes' datamover slots until their 24-hour deadline) and keeps the failed one,
/// with its pod's logs, for inspection.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_restore_stops_its_running_datamovers_and_keeps_the_failed_one() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let job = |pvc| {
        let name = mock
            .run_key("restores", "copy", "shop-copy", pvc)
            .name(Role::Datamover);
        format!("{COPY_JOBS}/{name}")
    };
    assert!(mock.get(&job("data")).is_some() && mock.get(&job("raw")).is_some());
    update(
        &mock,
        &job("raw"),
        json!({"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the backoff limit"}]}}),
    );
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
    assert!(
        mock.get(&job("data")).is_none(),
        "the running datamover is stopped"
    );
    assert!(
        mock.get(&job("raw")).is_some(),
        "the failed datamover stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filesystem_pvc_name_taken_by_someone_else_is_refused_before_copying() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    mock.put(
        &format!("{COPY_PVCS}/data"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data", "namespace": "shop-copy"},
               "spec": {"resources": {"requests": {"storage": "1Mi"}}}}),
    );
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = condition(&status, "Failed");
    assert_eq!(failed["reason"], "InvalidSpec");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("PVC shop-copy/data already exists"),
        "{failed}"
    );
    let staging = mock
        .run_key("restores", "copy", "shop-copy", "data")
        .name(Role::Volume);
    assert!(mock.get(&format!("{COPY_PVCS}/{staging}")).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_restores_snapshot_class_overrides_the_default_choice() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    // A second class of the driver: without the override the choice would be ambiguous.
    mock.put(
        "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/hostpath-retain",
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
               "metadata": {"name": "hostpath-retain"},
               "driver": "hostpath.csi.k8s.io", "deletionPolicy": "Retain"}),
    );
    update(
        &mock,
        &format!("{RESTORES}/copy"),
        json!({"spec": {"snapshotClassName": "hostpath-retain"}}),
    );
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    for pvc in ["data", "raw"] {
        let job = mock
            .run_key("restores", "copy", "shop-copy", pvc)
            .name(Role::Datamover);
        update(&mock, &format!("{COPY_JOBS}/{job}"), complete());
    }
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let snapshot = mock
        .run_key("restores", "copy", "shop-copy", "data")
        .name(Role::Snapshot);
    let taken = mock
        .get(&format!("{COPY_SNAPSHOTS}/{snapshot}"))
        .expect("staging snapshot");
    assert_eq!(taken["spec"]["volumeSnapshotClassName"], "hostpath-retain");
}

/// A Restore into `shop-copy` with its Filesystem volume staged (Job done, staging PVC and
/// snapshot made), its status' volumes then emptied when `lose_volumes` (a status write lost
/// after its objects were made), deleted: its finalizer removes its Jobs and staging objects
/// there, by name or by the run's labels, leaves the claims it restored, and goes.
async fn staged_then_deleted(lose_volumes: bool) {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    backed_up(&mock, &ctx, folder.path()).await;
    let key = mock.run_key("restores", "copy", "shop-copy", "data");
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let job = key.name(Role::Datamover);
    update(&mock, &format!("{COPY_JOBS}/{job}"), complete());
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let staging = key.name(Role::Volume);
    let snapshot = key.name(Role::Snapshot);
    for path in [
        format!("{COPY_PVCS}/{staging}"),
        format!("{COPY_SNAPSHOTS}/{snapshot}"),
        format!("{COPY_JOBS}/{job}"),
    ] {
        let object = mock.get(&path).unwrap_or_else(|| panic!("{path} exists"));
        assert!(object["metadata"]["ownerReferences"].is_null(), "{path}");
        assert_eq!(object["metadata"]["labels"]["strata.io/run-uid"], "r-1");
    }
    assert_eq!(
        restore(&mock).metadata.finalizers,
        Some(vec![strata::operator::reconcile::FINALIZER.to_owned()])
    );
    if lose_volumes {
        update(
            &mock,
            &format!("{RESTORES}/copy"),
            json!({"status": {"volumes": []}}),
        );
        assert!(restore(&mock).status.unwrap().volumes.is_empty());
    }

    kube::Api::<Restore>::namespaced(mock.client(), "shop")
        .delete("copy", &Default::default())
        .await
        .unwrap();
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    assert!(
        mock.get(&format!("{RESTORES}/copy")).is_none(),
        "finalizer removed"
    );
    assert!(mock.names_under(COPY_JOBS).is_empty());
    assert!(mock.names_under(COPY_SNAPSHOTS).is_empty());
    assert_eq!(
        mock.names_under(COPY_PVCS),
        ["raw"],
        "the restored claim stays"
    );
}

/// Issue 16 item 5: a Restore into another namespace cannot own what it makes there (owner
/// references do not cross namespaces); deleted mid-way, its finalizer deletes its Jobs and
/// staging objects there by name, and leaves the claims it restored.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_restore_removes_its_jobs_and_staging_objects_in_the_mapped_namespace() {
    staged_then_deleted(false).await;
}

/// A Restore whose status lost the volumes it had started, deleted, still removes its Jobs and
/// staging objects in the mapped namespace: they are found by the run's labels.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_restore_whose_status_lost_its_volumes_still_removes_its_staging_objects() {
    staged_then_deleted(true).await;
}
