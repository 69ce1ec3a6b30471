//! The Backup and Restore reconcilers, step by step, against an in-memory API server and a real
//! filesystem target; the datamover's work is done by the test with the same library calls the
//! `strata backup` / `strata restore` commands make.

mod kube_mock;

use std::io::Write;

use kube::runtime::controller::Action;
use kube_mock::{Mock, refused_as_stale};
use serde_json::{Value, json};
use strata::csi::{Role, VolumeKey};
use strata::operator::crd::Restore;
use strata::operator::reconcile::stash_name;
use strata::operator::status::{ConditionStatus, Phase};
use strata::operator::{Context, reconcile_backup, reconcile_restore};
use strata::target::{AppName, Target, VolumeName};

const NS: &str = "/api/v1/namespaces/shop";
const PVCS: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
const JOBS: &str = "/apis/batch/v1/namespaces/shop/jobs";
const BACKUPS: &str = "/apis/strata.io/v1alpha1/namespaces/shop/backups";
const RESTORES: &str = "/apis/strata.io/v1alpha1/namespaces/shop/restores";

/// A cluster with namespace `shop` holding PVC `data` (Block, class `fast` of the hostpath
/// driver) and ConfigMap `db-config`, both labelled `app=db`; a snapshot class for the driver;
/// a Target on a local folder; and Backup `nightly` of `app=db`.
fn cluster(target: &std::path::Path) -> Mock {
    let mock = Mock::default();
    mock.put(
        NS,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    mock.put(
        &format!("{PVCS}/data"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data", "namespace": "shop", "labels": {"app": "db"},
                            "uid": "pvc-data-1"},
               "spec": {"storageClassName": "fast", "volumeMode": "Block",
                        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
               "status": {"phase": "Bound", "capacity": {"storage": "1Mi"}}}),
    );
    mock.put(
        "/api/v1/namespaces/shop/configmaps/db-config",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "db-config", "namespace": "shop", "labels": {"app": "db"}},
               "data": {"max_connections": "100"}}),
    );
    mock.put(
        "/apis/storage.k8s.io/v1/storageclasses/fast",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "fast"}, "provisioner": "hostpath.csi.k8s.io"}),
    );
    mock.put_snapshot_class_target_and_backup(target);
    mock
}

/// The key of Backup `run`'s objects for `shop/data` (`copy`: Restore `copy`'s for
/// `namespace/data`).
fn key(mock: &Mock, run: &str, namespace: &str) -> VolumeKey {
    let kind = if run == "copy" { "restores" } else { "backups" };
    mock.run_key(kind, run, namespace, "data")
}

/// Mark the snapshot of `data` ready, as the snapshot controller would.
fn snapshot_ready(mock: &Mock) {
    let path = format!(
        "{SNAPSHOTS}/{}",
        key(mock, "nightly", "shop").name(Role::Snapshot)
    );
    let mut snapshot = mock.get(&path).expect("snapshot created");
    snapshot["status"] = json!({"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-1",
                                "restoreSize": "1Mi"});
    mock.put(&path, snapshot);
}

/// Set the Job's status as the Job controller would.
fn job_status(mock: &Mock, jobs: &str, name: &str, status: Value) {
    let path = format!("{jobs}/{name}");
    let mut job = mock.get(&path).expect("job created");
    job["status"] = status;
    mock.put(&path, job);
}

fn complete() -> Value {
    json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
}

