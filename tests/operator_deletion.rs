//! Deleting Backups and Restores against the cluster simulator (`cluster_sim`): a Backup's
//! `deletionPolicy: Delete` removes its application backup from the target through the
//! finalizer, with retention's reference counting, while every other Backup of the application
//! stays restorable byte for byte; a target that fails keeps the finalizer and says why; and a
//! Restore made again under the name of one whose per-run copies remain gets its own.

mod cluster_sim;
mod kube_mock;
mod strata_bin;

use std::path::Path;
use std::time::Duration;

use cluster_sim::{IMAGE, Sim, restore_from};
use serde_json::{Value, json};
use strata::csi::Role;
use strata::operator::crd::{BackupStatus, Restore};
use strata::operator::reconcile::FINALIZER;
use strata::operator::status::Phase;
use strata::operator::{Context, reconcile_backup, reconcile_restore};
use strata::target::{AppBackupId, AppName, Target, VolumeName};
use strata_bin::noise;

const BACKUPS: &str = "/apis/strata.io/v1alpha1/namespaces/shop/backups";
const RESTORES: &str = "/apis/strata.io/v1alpha1/namespaces/shop/restores";
const VOLUME_BYTES: usize = 4 << 20;

/// `cluster_sim::shop_cluster` with a device of noise, and a context for it.
fn cluster() -> (Sim, tempfile::TempDir, Context) {
    let (sim, folder) = cluster_sim::shop_cluster(json!({}), &noise(VOLUME_BYTES, 7));
    let mut ctx = sim.mock.context();
    ctx.image = IMAGE.to_owned();
    (sim, folder, ctx)
}

/// Back the device up as Backup `name` (`mode`, `policy`), to completion; its status.
async fn back_up(sim: &Sim, ctx: &Context, name: &str, mode: &str, policy: &str) -> BackupStatus {
    sim.mock.put(
        &format!("{BACKUPS}/{name}"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": name, "namespace": "shop", "uid": format!("b-{name}"),
                            "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": mode, "deletionPolicy": policy}}),
    );
    for _ in 0..12 {
        if status(sim, name).phase.is_some_and(Phase::is_final) {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup(name), ctx).await;
        sim.step(Duration::from_secs(60)).await;
    }
    let done = status(sim, name);
    assert_eq!(done.phase, Some(Phase::Completed), "{name}: {done:?}");
    done
}

fn status(sim: &Sim, name: &str) -> BackupStatus {
    sim.mock.backup(name).status.unwrap_or_default()
}

fn volume_backup(status: &BackupStatus) -> String {
    status.volumes[0].backup_id.clone().expect("a volume id")
}

