//! Steps on the volumes of a run that backup and restore share: datamover Job outcomes, progress,
//! cleanup of the temporary objects, and the creation of restored claims.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::try_join_all;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::cbt::LABEL_BASE;
use super::jobs::{JobOutcome, age_of, delete_job, read_job};
use crate::crd::{Staging, VolumeStatus};
use crate::error::{Error, Result};
use crate::status::{Condition, ConditionStatus, Progress, condition, set_condition};
use strata_csi::client::{delete_pvc, delete_snapshot};
use strata_csi::naming::{LABEL_ROLE, LABEL_RUN, LABEL_RUN_UID, label_value};
use strata_csi::{Role, VolumeKey, VolumeSnapshot};

/// What reading the datamover Jobs found.
#[derive(Debug, Default)]
pub struct JobsRead {
    /// Indexes of the volumes whose Job finished now.
    pub finished: Vec<usize>,
    /// Jobs whose pod cannot start (yet within the wait): `(reason, message)`.
    pub stuck: Vec<(String, String)>,
}

/// Read the datamover Job of every volume not yet done that `has_job`; mark the finished
/// ones done. A failed
/// Job is an [`Error::JobFailed`] with the Job's own message, and so is one whose pod has been
/// unable to start for longer than `start_timeout` (see [`super::jobs::why_not_started`]).
pub async fn finished_jobs(
    client: &Client,
    key: impl Fn(&VolumeStatus) -> VolumeKey,
    has_job: impl Fn(&VolumeStatus) -> bool,
    namespace: &str,
    volumes: &mut [VolumeStatus],
    start_timeout: Duration,
) -> Result<JobsRead> {
    let pending: Vec<(usize, String)> = volumes
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.done && has_job(v))
        .map(|(i, v)| (i, key(v).name(Role::Datamover)))
        .collect();
    let outcomes = try_join_all(
        pending
            .iter()
            .map(|(_, job)| read_job(client, namespace, job)),
    )
    .await?;
    let mut read = JobsRead::default();
    for ((index, job), outcome) in pending.into_iter().zip(outcomes) {
        match outcome {
            JobOutcome::Running => {}
            JobOutcome::Succeeded => {
                if let Some(volume) = volumes.get_mut(index) {
                    volume.done = true;
                    read.finished.push(index);
                }
            }
            JobOutcome::Stuck {
                reason,
                message,
                age,
            } => {
                if age >= start_timeout {
                    return Err(Error::JobFailed {
                        namespace: namespace.to_owned(),
                        job,
                        message: format!(
                            "its pod did not start within {}s: {reason}: {message}",
                            start_timeout.as_secs()
                        ),
                    });
                }
                read.stuck.push((reason, message));
            }
            JobOutcome::Failed(message) => {
                return Err(Error::JobFailed {
                    namespace: namespace.to_owned(),
                    job,
                    message,
                });
            }
        }
    }
    Ok(read)
}

/// How long ago `snapshot` was created (zero without a `creationTimestamp`), which is how long
/// its run has waited for it: the limits of [`strata_csi::SnapshotLimits`] count from there.
pub fn snapshot_age(snapshot: &VolumeSnapshot) -> Duration {
    snapshot
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| age_of(t.0.as_second()))
        .unwrap_or_default()
}

/// The `DatamoversStarted` condition: False naming what keeps the stuck pods from starting,
/// True again once none is stuck (set only after it was first False, so a run that never
/// waited carries no such condition).
pub fn record_stuck(
    conditions: &mut Vec<Condition>,
    stuck: &[(String, String)],
    generation: Option<i64>,
) {
    match stuck.first() {
        Some((reason, _)) => {
            let messages: Vec<String> = stuck
                .iter()
                .map(|(reason, message)| format!("{reason}: {message}"))
                .collect();
            set_condition(
                conditions,
                "DatamoversStarted",
                ConditionStatus::False,
                reason,
                messages.join("; "),
                generation,
            );
        }
        None if condition(conditions, "DatamoversStarted").is_some() => set_condition(
            conditions,
            "DatamoversStarted",
            ConditionStatus::True,
            "Started",
            "every datamover pod started",
            generation,
        ),
        None => {}
    }
}

/// Whether `volume`'s data is in place: its datamover finished and, for a volume restored
/// through a staging volume, its claim was made from the staging snapshot.
pub fn settled(volume: &VolumeStatus) -> bool {
    volume.done
        && !matches!(
            volume.staging,
            Some(Staging::Filling | Staging::Snapshotting)
        )
}

/// Progress of `volumes`: the settled ones are done.
pub fn progress(volumes: &[VolumeStatus]) -> Progress {
    let size = |v: &&VolumeStatus| v.size_bytes.unwrap_or(0);
    Progress {
        volumes_done: u32::try_from(volumes.iter().filter(|v| settled(v)).count())
            .unwrap_or(u32::MAX),
        volumes_total: u32::try_from(volumes.len()).unwrap_or(u32::MAX),
        bytes_done: volumes
            .iter()
            .filter(|v| settled(v))
            .map(|v| size(&v))
            .sum(),
        bytes_total: volumes.iter().map(|v| size(&v)).sum(),
    }
}

/// Label `claim` as restored by run `run`, so a re-run recognises it.
pub fn label_restored(claim: &mut PersistentVolumeClaim, run: &str) {
    claim
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_RUN.to_owned(), label_value(run));
}

/// Whether `claim` was restored by run `run` (its `strata.io/run` label).
pub fn restored_by(claim: &PersistentVolumeClaim, run: &str) -> bool {
    claim
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_RUN))
        == Some(&label_value(run))
}