/// What the backup datamover does: `strata backup --full --target T --volume shop.data DEVICE`.
fn datamover_backup(target: &std::path::Path, device: &std::path::Path) {
    let target = Target::open(target.to_str().unwrap()).unwrap();
    strata::backup_volume(
        &target,
        &VolumeName::new("shop.data").unwrap(),
        &strata::open_volume(device).unwrap(),
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
}

fn device() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    file.write_all(&block).unwrap();
    file
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_snapshots_then_copies_then_commits_and_cleans_up() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    let k = key(&mock, "nightly", "shop");
    let job = k.name(Role::Datamover);

    // 1: discovery, the metadata stash, a snapshot; nothing else until it is ready.
    let action = reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(ctx.resync));
    assert_eq!(mock.names_under(SNAPSHOTS), [k.name(Role::Snapshot)]);
    assert!(
        mock.get(&format!("{SECRETS}/{}", stash_name("nightly", "b-1")))
            .is_some()
    );
    assert_eq!(mock.names_under(PVCS), ["data"]);
    assert!(mock.names_under(JOBS).is_empty());
    let status = mock.backup("nightly").status.unwrap();
    assert_eq!(status.phase, Some(Phase::Preparing));
    assert_eq!(status.volumes[0].volume, "shop.data");
    assert_eq!(status.progress.as_ref().unwrap().bytes_total, 1 << 20);
    let snapshot = mock
        .get(&format!("{SNAPSHOTS}/{}", k.name(Role::Snapshot)))
        .unwrap();
    assert_eq!(
        snapshot["spec"]["volumeSnapshotClassName"],
        "csi-hostpath-snapclass"
    );

    // 2: still not ready: no claim, no Job.
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert!(mock.names_under(JOBS).is_empty());
    let waiting = serde_json::to_value(mock.backup("nightly").status.unwrap()).unwrap();
    assert_eq!(condition(&waiting, "SnapshotsReady")["reason"], "Waiting");

    // 3: ready: a Block claim from the snapshot and a datamover Job, once even if re-run
    // from the same (stale) object, as after a crash before the status was written (the
    // re-run's own status write is refused as stale).
    snapshot_ready(&mock);
    let stale = mock.backup("nightly");
    reconcile_backup(&stale, &ctx).await.unwrap();
    refused_as_stale(reconcile_backup(&stale, &ctx).await);
    assert_eq!(mock.names_under(JOBS), std::slice::from_ref(&job));
    let claim = mock
        .get(&format!("{PVCS}/{}", k.name(Role::Volume)))
        .unwrap();
    assert_eq!(claim["spec"]["volumeMode"], "Block");
    assert_eq!(claim["spec"]["dataSource"]["name"], k.name(Role::Snapshot));
    let args = mock.get(&format!("{JOBS}/{job}")).unwrap()["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .clone();
    assert_eq!(
        args,
        json!([
            "strata",
            "backup",
            "--full",
            format!("--target={}", folder.path().to_str().unwrap()),
            "--volume=shop.data",
            "--",
            "/dev/xvda"
        ])
    );
    assert_eq!(
        mock.backup("nightly").status.unwrap().phase,
        Some(Phase::Copying)
    );

    // 4: the Job runs; once it succeeded the backup is committed and the temporaries go.
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(
        mock.backup("nightly").status.unwrap().phase,
        Some(Phase::Copying)
    );
    let dev = device();
    let (target_dir, dev_path) = (folder.path().to_owned(), dev.path().to_owned());
    tokio::task::spawn_blocking(move || datamover_backup(&target_dir, &dev_path))
        .await
        .unwrap();
    job_status(&mock, JOBS, &job, complete());
    // What a datamover killed an hour ago left: a claim and a partial image, no writer record.
    let leftovers = folder.path().join("volumes/shop.data");
    let planted = [
        leftovers.join("claims/dead.json"),
        leftovers.join("images/dead.qcow2.0123456789abcdef.partial"),
    ];
    for path in &planted {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body = r#"{"backup":"dead","parent":null,"writer":"0123456789abcdef","created":"2026-01-01T00:00:00Z"}"#;
        std::fs::write(path, body).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    let action = reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let status = mock.backup("nightly").status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed));
    // The controller ran gc on the volume after the commit.
    for path in &planted {
        assert!(!path.exists(), "{} survived the gc", path.display());
    }
    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(condition(&value, "GarbageCollected")["status"], "True");
    assert_eq!(status.backup_id.as_deref(), Some("nightly"));
    let progress = status.progress.clone().unwrap();
    assert_eq!((progress.volumes_done, progress.volumes_total), (1, 1));
    assert_eq!(progress.bytes_done, 1 << 20);
    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(condition(&value, "Committed")["status"], "True");
    assert!(mock.names_under(JOBS).is_empty());
    assert!(mock.names_under(SNAPSHOTS).is_empty());
    assert_eq!(mock.names_under(PVCS), ["data"]);
    assert!(mock.names_under(SECRETS).is_empty());
    let volume_backup = status.volumes[0].backup_id.clone().unwrap();
    let target_dir = folder.path().to_owned();
    let committed = tokio::task::spawn_blocking(move || {
        Target::open(target_dir.to_str().unwrap())
            .unwrap()
            .app_backups(&AppName::new("shop").unwrap())
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0].id.to_string(), "nightly");
    assert_eq!(committed[0].volumes[0].backup.to_string(), volume_backup);
    // `kubectl describe` shows the run's phases as Normal Events, in order, and the refused
    // status write of step 3's stale re-run as a Warning.
    let mut events = mock.events("shop");
    events.sort_by_key(|e| e["eventTime"].as_str().map(str::to_owned));
    let phases: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        phases,
        [
            ("Normal", "Started"),
            ("Normal", "Copying"),
            ("Warning", "Conflict"),
            ("Normal", "Completed")
        ]
    );
    assert_eq!(events[3]["regarding"]["name"], "nightly");
    assert_eq!(events[3]["reportingController"], "strata-controller");

    // 5: a completed Backup is left alone: no request at all.
    let before = mock.requests().len();
    assert_eq!(
        reconcile_backup(&mock.backup("nightly"), &ctx)
            .await
            .unwrap(),
        Action::await_change()
    );
    assert_eq!(mock.requests().len(), before);

    // Restore into another namespace: PVC and restore Job first, objects once the Job is done.
    mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "shop-copy"}}}),
    );
    let restore = |mock: &Mock| -> Restore {
        serde_json::from_value(mock.get(&format!("{RESTORES}/copy")).unwrap()).unwrap()
    };
    let copy_jobs = "/apis/batch/v1/namespaces/shop-copy/jobs";
    let restore_job = key(&mock, "copy", "shop-copy").name(Role::Datamover);
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    assert!(mock.get("/api/v1/namespaces/shop-copy").is_some());
    let pvc = mock
        .get("/api/v1/namespaces/shop-copy/persistentvolumeclaims/data")
        .expect("restored PVC");
    assert_eq!(pvc["spec"]["volumeMode"], "Block");
    assert!(
        mock.get("/api/v1/namespaces/shop-copy/configmaps/db-config")
            .is_none()
    );
    let args = mock.get(&format!("{copy_jobs}/{restore_job}")).unwrap()["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .clone();
    assert_eq!(args[1], "restore");
    assert_eq!(args[4], format!("--backup={volume_backup}").as_str());
    assert_eq!(restore(&mock).status.unwrap().phase, Some(Phase::Copying));

    job_status(&mock, copy_jobs, &restore_job, complete());
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    assert_eq!(restore(&mock).status.unwrap().phase, Some(Phase::Finishing));
    reconcile_restore(&restore(&mock), &ctx).await.unwrap();
    let status = restore(&mock).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed), "{status:?}");
    let config = mock
        .get("/api/v1/namespaces/shop-copy/configmaps/db-config")
        .expect("ConfigMap applied");
    assert_eq!(config["data"]["max_connections"], "100");
    assert!(mock.names_under(copy_jobs).is_empty());
    assert_eq!(
        status.volumes[0].backup_id.as_deref(),
        Some(volume_backup.as_str())
    );
    // Each run was counted once as it started and once as it ended, whatever the number of
    // reconciles in between.
    let metrics = ctx.metrics.encode();
    for line in [
        "strata_backups_total{event=\"Attempted\"} 1",
        "strata_backups_total{event=\"Succeeded\"} 1",
        "strata_restores_total{event=\"Attempted\"} 1",
        "strata_restores_total{event=\"Succeeded\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    assert!(!metrics.contains("event=\"Failed\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_datamover_fails_the_backup_with_the_job_message_and_cleans_up() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    let job = key(&mock, "nightly", "shop").name(Role::Datamover);
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    snapshot_ready(&mock);
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    job_status(
        &mock,
        JOBS,
        &job,
        json!({"failed": 4, "conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}),
    );
    let action = reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let status = mock.backup("nightly").status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.status, ConditionStatus::True);
    assert_eq!(failed.reason, "JobFailed");
    assert!(
        failed
            .message
            .ends_with("failed: BackoffLimitExceeded: Job has reached the specified backoff limit"),
        "{}",
        failed.message
    );
    assert!(mock.names_under(JOBS).is_empty());
    assert!(mock.names_under(SNAPSHOTS).is_empty());
    assert!(mock.names_under(SECRETS).is_empty());
    // Failed is final too.
    let before = mock.requests().len();
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(mock.requests().len(), before);
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("strata_backups_total{event=\"Failed\"} 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("event=\"Succeeded\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_selector_fails_with_invalid_spec_before_touching_volumes() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let mut object = mock.get(&format!("{BACKUPS}/nightly")).unwrap();
    object["spec"]["application"]["selectors"] = json!(["app in (db"]);
    mock.put(&format!("{BACKUPS}/nightly"), object);
    reconcile_backup(&mock.backup("nightly"), &mock.context())
        .await
        .unwrap();
    let status = mock.backup("nightly").status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed));
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason, "DiscoveryFailed");
    assert!(failed.message.contains("app in (db"), "{}", failed.message);
    assert!(mock.names_under(SNAPSHOTS).is_empty());
}