/// Delete Backup `name` as a user does (the API server only marks it: it has a finalizer)
/// and reconcile it once; the reconcile's result.
async fn delete(
    sim: &Sim,
    ctx: &Context,
    name: &str,
) -> Result<kube::runtime::controller::Action, strata::operator::Error> {
    // The user's request, not the controller's: outside the RBAC the mock may enforce.
    let path = format!("{BACKUPS}/{name}");
    let mut object = sim.mock.get(&path).unwrap();
    object["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    sim.mock.put(&path, object);
    let marked = sim.mock.backup(name);
    assert!(marked.metadata.deletion_timestamp.is_some(), "{name} held");
    reconcile_backup(&marked, ctx).await
}

fn target(folder: &Path) -> Target {
    Target::open(folder.join("target").to_str().unwrap()).unwrap()
}

/// The ids of `shop`'s application backups, oldest first.
fn app_backups(folder: &Path) -> Vec<String> {
    let shop = AppName::new("shop").unwrap();
    let all = target(folder).app_backups(&shop).unwrap();
    all.iter().map(|m| m.id.to_string()).collect()
}

/// The ids of `shop.data`'s volume backups, oldest first.
fn volume_backups(folder: &Path) -> Vec<String> {
    let data = VolumeName::new("shop.data").unwrap();
    let all = target(folder).backups(&data).unwrap();
    all.iter().map(|m| m.id.to_string()).collect()
}

/// Volume backup `id` of `shop.data`, restored with `strata restore` and read back.
fn restored(folder: &Path, id: &str) -> Vec<u8> {
    restore_from(&folder.join("target"), "shop.data", id)
}

/// A full Backup of the device's first contents and an incremental of changed ones, both
/// `deletionPolicy: Delete`: the two contents and the two statuses.
async fn full_then_incremental(
    sim: &Sim,
    ctx: &Context,
) -> ((Vec<u8>, BackupStatus), (Vec<u8>, BackupStatus)) {
    let first = noise(VOLUME_BYTES, 7);
    let full = back_up(sim, ctx, "full", "Full", "Delete").await;
    let mut second = first.clone();
    second[1 << 20..(1 << 20) + (256 << 10)].copy_from_slice(&noise(256 << 10, 8));
    std::fs::write(sim.device_of_claim("shop", "data").unwrap(), &second).unwrap();
    let incremental = back_up(sim, ctx, "incr", "Incremental", "Delete").await;
    ((first, full), (second, incremental))
}

/// Deleting the full Backup of a chain folds its volume backup into the incremental's, which
/// still restores byte for byte; the full's application backup is gone from the target.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_full_backup_with_delete_keeps_the_incremental_restorable() {
    let (sim, folder, ctx) = cluster();
    // Every request, the deletion's included, is one `strata install`'s RBAC allows.
    sim.enforce(cluster_sim::install_grants(&cluster_sim::shop_install()));
    let ((_, full), (second, incremental)) = full_then_incremental(&sim, &ctx).await;
    let (full_id, incr_id) = (volume_backup(&full), volume_backup(&incremental));
    assert_eq!(
        volume_backups(folder.path()),
        [full_id.clone(), incr_id.clone()]
    );
    assert_eq!(app_backups(folder.path()), ["full", "incr"]);

    delete(&sim, &ctx, "full").await.unwrap();
    assert!(
        sim.mock.get(&format!("{BACKUPS}/full")).is_none(),
        "the finalizer went"
    );
    assert_eq!(app_backups(folder.path()), ["incr"]);
    let gone = target(folder.path()).app_backup(
        &AppName::new("shop").unwrap(),
        &AppBackupId::new("full").unwrap(),
    );
    assert!(
        matches!(gone, Err(strata::target::Error::NotFound { .. })),
        "{gone:?}"
    );
    assert_eq!(
        volume_backups(folder.path()),
        [incr_id.as_str()],
        "folded into it"
    );
    assert!(restored(folder.path(), &incr_id) == second, "byte for byte");
    assert_eq!(sim.mock.denied(), Vec::<String>::new());
}

/// Deleting the incremental deletes its volume backup (nothing rests on it); the full still
/// restores byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_incremental_with_delete_keeps_the_full_restorable() {
    let (sim, folder, ctx) = cluster();
    let ((first, full), _) = full_then_incremental(&sim, &ctx).await;
    delete(&sim, &ctx, "incr").await.unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/incr")).is_none());
    assert_eq!(app_backups(folder.path()), ["full"]);
    assert_eq!(volume_backups(folder.path()), [volume_backup(&full)]);
    assert!(restored(folder.path(), &volume_backup(&full)) == first);
}

/// Retain, the default, keeps the application backup of a deleted Backup, as before.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_backup_with_retain_keeps_its_data() {
    let (sim, folder, ctx) = cluster();
    let kept = back_up(&sim, &ctx, "kept", "Full", "Retain").await;
    delete(&sim, &ctx, "kept").await.unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/kept")).is_none());
    assert_eq!(app_backups(folder.path()), ["kept"]);
    assert!(restored(folder.path(), &volume_backup(&kept)) == noise(VOLUME_BYTES, 7));
}

