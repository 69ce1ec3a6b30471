//! The controller against the cluster simulator (`cluster_sim`): its Jobs' pods run the real
//! `strata` binary on files standing in for the volumes, while the simulated Job controller,
//! kubelet, snapshot controller and provisioner behave as their documentation says, faults
//! included. Each test is one way a real cluster breaks a run.

mod cluster_sim;
mod kube_mock;
mod strata_bin;

use std::time::Duration;

use cluster_sim::{DRIVER, IMAGE, PodFault, Sim, SnapshotFault, restore_from};
use kube::Api;
use kube::api::DeleteParams;
use serde_json::{Value, json};
use strata::csi::Role;
use strata::operator::crd::{Backup, BackupStatus, Restore};
use strata::operator::reconcile::{FINALIZER, lock_name, stash_name};
use strata::operator::status::Phase;
use strata::operator::{Context, reconcile_backup, reconcile_restore};
use strata_bin::noise;

const BACKUPS: &str = "/apis/strata.io/v1alpha1/namespaces/shop/backups";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
const VOLUME_BYTES: usize = 4 << 20;

/// Namespace `shop` (Pod Security `labels`) holding Block PVC `data` (class `fast` of the
/// hostpath driver, labelled `app=db`) on a device of noise; a snapshot class; Target `local`
/// on a folder; Backup `nightly` (Full) of `app=db`.
fn cluster(namespace_labels: Value) -> (Sim, tempfile::TempDir) {
    cluster_sim::shop_cluster(namespace_labels, &noise(VOLUME_BYTES, 7))
}