const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const SERVICES: &str = "/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
const DRIVER: &str = "hostpath.csi.k8s.io";

/// Backup `name` (uid `uid`) of `app=db` in `mode`.
fn add_backup(mock: &Mock, name: &str, uid: &str, mode: &str) {
    mock.put(
        &format!("{BACKUPS}/{name}"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": mode}}),
    );
}

/// The driver advertises changed-block tracking.
fn metadata_service(mock: &Mock) {
    mock.put(
        &format!("{SERVICES}/{DRIVER}"),
        json!({"apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
               "metadata": {"name": DRIVER},
               "spec": {"address": "csi-snapshot-metadata.kube-system:6443",
                        "caCert": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==", "audience": "strata"}}),
    );
}

/// Mark run `run`'s snapshot of `data` ready, bound to content `content` with CSI `handle`.
fn snapshot_ready_with(mock: &Mock, run: &str, content: &str, handle: &str) {
    let path = format!(
        "{SNAPSHOTS}/{}",
        key(mock, run, "shop").name(Role::Snapshot)
    );
    let mut snapshot = mock.get(&path).expect("snapshot created");
    snapshot["status"] = json!({"readyToUse": true, "boundVolumeSnapshotContentName": content,
                                "restoreSize": "1Mi"});
    mock.put(&path, snapshot);
    mock.put(
        &format!("{CONTENTS}/{content}"),
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
               "metadata": {"name": content},
               "spec": {"volumeSnapshotRef": {"name": key(mock, run, "shop").name(Role::Snapshot),
                                              "namespace": "shop"},
                        "deletionPolicy": "Delete", "driver": DRIVER,
                        "source": {"volumeHandle": "pvc-data"}},
               "status": {"readyToUse": true, "snapshotHandle": handle}}),
    );
}

/// Run Backup `name` to its end, the test doing the datamover's work; returns the volume
/// backup id it wrote. `started` is called once the Job exists.
async fn run_backup(
    mock: &Mock,
    ctx: &Context,
    folder: &std::path::Path,
    name: &str,
    content: &str,
    handle: &str,
    started: impl FnOnce(&Mock),
) -> String {
    reconcile_backup(&mock.backup(name), ctx).await.unwrap();
    snapshot_ready_with(mock, name, content, handle);
    reconcile_backup(&mock.backup(name), ctx).await.unwrap();
    started(mock);
    let dev = device();
    let (target_dir, dev_path) = (folder.to_owned(), dev.path().to_owned());
    tokio::task::spawn_blocking(move || datamover_backup(&target_dir, &dev_path))
        .await
        .unwrap();
    job_status(
        mock,
        JOBS,
        &key(mock, name, "shop").name(Role::Datamover),
        complete(),
    );
    // The commit, run twice from the same object, as after a crash before the status write;
    // the second status write is refused as stale.
    let stale = mock.backup(name);
    reconcile_backup(&stale, ctx).await.unwrap();
    refused_as_stale(reconcile_backup(&stale, ctx).await);
    let status = mock.backup(name).status.unwrap();
    assert_eq!(status.phase, Some(Phase::Completed), "{status:?}");
    status.volumes[0].backup_id.clone().unwrap()
}

fn pod_spec(mock: &Mock, run: &str) -> Value {
    mock.get(&format!(
        "{JOBS}/{}",
        key(mock, run, "shop").name(Role::Datamover)
    ))
    .expect("datamover Job")["spec"]["template"]["spec"]
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn incrementals_list_changed_blocks_against_the_kept_base_snapshot() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    metadata_service(&mock);
    let ctx = mock.context();
    let monday = key(&mock, "nightly", "shop").name(Role::Snapshot);

    // The full backup reads the whole volume; its snapshot stays as the volume's base,
    // recording the backup taken from it, its CSI handle and driver, owned by the PVC.
    let first = run_backup(
        &mock,
        &ctx,
        folder.path(),
        "nightly",
        "snapcontent-1",
        "handle-monday",
        |mock| {
            let pod = pod_spec(mock, "nightly");
            assert!(pod.get("initContainers").is_none());
            assert_eq!(pod["containers"][0]["args"][2], "--full");
        },
    )
    .await;
    assert_eq!(mock.names_under(SNAPSHOTS), std::slice::from_ref(&monday));
    let base = mock.get(&format!("{SNAPSHOTS}/{monday}")).unwrap();
    assert_eq!(base["metadata"]["labels"]["strata.io/cbt-base"], "data");
    assert_eq!(
        base["metadata"]["annotations"],
        json!({"strata.io/cbt-backup": first, "strata.io/cbt-snapshot-handle": "handle-monday",
               "strata.io/cbt-driver": DRIVER, "strata.io/cbt-pvc-uid": "pvc-data-1"})
    );
    // Owned by the PVC, not the Backup: deleting the Backup must not take the next
    // incremental's base with it.
    assert_eq!(
        base["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "data",
                "uid": "pvc-data-1"}])
    );
    assert_eq!(mock.names_under(PVCS), ["data"]);
    assert!(mock.names_under(JOBS).is_empty());
    assert!(mock.names_under(LEASES).is_empty());
    let status = serde_json::to_value(mock.backup("nightly").status.unwrap()).unwrap();
    assert_eq!(status["volumes"][0]["changeSource"], "Full");

    // The incremental lists the changes since the base's handle, then backs up only those,
    // on the condition that the base's backup is still the latest.
    add_backup(&mock, "tuesday", "b-2", "Incremental");
    let tuesday = key(&mock, "tuesday", "shop").name(Role::Snapshot);
    let second = run_backup(
        &mock,
        &ctx,
        folder.path(),
        "tuesday",
        "snapcontent-2",
        "handle-tuesday",
        |mock| {
            let pod = pod_spec(mock, "tuesday");
            assert_eq!(
                pod["initContainers"][0]["args"],
                json!([
                    "strata",
                    "changed-blocks",
                    "--namespace",
                    "shop",
                    "--snapshot",
                    tuesday,
                    "--base-snapshot-handle",
                    "handle-monday",
                    "--output",
                    "/scratch/changed-ranges.json",
                    "--allow-unavailable"
                ])
            );
            assert_eq!(
                pod["containers"][0]["args"],
                json!([
                    "strata",
                    "backup",
                    format!("--target={}", folder.path().to_str().unwrap()),
                    "--volume=shop.data",
                    "--changed-ranges=/scratch/changed-ranges.json",
                    format!("--changed-since={first}"),
                    "--",
                    "/dev/xvda"
                ])
            );
            let status = serde_json::to_value(mock.backup("tuesday").status.unwrap()).unwrap();
            assert_eq!(status["volumes"][0]["changeSource"], "ChangedBlocks");
            assert_eq!(status["volumes"][0]["baseSnapshot"], monday.as_str());
            let tracking = condition(&status, "ChangedBlockTracking");
            assert_eq!(tracking["status"], "True");
            assert_eq!(tracking["message"], "1 of 1 volumes list changed blocks");
            // The Job has not finished, so the base it reads is still there.
            assert_eq!(mock.names_under(SNAPSHOTS).len(), 2);
        },
    )
    .await;
    assert_ne!(second, first);
    // Committed: tuesday's snapshot is the base now and monday's is gone.
    assert_eq!(mock.names_under(SNAPSHOTS), std::slice::from_ref(&tuesday));
    let base = mock.get(&format!("{SNAPSHOTS}/{tuesday}")).unwrap();
    assert_eq!(
        base["metadata"]["annotations"]["strata.io/cbt-backup"],
        second
    );
    assert_eq!(
        base["metadata"]["annotations"]["strata.io/cbt-snapshot-handle"],
        "handle-tuesday"
    );
    assert!(mock.names_under(LEASES).is_empty());
    assert_eq!(mock.names_under(JOBS).len(), 0);

    // A base whose handle was never recorded is not used: digests, and the condition says why.
    let path = format!("{SNAPSHOTS}/{tuesday}");
    let mut base = mock.get(&path).unwrap();
    base["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("strata.io/cbt-snapshot-handle");
    mock.put(&path, base);
    add_backup(&mock, "wednesday", "b-3", "Incremental");
    run_backup(
        &mock,
        &ctx,
        folder.path(),
        "wednesday",
        "snapcontent-3",
        "handle-wednesday",
        |mock| {
            let pod = pod_spec(mock, "wednesday");
            assert!(pod.get("initContainers").is_none());
            assert_eq!(
                pod["containers"][0]["args"],
                json!([
                    "strata",
                    "backup",
                    format!("--target={}", folder.path().to_str().unwrap()),
                    "--volume=shop.data",
                    "--",
                    "/dev/xvda"
                ])
            );
            let status = serde_json::to_value(mock.backup("wednesday").status.unwrap()).unwrap();
            assert_eq!(status["volumes"][0]["changeSource"], "Digests");
            let tracking = condition(&status, "ChangedBlockTracking");
            assert_eq!(tracking["reason"], "Digests");
            assert_eq!(
                tracking["message"],
                format!(
                    "0 of 1 volumes list changed blocks; digests for data: \
                         the CSI handle of base snapshot {tuesday} is unknown"
                )
            );
        },
    )
    .await;
    // Its own snapshot, with a known handle, replaced the unusable base.
    let wednesday = key(&mock, "wednesday", "shop").name(Role::Snapshot);
    assert_eq!(
        mock.names_under(SNAPSHOTS),
        std::slice::from_ref(&wednesday)
    );
    let base = mock.get(&format!("{SNAPSHOTS}/{wednesday}")).unwrap();
    assert_eq!(
        base["metadata"]["annotations"]["strata.io/cbt-pvc-uid"],
        "pvc-data-1"
    );

    // The PVC is deleted and made again under the same name: another volume, whose changes
    // cannot be listed against the old one's snapshot, so the next incremental compares digests.
    let mut claim = mock.get(&format!("{PVCS}/data")).unwrap();
    claim["metadata"]["uid"] = json!("pvc-data-2");
    mock.put(&format!("{PVCS}/data"), claim);
    add_backup(&mock, "thursday", "b-4", "Incremental");
    run_backup(
        &mock,
        &ctx,
        folder.path(),
        "thursday",
        "snapcontent-4",
        "handle-thursday",
        |mock| {
            let pod = pod_spec(mock, "thursday");
            assert!(pod.get("initContainers").is_none());
            let status = serde_json::to_value(mock.backup("thursday").status.unwrap()).unwrap();
            assert_eq!(status["volumes"][0]["changeSource"], "Digests");
            assert_eq!(
                condition(&status, "ChangedBlockTracking")["message"],
                format!(
                    "0 of 1 volumes list changed blocks; digests for data: \
                         base snapshot {wednesday} was taken of an earlier PVC named data"
                )
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_metadata_service_incrementals_compare_digests_and_keep_no_snapshot() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    run_backup(
        &mock,
        &ctx,
        folder.path(),
        "nightly",
        "snapcontent-1",
        "handle-1",
        |_| {},
    )
    .await;
    assert!(mock.names_under(SNAPSHOTS).is_empty());
    add_backup(&mock, "tuesday", "b-2", "Incremental");
    run_backup(
        &mock,
        &ctx,
        folder.path(),
        "tuesday",
        "snapcontent-2",
        "handle-2",
        |mock| {
            let pod = pod_spec(mock, "tuesday");
            assert!(pod.get("initContainers").is_none());
            assert!(
                pod["containers"][0]["args"][2]
                    .as_str()
                    .is_some_and(|a| a.starts_with("--target=")),
                "{pod}"
            );
            let status = serde_json::to_value(mock.backup("tuesday").status.unwrap()).unwrap();
            assert_eq!(
                condition(&status, "ChangedBlockTracking")["message"],
                format!(
                    "0 of 1 volumes list changed blocks; digests for data: \
                         CSI driver {DRIVER} has no SnapshotMetadataService"
                )
            );
        },
    )
    .await;
    assert!(mock.names_under(SNAPSHOTS).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_volume_another_backup_holds_waits_for_it() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    let lease = format!("{LEASES}/strata-backup-data");
    // A lock left by a Backup that no longer exists is taken over.
    mock.put(
        &lease,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "strata-backup-data", "namespace": "shop", "uid": "l-0",
                            "ownerReferences": [{"apiVersion": "strata.io/v1alpha1",
                                "kind": "Backup", "name": "ghost", "uid": "g-1", "controller": true}]},
               "spec": {"holderIdentity": "ghost"}}),
    );
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    let held = mock.get(&lease).unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "nightly");
    assert_eq!(held["metadata"]["ownerReferences"][0]["uid"], "b-1");
    let status = serde_json::to_value(mock.backup("nightly").status.unwrap()).unwrap();
    assert_eq!(condition(&status, "VolumesLocked")["reason"], "Locked");

    // A second Backup of the same volume waits, naming the first, and snapshots nothing;
    // asking again changes nothing.
    add_backup(&mock, "second", "b-2", "Incremental");
    for _ in 0..2 {
        let action = reconcile_backup(&mock.backup("second"), &ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(ctx.resync));
        let status = serde_json::to_value(mock.backup("second").status.unwrap()).unwrap();
        assert_eq!(status["phase"], "Preparing");
        let locked = condition(&status, "VolumesLocked");
        assert_eq!(locked["status"], "False");
        assert_eq!(locked["reason"], "WaitingForBackup");
        assert_eq!(
            locked["message"],
            "Backup nightly is backing up PVC data; waiting for it to finish"
        );
        assert_eq!(
            mock.names_under(SNAPSHOTS),
            [key(&mock, "nightly", "shop").name(Role::Snapshot)]
        );
        assert_eq!(mock.names_under(LEASES), ["strata-backup-data"]);
    }

    // While it waits, the application gains a volume.
    mock.put(
        &format!("{PVCS}/logs"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "logs", "namespace": "shop", "labels": {"app": "db"}},
               "spec": {"storageClassName": "fast", "volumeMode": "Block",
                        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
               "status": {"phase": "Bound", "capacity": {"storage": "1Mi"}}}),
    );

    // The first one finishes and releases the lock; the second goes ahead, discovering again
    // (so it sees the new volume, and locks it too).
    snapshot_ready(&mock);
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    let dev = device();
    let (target_dir, dev_path) = (folder.path().to_owned(), dev.path().to_owned());
    tokio::task::spawn_blocking(move || datamover_backup(&target_dir, &dev_path))
        .await
        .unwrap();
    job_status(
        &mock,
        JOBS,
        &key(&mock, "nightly", "shop").name(Role::Datamover),
        complete(),
    );
    let before = mock.requests().len();
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(
        mock.backup("nightly").status.unwrap().phase,
        Some(Phase::Completed)
    );
    assert!(mock.names_under(LEASES).is_empty());
    // The lock goes only after the Completed status is written: a failed status write must
    // not leave the commit to be repeated while another Backup holds the volume.
    let calls = mock.requests()[before..].to_vec();
    let at = |wanted: &str| calls.iter().position(|c| c == wanted);
    let status_write = at(&format!("PATCH {BACKUPS}/nightly/status"));
    let release = at(&format!("DELETE {lease}"));
    assert!(
        status_write.is_some() && release > status_write,
        "{calls:#?}"
    );
    reconcile_backup(&mock.backup("second"), &ctx)
        .await
        .unwrap();
    assert_eq!(
        mock.names_under(LEASES),
        ["strata-backup-data", "strata-backup-logs"]
    );
    for name in mock.names_under(LEASES) {
        let lease = mock.get(&format!("{LEASES}/{name}")).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "second");
    }
    let logs = mock
        .run_key("backups", "second", "shop", "logs")
        .name(Role::Snapshot);
    assert_eq!(
        mock.names_under(SNAPSHOTS),
        [
            key(&mock, "second", "shop").name(Role::Snapshot),
            logs.clone()
        ]
    );
    let status = mock.backup("second").status.unwrap();
    assert_eq!(status.volumes.len(), 2);
    assert_eq!(status.volumes[1].volume, "shop.logs");

    // A failed Backup releases its locks too.
    snapshot_ready_with(&mock, "second", "snapcontent-2", "handle-2");
    let mut snapshot = mock.get(&format!("{SNAPSHOTS}/{logs}")).unwrap();
    snapshot["status"] = json!({"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-2",
                                "restoreSize": "1Mi"});
    mock.put(&format!("{SNAPSHOTS}/{logs}"), snapshot);
    reconcile_backup(&mock.backup("second"), &ctx)
        .await
        .unwrap();
    job_status(
        &mock,
        JOBS,
        &key(&mock, "second", "shop").name(Role::Datamover),
        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded"}]}),
    );
    reconcile_backup(&mock.backup("second"), &ctx)
        .await
        .unwrap();
    assert_eq!(
        mock.backup("second").status.unwrap().phase,
        Some(Phase::Failed)
    );
    assert!(mock.names_under(LEASES).is_empty());
}

