//! The `Preparing` step of a Backup after the locks: a VolumeSnapshot per PVC and, once all
//! are ready, a Block-mode PVC from each snapshot and a datamover Job reading it.

use std::collections::BTreeSet;

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Api;

use super::Run;
use crate::context::TargetAccess;
use crate::crd::{BackupMode, BackupStatus, ChangeSource, VolumeStatus};
use crate::error::{Error, Result};
use crate::reconcile::cbt::{self, Plan};
use crate::reconcile::jobs::{Created, create_job};
use crate::reconcile::nodes::{NodeSlots, exclude, record_slots};
use crate::reconcile::volumes::snapshot_age;
use crate::status::{ConditionStatus, Phase, set_condition};
use strata_csi::client::{
    allow_volume_mode_change, create_or_get_pvc, create_or_get_snapshot, snapshot_class_for_pvc,
    storage_class_for_clone,
};
use strata_csi::datamover::{self, Attach, DatamoverSpec, Step};
use strata_csi::metadata::backup_job_with_changed_blocks;
use strata_csi::{
    ReadySnapshot, Role, SnapshotState, VolumeMode, changes_volume_mode, pvc_from_snapshot,
    volume_snapshot, waited_state,
};
use strata_target::VolumeName;

impl Run<'_> {
    /// Snapshot every volume; once all are ready, start datamovers, at most the Backup's
    /// `maxParallelVolumes` running at once (`copy` calls this again to start the rest). True
    /// when the datamovers were started.
    pub(super) async fn snapshot(&self, status: &mut BackupStatus) -> Result<bool> {
        let client = &self.ctx.client;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &self.namespace);
        let class = self.backup.spec.snapshot_class_name.as_deref();
        // Volumes already started have their snapshot and need nothing more here: their PVC
        // may be gone meanwhile (a StatefulSet scaled down), which must not fail the rest.
        let snapshots = try_join_all(status.volumes.iter().map(|v| {
            let claims = claims.clone();
            async move {
                if v.started || v.done {
                    return Ok::<_, Error>((Some(None), None));
                }
                let pvc = claims
                    .get_opt(&v.pvc)
                    .await
                    .map_err(Error::kube(format!("get PVC {}/{}", self.namespace, v.pvc)))?
                    .ok_or_else(|| Error::InvalidSpec {
                        what: "volume",
                        reason: format!("PVC {}/{} disappeared", self.namespace, v.pvc),
                    })?;
                let class = snapshot_class_for_pvc(client, &pvc, class)
                    .await
                    .map_err(Error::csi(format!("snapshot class for {}", v.pvc)))?;
                let wanted = volume_snapshot(
                    &self.key(v),
                    class.metadata.name.as_deref().unwrap_or_default(),
                );
                let snapshot = create_or_get_snapshot(client, &wanted)
                    .await
                    .map_err(Error::csi(format!("snapshot {}", v.pvc)))?;
                // The snapshot controller posts errors it retries and clears; only one that
                // outlasts the grace fails the run, as does a snapshot never ready in time.
                let state = waited_state(
                    &snapshot,
                    snapshot_age(&snapshot),
                    self.ctx.snapshot_limits(),
                )
                .map_err(Error::csi(format!("snapshot {}", v.pvc)))?;
                let ready = match state {
                    SnapshotState::Ready(ready) => Some(ready),
                    SnapshotState::Pending {
                        error: Some(message),
                    } => return Ok((None, Some(format!("{}: {message}", v.pvc)))),
                    _ => None,
                };
                Ok::<_, Error>((
                    ready.map(|ready| {
                        Some(Source {
                            pvc,
                            snapshot: ready,
                            driver: class.driver,
                        })
                    }),
                    None,
                ))
            }
        }))
        .await?;
        let (snapshots, errors): (Vec<_>, Vec<_>) = snapshots.into_iter().unzip();
        let errors: Vec<String> = errors.into_iter().flatten().collect();
        let total = snapshots.len();
        // Per volume: `None` until its snapshot is ready, `Some(None)` once started.
        let ready_count = snapshots.iter().filter(|s| s.is_some()).count();
        let sources: Vec<Option<Source>> = snapshots.into_iter().map(Option::flatten).collect();
        let generation = self.backup.metadata.generation;
        if ready_count < total {
            let mut message = format!("{ready_count} of {total} snapshots ready");
            if !errors.is_empty() {
                message.push_str(&format!(
                    "; the snapshot controller reports (retrying): {}",
                    errors.join("; ")
                ));
            }
            set_condition(
                &mut status.conditions,
                "SnapshotsReady",
                ConditionStatus::False,
                if errors.is_empty() {
                    "Waiting"
                } else {
                    "SnapshotError"
                },
                message,
                generation,
            );
            return Ok(false);
        }
        set_condition(
            &mut status.conditions,
            "SnapshotsReady",
            ConditionStatus::True,
            "Ready",
            format!("{total} snapshots ready"),
            generation,
        );
        // Start datamovers up to the limit; `copy` calls this again as they finish.
        let limit = self
            .backup
            .spec
            .max_parallel_volumes
            .map_or(self.ctx.max_parallel_volumes, |n| n as usize)
            .max(1);
        let active = status
            .volumes
            .iter()
            .filter(|v| v.started && !v.done)
            .count();
        let chosen: Vec<usize> = (0..status.volumes.len())
            .filter(|&i| !status.volumes[i].started && !status.volumes[i].done)
            .take(limit.saturating_sub(active))
            .collect();
        if chosen.is_empty() {
            status.phase = Some(Phase::Copying);
            return Ok(true);
        }
        let target = self.target().await?;
        let names: Vec<String> = chosen
            .iter()
            .map(|&i| status.volumes[i].volume.clone())
            .collect();
        let previous = target
            .with(move |t| {
                names
                    .iter()
                    .map(|n| {
                        let volume =
                            VolumeName::new(n.as_str()).map_err(Error::target("volume name"))?;
                        Ok(t.latest(&volume)
                            .map_err(Error::target(format!("latest backup of {n}")))?
                            .map(|m| m.id.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
        // A slot on some node for each (`nodes`), held until the Jobs exist; the volumes
        // without one wait, like those beyond the limit, for a datamover to end.
        let _counting = self.ctx.datamover_slots.lock().await;
        let mut slots = NodeSlots::read(client, self.ctx.max_datamovers_per_node).await?;
        let excluded: Vec<_> = chosen.iter().map_while(|_| slots.take()).collect();
        record_slots(
            &mut status.conditions,
            chosen.len() - excluded.len(),
            &slots,
            self.backup.metadata.generation,
        );
        // Chosen volumes are never started, so each has its snapshot's source.
        let chosen_sources = chosen
            .iter()
            .map(|&i| {
                sources[i].as_ref().ok_or_else(|| Error::InvalidSpec {
                    what: "volume",
                    reason: format!("no snapshot of {} to start from", status.volumes[i].pvc),
                })
            })
            .collect::<Result<Vec<&Source>>>()?;
        let started = try_join_all(
            chosen
                .iter()
                .zip(&chosen_sources)
                .zip(&previous)
                .zip(&excluded)
                .map(|(((&i, source), previous), excluded)| {
                    self.start_datamover(
                        &status.volumes[i],
                        source,
                        previous.as_deref(),
                        &target,
                        excluded,
                    )
                }),
        )
        .await?;
        let mut any_new = false;
        for ((&i, (created, plan)), previous) in chosen.iter().zip(started).zip(previous) {
            let Some(volume) = status.volumes.get_mut(i) else {
                continue;
            };
            volume.started = true;
            // A Job found rather than created may already have written its backup, so the
            // latest id now proves nothing; the id is then taken as it is when the Job ends.
            // The same goes for the plan, which the existing Job may not have followed.
            if created != Created::New {
                continue;
            }
            any_new = true;
            volume.previous_backup_id = previous;
            match plan {
                None => volume.change_source = Some(ChangeSource::Full),
                Some(Plan::ChangedBlocks { snapshot, .. }) => {
                    volume.change_source = Some(ChangeSource::ChangedBlocks);
                    volume.base_snapshot = Some(snapshot);
                }
                Some(Plan::Digests(why)) => {
                    volume.change_source = Some(ChangeSource::Digests);
                    volume.digests_reason = Some(why);
                }
            }
        }
        if any_new && self.backup.spec.mode == BackupMode::Incremental {
            self.record_change_tracking(status);
        }
        status.phase = Some(Phase::Copying);
        Ok(true)
    }

    /// The `ChangedBlockTracking` condition: whether every incremental lists changed blocks,
    /// and why the others compare digests, over all the volumes started so far (with
    /// `maxParallelVolumes` they start in batches).
    fn record_change_tracking(&self, status: &mut BackupStatus) {
        let fallbacks: Vec<String> = status
            .volumes
            .iter()
            .filter(|v| v.change_source == Some(ChangeSource::Digests))
            .map(|v| {
                let why = v.digests_reason.as_deref().unwrap_or("reason not recorded");
                format!("{}: {why}", v.pvc)
            })
            .collect();
        let tracked = status
            .volumes
            .iter()
            .filter(|v| v.change_source == Some(ChangeSource::ChangedBlocks))
            .count();
        let total = status.volumes.len();
        let mut message = format!("{tracked} of {total} volumes list changed blocks");
        let (state, reason) = if fallbacks.is_empty() {
            (ConditionStatus::True, "ChangedBlocks")
        } else {
            message.push_str("; digests for ");
            message.push_str(&fallbacks.join("; "));
            (ConditionStatus::False, "Digests")
        };
        set_condition(
            &mut status.conditions,
            "ChangedBlockTracking",
            state,
            reason,
            message,
            self.backup.metadata.generation,
        );
    }

    /// The temporary Block-mode PVC from the snapshot and the datamover Job reading it, which
    /// for an incremental follows the [`Plan`] returned (`None` for a full backup).
    async fn start_datamover(
        &self,
        volume: &VolumeStatus,
        source: &Source,
        latest: Option<&str>,
        target: &TargetAccess,
        excluded_nodes: &BTreeSet<String>,
    ) -> Result<(Created, Option<Plan>)> {
        let Source {
            pvc,
            snapshot,
            driver,
        } = source;
        let client = &self.ctx.client;
        let key = self.key(volume);
        if changes_volume_mode(pvc, VolumeMode::Block) {
            allow_volume_mode_change(client, &snapshot.content)
                .await
                .map_err(Error::csi(format!(
                    "Block PVC from the snapshot of {}",
                    volume.pvc
                )))?;
        }
        // A claim without a class (statically provisioned) clones into a class of its driver.
        let mut source_pvc = pvc.clone();
        if let Some(spec) = source_pvc.spec.as_mut() {
            spec.storage_class_name = Some(
                storage_class_for_clone(client, pvc, driver)
                    .await
                    .map_err(Error::csi(format!(
                        "storage class for a clone of {}",
                        volume.pvc
                    )))?,
            );
        }
        let claim = pvc_from_snapshot(
            &key,
            &source_pvc,
            &key.name(Role::Snapshot),
            snapshot.restore_size.as_ref(),
            VolumeMode::Block,
        )
        .map_err(Error::csi(format!(
            "PVC from the snapshot of {}",
            volume.pvc
        )))?;
        create_or_get_pvc(client, &claim)
            .await
            .map_err(Error::csi(format!(
                "PVC from the snapshot of {}",
                volume.pvc
            )))?;
        let mut spec = DatamoverSpec::new(
            key.clone(),
            &self.ctx.image,
            key.name(Role::Volume),
            Attach::Block,
            &target.url,
            &volume.volume,
        );
        spec.credentials_secret = target.credentials_secret.clone();
        spec.service_account = self.ctx.datamover_service_account.clone();
        spec.target_mount = target.mount.clone();
        spec.node_affinity = exclude(spec.node_affinity.take(), excluded_nodes);
        spec.active_deadline_seconds = self
            .ctx
            .datamover_deadline
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let plan = match self.backup.spec.mode {
            BackupMode::Full => None,
            BackupMode::Incremental => Some(
                cbt::plan(
                    client,
                    &self.namespace,
                    (&volume.pvc, pvc.metadata.uid.as_deref()),
                    driver,
                    latest,
                )
                .await?,
            ),
        };
        let job = match &plan {
            Some(Plan::ChangedBlocks { base, .. }) => {
                backup_job_with_changed_blocks(&spec, &key.name(Role::Snapshot), base)
            }
            _ => datamover::job(
                &spec,
                &Step::Backup {
                    full: plan.is_none(),
                    changed_ranges: None,
                    changed_since: None,
                },
            ),
        }
        .map_err(Error::csi(format!("datamover of {}", volume.pvc)))?;
        Ok((create_job(client, &job).await?, plan))
    }
}

/// A volume's snapshot, ready, and where it came from.
struct Source {
    /// The PVC snapshotted.
    pvc: PersistentVolumeClaim,
    /// Its ready snapshot.
    snapshot: ReadySnapshot,
    /// The CSI driver of the snapshot class.
    driver: String,
}