fn add_backup(sim: &Sim, name: &str, uid: &str, mode: &str) {
    sim.mock.put(
        &format!("{BACKUPS}/{name}"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": mode}}),
    );
}

/// Block PVCs `logs` and `index` of 1 MiB (labelled `app=db`) holding noise of the seeds.
fn add_small_volumes(sim: &Sim, logs: u64, index: u64) {
    for (name, seed) in [("logs", logs), ("index", index)] {
        sim.add_volume(
            "shop",
            name,
            json!({"app": "db"}),
            Some("fast"),
            DRIVER,
            &noise(1 << 20, seed),
        );
    }
}

fn context(sim: &Sim) -> Context {
    let mut ctx = sim.mock.context();
    ctx.image = IMAGE.to_owned();
    ctx
}

fn status(sim: &Sim, name: &str) -> BackupStatus {
    sim.mock.backup(name).status.unwrap_or_default()
}

fn is_final(status: &BackupStatus) -> bool {
    status.phase.is_some_and(Phase::is_final)
}

/// Reconcile Backup `name` and step the cluster, `rounds` times or until the Backup ends;
/// errors are retried, as the controller's error policy does.
async fn drive(
    sim: &Sim,
    ctx: &Context,
    name: &str,
    rounds: usize,
    wait: Duration,
) -> BackupStatus {
    for _ in 0..rounds {
        if is_final(&status(sim, name)) {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup(name), ctx).await;
        sim.step(wait).await;
    }
    status(sim, name)
}

fn condition(status: &BackupStatus, type_: &str) -> Option<(String, String, String)> {
    let found = status.conditions.iter().find(|c| c.type_ == type_)?;
    let state = serde_json::to_value(found.status).unwrap();
    Some((
        state.as_str().unwrap_or_default().to_owned(),
        found.reason.clone(),
        found.message.clone(),
    ))
}

fn job_of(sim: &Sim, run: &str) -> String {
    sim.mock
        .run_key("backups", run, "shop", "data")
        .name(Role::Datamover)
}

/// The volume restored from the target's backup `id` of `shop.data`, read with the CLI.
fn restored(folder: &std::path::Path, id: &str) -> Vec<u8> {
    restore_from(&folder.join("target"), "shop.data", id)
}

fn backup_id(status: &BackupStatus) -> String {
    status.volumes[0]
        .backup_id
        .clone()
        .expect("a volume backup id")
}

/// Whether the run still holds its per-PVC Lease.
fn holds_lease(sim: &Sim) -> bool {
    sim.mock.names_under(LEASES).iter().any(|name| {
        sim.mock
            .get(&format!("{LEASES}/{name}"))
            .is_some_and(|lease| {
                lease["spec"]["holderIdentity"]
                    .as_str()
                    .is_some_and(|h| !h.is_empty())
            })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_backup_runs_the_real_datamover_and_restores_byte_for_byte() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    let pods = sim.pod_history("shop", &job_of(&sim, "nightly"));
    assert_eq!(pods.len(), 1, "one pod, no retry: {pods:?}");
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
    assert!(!holds_lease(&sim), "the run released its locks");
}

/// Item 1: an OOM-killed datamover leaves a claim (and, for an incremental, the parent's child
/// slot) behind; the Job's retry must take them over, and the next incremental must work.
#[tokio::test(flavor = "multi_thread")]
async fn a_datamover_killed_mid_upload_is_retried_and_later_incrementals_still_work() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    sim.inject_pod_fault(PodFault::OomAt("mid-upload"));
    let full = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(full.phase, Some(Phase::Completed), "{full:?}");
    let pods = sim.pod_history("shop", &job_of(&sim, "nightly"));
    assert_eq!(pods.len(), 2, "the killed pod and its retry: {pods:?}");
    let first = &pods[0];
    assert_eq!(first["status"]["phase"], "Failed");
    assert_eq!(
        first["status"]["containerStatuses"][0]["state"]["terminated"]["reason"],
        "OOMKilled"
    );
    assert_eq!(
        restored(folder.path(), &backup_id(&full)),
        noise(VOLUME_BYTES, 7)
    );

    // The incremental's first pod dies holding the full backup's one child slot.
    let changed = noise(VOLUME_BYTES, 11);
    std::fs::write(sim.device_of_claim("shop", "data").unwrap(), &changed).unwrap();
    add_backup(&sim, "hourly", "b-2", "Incremental");
    sim.inject_pod_fault(PodFault::OomAt("claimed"));
    let incremental = drive(&sim, &ctx, "hourly", 12, Duration::from_secs(60)).await;
    assert_eq!(incremental.phase, Some(Phase::Completed), "{incremental:?}");
    assert_eq!(sim.pod_history("shop", &job_of(&sim, "hourly")).len(), 2);
    assert_eq!(restored(folder.path(), &backup_id(&incremental)), changed);

    add_backup(&sim, "later", "b-3", "Incremental");
    let later = drive(&sim, &ctx, "later", 12, Duration::from_secs(60)).await;
    assert_eq!(later.phase, Some(Phase::Completed), "{later:?}");
    assert_eq!(restored(folder.path(), &backup_id(&later)), changed);
}

/// Item 2: a pod that can never start must not leave the Backup `Copying` forever holding its
/// volumes' locks: the reason shows in a condition while the run waits, and after the bounded
/// wait the run fails with it and releases the locks.
async fn never_starts(
    sim: &Sim,
    mut ctx: Context,
    reason: &str,
    message_part: &str,
) -> BackupStatus {
    ctx.datamover_start_timeout = Duration::from_secs(3600);
    let waiting = drive(sim, &ctx, "nightly", 6, Duration::from_secs(5)).await;
    assert_eq!(waiting.phase, Some(Phase::Copying), "{waiting:?}");
    let (state, got, message) = condition(&waiting, "DatamoversStarted").expect("a condition");
    assert_eq!(
        (state.as_str(), got.as_str()),
        ("False", reason),
        "{message}"
    );
    assert!(message.contains(message_part), "{message}");
    assert!(holds_lease(sim), "still waiting, still locked");

    ctx.datamover_start_timeout = Duration::ZERO;
    let failed = drive(sim, &ctx, "nightly", 2, Duration::from_secs(5)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let (_, _, why) = condition(&failed, "Failed")
        .or_else(|| condition(&failed, "Ready"))
        .expect("a failure condition");
    assert!(why.contains(reason) && why.contains(message_part), "{why}");
    assert!(!holds_lease(sim), "a failed run releases its locks");
    failed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_service_account_is_reported_then_fails_the_backup() {
    let (sim, _folder) = cluster(json!({}));
    let mut ctx = context(&sim);
    ctx.datamover_service_account = Some("strata-datamover".to_owned());
    never_starts(
        &sim,
        ctx,
        "FailedCreate",
        "serviceaccount \"strata-datamover\" not found",
    )
    .await;
    assert!(
        sim.pod_history("shop", &job_of(&sim, "nightly")).is_empty(),
        "admission made no pod"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_the_registry_lacks_is_reported_then_fails_the_backup() {
    let (sim, _folder) = cluster(json!({}));
    let mut ctx = context(&sim);
    ctx.image = "registry.example/strata:no-such-tag".to_owned();
    never_starts(&sim, ctx, "ErrImagePull", "strata:no-such-tag").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_security_restricted_refusing_the_root_datamover_is_reported_then_fails() {
    let (sim, _folder) = cluster(json!({"pod-security.kubernetes.io/enforce": "restricted"}));
    let ctx = context(&sim);
    never_starts(&sim, ctx, "FailedCreate", "violates PodSecurity").await;
}

/// Item 2: a datamover that hangs (a frozen process) is stopped by the Job's deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_datamover_is_failed_by_the_jobs_deadline() {
    let (sim, _folder) = cluster(json!({}));
    let mut ctx = context(&sim);
    ctx.datamover_deadline = Some(Duration::from_secs(600));
    sim.inject_pod_fault(PodFault::FreezeAt("mid-upload"));
    let running = drive(&sim, &ctx, "nightly", 4, Duration::from_millis(500)).await;
    assert_eq!(running.phase, Some(Phase::Copying), "{running:?}");
    let job = sim
        .mock
        .get(&format!(
            "/apis/batch/v1/namespaces/shop/jobs/{}",
            job_of(&sim, "nightly")
        ))
        .unwrap();
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 600);
    sim.advance(601);
    let failed = drive(&sim, &ctx, "nightly", 3, Duration::from_millis(500)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let text = format!("{:?}", failed.conditions);
    assert!(text.contains("DeadlineExceeded"), "{text}");
    assert!(!holds_lease(&sim));
}

/// Item 2 (`podFailurePolicy`): node losses are not the datamover's failures and must not use
/// up `backoffLimit` (3): four in a row still end in a completed backup.
#[tokio::test(flavor = "multi_thread")]
async fn node_losses_do_not_count_against_the_backoff_limit() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    for _ in 0..4 {
        sim.inject_pod_fault(PodFault::FreezeAt("claimed"));
    }
    let mut lost = 0;
    for _ in 0..40 {
        if is_final(&status(&sim, "nightly")) {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
        // Frozen pods never end by themselves: short rounds until the last node loss.
        let wait = if lost < 4 { 300 } else { 60_000 };
        sim.step(Duration::from_millis(wait)).await;
        for pod in sim.pods_of("shop", &job_of(&sim, "nightly")) {
            let phase = sim.mock.get(&pod).unwrap()["status"]["phase"].clone();
            if phase == "Running" && lost < 4 {
                sim.lose_node(&pod);
                lost += 1;
            }
        }
    }
    let done = status(&sim, "nightly");
    assert_eq!(lost, 4);
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert_eq!(sim.pod_history("shop", &job_of(&sim, "nightly")).len(), 5);
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
}

/// Item 8: the snapshot controller posts transient errors and clears them; they must not fail
/// the run (the condition shows them meanwhile), while one that outlasts the grace does.
#[tokio::test(flavor = "multi_thread")]
async fn transient_snapshot_errors_are_waited_out_and_lasting_ones_fail() {
    let (sim, _folder) = cluster(json!({}));
    let ctx = context(&sim);
    let snapshot = sim
        .mock
        .run_key("backups", "nightly", "shop", "data")
        .name(Role::Snapshot);
    sim.inject_snapshot_fault(
        "shop",
        &snapshot,
        SnapshotFault::Transient(2, "rpc error: code = Unavailable desc = driver busy".into()),
    );
    let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
    sim.step(Duration::from_secs(1)).await;
    let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
    let (state, reason, message) = condition(&status(&sim, "nightly"), "SnapshotsReady").unwrap();
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("False", "SnapshotError")
    );
    assert!(message.contains("driver busy"), "{message}");
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");

    add_backup(&sim, "doomed", "b-9", "Full");
    let snapshot = sim
        .mock
        .run_key("backups", "doomed", "shop", "data")
        .name(Role::Snapshot);
    sim.inject_snapshot_fault(
        "shop",
        &snapshot,
        SnapshotFault::Permanent("quota exceeded".into()),
    );
    let waiting = drive(&sim, &ctx, "doomed", 4, Duration::from_secs(1)).await;
    assert_eq!(waiting.phase, Some(Phase::Preparing), "{waiting:?}");
    let mut impatient = ctx.clone();
    impatient.snapshot_error_grace = Duration::ZERO;
    let failed = drive(&sim, &impatient, "doomed", 2, Duration::from_secs(1)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    assert!(format!("{:?}", failed.conditions).contains("quota exceeded"));
}

/// Item 8: a migrated in-tree class names the in-tree provisioner while its volumes are the CSI
/// driver's; the snapshot class must be found from the PV's driver.
#[tokio::test(flavor = "multi_thread")]
async fn the_snapshot_class_follows_the_volumes_csi_driver_not_the_class_provisioner() {
    let sim = Sim::new();
    sim.add_namespace("shop", json!({}));
    sim.add_storage_class("gp2", "kubernetes.io/aws-ebs", "WaitForFirstConsumer");
    sim.add_snapshot_class("ebs-snapclass", "ebs.csi.aws.com");
    sim.add_volume(
        "shop",
        "data",
        json!({"app": "db"}),
        Some("gp2"),
        "ebs.csi.aws.com",
        &noise(VOLUME_BYTES, 7),
    );
    let folder = tempfile::tempdir().unwrap();
    sim.mock
        .put_snapshot_class_target_and_backup(&folder.path().join("target"));
    sim.mock
        .remove("/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/csi-hostpath-snapclass");
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
}

/// Item 8: a statically provisioned claim without a class is backed up through a class of its
/// driver.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_without_a_storage_class_is_backed_up() {
    let (sim, folder) =
        cluster_sim::shop_cluster_of_class(json!({}), &noise(VOLUME_BYTES, 7), None);
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    let clone = sim
        .mock
        .run_key("backups", "nightly", "shop", "data")
        .name(Role::Volume);
    let events = sim.events_for("shop", &clone);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
}

const RESTORES: &str = "/apis/strata.io/v1alpha1/namespaces/shop/restores";

/// Reconcile Restore `name` and step the cluster until it ends (or `rounds` pass).
async fn drive_restore(sim: &Sim, ctx: &Context, name: &str, rounds: usize) -> Value {
    let path = format!("{RESTORES}/{name}");
    for _ in 0..rounds {
        let restore: Restore = serde_json::from_value(sim.mock.get(&path).unwrap()).unwrap();
        let phase = restore.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(Phase::is_final) {
            break;
        }
        let _ = reconcile_restore(&restore, ctx).await;
        sim.step(Duration::from_secs(60)).await;
    }
    sim.mock.get(&path).unwrap()["status"].clone()
}

/// Item 3: a Restore into a mapped namespace runs its datamover there, where neither the
/// Target's credentials Secret nor the datamover's ServiceAccount exists; the run brings its
/// own and removes them when done.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_into_a_mapped_namespace_brings_its_own_credentials_and_account() {
    let (sim, _folder) = cluster(json!({}));
    // As `strata install --namespace shop` sets it up, and a Target with credentials.
    sim.add_service_account("shop", "strata-datamover");
    sim.give_target_credentials(json!({"AWS_REGION": "ZXUtd2VzdC0x"}));
    let mut ctx = context(&sim);
    ctx.datamover_service_account = Some("strata-datamover".to_owned());
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");

    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let restored = drive_restore(&sim, &ctx, "copy", 12).await;
    assert_eq!(restored["phase"], "Completed", "{restored}");
    let device = sim
        .device_of_claim("copy", "data")
        .expect("restored claim bound");
    assert_eq!(std::fs::read(device).unwrap(), noise(VOLUME_BYTES, 7));

    let job = sim
        .mock
        .run_key("restores", "copy", "copy", "data")
        .name(Role::Datamover);
    let pods = sim.pod_history("copy", &job);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let spec = &pods[0]["spec"];
    let account = spec["serviceAccountName"].as_str().unwrap();
    assert!(account.starts_with("strata-access-"), "{account}");
    assert_eq!(
        spec["containers"][0]["envFrom"][0]["secretRef"]["name"], account,
        "the copy of the credentials"
    );
    for kind in ["secrets", "serviceaccounts"] {
        let left = sim
            .mock
            .names_under(&format!("/api/v1/namespaces/copy/{kind}"));
        assert!(
            left.iter().all(|n| !n.starts_with("strata-access-")),
            "{kind} left behind: {left:?}"
        );
    }
}

/// Item 10: a folder target the controller can see is no target for pods elsewhere; without
/// the NFS export that brings it to them the Backup fails at once, saying so.
#[tokio::test(flavor = "multi_thread")]
async fn a_folder_target_without_its_nfs_export_is_refused_by_name() {
    let (sim, _folder) = cluster(json!({}));
    let mut ctx = context(&sim);
    ctx.host_folder_targets = false;
    let failed = drive(&sim, &ctx, "nightly", 3, Duration::from_secs(1)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let (_, _, why) = condition(&failed, "Failed").unwrap();
    assert!(
        why.contains("shop/local") && why.contains("spec.nfs"),
        "{why}"
    );
    assert!(sim.pod_history("shop", &job_of(&sim, "nightly")).is_empty());
}

/// Deliverable 3, before each run: a Target that refuses writes stops the Backup before any
/// snapshot is taken, under a condition naming the probe that failed; once the Target takes
/// writes again the same Backup completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_refusing_writes_stops_the_backup_before_any_snapshot() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let probes = folder.path().join("target").join("probes");
    // A file where the probes go: no write can succeed there, not even root's.
    std::fs::create_dir_all(probes.parent().unwrap()).unwrap();
    let _ = std::fs::remove_dir(&probes);
    std::fs::write(&probes, b"in the way").unwrap();
    let refused = drive(&sim, &ctx, "nightly", 3, Duration::from_secs(1)).await;
    assert!(!is_final(&refused), "{refused:?}");
    let (state, _, why) = condition(&refused, "Retrying")
        .or_else(|| condition(&refused, "Stalled"))
        .expect("a Retrying or Stalled condition");
    assert_eq!(state, "True");
    assert!(why.contains("write a probe to"), "{why}");
    let snapshots = sim
        .mock
        .names_under("/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots");
    assert!(snapshots.is_empty(), "{snapshots:?}");

    std::fs::remove_file(&probes).unwrap();
    let mut ctx = ctx;
    ctx.backoff = Default::default();
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
}

/// Item 10: two clusters backing up the same `shop/data` into one target keep separate
/// chains under their cluster ids, and each restores its own data.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_sharing_a_target_keep_their_chains_apart() {
    let shared = tempfile::tempdir().unwrap();
    let mut made = Vec::new();
    for (id, seed) in [("east", 21), ("west", 22)] {
        let (sim, _own) = cluster(json!({}));
        std::fs::write(
            sim.device_of_claim("shop", "data").unwrap(),
            noise(VOLUME_BYTES, seed),
        )
        .unwrap();
        let target = "/apis/strata.io/v1alpha1/namespaces/shop/targets/local";
        let mut spec = sim.mock.get(target).unwrap();
        spec["spec"]["url"] = json!(shared.path().join("target").to_str().unwrap());
        sim.mock.put(target, spec);
        let mut ctx = context(&sim);
        ctx.cluster_id = Some(id.to_owned());
        let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
        assert_eq!(done.phase, Some(Phase::Completed), "{id}: {done:?}");
        made.push((id, seed, backup_id(&done)));
    }
    for (id, seed, backup) in made {
        let target = shared.path().join("target").join(id);
        assert_eq!(
            restore_from(&target, "shop.data", &backup),
            noise(VOLUME_BYTES, seed),
            "{id}"
        );
        // Each cluster's volume holds only its own backup: no chain was extended across.
        let opened = strata::target::Target::open(target.to_str().unwrap()).unwrap();
        let backups = opened
            .backups(&strata::target::VolumeName::new("shop.data").unwrap())
            .unwrap();
        assert_eq!(backups.len(), 1, "{id}: {backups:?}");
        assert_eq!(backups[0].id.to_string(), backup);
    }
}

const JOBS: &str = "/apis/batch/v1/namespaces/shop/jobs";
const PVCS: &str = "/api/v1/namespaces/shop/persistentvolumeclaims";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";

/// Drive Backup `nightly` until its datamover is frozen mid-upload.
async fn frozen_mid_upload(sim: &Sim, ctx: &Context) {
    sim.inject_pod_fault(PodFault::FreezeAt("mid-upload"));
    let running = drive(sim, ctx, "nightly", 4, Duration::from_millis(500)).await;
    assert_eq!(running.phase, Some(Phase::Copying), "{running:?}");
    assert!(sim.busy(), "the datamover is writing");
}

/// The application backups of `shop` the target holds.
fn committed(folder: &std::path::Path) -> usize {
    let target = strata::target::Target::open(folder.join("target").to_str().unwrap()).unwrap();
    target
        .app_backups(&strata::target::AppName::new("shop").unwrap())
        .map(|all| all.len())
        .unwrap_or(0)
}

/// A metadata archive larger than one Secret holds (a Helm release's history of release
/// Secrets, each an incompressible gzip of the chart, does that; here, ConfigMaps of
/// incompressible binary data) is stashed in parts and committed whole; every part goes with
/// the run.
#[tokio::test(flavor = "multi_thread")]
async fn a_metadata_archive_larger_than_a_secret_is_stashed_in_parts_and_committed_whole() {
    const CONFIG_MAPS: &str = "/api/v1/namespaces/shop/configmaps";
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let mut charts = Vec::new();
    for revision in 1..=3u64 {
        let name = format!("chart-v{revision}");
        let blob =
            serde_json::to_value(k8s_openapi::ByteString(noise(700 << 10, 40 + revision))).unwrap();
        sim.mock.put(
            &format!("{CONFIG_MAPS}/{name}"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": "shop", "labels": {"app": "db"}},
                   "binaryData": {"chart.tgz": blob}}),
        );
        charts.push(name);
    }
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");

    let target =
        strata::target::Target::open(folder.path().join("target").to_str().unwrap()).unwrap();
    let app = strata::target::AppName::new("shop").unwrap();
    let committed = target.app_backups(&app).unwrap();
    let archive = target.read_app_archive(&app, &committed[0].id).unwrap();
    assert!(archive.len() > 2 << 20, "{} bytes", archive.len());
    let metadata = strata::discovery::MetadataBackup::read_archive(&archive[..]).unwrap();
    let mut saved: Vec<&str> = metadata
        .objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .filter(|name| name.starts_with("chart-"))
        .collect();
    saved.sort_unstable();
    assert_eq!(saved, charts);
    assert!(
        sim.mock.names_under(SECRETS).is_empty(),
        "the stash's parts went"
    );
}

/// Item 5: deleting a Backup whose datamover is writing cancels the run through the finalizer:
/// the Job goes and its writer is killed, the temporaries and the stash are deleted, the lock
/// released, nothing is committed; the next Backup of the volume completes.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_running_backup_kills_its_writer_and_removes_what_it_made() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    frozen_mid_upload(&sim, &ctx).await;
    let backup = sim.mock.backup("nightly");
    assert_eq!(backup.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
    let job = job_of(&sim, "nightly");
    Api::<Backup>::namespaced(sim.mock.client(), "shop")
        .delete("nightly", &DeleteParams::default())
        .await
        .unwrap();
    let marked = sim.mock.backup("nightly");
    assert!(
        marked.metadata.deletion_timestamp.is_some(),
        "held by the finalizer"
    );
    reconcile_backup(&marked, &ctx).await.unwrap();
    sim.step(Duration::from_millis(500)).await;

    assert!(
        sim.mock.get(&format!("{BACKUPS}/nightly")).is_none(),
        "finalizer removed"
    );
    assert!(sim.mock.names_under(JOBS).is_empty());
    let pods = sim.pod_history("shop", &job);
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["status"]["phase"], "Failed");
    assert!(sim.pods_of("shop", &job).is_empty());
    assert!(!sim.busy(), "the writer process was killed");
    assert_eq!(sim.mock.names_under(PVCS), ["data"]);
    assert!(sim.mock.names_under(SNAPSHOTS).is_empty());
    assert!(sim.mock.names_under(SECRETS).is_empty(), "the stash went");
    assert!(!holds_lease(&sim), "the lock was released");
    assert_eq!(committed(folder.path()), 0);

    add_backup(&sim, "again", "b-2", "Full");
    let done = drive(&sim, &ctx, "again", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert_eq!(committed(folder.path()), 1);
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
}

/// Item 5: a Backup made again under the name of one whose Job still runs (deleted without
/// its finalizer running: the controller was down and someone removed it) must not adopt
/// that Job: it gets its own and completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_recreated_under_its_name_does_not_adopt_the_old_job() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    frozen_mid_upload(&sim, &ctx).await;
    let old = job_of(&sim, "nightly");
    assert!(sim.mock.remove(&format!("{BACKUPS}/nightly")));
    add_backup(&sim, "nightly", "b-2", "Full");
    let new = job_of(&sim, "nightly");
    assert_ne!(old, new);
    // Short rounds: the kubelet would wait out each one for the frozen pod.
    let done = drive(&sim, &ctx, "nightly", 60, Duration::from_secs(2)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert!(
        sim.mock.get(&format!("{JOBS}/{old}")).is_some(),
        "left to its own owner"
    );
    assert_eq!(sim.pod_history("shop", &new).len(), 1);
    assert_eq!(
        restored(folder.path(), &backup_id(&done)),
        noise(VOLUME_BYTES, 7)
    );
}

/// A Backup made again under the name of a committed one (the old object removed, its backup
/// kept) can never commit: it fails at discovery, before a snapshot or a datamover.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_recreated_under_a_committed_name_fails_before_any_snapshot() {
    let (sim, _folder) = cluster(json!({}));
    let ctx = context(&sim);
    add_backup(&sim, "nightly", "b-1", "Full");
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    let snapshots = sim.mock.names_under(SNAPSHOTS);
    assert!(sim.mock.remove(&format!("{BACKUPS}/nightly")));
    add_backup(&sim, "nightly", "b-2", "Full");
    let failed = drive(&sim, &ctx, "nightly", 3, Duration::from_secs(1)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let (_, _, why) = condition(&failed, "Failed").unwrap();
    assert!(why.contains("already has a backup nightly"), "{why}");
    let new_job = job_of(&sim, "nightly");
    assert!(sim.mock.get(&format!("{JOBS}/{new_job}")).is_none());
    assert_eq!(
        sim.mock.names_under(SNAPSHOTS),
        snapshots,
        "no snapshot was taken"
    );
}

/// Item 5: every object a running Backup made in its namespace names it as its controller
/// owner, so the garbage collector removes whatever a run leaves.
#[tokio::test(flavor = "multi_thread")]
async fn every_object_of_a_run_is_owned_by_its_backup() {
    let (sim, _folder) = cluster(json!({}));
    let ctx = context(&sim);
    frozen_mid_upload(&sim, &ctx).await;
    let key = sim.mock.run_key("backups", "nightly", "shop", "data");
    let made = [
        format!("{JOBS}/{}", key.name(Role::Datamover)),
        format!("{PVCS}/{}", key.name(Role::Volume)),
        format!("{SNAPSHOTS}/{}", key.name(Role::Snapshot)),
        format!("{SECRETS}/{}", stash_name("nightly", "b-1")),
        format!("{LEASES}/{}", lock_name("data")),
    ];
    for path in &made {
        let object = sim
            .mock
            .get(path)
            .unwrap_or_else(|| panic!("{path} exists"));
        let owners = &object["metadata"]["ownerReferences"];
        assert_eq!(owners.as_array().map(Vec::len), Some(1), "{path}: {owners}");
        let owner = &owners[0];
        assert_eq!(
            (&owner["kind"], &owner["name"], &owner["uid"]),
            (&json!("Backup"), &json!("nightly"), &json!("b-1")),
            "{path}"
        );
        assert_eq!(owner["controller"], true, "{path}");
        assert_eq!(owner["blockOwnerDeletion"], true, "{path}");
    }
    // Nothing else carries the run's label (but the Job's pods, which the Job owns).
    for path in sim
        .mock
        .paths()
        .into_iter()
        .filter(|p| !p.contains("/pods/"))
    {
        let object = sim.mock.get(&path).unwrap();
        if object["metadata"]["labels"]["strata.io/run"] == "nightly" {
            assert!(made.contains(&path), "{path} is not expected");
        }
    }
}

/// Backup `name` (Incremental) of `app=db` keeping the last `keep_last` application backups.
fn add_backup_keeping(sim: &Sim, name: &str, uid: &str, keep_last: u32) {
    sim.mock.put(
        &format!("{BACKUPS}/{name}"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": "Incremental", "retention": {"keepLast": keep_last}}}),
    );
}

/// Restore `name` of Backup `backup` into `shop-copy`, reconciled once; its status.
async fn validate_restore(
    sim: &Sim,
    ctx: &Context,
    name: &str,
    backup: &str,
) -> strata::operator::crd::RestoreStatus {
    validate_restore_into(sim, ctx, name, backup, "shop-copy").await
}

/// One reconcile of a new Restore `name` of `backup` with shop mapped to `into`.
async fn validate_restore_into(
    sim: &Sim,
    ctx: &Context,
    name: &str,
    backup: &str,
    into: &str,
) -> strata::operator::crd::RestoreStatus {
    let path = format!("/apis/strata.io/v1alpha1/namespaces/shop/restores/{name}");
    sim.mock.put(
        &path,
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": name, "namespace": "shop", "uid": format!("r-{name}"),
                            "generation": 1},
               "spec": {"backupRef": {"name": backup},
                        "namespaceMapping": {"shop": into}}}),
    );
    let restore: strata::operator::crd::Restore =
        serde_json::from_value(sim.mock.get(&path).unwrap()).unwrap();
    let _ = strata::operator::reconcile_restore(&restore, ctx).await;
    let restore: strata::operator::crd::Restore =
        serde_json::from_value(sim.mock.get(&path).unwrap()).unwrap();
    restore.status.unwrap_or_default()
}