/// PVC `name` of `app=db` in Block mode.
fn add_pvc(mock: &Mock, name: &str) {
    mock.put(
        &format!("{PVCS}/{name}"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": name, "namespace": "shop", "labels": {"app": "db"}},
               "spec": {"storageClassName": "fast", "volumeMode": "Block",
                        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
               "status": {"phase": "Bound", "capacity": {"storage": "1Mi"}}}),
    );
}

/// The lock of PVC `pvc`, held by Backup `holder` (uid `uid`).
fn add_lease(mock: &Mock, pvc: &str, holder: &str, uid: &str) {
    mock.put(
        &format!("{LEASES}/strata-backup-{pvc}"),
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": format!("strata-backup-{pvc}"), "namespace": "shop",
                            "uid": format!("lease-{pvc}"),
                            "ownerReferences": [{"apiVersion": "strata.io/v1alpha1",
                                "kind": "Backup", "name": holder, "uid": uid, "controller": true}]},
               "spec": {"holderIdentity": holder}}),
    );
}

/// A Backup that waited, then finds on its second discovery a PVC that sorts before the ones it
/// holds, must not keep them while waiting for that one: the Backup holding the new PVC's lock
/// may be waiting for them (the deadlock of ordered locking taken out of order).
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_finding_a_new_volume_after_waiting_takes_its_locks_again_in_order() {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    // `nightly` (in progress) holds `data`; `second` waits for it, knowing only `data`.
    add_lease(&mock, "data", "nightly", "b-1");
    add_backup(&mock, "second", "b-2", "Full");
    reconcile_backup(&mock.backup("second"), &ctx)
        .await
        .unwrap();
    let status = serde_json::to_value(mock.backup("second").status.unwrap()).unwrap();
    assert_eq!(
        condition(&status, "VolumesLocked")["reason"],
        "WaitingForBackup"
    );

    // Meanwhile PVC `archive` appears, and `third` (in progress) takes its lock and waits for
    // `data` in turn; then `nightly` finishes, leaving its lock stale.
    add_pvc(&mock, "archive");
    add_backup(&mock, "third", "b-3", "Full");
    add_lease(&mock, "archive", "third", "b-3");
    let mut nightly = mock.get(&format!("{BACKUPS}/nightly")).unwrap();
    nightly["status"] = json!({"phase": "Completed"});
    mock.put(&format!("{BACKUPS}/nightly"), nightly);

    // `second` takes `data`, discovers again, finds `archive` held by `third`, and gives `data`
    // back instead of holding it while it waits.
    reconcile_backup(&mock.backup("second"), &ctx)
        .await
        .unwrap();
    let status = serde_json::to_value(mock.backup("second").status.unwrap()).unwrap();
    let locked = condition(&status, "VolumesLocked");
    assert_eq!(locked["reason"], "WaitingForBackup");
    assert_eq!(
        locked["message"],
        "Backup third is backing up PVC archive; waiting for it to finish"
    );
    assert_eq!(mock.names_under(LEASES), ["strata-backup-archive"]);

    // So `third` gets both and goes ahead.
    reconcile_backup(&mock.backup("third"), &ctx).await.unwrap();
    for pvc in ["archive", "data"] {
        let lease = mock.get(&format!("{LEASES}/strata-backup-{pvc}")).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "third", "{pvc}");
    }
    let status = serde_json::to_value(mock.backup("third").status.unwrap()).unwrap();
    assert_eq!(condition(&status, "VolumesLocked")["reason"], "Locked");
}
