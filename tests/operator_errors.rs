//! How the reconcilers report and retry errors, against the in-memory API server: stalled runs
//! (403, a missing Target) get a `Stalled` condition, a Warning Event and a growing backoff;
//! a 422 fails the run; a status write from a stale copy is refused (409) and overwrites
//! nothing; a success clears the condition and the backoff.
//!
//! The backoff waits on tokio's clock, paused here: time moves only by `advance`, so no test
//! depends on how fast the machine is.

mod kube_mock;

use std::time::Duration;

use kube::runtime::controller::Action;
use kube_mock::Mock;
use serde_json::{Value, json};
use strata::operator::crd::Restore;
use strata::operator::{Context, Error, ErrorClass};
use strata::operator::{reconcile_backup, reconcile_restore};

const BACKUPS: &str = "/apis/strata.io/v1alpha1/namespaces/shop/backups";
const CONFIGMAPS: &str = "/api/v1/namespaces/shop/configmaps";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";

/// Namespace `shop` with Block PVC `data` (class `fast` of the hostpath driver) labelled
/// `app=db`, the driver's snapshot class, Target `local` on `folder` and Backup `nightly`.
fn cluster(folder: &std::path::Path) -> Mock {
    let mock = Mock::default();
    mock.put(
        "/api/v1/namespaces/shop",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    mock.put(
        "/api/v1/namespaces/shop/persistentvolumeclaims/data",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data", "namespace": "shop", "labels": {"app": "db"}},
               "spec": {"storageClassName": "fast", "volumeMode": "Block",
                        "resources": {"requests": {"storage": "1Mi"}}},
               "status": {"phase": "Bound"}}),
    );
    mock.put(
        "/apis/storage.k8s.io/v1/storageclasses/fast",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "fast"}, "provisioner": "hostpath.csi.k8s.io"}),
    );
    mock.put_snapshot_class_target_and_backup(folder);
    mock
}

/// The cluster on a fresh target folder (kept while the test runs) and a context on it.
fn setup() -> (tempfile::TempDir, Mock, Context) {
    let folder = tempfile::tempdir().unwrap();
    let mock = cluster(folder.path());
    let ctx = mock.context();
    (folder, mock, ctx)
}

fn status(mock: &Mock) -> Value {
    mock.get(&format!("{BACKUPS}/nightly")).unwrap()["status"].clone()
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The reasons of the Warning Events in `shop`.
fn warnings(mock: &Mock) -> Vec<String> {
    mock.events("shop")
        .iter()
        .filter(|e| e["type"] == "Warning")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect()
}

/// One reconcile of `nightly` as stored, expected to fail with `class` and `reason`; its
/// requeue delay.
async fn fails(mock: &Mock, ctx: &Context, class: ErrorClass, reason: &str) -> Duration {
    let err: Error = reconcile_backup(&mock.backup("nightly"), ctx)
        .await
        .expect_err("the reconcile fails");
    assert_eq!((err.class(), err.reason()), (class, reason), "{err}");
    err.requeue_after().expect("a failure says when to retry")
}

#[tokio::test(start_paused = true)]
async fn forbidden_listing_stalls_with_a_condition_an_event_and_a_growing_backoff() {
    let (_folder, mock, ctx) = setup();
    mock.fail(&format!("GET {CONFIGMAPS}"), 403);

    let first = fails(&mock, &ctx, ErrorClass::Stalled, "Forbidden").await;
    assert_eq!(first, Duration::from_secs(30));
    let stalled = condition(&status(&mock), "Stalled");
    assert_eq!(
        (&stalled["status"], &stalled["reason"]),
        (&json!("True"), &json!("Forbidden"))
    );
    let message = stalled["message"].as_str().unwrap();
    assert!(message.starts_with("attempt 1, next in 30s: "), "{message}");
    assert!(message.contains("configmaps"), "{message}");
    assert_eq!(status(&mock)["phase"], Value::Null, "not Failed");
    assert_eq!(warnings(&mock), ["Forbidden"]);

    // Triggered again (by its own status write) before the pause is over: no API call.
    let before = mock.requests().len();
    let action = reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(first));
    assert_eq!(mock.requests().len(), before);

    tokio::time::advance(first).await;
    let second = fails(&mock, &ctx, ErrorClass::Stalled, "Forbidden").await;
    tokio::time::advance(second).await;
    let third = fails(&mock, &ctx, ErrorClass::Stalled, "Forbidden").await;
    assert_eq!(
        (second, third),
        (Duration::from_secs(60), Duration::from_secs(120))
    );
    let message = condition(&status(&mock), "Stalled")["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .starts_with("attempt 3, next in 120s: "),
        "{message}"
    );
    // The repeats fold into the first Event's series.
    let events = mock.events("shop");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["series"]["count"], 3);
    let note = events[0]["note"].as_str().unwrap();
    assert!(
        note.starts_with("application metadata: read namespace shop: "),
        "{note}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_target_stalls_the_backup_instead_of_failing_it() {
    let (_folder, mock, ctx) = setup();
    let mut backup = mock.get(&format!("{BACKUPS}/nightly")).unwrap();
    backup["spec"]["targetRef"]["name"] = json!("offsite");
    mock.put(&format!("{BACKUPS}/nightly"), backup);

    let delay = fails(&mock, &ctx, ErrorClass::Stalled, "TargetNotFound").await;
    assert_eq!(delay, Duration::from_secs(30));
    let stalled_status = status(&mock);
    assert_eq!(stalled_status["phase"], Value::Null);
    assert_eq!(condition(&stalled_status, "Failed"), Value::Null);
    let stalled = condition(&stalled_status, "Stalled");
    assert_eq!(stalled["reason"], "TargetNotFound");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .ends_with("Target shop/offsite not found"),
        "{stalled}"
    );
    assert_eq!(warnings(&mock), ["TargetNotFound"]);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_snapshot_fails_the_backup_with_an_event() {
    let (_folder, mock, ctx) = setup();
    mock.fail(&format!("POST {SNAPSHOTS}"), 422);

    let action = reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let failed_status = status(&mock);
    assert_eq!(failed_status["phase"], "Failed");
    let failed = condition(&failed_status, "Failed");
    assert_eq!(failed["reason"], "Invalid");
    assert!(
        failed["message"].as_str().unwrap().contains("422"),
        "{failed}"
    );
    assert_eq!(condition(&failed_status, "Stalled"), Value::Null);
    assert_eq!(condition(&failed_status, "Retrying"), Value::Null);
    assert_eq!(warnings(&mock), ["Invalid"]);
}