/// A Backup that never got to copying (its Target does not exist) has nothing in any target:
/// deleting it with Delete needs no target and removes the finalizer at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_that_never_ran_is_deleted_without_its_target() {
    let (sim, _folder, ctx) = cluster();
    sim.mock.put(
        &format!("{BACKUPS}/lost"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "lost", "namespace": "shop", "uid": "b-lost", "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "gone"},
                        "deletionPolicy": "Delete"}}),
    );
    let err = reconcile_backup(&sim.mock.backup("lost"), &ctx)
        .await
        .expect_err("no such Target");
    assert_eq!(err.reason(), "TargetNotFound");
    assert_eq!(
        sim.mock.backup("lost").metadata.finalizers,
        Some(vec![FINALIZER.to_owned()])
    );
    delete(&sim, &ctx, "lost").await.unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/lost")).is_none());
}

/// A run that committed before its status said so (a crash in `Finishing` after the commit)
/// and is then deleted leaves no restorable application backup behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_deleted_after_an_unrecorded_commit_takes_its_application_backup_along() {
    let (sim, folder, ctx) = cluster();
    back_up(&sim, &ctx, "crashed", "Full", "Delete").await;
    let path = format!("{BACKUPS}/crashed");
    let mut object = sim.mock.get(&path).unwrap();
    object["status"]["phase"] = json!("Finishing");
    object["status"].as_object_mut().unwrap().remove("backupId");
    sim.mock.put(&path, object);
    assert_eq!(app_backups(folder.path()), ["crashed"]);

    delete(&sim, &ctx, "crashed").await.unwrap();
    assert!(sim.mock.get(&path).is_none());
    assert_eq!(app_backups(folder.path()), Vec::<String>::new());
    assert_eq!(volume_backups(folder.path()), Vec::<String>::new());
}

/// A target gone for good: the person sets the deleted Backup's policy to Retain, which ends
/// the backoff's wait (another version of the object) and lets the Backup go.
#[tokio::test(flavor = "multi_thread")]
async fn retain_set_on_a_stuck_deletion_lets_the_backup_go() {
    let (sim, folder, ctx) = cluster();
    back_up(&sim, &ctx, "full", "Full", "Delete").await;
    let dir = folder.path().join("target");
    std::fs::rename(&dir, folder.path().join("away")).unwrap();
    std::fs::write(&dir, b"not a folder").unwrap();
    delete(&sim, &ctx, "full")
        .await
        .expect_err("the target fails");
    let path = format!("{BACKUPS}/full");
    let mut object = sim.mock.get(&path).unwrap();
    object["spec"]["deletionPolicy"] = json!("Retain");
    sim.mock.put(&path, object);
    reconcile_backup(&sim.mock.backup("full"), &ctx)
        .await
        .unwrap();
    assert!(sim.mock.get(&path).is_none());
}

/// The deletion folds a chain another Backup may be writing on, so it waits for the volume's
/// lock: while an incremental holds it, the deleted Backup keeps its finalizer with condition
/// `Deleting` False (`WaitingForBackup`); once that Backup completed, its deletion goes ahead and
/// the incremental, built on the deleted volume backup, restores byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_waits_for_the_backup_writing_its_volumes() {
    let (sim, folder, ctx) = cluster();
    back_up(&sim, &ctx, "full", "Full", "Delete").await;
    let mut second = noise(VOLUME_BYTES, 7);
    second[..64 << 10].copy_from_slice(&noise(64 << 10, 9));
    std::fs::write(sim.device_of_claim("shop", "data").unwrap(), &second).unwrap();
    sim.mock.put(
        &format!("{BACKUPS}/incr"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "incr", "namespace": "shop", "uid": "b-incr", "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": "Incremental"}}),
    );
    // Discovered and locked; its snapshot is not ready yet.
    reconcile_backup(&sim.mock.backup("incr"), &ctx)
        .await
        .unwrap();
    assert_eq!(status(&sim, "incr").phase, Some(Phase::Preparing));

    delete(&sim, &ctx, "full").await.unwrap();
    let waiting = status(&sim, "full");
    let deleting = waiting.conditions.iter().find(|c| c.type_ == "Deleting");
    assert_eq!(
        deleting.map(|c| c.reason.as_str()),
        Some("WaitingForBackup"),
        "{waiting:?}"
    );
    assert!(sim.mock.get(&format!("{BACKUPS}/full")).is_some());
    assert_eq!(app_backups(folder.path()), ["full"]);

    for _ in 0..12 {
        if status(&sim, "incr").phase.is_some_and(Phase::is_final) {
            break;
        }
        sim.step(Duration::from_secs(60)).await;
        let _ = reconcile_backup(&sim.mock.backup("incr"), &ctx).await;
    }
    let incremental = status(&sim, "incr");
    assert_eq!(incremental.phase, Some(Phase::Completed), "{incremental:?}");
    reconcile_backup(&sim.mock.backup("full"), &ctx)
        .await
        .unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/full")).is_none());
    assert_eq!(app_backups(folder.path()), ["incr"]);
    assert_eq!(volume_backups(folder.path()), [volume_backup(&incremental)]);
    assert!(restored(folder.path(), &volume_backup(&incremental)) == second);
}