/// The condition `type_` of a Restore's status; fails the test when it is not set.
fn restore_condition<'a>(
    status: &'a strata::operator::crd::RestoreStatus,
    type_: &str,
) -> &'a strata::operator::status::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition: {status:?}"))
}

/// Item 4: `keepLast` kept the newest N volume backups of each volume, folding away the volume
/// backup an older Completed Backup still named, which then looked restorable and was not.
/// Retention now expires whole application backups: the expired Backup says so, a Restore of
/// it fails validation naming the missing id, the kept ones restore.
#[tokio::test(flavor = "multi_thread")]
async fn keep_last_expires_whole_application_backups_and_marks_the_expired_backup() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let device = sim.device_of_claim("shop", "data").unwrap();
    let mut contents = Vec::new();
    for (i, name) in ["first", "second", "third"].into_iter().enumerate() {
        let content = noise(VOLUME_BYTES, 100 + i as u64);
        std::fs::write(&device, &content).unwrap();
        add_backup_keeping(&sim, name, &format!("b-{name}"), 2);
        let done = drive(&sim, &ctx, name, 12, Duration::from_secs(60)).await;
        assert_eq!(done.phase, Some(Phase::Completed), "{name}: {done:?}");
        contents.push((backup_id(&done), content));
    }

    let first = status(&sim, "first");
    assert_eq!(first.phase, Some(Phase::Completed), "the run did complete");
    let (state, reason, message) = condition(&first, "Expired").expect("an Expired condition");
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("True", "RetentionExpired")
    );
    assert!(
        message.contains("/first") && message.contains("Backup third"),
        "{message}"
    );
    for kept in ["second", "third"] {
        assert_eq!(condition(&status(&sim, kept), "Expired"), None, "{kept}");
    }
    for (id, content) in &contents[1..] {
        assert!(restored(folder.path(), id) == *content, "{id} restores");
    }

    let refused = validate_restore(&sim, &ctx, "from-first", "first").await;
    assert_eq!(refused.phase, Some(Phase::Failed), "{refused:?}");
    let failed = restore_condition(&refused, "Failed");
    assert_eq!(failed.reason, "InvalidSpec");
    assert!(
        failed.message.contains("/first is not in the target"),
        "{}",
        failed.message
    );
    let accepted = validate_restore(&sim, &ctx, "from-second", "second").await;
    assert_ne!(accepted.phase, Some(Phase::Failed), "{accepted:?}");
    let validated = restore_condition(&accepted, "Validated");
    assert_eq!(validated.reason, "Validated", "{accepted:?}");
}

