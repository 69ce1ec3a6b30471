//! Reconciling a Restore: the reverse of a backup, one step per call.
//!
//! | phase       | the call                                                                     |
//! |-------------|------------------------------------------------------------------------------|
//! | (none)      | validates (the Backup is Completed, its archive reads), applies the          |
//! |             | Namespace, recreates the Block PVCs, makes a Block staging PVC for each      |
//! |             | Filesystem one, and starts a restore datamover per volume                    |
//! | `Copying`   | reads the Jobs; a failed one fails the Restore with the Job's message; a     |
//! |             | filled staging PVC is snapshotted, and its Filesystem PVC made from that     |
//! | `Finishing` | applies the other objects in restore order (server-side apply), deletes Jobs;|
//! |             | deletes each staging PVC and snapshot once its PVC is Bound                  |
//! | final       | nothing                                                                      |
//!
//! The volumes are filled before the workloads that use them exist, so no pod sees a
//! half-restored volume. The datamover writes the raw device: a `volumeMode: Block` PVC is
//! recreated and filled in place; a Filesystem PVC is filled through a Block staging PVC and a
//! snapshot of it, from which the PVC is provisioned (see the `staging` module). No step waits
//! for a PVC to bind before the workloads are applied, as a `WaitForFirstConsumer` PVC binds
//! only once a pod uses it; the staging snapshot is kept until then, with the Restore in
//! `Finishing` and condition `StagingCleanedUp` False.
//!
//! A call may run several steps; it writes the status once, at the end. Every step tolerates
//! having run before (deterministic names, create-or-adopt), so an interrupted call is repeated;
//! Finishing, which deletes the Jobs that Copying reads, starts only in a call that finds the
//! status already saying Finishing.

use std::collections::BTreeMap;

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Api;
use kube::runtime::controller::Action;
use serde_json::Value;

use super::jobs::create_job;
use super::staging::{
    awaits_binding, awaits_snapshot, clean_up_once_bound, create_staging, needs_staging, provision,
};
use super::volumes::{Temporaries, cleanup, create_claim, finished_jobs, label_restored, progress};
use super::{fail, namespace_and_name, patch_status};
use crate::csi::VolumeKey;
use crate::csi::datamover::{Attach, DatamoverSpec, restore_job};
use crate::discovery::restore::{ApplyOptions, ExistingPolicy, apply};
use crate::discovery::{MetadataBackup, RestoreOrder, RestorePlan, Transforms};
use crate::operator::context::{Context, TargetAccess, volume_name};
use crate::operator::crd::{
    Backup, BackupStatus, ExistingObjects, Restore, RestoreStatus, Staging, VolumeStatus,
};
use crate::operator::error::{Error, Result};
use crate::operator::status::{ConditionStatus, Phase, quantity_bytes, set_condition};
use crate::target::{AppBackupId, AppName};

/// One reconcile of a Restore.
struct Run<'a> {
    restore: &'a Restore,
    ctx: &'a Context,
    namespace: String,
    name: String,
}

/// What the Backup being restored provides.
struct Source {
    backup: BackupStatus,
    target: TargetAccess,
    metadata: MetadataBackup,
    /// Namespace of the backed-up application.
    namespace: String,
}

/// Move `restore` one step forward and write its status; the returned action says when to look
/// again. A finished Restore is left alone without any API call.
pub async fn reconcile_restore(restore: &Restore, ctx: &Context) -> Result<Action> {
    let mut status = restore.status.clone().unwrap_or_default();
    if status.phase.is_some_and(Phase::is_final) {
        return Ok(Action::await_change());
    }
    let (namespace, name) = namespace_and_name(restore, "Restore")?;
    let run = Run {
        restore,
        ctx,
        namespace,
        name,
    };
    let before = status.clone();
    let generation = restore.metadata.generation;
    let action = match run.step(&mut status).await {
        Ok(action) => action,
        Err(err) if err.is_permanent() => {
            fail(&mut status.conditions, &err, generation);
            status.phase = Some(Phase::Failed);
            Action::await_change()
        }
        Err(err) => return Err(err),
    };
    status.observed_generation = generation;
    if status != before {
        patch_status::<Restore>(&ctx.client, &run.namespace, &run.name, &status).await?;
    }
    Ok(action)
}