/// A target that cannot be opened while the Backup is deleted: the finalizer stays, condition
/// `Deleting` (False) and a Warning Event name the cause, the retry waits out the backoff;
/// once the target is back the deletion completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_target_keeps_the_finalizer_until_the_deletion_succeeds() {
    let (sim, folder, mut ctx) = cluster();
    let ((_, _), (second, incremental)) = full_then_incremental(&sim, &ctx).await;
    let (dir, away) = (folder.path().join("target"), folder.path().join("away"));
    std::fs::rename(&dir, &away).unwrap();
    std::fs::write(&dir, b"not a folder").unwrap();

    let err = delete(&sim, &ctx, "full")
        .await
        .expect_err("the target fails");
    assert_eq!(err.requeue_after(), Some(Duration::from_secs(5)), "{err}");
    let held = sim.mock.backup("full");
    assert_eq!(held.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
    let deleting = held
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Deleting"))
        .cloned()
        .expect("a Deleting condition");
    assert_eq!(
        serde_json::to_value(deleting.status).unwrap(),
        json!("False")
    );
    assert_eq!(deleting.reason, err.reason());
    assert_eq!(deleting.reason, "TargetIo");
    assert!(
        deleting.message.contains(dir.to_str().unwrap()),
        "{}",
        deleting.message
    );
    let events = sim.events_for("shop", "full");
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "TargetIo" && note.contains(dir.to_str().unwrap())),
        "{events:?}"
    );
    // Within the backoff the next call does nothing.
    reconcile_backup(&sim.mock.backup("full"), &ctx)
        .await
        .unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/full")).is_some());

    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&away, &dir).unwrap();
    // The backoff's pause over (its clock is tokio's; a fresh record stands for the wait).
    ctx.backoff = Default::default();
    reconcile_backup(&sim.mock.backup("full"), &ctx)
        .await
        .unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/full")).is_none());
    assert_eq!(app_backups(folder.path()), ["incr"]);
    assert!(restored(folder.path(), &volume_backup(&incremental)) == second);
}