/// A Restore under way pins the application backup it restores: a later Backup's retention
/// keeps it past `keepLast` (not Expired), so the Restore still reads its archive when it
/// applies the objects; once the Restore ended, the next retention expires it.
#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_application_backup_a_running_restore_reads() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let device = sim.device_of_claim("shop", "data").unwrap();
    let first_content = noise(VOLUME_BYTES, 300);
    std::fs::write(&device, &first_content).unwrap();
    add_backup_keeping(&sim, "first", "b-first", 1);
    let first = drive(&sim, &ctx, "first", 12, Duration::from_secs(60)).await;
    assert_eq!(first.phase, Some(Phase::Completed), "{first:?}");
    let started = validate_restore(&sim, &ctx, "from-first", "first").await;
    assert!(
        !started.phase.is_some_and(Phase::is_final),
        "the restore is under way: {started:?}"
    );

    std::fs::write(&device, noise(VOLUME_BYTES, 301)).unwrap();
    add_backup_keeping(&sim, "second", "b-second", 1);
    let second = drive(&sim, &ctx, "second", 12, Duration::from_secs(60)).await;
    assert_eq!(second.phase, Some(Phase::Completed), "{second:?}");
    assert_eq!(condition(&status(&sim, "first"), "Expired"), None);
    assert!(restored(folder.path(), &backup_id(&first)) == first_content);
    let done = drive_restore(&sim, &ctx, "from-first", 12).await;
    assert_eq!(done["phase"], "Completed", "{done}");

    std::fs::write(&device, noise(VOLUME_BYTES, 302)).unwrap();
    add_backup_keeping(&sim, "third", "b-third", 1);
    let third = drive(&sim, &ctx, "third", 12, Duration::from_secs(60)).await;
    assert_eq!(third.phase, Some(Phase::Completed), "{third:?}");
    let (state, reason, _) = condition(&status(&sim, "first"), "Expired").expect("expired now");
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("True", "RetentionExpired")
    );
}