impl Run<'_> {
    /// Where the application's namespace is restored to.
    fn restored_namespace(&self, source: &str) -> String {
        self.restore
            .spec
            .namespace_mapping
            .get(source)
            .cloned()
            .unwrap_or_else(|| source.to_owned())
    }

    async fn step(&self, status: &mut RestoreStatus) -> Result<Action> {
        if matches!(status.phase, None | Some(Phase::Pending | Phase::Preparing)) {
            let Some(source) = self.source(status).await? else {
                return Ok(Action::requeue(self.ctx.poll));
            };
            self.prepare(status, &source).await?;
        }
        if status.phase == Some(Phase::Copying) {
            self.copy(status).await?;
            // Finishing deletes the Jobs, which Copying reads: it runs in the next call, once
            // the status says Finishing, so a call interrupted before writing the status never
            // leaves a Copying run without its Jobs.
            return Ok(Action::requeue(self.ctx.poll));
        }
        if status.phase == Some(Phase::Finishing) {
            if status.objects_applied.is_none() {
                let Some(source) = self.source(status).await? else {
                    return Ok(Action::requeue(self.ctx.poll));
                };
                self.apply_objects(status, &source).await?;
            }
            if !self.clean_up_staging(status).await? {
                return Ok(Action::requeue(self.ctx.poll));
            }
            status.phase = Some(Phase::Completed);
        }
        Ok(Action::await_change())
    }

    /// Read the datamovers, and make the Filesystem PVCs of the filled staging volumes; once
    /// every volume is settled, move to Finishing.
    async fn copy(&self, status: &mut RestoreStatus) -> Result<()> {
        let restored = self.restored_namespace(&self.source_namespace().await?);
        finished_jobs(&self.ctx.client, &self.name, &restored, &mut status.volumes).await?;
        if status.volumes.iter().any(awaits_snapshot) {
            let Some(source) = self.source(status).await? else {
                return Ok(());
            };
            self.provision_from_staging(status, &source, &restored)
                .await?;
        }
        let progress = progress(&status.volumes);
        let all = progress.volumes_done == progress.volumes_total;
        let copying = status.volumes.iter().any(|v| !v.done);
        let snapshotting = status.volumes.iter().filter(|v| awaits_snapshot(v)).count();
        let mut message = format!(
            "{} of {} volumes restored",
            progress.volumes_done, progress.volumes_total
        );
        if snapshotting > 0 {
            message.push_str(&format!(
                "; {snapshotting} waiting for the snapshot of their staging volume"
            ));
        }
        set_condition(
            &mut status.conditions,
            "VolumesRestored",
            if all {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            match (all, copying) {
                (true, _) => "Restored",
                (false, true) => "Copying",
                (false, false) => "Snapshotting",
            },
            message,
            self.restore.metadata.generation,
        );
        status.progress = Some(progress);
        if all {
            status.phase = Some(Phase::Finishing);
        }
        Ok(())
    }

    /// Snapshot the filled staging volumes and make their Filesystem PVCs from the snapshots.
    async fn provision_from_staging(
        &self,
        status: &mut RestoreStatus,
        source: &Source,
        restored: &str,
    ) -> Result<()> {
        let plan = self.plan(&source.metadata)?;
        let class = self.restore.spec.snapshot_class_name.as_deref();
        try_join_all(
            status
                .volumes
                .iter_mut()
                .filter(|v| awaits_snapshot(v))
                .map(|volume| {
                    let claim = plan
                        .objects
                        .iter()
                        .find(|o| is_claim(o, restored, &volume.pvc))
                        .cloned();
                    async move {
                        let claim = claim.ok_or_else(|| Error::InvalidSpec {
                            what: "spec.backupRef",
                            reason: format!("the archive has no PVC {restored}/{}", volume.pvc),
                        })?;
                        let claim = self.restored_claim(claim)?;
                        let key = VolumeKey::new(&self.name, restored, &volume.pvc);
                        provision(&self.ctx.client, &key, volume, claim, class, &self.name).await
                    }
                }),
        )
        .await?;
        Ok(())
    }

    /// Delete the staging objects of the volumes whose PVC is Bound; true once none is left.
    async fn clean_up_staging(&self, status: &mut RestoreStatus) -> Result<bool> {
        if !status.volumes.iter().any(|v| v.staging.is_some()) {
            return Ok(true);
        }
        let restored = self.restored_namespace(&self.source_namespace().await?);
        let waiting: Vec<String> = try_join_all(
            status
                .volumes
                .iter_mut()
                .filter(|v| awaits_binding(v))
                .map(|volume| {
                    let key = VolumeKey::new(&self.name, &restored, &volume.pvc);
                    async move {
                        let pvc = volume.pvc.clone();
                        let phase = clean_up_once_bound(&self.ctx.client, &key, volume).await?;
                        Ok::<_, Error>(phase.map(|phase| format!("{pvc} is {phase}")))
                    }
                }),
        )
        .await?
        .into_iter()
        .flatten()
        .collect();
        let staged = status
            .volumes
            .iter()
            .filter(|v| v.staging.is_some())
            .count();
        let generation = self.restore.metadata.generation;
        if waiting.is_empty() {
            set_condition(
                &mut status.conditions,
                "StagingCleanedUp",
                ConditionStatus::True,
                "CleanedUp",
                format!("the staging PVCs and snapshots of {staged} Filesystem volumes deleted"),
                generation,
            );
            return Ok(true);
        }
        set_condition(
            &mut status.conditions,
            "StagingCleanedUp",
            ConditionStatus::False,
            "WaitingForBinding",
            format!(
                "{}; each staging snapshot is kept until its PVC is Bound (with a \
                 WaitForFirstConsumer StorageClass, once a pod using the PVC is scheduled)",
                waiting.join(", ")
            ),
            generation,
        );
        Ok(false)
    }

    /// The namespace of the Backup being restored (the Backup's own).
    async fn source_namespace(&self) -> Result<String> {
        Ok(self.backup().await?.metadata.namespace.unwrap_or_default())
    }

    async fn backup(&self) -> Result<Backup> {
        let name = &self.restore.spec.backup_ref.name;
        let backups: Api<Backup> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        backups
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("get Backup {}/{name}", self.namespace)))?
            .ok_or_else(|| Error::InvalidSpec {
                what: "spec.backupRef",
                reason: format!("Backup {}/{name} does not exist", self.namespace),
            })
    }

    /// The Backup, its target and its metadata; `None` (with a condition) while the Backup is
    /// still running.
    async fn source(&self, status: &mut RestoreStatus) -> Result<Option<Source>> {
        let backup = self.backup().await?;
        let name = &self.restore.spec.backup_ref.name;
        let backup_status = backup.status.clone().unwrap_or_default();
        match backup_status.phase {
            Some(Phase::Completed) => {}
            Some(Phase::Failed) => {
                return Err(Error::InvalidSpec {
                    what: "spec.backupRef",
                    reason: format!("Backup {name} failed"),
                });
            }
            phase => {
                set_condition(
                    &mut status.conditions,
                    "Validated",
                    ConditionStatus::False,
                    "BackupNotCompleted",
                    format!("Backup {name} is {phase:?}; waiting for it to complete"),
                    self.restore.metadata.generation,
                );
                return Ok(None);
            }
        }
        let (Some(app), Some(id)) = (
            backup_status.application_name.clone(),
            backup_status.backup_id.clone(),
        ) else {
            return Err(Error::InvalidSpec {
                what: "spec.backupRef",
                reason: format!("Backup {name} is Completed but names no application backup"),
            });
        };
        let app = AppName::new(app).map_err(Error::target("application name"))?;
        let id = AppBackupId::new(id).map_err(Error::target("backup id"))?;
        let target = TargetAccess::resolve(
            &self.ctx.client,
            &self.namespace,
            &backup.spec.target_ref.name,
        )
        .await?;
        let archive = target
            .with(move |t| {
                t.read_app_archive(&app, &id)
                    .map_err(Error::target(format!("read the archive of {app}/{id}")))
            })
            .await?;
        let metadata = MetadataBackup::read_archive(&archive[..])
            .map_err(Error::discovery("read the metadata archive"))?;
        Ok(Some(Source {
            backup: backup_status,
            target,
            metadata,
            namespace: backup.metadata.namespace.unwrap_or_default(),
        }))
    }

    fn plan(&self, metadata: &MetadataBackup) -> Result<RestorePlan> {
        let transforms = Transforms {
            namespaces: self.restore.spec.namespace_mapping.clone(),
            storage_classes: self.restore.spec.storage_class_mapping.clone(),
            ..Default::default()
        };
        RestorePlan::new(
            metadata.objects.clone(),
            &RestoreOrder::default(),
            &transforms,
        )
        .map_err(Error::discovery("plan the restore"))
    }

    /// Validate, recreate the PVCs and start a restore datamover per volume.
    async fn prepare(&self, status: &mut RestoreStatus, source: &Source) -> Result<()> {
        let restored = self.restored_namespace(&source.namespace);
        let plan = self.plan(&source.metadata)?;
        let backup_ids: BTreeMap<&str, &str> = source
            .backup
            .volumes
            .iter()
            .filter_map(|v| Some((v.volume.as_str(), v.backup_id.as_deref()?)))
            .collect();
        let mut claims = Vec::new();
        let mut volumes = Vec::new();
        for volume in &source.metadata.volumes {
            let name = volume_name(&volume.namespace, &volume.pvc)?.to_string();
            let backup_id = backup_ids
                .get(name.as_str())
                .ok_or_else(|| Error::InvalidSpec {
                    what: "spec.backupRef",
                    reason: format!("the Backup has no volume backup of {name}"),
                })?;
            let claim = plan
                .objects
                .iter()
                .find(|o| is_claim(o, &restored, &volume.pvc))
                .ok_or_else(|| Error::InvalidSpec {
                    what: "spec.backupRef",
                    reason: format!("the archive has no PVC {}/{}", volume.namespace, volume.pvc),
                })?;
            claims.push(claim.clone());
            volumes.push(VolumeStatus {
                pvc: volume.pvc.clone(),
                volume: name,
                size_bytes: volume.size.as_deref().and_then(quantity_bytes),
                backup_id: Some((*backup_id).to_owned()),
                staging: needs_staging(&volume.volume_mode).then_some(Staging::Filling),
                ..Default::default()
            });
        }
        set_condition(
            &mut status.conditions,
            "Validated",
            ConditionStatus::True,
            "Validated",
            format!(
                "{} objects, {} volumes from backup {}",
                plan.objects.len(),
                volumes.len(),
                source.backup.backup_id.as_deref().unwrap_or_default()
            ),
            self.restore.metadata.generation,
        );
        // The Namespace first, so the claims have somewhere to go.
        let namespaces = RestorePlan {
            objects: plan
                .objects
                .iter()
                .filter(|o| o["kind"] == "Namespace" && o["apiVersion"] == "v1")
                .cloned()
                .collect(),
        };
        apply(&self.ctx.client, &namespaces, &self.apply_options())
            .await
            .map_err(Error::discovery("apply the Namespace"))?;
        try_join_all(
            claims.into_iter().zip(&volumes).map(|(claim, volume)| {
                self.restore_volume(claim, volume, &restored, &source.target)
            }),
        )
        .await?;
        status.backup_id = source.backup.backup_id.clone();
        status.progress = Some(progress(&volumes));
        status.volumes = volumes;
        status.phase = Some(Phase::Copying);
        Ok(())
    }

    fn apply_options(&self) -> ApplyOptions {
        ApplyOptions {
            field_manager: self.ctx.field_manager.clone(),
            existing: match self.restore.spec.existing_objects {
                ExistingObjects::Skip => ExistingPolicy::Skip,
                ExistingObjects::Update => ExistingPolicy::Update,
            },
            ..Default::default()
        }
    }

    /// The archived (mapped) claim `claim`, labelled with this run.
    fn restored_claim(&self, claim: Value) -> Result<PersistentVolumeClaim> {
        let mut pvc: PersistentVolumeClaim =
            serde_json::from_value(claim).map_err(|e| Error::InvalidSpec {
                what: "archived PVC",
                reason: e.to_string(),
            })?;
        label_restored(&mut pvc, &self.name);
        Ok(pvc)
    }

    /// Create the PVC (labelled with this run), or for a Filesystem one its Block staging PVC,
    /// and the restore datamover that fills it.
    async fn restore_volume(
        &self,
        claim: Value,
        volume: &VolumeStatus,
        namespace: &str,
        target: &TargetAccess,
    ) -> Result<()> {
        let client = &self.ctx.client;
        let pvc = self.restored_claim(claim)?;
        let key = VolumeKey::new(&self.name, namespace, &volume.pvc);
        let filled = if volume.staging.is_some() {
            create_staging(client, &key, &pvc, volume.size_bytes, &self.name).await?
        } else {
            create_claim(client, &pvc, &self.name).await?;
            volume.pvc.clone()
        };
        let mut spec = DatamoverSpec::new(
            key,
            &self.ctx.image,
            filled,
            Attach::Block,
            &target.url,
            &volume.volume,
        );
        spec.credentials_secret = target.credentials_secret.clone();
        spec.service_account = self.ctx.datamover_service_account.clone();
        let job = restore_job(&spec, volume.backup_id.as_deref())
            .map_err(Error::csi(format!("datamover of {}", volume.pvc)))?;
        create_job(client, &job, &self.name).await?;
        Ok(())
    }

    /// Apply everything but the restored PVCs, then delete the Jobs; the counts in the status
    /// record that it was done.
    async fn apply_objects(&self, status: &mut RestoreStatus, source: &Source) -> Result<()> {
        let restored = self.restored_namespace(&source.namespace);
        let mut plan = self.plan(&source.metadata)?;
        plan.objects.retain(|o| {
            !status
                .volumes
                .iter()
                .any(|v| is_claim(o, &restored, &v.pvc))
        });
        let report = apply(&self.ctx.client, &plan, &self.apply_options())
            .await
            .map_err(Error::discovery("apply the objects"))?;
        cleanup(
            &self.ctx.client,
            &self.name,
            &restored,
            &status.volumes,
            Temporaries::JobOnly,
        )
        .await?;
        status.objects_applied = Some(u32::try_from(report.applied.len()).unwrap_or(u32::MAX));
        status.objects_skipped = Some(u32::try_from(report.skipped.len()).unwrap_or(u32::MAX));
        set_condition(
            &mut status.conditions,
            "ObjectsApplied",
            ConditionStatus::True,
            "Applied",
            format!(
                "{} applied, {} skipped as existing",
                report.applied.len(),
                report.skipped.len()
            ),
            self.restore.metadata.generation,
        );
        Ok(())
    }
}

/// Whether `object` is PVC `namespace/name`.
fn is_claim(object: &Value, namespace: &str, name: &str) -> bool {
    object["apiVersion"] == "v1"
        && object["kind"] == "PersistentVolumeClaim"
        && object["metadata"]["namespace"] == namespace
        && object["metadata"]["name"] == name
}