/// Restore `name` (uid `uid`) of Backup `nightly` into namespace `copy`.
fn add_restore(sim: &Sim, name: &str, uid: &str) -> String {
    let path = format!("{RESTORES}/{name}");
    sim.mock.put(
        &path,
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    path
}

async fn reconcile_restore_at(sim: &Sim, ctx: &Context, path: &str) {
    let restore: Restore = serde_json::from_value(sim.mock.get(path).unwrap()).unwrap();
    let _ = reconcile_restore(&restore, ctx).await;
    sim.step(Duration::from_secs(60)).await;
}

fn access_copies(sim: &Sim, kind: &str) -> Vec<(String, Value)> {
    let collection = format!("/api/v1/namespaces/copy/{kind}");
    sim.mock
        .names_under(&collection)
        .into_iter()
        .filter(|n| n.starts_with("strata-access-"))
        .map(|n| {
            let object = sim.mock.get(&format!("{collection}/{n}")).unwrap();
            (n, object)
        })
        .collect()
}

/// A mapped Restore removed while its copy of the credentials and its ServiceAccount remain
/// (its finalizer removed by hand), then made again under its name, with the credentials
/// rotated since: the new run makes and uses copies of its own, named and labelled with its
/// uid, and leaves the old run's alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_recreated_under_its_name_does_not_adopt_the_old_credentials() {
    let (sim, _folder, ctx) = cluster();
    sim.give_target_credentials(json!({"AWS_REGION": "ZXUtd2VzdC0x"}));
    let done = back_up(&sim, &ctx, "nightly", "Full", "Retain").await;
    assert_eq!(done.phase, Some(Phase::Completed));

    // The first run gets as far as its copies: the claims cannot be made.
    sim.mock
        .fail("POST /api/v1/namespaces/copy/persistentvolumeclaims", 500);
    let path = add_restore(&sim, "copy", "r-1");
    for _ in 0..3 {
        reconcile_restore_at(&sim, &ctx, &path).await;
    }
    let old_secrets = access_copies(&sim, "secrets");
    let old_accounts = access_copies(&sim, "serviceaccounts");
    assert_eq!(old_secrets.len(), 1, "{old_secrets:?}");
    assert_eq!(old_accounts.len(), 1, "{old_accounts:?}");
    assert!(sim.mock.remove(&path));
    sim.mock.heal();

    sim.give_target_credentials(json!({"AWS_REGION": "dXMtZWFzdC0x"}));
    add_restore(&sim, "copy", "r-2");
    let mut used = None;
    for _ in 0..12 {
        reconcile_restore_at(&sim, &ctx, &path).await;
        let secrets = access_copies(&sim, "secrets");
        if let Some((name, secret)) = secrets.iter().find(|(n, _)| *n != old_secrets[0].0) {
            used = Some((name.clone(), secret.clone()));
        }
        if sim.mock.get(&path).unwrap()["status"]["phase"] == "Completed" {
            break;
        }
    }
    let restored = sim.mock.get(&path).unwrap()["status"].clone();
    assert_eq!(restored["phase"], "Completed", "{restored}");
    let (name, secret) = used.expect("the new run made its own copy");
    assert_eq!(
        secret["data"]["AWS_REGION"], "dXMtZWFzdC0x",
        "current credentials"
    );
    assert_eq!(secret["metadata"]["labels"]["strata.io/run-uid"], "r-2");

    let job = sim
        .mock
        .run_key("restores", "copy", "copy", "data")
        .name(Role::Datamover);
    let pods = sim.pod_history("copy", &job);
    let pod = pods.last().expect("a datamover pod");
    assert_eq!(
        pod["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"],
        json!(name)
    );
    assert_ne!(pod["spec"]["serviceAccountName"], json!(old_accounts[0].0));
    // The old run's copies are not the new run's to adopt or to remove.
    assert_eq!(access_copies(&sim, "secrets"), old_secrets);
    assert_eq!(access_copies(&sim, "serviceaccounts"), old_accounts);
}

/// A Restore of the Backup that has not ended reads its volume backups: the deletion waits
/// (`Deleting` False, `RestoreInProgress`) and the data stays; once the Restore has ended the
/// deletion goes ahead.
#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_waits_for_a_restore_reading_the_backup() {
    let (sim, folder, ctx) = cluster();
    back_up(&sim, &ctx, "full", "Full", "Delete").await;
    let restore = "/apis/strata.io/v1alpha1/namespaces/shop/restores/copy";
    sim.mock.put(
        restore,
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "full"}, "namespaceMapping": {"shop": "copy"}},
               "status": {"phase": "Copying"}}),
    );
    delete(&sim, &ctx, "full").await.unwrap();
    let waiting = status(&sim, "full");
    let deleting = waiting
        .conditions
        .iter()
        .find(|c| c.type_ == "Deleting")
        .expect("a Deleting condition");
    assert_eq!(deleting.reason, "RestoreInProgress", "{deleting:?}");
    assert!(
        deleting.message.contains("Restore copy"),
        "{}",
        deleting.message
    );
    assert_eq!(app_backups(folder.path()), ["full"], "the data stays");

    let mut ended = sim.mock.get(restore).unwrap();
    ended["status"]["phase"] = json!("Completed");
    sim.mock.put(restore, ended);
    reconcile_backup(&sim.mock.backup("full"), &ctx)
        .await
        .unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/full")).is_none());
    assert_eq!(app_backups(folder.path()), Vec::<String>::new());
}