/// Retention that fails after the commit (an older application manifest that no longer reads)
/// does not fail the Backup that committed: it completes, restorable, and says in its
/// `RetentionApplied` condition why retention was not applied.
#[tokio::test(flavor = "multi_thread")]
async fn retention_failing_after_the_commit_leaves_the_backup_completed() {
    let (sim, folder) = cluster(json!({}));
    let ctx = context(&sim);
    let device = sim.device_of_claim("shop", "data").unwrap();
    std::fs::write(&device, noise(VOLUME_BYTES, 7)).unwrap();
    add_backup_keeping(&sim, "first", "b-first", 5);
    let first = drive(&sim, &ctx, "first", 12, Duration::from_secs(60)).await;
    assert_eq!(first.phase, Some(Phase::Completed), "{first:?}");
    // The first application backup's manifest no longer reads.
    let apps = folder.path().join("target/applications");
    let manifest = std::fs::read_dir(&apps)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|app| app.path().join("first.json"))
        .find(|path| path.exists())
        .expect("the first application backup's manifest");
    std::fs::write(&manifest, b"{").unwrap();

    let content = noise(VOLUME_BYTES, 8);
    std::fs::write(&device, &content).unwrap();
    add_backup_keeping(&sim, "second", "b-second", 1);
    let second = drive(&sim, &ctx, "second", 12, Duration::from_secs(60)).await;
    assert_eq!(second.phase, Some(Phase::Completed), "{second:?}");
    let (state, reason, message) =
        condition(&second, "RetentionApplied").expect("a RetentionApplied condition");
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("False", "RetentionFailed")
    );
    assert!(
        message.contains("first.json") && message.contains("applied again at the next commit"),
        "{message}"
    );
    assert!(restored(folder.path(), &backup_id(&second)) == content);
}

/// Item 7, restore authorisation: the restore policy is checked against the whole mapped plan
/// before anything is written. A destination namespace no grant names, and a kind the policy
/// lacks, each fail the Restore with reason NotAuthorized naming what was refused, and nothing
/// is created there; the same Backup restores where the policy allows.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_the_policy_refuses_fails_before_writing_anything() {
    let (sim, _folder) = cluster(json!({}));
    sim.mock.put(
        "/api/v1/namespaces/shop/configmaps/settings",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "settings", "namespace": "shop", "labels": {"app": "db"}},
               "data": {"mode": "fast"}}),
    );
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");

    let refused = validate_restore_into(&sim, &ctx, "to-prod", "nightly", "prod").await;
    assert_eq!(refused.phase, Some(Phase::Failed), "{refused:?}");
    assert_refused_untouched(
        &sim,
        &refused,
        "prod",
        "namespace prod: a Restore in namespace shop may write only into shop",
    );

    let mut narrow = context(&sim);
    narrow
        .restore_policy
        .kinds
        .retain(|k| k.resource != "configmaps");
    let refused = validate_restore_into(&sim, &narrow, "no-configmaps", "nightly", "copy").await;
    assert_refused_untouched(
        &sim,
        &refused,
        "copy",
        "ConfigMap settings: configmaps is not a kind the restore policy allows",
    );

    let allowed = drive_restore_new(&sim, &ctx, "to-copy", "nightly", "copy").await;
    assert_eq!(allowed["phase"], "Completed", "{allowed}");
    assert!(
        sim.mock
            .get("/api/v1/namespaces/copy/configmaps/settings")
            .is_some()
    );
}

/// The Restore failed `NotAuthorized` with a message containing `why`, and namespace `ns` was
/// neither created nor written to.
fn assert_refused_untouched(
    sim: &Sim,
    refused: &strata::operator::crd::RestoreStatus,
    ns: &str,
    why: &str,
) {
    let failed = restore_condition(refused, "Failed");
    assert_eq!(failed.reason, "NotAuthorized", "{refused:?}");
    assert!(failed.message.contains(why), "{}", failed.message);
    assert!(sim.mock.get(&format!("/api/v1/namespaces/{ns}")).is_none());
    assert_eq!(written_in(sim, ns), Vec::<String>::new());
}

/// The paths of every object stored in namespace `ns`.
fn written_in(sim: &Sim, ns: &str) -> Vec<String> {
    let prefix = format!("/namespaces/{ns}/");
    sim.mock
        .paths()
        .into_iter()
        .filter(|p| p.contains(&prefix))
        .collect()
}