#[tokio::test(start_paused = true)]
async fn a_status_write_from_a_stale_copy_is_refused_and_overwrites_nothing() {
    let (_folder, mock, ctx) = setup();
    let stale = mock.backup("nightly");
    // Another writer (a second controller during a rolling update) gets there first.
    let mut newer = mock.get(&format!("{BACKUPS}/nightly")).unwrap();
    newer["status"] = json!({"applicationName": "other-writer"});
    mock.put(&format!("{BACKUPS}/nightly"), newer);

    let err = reconcile_backup(&stale, &ctx).await.unwrap_err();
    assert_eq!(
        (err.class(), err.reason()),
        (ErrorClass::Transient, "Conflict"),
        "{err}"
    );
    assert_eq!(err.requeue_after(), Some(Duration::from_secs(5)));
    assert_eq!(status(&mock), json!({"applicationName": "other-writer"}));
    // The newer object is someone else's change: no wait for it; the next call starts from it.
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    let fresh = status(&mock);
    assert_eq!(fresh["phase"], "Preparing");
    assert_eq!(fresh["volumes"][0]["pvc"], "data");
    assert_eq!(condition(&fresh, "Retrying"), Value::Null);
}

#[tokio::test(start_paused = true)]
async fn a_success_clears_the_condition_and_resets_the_backoff() {
    let (_folder, mock, ctx) = setup();
    mock.fail(&format!("GET {CONFIGMAPS}"), 403);
    let first = fails(&mock, &ctx, ErrorClass::Stalled, "Forbidden").await;
    tokio::time::advance(first).await;
    let second = fails(&mock, &ctx, ErrorClass::Stalled, "Forbidden").await;
    assert!(second > first);

    mock.heal();
    tokio::time::advance(second).await;
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    let healed = status(&mock);
    assert_eq!(healed["phase"], "Preparing");
    assert_eq!(condition(&healed, "Stalled"), Value::Null);

    // The next failure is a first attempt again: a transient one waits the 5 s floor (a third
    // failure in a row would wait 20 s).
    mock.fail(&format!("GET {SNAPSHOTS}"), 503);
    let next = fails(&mock, &ctx, ErrorClass::Transient, "ServiceUnavailable").await;
    assert_eq!(next, Duration::from_secs(5));
    let retrying = condition(&status(&mock), "Retrying");
    assert_eq!(retrying["reason"], "ServiceUnavailable");
    assert!(
        retrying["message"]
            .as_str()
            .unwrap()
            .starts_with("attempt 1, next in 5s: "),
        "{retrying}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_event_does_not_fail_the_reconcile() {
    let (_folder, mock, ctx) = setup();
    mock.fail("POST /apis/events.k8s.io/", 403);
    reconcile_backup(&mock.backup("nightly"), &ctx)
        .await
        .unwrap();
    assert_eq!(status(&mock)["phase"], "Preparing");
    assert!(mock.events("shop").is_empty());
    assert!(
        mock.requests()
            .iter()
            .any(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/shop/events")),
        "the Event was tried"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restore_whose_credentials_secret_is_missing_stalls() {
    let (folder, mock, ctx) = setup();
    mock.put(
        "/apis/strata.io/v1alpha1/namespaces/shop/targets/local",
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Target",
               "metadata": {"name": "local", "namespace": "shop"},
               "spec": {"url": folder.path().to_str().unwrap(),
                        "credentialsSecretRef": {"name": "s3-keys"}}}),
    );
    let mut backup = mock.get(&format!("{BACKUPS}/nightly")).unwrap();
    backup["status"] =
        json!({"phase": "Completed", "applicationName": "shop", "backupId": "nightly"});
    mock.put(&format!("{BACKUPS}/nightly"), backup);
    let path = "/apis/strata.io/v1alpha1/namespaces/shop/restores/copy";
    mock.put(
        path,
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}}}),
    );
    let restore: Restore = serde_json::from_value(mock.get(path).unwrap()).unwrap();
    let err = reconcile_restore(&restore, &ctx).await.unwrap_err();
    assert_eq!(
        (err.class(), err.reason(), err.requeue_after()),
        (
            ErrorClass::Stalled,
            "SecretNotFound",
            Some(Duration::from_secs(30))
        )
    );
    let stored = mock.get(path).unwrap()["status"].clone();
    assert_eq!(stored["phase"], Value::Null);
    let stalled = condition(&stored, "Stalled");
    assert_eq!(stalled["reason"], "SecretNotFound");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .ends_with("Secret shop/s3-keys not found"),
        "{stalled}"
    );
    let events = mock.events("shop");
    assert_eq!(events.len(), 1);
    assert_eq!(
        (&events[0]["type"], &events[0]["regarding"]["kind"]),
        (&json!("Warning"), &json!("Restore"))
    );
}