/// The error for restored claim `namespace/name` found taken by something else.
pub fn claim_taken(namespace: &str, name: &str) -> Error {
    Error::InvalidSpec {
        what: "volume",
        reason: format!(
            "PVC {namespace}/{name} already exists; delete it or restore into another namespace"
        ),
    }
}

/// Create restored claim `claim` (labelled by [`label_restored`]), or find the one an earlier
/// reconcile of run `run` created; a claim of that name from anything else is refused.
pub async fn create_claim(client: &Client, claim: &PersistentVolumeClaim, run: &str) -> Result<()> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    match api.create(&PostParams::default(), claim).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api
                .get(&name)
                .await
                .map_err(Error::kube(format!("get PVC {namespace}/{name}")))?;
            if restored_by(&existing, run) {
                Ok(())
            } else {
                Err(claim_taken(&namespace, &name))
            }
        }
        Err(source) => Err(Error::Kube {
            operation: format!("create PVC {namespace}/{name}"),
            source,
        }),
    }
}

/// Which temporary objects of a volume to delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Temporaries {
    /// Job, temporary PVC and snapshot (a backup).
    SnapshotAndClaim,
    /// Only the Job (a restore: the PVC is the restored volume).
    JobOnly,
    /// Job, temporary PVC, and the snapshot unless a commit kept it as the volume's
    /// changed-block base (a deleted Backup's).
    AllButBase,
}

/// Whether snapshot `namespace/name` is a volume's changed-block base ([`LABEL_BASE`]).
async fn is_base(client: &Client, namespace: &str, name: &str) -> Result<bool> {
    let snapshot = Api::<VolumeSnapshot>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!(
            "get VolumeSnapshot {namespace}/{name}"
        )))?;
    Ok(snapshot
        .and_then(|s| s.metadata.labels)
        .is_some_and(|l| l.contains_key(LABEL_BASE)))
}

/// Delete every temporary object of run `uid` in `namespace` found by its labels
/// (`strata.io/run-uid` and a datamover, volume or snapshot role), whatever the run's status
/// says: the Jobs first, as they use the claims, then the claims, then the snapshots. For a
/// run whose status lost volumes it had started (a status write that failed after the objects
/// were made) in a namespace where owner references cannot reach them. Restored claims carry
/// no run uid, and stay.
pub async fn cleanup_labelled(client: &Client, namespace: &str, uid: &str) -> Result<()> {
    let selector = |role: Role| {
        ListParams::default().labels(&format!(
            "{LABEL_RUN_UID}={},{LABEL_ROLE}={}",
            label_value(uid),
            role.as_str()
        ))
    };
    let names = |items: Vec<Option<String>>| items.into_iter().flatten().collect::<Vec<_>>();
    let jobs = Api::<Job>::namespaced(client.clone(), namespace)
        .list(&selector(Role::Datamover))
        .await
        .map_err(Error::kube(format!("list the run's Jobs in {namespace}")))?;
    for job in names(jobs.items.into_iter().map(|j| j.metadata.name).collect()) {
        delete_job(client, namespace, &job).await?;
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .list(&selector(Role::Volume))
        .await
        .map_err(Error::kube(format!("list the run's PVCs in {namespace}")))?;
    for claim in names(claims.items.into_iter().map(|c| c.metadata.name).collect()) {
        delete_pvc(client, namespace, &claim)
            .await
            .map_err(Error::csi(format!("delete PVC {namespace}/{claim}")))?;
    }
    // A cluster without the snapshot CRDs (Block volumes alone need none) has no snapshots.
    let snapshots = match Api::<VolumeSnapshot>::namespaced(client.clone(), namespace)
        .list(&selector(Role::Snapshot))
        .await
    {
        Ok(list) => list.items,
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(source) => {
            return Err(Error::Kube {
                operation: format!("list the run's VolumeSnapshots in {namespace}"),
                source,
            });
        }
    };
    for snapshot in names(snapshots.into_iter().map(|s| s.metadata.name).collect()) {
        delete_snapshot(client, namespace, &snapshot)
            .await
            .map_err(Error::csi(format!(
                "delete VolumeSnapshot {namespace}/{snapshot}"
            )))?;
    }
    Ok(())
}

/// Delete the run's temporary objects of every volume (named by `key`): the Job (with its
/// pods) first, as it uses the claim, then the claim, then the snapshot it was made from.
pub async fn cleanup(
    client: &Client,
    key: impl Fn(&VolumeStatus) -> VolumeKey,
    namespace: &str,
    volumes: &[VolumeStatus],
    what: Temporaries,
) -> Result<()> {
    let key = &key;
    try_join_all(volumes.iter().map(|v| async move {
        let key = key(v);
        delete_job(client, namespace, &key.name(Role::Datamover)).await?;
        if what != Temporaries::JobOnly {
            let claim = key.name(Role::Volume);
            delete_pvc(client, namespace, &claim)
                .await
                .map_err(Error::csi(format!("delete PVC {namespace}/{claim}")))?;
            let snapshot = key.name(Role::Snapshot);
            if what == Temporaries::AllButBase && is_base(client, namespace, &snapshot).await? {
                return Ok(());
            }
            delete_snapshot(client, namespace, &snapshot)
                .await
                .map_err(Error::csi(format!(
                    "delete VolumeSnapshot {namespace}/{snapshot}"
                )))?;
        }
        Ok::<_, Error>(())
    }))
    .await?;
    Ok(())
}