/// Create Restore `name` of `backup` into `into` and drive it to its end.
async fn drive_restore_new(
    sim: &Sim,
    ctx: &Context,
    name: &str,
    backup: &str,
    into: &str,
) -> Value {
    validate_restore_into(sim, ctx, name, backup, into).await;
    drive_restore(sim, ctx, name, 12).await
}

/// Item 7 (in part): every request the controller makes in a backup, an incremental with
/// retention, a Target check, a restore into a mapped namespace and the cancellation of a
/// running Backup is allowed by the ClusterRole `strata install` generates.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_of_the_controller_is_allowed_by_the_generated_rbac() {
    let (sim, _folder) = cluster(json!({}));
    sim.enforce(cluster_sim::install_grants(&cluster_sim::shop_install()));
    let ctx = context(&sim);
    let full = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(
        full.phase,
        Some(Phase::Completed),
        "{full:?} {:?}",
        sim.mock.denied()
    );
    sim.mock.put(
        &format!("{BACKUPS}/hourly"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "hourly", "namespace": "shop", "uid": "b-2", "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": "Incremental", "retention": {"keepLast": 1}}}),
    );
    let incremental = drive(&sim, &ctx, "hourly", 12, Duration::from_secs(60)).await;
    assert_eq!(incremental.phase, Some(Phase::Completed), "{incremental:?}");
    let expired = status(&sim, "nightly");
    assert!(condition(&expired, "Expired").is_some(), "{expired:?}");

    let target: strata::operator::crd::Target = serde_json::from_value(
        sim.mock
            .get("/apis/strata.io/v1alpha1/namespaces/shop/targets/local")
            .unwrap(),
    )
    .unwrap();
    strata::operator::reconcile_target(&target, &ctx)
        .await
        .unwrap();

    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "hourly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let restored = drive_restore(&sim, &ctx, "copy", 12).await;
    assert_eq!(restored["phase"], "Completed", "{restored}");

    add_backup(&sim, "doomed", "b-3", "Full");
    sim.inject_pod_fault(PodFault::FreezeAt("mid-upload"));
    let running = drive(&sim, &ctx, "doomed", 4, Duration::from_millis(500)).await;
    assert_eq!(running.phase, Some(Phase::Copying), "{running:?}");
    // A user deletes it (as its owner may; not the controller's request): the API server
    // marks an object with finalizers deleted.
    let path = format!("{BACKUPS}/doomed");
    let mut marked = sim.mock.get(&path).unwrap();
    marked["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    sim.mock.put(&path, marked);
    let gone = sim.mock.get(&path).unwrap();
    let doomed: Backup = serde_json::from_value(gone).unwrap();
    reconcile_backup(&doomed, &ctx).await.unwrap();
    assert!(sim.mock.get(&format!("{BACKUPS}/doomed")).is_none());

    assert_eq!(sim.mock.denied(), Vec::<String>::new());
}

/// The enforcement is real: without `delete` on ServiceAccounts, the mapped restore cannot
/// remove the account it made, and the refused request is the one named.
#[tokio::test(flavor = "multi_thread")]
async fn a_verb_missing_from_the_rbac_stops_the_flow_that_needs_it() {
    let (sim, _folder) = cluster(json!({}));
    let mut grants = cluster_sim::install_grants(&cluster_sim::shop_install());
    // Every grant of `delete` on ServiceAccounts goes; their other verbs stay.
    for (_, rules) in &mut grants {
        let mut kept = Vec::new();
        for rule in rules.iter_mut() {
            let deletes = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == "delete");
            let resources = rule["resources"].as_array_mut().unwrap();
            if deletes && resources.iter().any(|r| r == "serviceaccounts") {
                resources.retain(|r| r != "serviceaccounts");
                let mut without = rule.clone();
                without["resources"] = json!(["serviceaccounts"]);
                without["verbs"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|v| v != "delete");
                kept.push(without);
            }
        }
        rules.extend(kept);
    }
    sim.enforce(grants);
    let ctx = context(&sim);
    let full = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(full.phase, Some(Phase::Completed), "{full:?}");
    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let stuck = drive_restore(&sim, &ctx, "copy", 6).await;
    assert_ne!(stuck["phase"], "Completed", "{stuck}");
    let denied = sim.mock.denied();
    assert!(
        denied
            .iter()
            .any(|d| d.starts_with("delete core/serviceaccounts strata-access-")),
        "{denied:?}"
    );
}

/// Item 8: per-PVC include and exclude. An excluded PVC has no volume backup but stays in the
/// metadata, so a restore provisions it empty; an include naming no PVC of the application is
/// refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn excluded_pvcs_are_not_copied_and_are_restored_empty() {
    let (sim, folder) = cluster(json!({}));
    sim.add_volume(
        "shop",
        "cache",
        json!({"app": "db"}),
        Some("fast"),
        DRIVER,
        &noise(1 << 20, 9),
    );
    sim.mock.put(
        &format!("{BACKUPS}/nightly"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "nightly", "namespace": "shop", "uid": "b-1", "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": "Full", "volumes": {"exclude": ["cache"]}}}),
    );
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    let pvcs: Vec<&str> = done.volumes.iter().map(|v| v.pvc.as_str()).collect();
    assert_eq!(pvcs, ["data"]);
    let target =
        strata::target::Target::open(folder.path().join("target").to_str().unwrap()).unwrap();
    let volumes: Vec<String> = target
        .volumes()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(volumes, ["shop.data"]);

    restores_nightly_into_copy(&sim, &ctx).await;
    let cache = sim
        .mock
        .get("/api/v1/namespaces/copy/persistentvolumeclaims/cache")
        .expect("the excluded claim is restored as an object");
    assert!(cache["spec"]["dataSource"].is_null(), "{cache}");

    add_backup(&sim, "wrong", "b-2", "Full");
    let path = format!("{BACKUPS}/wrong");
    let mut wrong = sim.mock.get(&path).unwrap();
    wrong["spec"]["volumes"] = json!({"include": ["nope"]});
    sim.mock.put(&path, wrong);
    let failed = drive(&sim, &ctx, "wrong", 2, Duration::from_secs(1)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let (_, _, why) = condition(&failed, "Failed").unwrap();
    assert!(
        why.contains("spec.volumes.include") && why.contains("\"nope\""),
        "{why}"
    );
}

/// Restore `copy` of Backup `nightly` into namespace `copy`: it completes and claim `data`
/// holds the volume's bytes.
async fn restores_nightly_into_copy(sim: &Sim, ctx: &Context) {
    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let restored = drive_restore(sim, ctx, "copy", 12).await;
    assert_eq!(restored["phase"], "Completed", "{restored}");
    let data = sim.device_of_claim("copy", "data").unwrap();
    assert_eq!(std::fs::read(data).unwrap(), noise(VOLUME_BYTES, 7));
}

/// A controller restarting between stashing the metadata and writing the status discovers
/// again; if the volume selection changed meanwhile, the stash is replaced, so the committed
/// archive names exactly the volumes backed up and the Backup restores. A stash that still
/// disagrees at commit (tampered) fails the Backup and commits nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_stash_from_a_lost_status_write_is_replaced_and_a_disagreeing_one_never_commits() {
    let (sim, folder) = cluster(json!({}));
    sim.add_volume(
        "shop",
        "cache",
        json!({"app": "db"}),
        Some("fast"),
        DRIVER,
        &noise(1 << 20, 9),
    );
    add_backup(&sim, "nightly", "b-1", "Full");
    let ctx = context(&sim);
    let stash = format!("{SECRETS}/{}", stash_name("nightly", "b-1"));
    // Every status write is lost until the stash exists: a restart after `stash::store`.
    sim.mock
        .fail(&format!("PATCH {BACKUPS}/nightly/status"), 500);
    for _ in 0..4 {
        if sim.mock.get(&stash).is_some() {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
    }
    sim.mock.heal();
    assert!(
        sim.mock.get(&stash).is_some(),
        "discovery stashed the archive"
    );
    assert_eq!(status(&sim, "nightly").phase, None, "no status was written");
    let path = format!("{BACKUPS}/nightly");
    let mut edited = sim.mock.get(&path).unwrap();
    edited["spec"]["volumes"] = json!({"exclude": ["cache"]});
    sim.mock.put(&path, edited);

    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    let pvcs: Vec<&str> = done.volumes.iter().map(|v| v.pvc.as_str()).collect();
    assert_eq!(pvcs, ["data"]);
    restores_nightly_into_copy(&sim, &ctx).await;

    // A stash swapped after discovery for one naming another volume set.
    add_backup(&sim, "weekly", "b-2", "Full");
    let swapped = format!("{SECRETS}/{}", stash_name("weekly", "b-2"));
    for _ in 0..4 {
        if sim.mock.get(&swapped).is_some() {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup("weekly"), &ctx).await;
    }
    let mut secret = sim.mock.get(&swapped).expect("weekly's stash");
    let empty = strata::discovery::MetadataBackup {
        objects: Vec::new(),
        volumes: Vec::new(),
    }
    .write_archive(Vec::new())
    .unwrap();
    secret["data"]["metadata.tar.gz"] =
        serde_json::to_value(k8s_openapi::ByteString(empty)).unwrap();
    sim.mock.put(&swapped, secret);
    let failed = drive(&sim, &ctx, "weekly", 12, Duration::from_secs(60)).await;
    assert_eq!(failed.phase, Some(Phase::Failed), "{failed:?}");
    let (_, _, why) = condition(&failed, "Failed").unwrap();
    assert!(
        why.contains("metadata stash")
            && why.contains("lists volumes [] but the run backed up [shop/cache, shop/data]"),
        "{why}"
    );
    let target =
        strata::target::Target::open(folder.path().join("target").to_str().unwrap()).unwrap();
    let app = strata::target::AppName::new("shop").unwrap();
    let ids: Vec<String> = target
        .app_backups(&app)
        .unwrap()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, ["nightly"], "nothing unrestorable committed");
}

/// Item 9: a Backup of many volumes copies at most `maxParallelVolumes` at once (each copy is a
/// full-size clone and a pod), starting the others as those finish.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_copies_at_most_max_parallel_volumes_at_once() {
    let (sim, folder) = cluster(json!({}));
    add_small_volumes(&sim, 31, 32);
    let path = format!("{BACKUPS}/nightly");
    let mut backup = sim.mock.get(&path).unwrap();
    backup["spec"]["maxParallelVolumes"] = json!(1);
    sim.mock.put(&path, backup);
    let ctx = context(&sim);
    let mut most = 0;
    for _ in 0..30 {
        if is_final(&status(&sim, "nightly")) {
            break;
        }
        let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
        let running = sim
            .mock
            .names_under("/apis/batch/v1/namespaces/shop/jobs")
            .iter()
            .filter(|job| {
                let job = sim
                    .mock
                    .get(&format!("/apis/batch/v1/namespaces/shop/jobs/{job}"))
                    .unwrap();
                job["status"]["succeeded"].as_u64().unwrap_or(0) == 0
            })
            .count();
        most = most.max(running);
        sim.step(Duration::from_secs(60)).await;
    }
    let done = status(&sim, "nightly");
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert_eq!(most, 1, "never more than one datamover at once");
    assert_eq!(done.volumes.len(), 3);
    assert_restored(&folder.path().join("target"), &done, |pvc| match pvc {
        "data" => noise(VOLUME_BYTES, 7),
        "logs" => noise(1 << 20, 31),
        _ => noise(1 << 20, 32),
    });
}

/// A PVC whose volume is already copied may go (a StatefulSet scaled down) while other volumes
/// wait for a slot: the Backup still completes, every volume restorable. Every call of the
/// Copying step looked up every source PVC again, and failed the whole run (InvalidSpec, "PVC
/// disappeared") on the first one missing.
#[tokio::test(flavor = "multi_thread")]
async fn a_copied_volumes_pvc_deleted_while_others_wait_does_not_fail_the_backup() {
    let (sim, folder) = cluster(json!({}));
    add_small_volumes(&sim, 41, 42);
    let path = format!("{BACKUPS}/nightly");
    let mut backup = sim.mock.get(&path).unwrap();
    backup["spec"]["maxParallelVolumes"] = json!(1);
    sim.mock.put(&path, backup);
    let ctx = context(&sim);
    let mut deleted = None;
    for _ in 0..30 {
        let now = status(&sim, "nightly");
        if is_final(&now) {
            break;
        }
        if deleted.is_none() {
            let waiting = now.volumes.iter().any(|v| !v.started);
            if let Some(copied) = now.volumes.iter().find(|v| v.done).filter(|_| waiting) {
                let claim = format!(
                    "/api/v1/namespaces/shop/persistentvolumeclaims/{}",
                    copied.pvc
                );
                assert!(sim.mock.remove(&claim), "{claim}");
                deleted = Some(copied.pvc.clone());
            }
        }
        let _ = reconcile_backup(&sim.mock.backup("nightly"), &ctx).await;
        sim.step(Duration::from_secs(60)).await;
    }
    let done = status(&sim, "nightly");
    assert!(
        deleted.is_some(),
        "no volume was copied while others waited: {done:?}"
    );
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    assert_restored(&folder.path().join("target"), &done, |pvc| match pvc {
        "data" => noise(VOLUME_BYTES, 7),
        "logs" => noise(1 << 20, 41),
        _ => noise(1 << 20, 42),
    });
}

/// Every volume backup of `done` restores from `target` to what `expected` says of its PVC.
fn assert_restored(
    target: &std::path::Path,
    done: &BackupStatus,
    expected: impl Fn(&str) -> Vec<u8>,
) {
    for volume in &done.volumes {
        let id = volume.backup_id.as_deref().unwrap();
        assert_eq!(
            restore_from(target, &volume.volume, id),
            expected(&volume.pvc),
            "{}",
            volume.pvc
        );
    }
}

/// Item 9: the run loop watches what a run makes and what it waits for. With the requeue an
/// hour away (the loop that only polled sat out the hour): a Backup goes from its snapshot
/// turning ready through its clone and datamover to Completed in seconds; a second Backup of
/// the same volume, waiting for the first's locks, and a Restore into a mapped namespace,
/// waiting for the first to complete (its Jobs there carry no ownerReference), follow at once.
/// Every list and watch of the loop is allowed by the ClusterRole `strata install` generates.
#[tokio::test(flavor = "multi_thread")]
async fn the_run_loop_reconciles_each_wait_when_what_it_waits_for_changes() {
    let (sim, folder) = cluster(json!({}));
    sim.enforce(cluster_sim::install_grants(&cluster_sim::shop_install()));
    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let mut ctx = context(&sim);
    ctx.poll = Duration::from_secs(3600);
    ctx.resync = Duration::from_secs(3600);
    let run = tokio::spawn(strata::operator::controller::run(ctx, None));
    let waits = |name: &str, type_: &str| {
        condition(&status(&sim, name), type_).is_some_and(|(state, ..)| state == "False")
    };
    let restore = || sim.mock.get(&format!("{RESTORES}/copy")).unwrap();
    let restore_waits = || restore()["status"]["conditions"][0]["reason"] == "BackupNotCompleted";
    let all_wait = || {
        waits("nightly", "SnapshotsReady") && waits("hourly", "VolumesLocked") && restore_waits()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !waits("nightly", "SnapshotsReady") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second Backup comes once the first holds the locks.
    add_backup(&sim, "hourly", "b-2", "Incremental");
    while !all_wait() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        all_wait(),
        "{:?} {:?} {}",
        status(&sim, "nightly"),
        status(&sim, "hourly"),
        restore()
    );
    // Let the loop settle: nothing but the snapshot's change can move the runs now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = tokio::time::Instant::now();
    let done = || {
        is_final(&status(&sim, "nightly"))
            && is_final(&status(&sim, "hourly"))
            && restore()["status"]["phase"] == "Completed"
    };
    while !done() && started.elapsed() < Duration::from_secs(60) {
        sim.step(Duration::from_millis(200)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.abort();
    for name in ["nightly", "hourly"] {
        let done = status(&sim, name);
        assert_eq!(done.phase, Some(Phase::Completed), "{name}: {done:?}");
        assert_eq!(
            restored(folder.path(), &backup_id(&done)),
            noise(VOLUME_BYTES, 7)
        );
    }
    assert_eq!(restore()["status"]["phase"], "Completed", "{}", restore());
    assert!(started.elapsed() < Duration::from_secs(60));
    let data = sim.device_of_claim("copy", "data").unwrap();
    assert_eq!(std::fs::read(data).unwrap(), noise(VOLUME_BYTES, 7));
    assert_eq!(sim.mock.denied(), Vec::<String>::new());
}

/// Item 9: a controller-wide bound on datamovers per node. Two Backups of three volumes each on
/// two nodes with a bound of one never run two datamovers on a node (the simulated kubelet
/// samples its running pods every round); the volumes without a slot wait, saying so, and every
/// volume restores byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn datamovers_per_node_stay_within_the_controllers_bound() {
    let (sim, folder) = cluster(json!({}));
    sim.add_node("node-2");
    let volumes = [
        ("logs", "db", 41),
        ("index", "db", 42),
        ("web-a", "web", 43),
        ("web-b", "web", 44),
        ("web-c", "web", 45),
    ];
    for (name, app, seed) in volumes {
        sim.add_volume(
            "shop",
            name,
            json!({"app": app}),
            Some("fast"),
            DRIVER,
            &noise(1 << 20, seed),
        );
    }
    sim.mock.put(
        &format!("{BACKUPS}/web"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "web", "namespace": "shop", "uid": "b-2", "generation": 1},
               "spec": {"application": {"selectors": ["app=web"]}, "applicationName": "web",
                        "targetRef": {"name": "local"}, "mode": "Full"}}),
    );
    let mut ctx = context(&sim);
    ctx.max_datamovers_per_node = 1;
    let mut waited = false;
    for _ in 0..60 {
        if ["nightly", "web"]
            .iter()
            .all(|b| is_final(&status(&sim, b)))
        {
            break;
        }
        for backup in ["nightly", "web"] {
            let _ = reconcile_backup(&sim.mock.backup(backup), &ctx).await;
            let slots = condition(&status(&sim, backup), "DatamoverSlots");
            waited |=
                slots.is_some_and(|(state, reason, _)| state == "False" && reason == "NodesFull");
        }
        sim.step(Duration::from_millis(300)).await;
    }
    assert_eq!(sim.most_pods_on_a_node(), 1, "one datamover a node at most");
    assert!(waited, "some volume waited for a slot");
    let target = folder.path().join("target");
    for backup in ["nightly", "web"] {
        let done = status(&sim, backup);
        assert_eq!(done.phase, Some(Phase::Completed), "{backup}: {done:?}");
        assert_eq!(done.volumes.len(), 3);
        assert_restored(&target, &done, |pvc| match pvc {
            "data" => noise(VOLUME_BYTES, 7),
            pvc => {
                let (_, _, seed) = volumes.iter().find(|(n, ..)| *n == pvc).unwrap();
                noise(1 << 20, *seed)
            }
        });
    }
}

/// With `maxParallelVolumes`, an incremental's volumes start in batches; its
/// `ChangedBlockTracking` condition names why every volume compared digests, not only the last
/// batch's (the simulated driver has no SnapshotMetadataService).
#[tokio::test(flavor = "multi_thread")]
async fn the_change_tracking_condition_covers_every_batch_of_volumes() {
    let (sim, _folder) = cluster(json!({}));
    add_small_volumes(&sim, 41, 42);
    let ctx = context(&sim);
    let full = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(full.phase, Some(Phase::Completed), "{full:?}");
    sim.mock.put(
        &format!("{BACKUPS}/hourly"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Backup",
               "metadata": {"name": "hourly", "namespace": "shop", "uid": "b-2", "generation": 1},
               "spec": {"application": {"selectors": ["app=db"]}, "targetRef": {"name": "local"},
                        "mode": "Incremental", "maxParallelVolumes": 1}}),
    );
    let incremental = drive(&sim, &ctx, "hourly", 30, Duration::from_secs(60)).await;
    assert_eq!(incremental.phase, Some(Phase::Completed), "{incremental:?}");
    let (state, reason, message) =
        condition(&incremental, "ChangedBlockTracking").expect("the condition");
    assert_eq!((state.as_str(), reason.as_str()), ("False", "Digests"));
    assert!(
        message.starts_with("0 of 3 volumes list changed blocks"),
        "{message}"
    );
    for pvc in ["data", "logs", "index"] {
        assert!(
            message.contains(&format!("{pvc}: ")),
            "{pvc} missing: {message}"
        );
    }
}

/// A Restore's datamovers are held to the same bound per node: on one node with a bound of
/// one, its three volumes are filled one at a time (the others wait under `DatamoverSlots`),
/// and each restores byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_restores_datamovers_stay_within_the_bound_per_node() {
    let (sim, _folder) = cluster(json!({}));
    add_small_volumes(&sim, 51, 52);
    let mut ctx = context(&sim);
    ctx.max_datamovers_per_node = 1;
    let done = drive(&sim, &ctx, "nightly", 30, Duration::from_millis(300)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"}}}),
    );
    let path = format!("{RESTORES}/copy");
    let mut waited = false;
    for _ in 0..60 {
        let restore: Restore = serde_json::from_value(sim.mock.get(&path).unwrap()).unwrap();
        let status = restore.status.clone().unwrap_or_default();
        if status.phase.is_some_and(Phase::is_final) {
            break;
        }
        let _ = reconcile_restore(&restore, &ctx).await;
        let after: Restore = serde_json::from_value(sim.mock.get(&path).unwrap()).unwrap();
        waited |= after.status.unwrap_or_default().conditions.iter().any(|c| {
            c.type_ == "DatamoverSlots"
                && c.reason == "NodesFull"
                && c.status == strata::operator::status::ConditionStatus::False
        });
        sim.step(Duration::from_millis(300)).await;
    }
    let status = &sim.mock.get(&path).unwrap()["status"];
    assert_eq!(status["phase"], "Completed", "{status}");
    assert!(waited, "some volume waited for a slot");
    assert_eq!(sim.most_pods_on_a_node(), 1, "one datamover a node at most");
    for (pvc, expected) in [
        ("data", noise(VOLUME_BYTES, 7)),
        ("logs", noise(1 << 20, 51)),
        ("index", noise(1 << 20, 52)),
    ] {
        let device = sim
            .device_of_claim("copy", pvc)
            .expect("restored claim bound");
        assert!(std::fs::read(device).unwrap() == expected, "{pvc}");
    }
}

/// An existing destination Namespace is never applied over, even with `existingObjects:
/// Update`: its labels (Pod Security levels among them) are the administrator's, not what the
/// archive says.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_never_applies_over_an_existing_namespace() {
    let (sim, _folder) = cluster(json!({"owner": "tenant"}));
    sim.add_namespace("copy", json!({"owner": "admin"}));
    let ctx = context(&sim);
    let done = drive(&sim, &ctx, "nightly", 12, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Some(Phase::Completed), "{done:?}");
    sim.mock.put(
        &format!("{RESTORES}/copy"),
        json!({"apiVersion": "strata.io/v1alpha1", "kind": "Restore",
               "metadata": {"name": "copy", "namespace": "shop", "uid": "r-1", "generation": 1},
               "spec": {"backupRef": {"name": "nightly"}, "namespaceMapping": {"shop": "copy"},
                        "existingObjects": "Update"}}),
    );
    let restored = drive_restore(&sim, &ctx, "copy", 12).await;
    assert_eq!(restored["phase"], "Completed", "{restored}");
    let namespace = sim.mock.get("/api/v1/namespaces/copy").unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["owner"], "admin",
        "{namespace}"
    );
}
