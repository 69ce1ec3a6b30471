//! Reconciling a Restore: the reverse of a backup, one step per call.
//!
//! | phase       | the call                                                                     |
//! |-------------|------------------------------------------------------------------------------|
//! | (none)      | validates (the Backup is Completed, its archive reads), applies the          |
//! |             | Namespace, recreates the PVCs and starts a restore datamover per volume      |
//! | `Copying`   | reads the Jobs; a failed one fails the Restore with the Job's message        |
//! | `Finishing` | applies the other objects in restore order (server-side apply), deletes Jobs |
//! | final       | nothing                                                                      |
//!
//! The volumes are filled before the workloads that use them exist, so no pod sees a
//! half-restored volume. The datamover writes the raw device, so restored PVCs must be
//! `volumeMode: Block`; a Filesystem PVC is refused with a clear condition for now (it needs a
//! Block staging volume and a second snapshot, not built yet).

use std::collections::BTreeMap;

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fail;
use super::jobs::create_job;
use super::volumes::{Temporaries, cleanup, finished_jobs, progress};
use crate::csi::VolumeKey;
use crate::csi::datamover::{Attach, DatamoverSpec, restore_job};
use crate::csi::naming::{LABEL_RUN, label_value};
use crate::discovery::restore::{ApplyOptions, ExistingPolicy, apply};
use crate::discovery::{MetadataBackup, RestoreOrder, RestorePlan, Transforms};
use crate::operator::context::{Context, TargetAccess, volume_name};
use crate::operator::crd::{
    Backup, BackupStatus, ExistingObjects, Restore, RestoreStatus, VolumeStatus,
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
    let run = Run {
        restore,
        ctx,
        namespace: restore
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingMetadata {
                kind: "Restore",
                field: "metadata.namespace",
            })?,
        name: restore
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingMetadata {
                kind: "Restore",
                field: "metadata.name",
            })?,
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
        let api: Api<Restore> = Api::namespaced(ctx.client.clone(), &run.namespace);
        api.patch_status(
            &run.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(Error::kube(format!(
            "update status of Restore {}/{}",
            run.namespace, run.name
        )))?;
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
            let namespace = self.source_namespace().await?;
            let restored = self.restored_namespace(&namespace);
            finished_jobs(&self.ctx.client, &self.name, &restored, &mut status.volumes).await?;
            let progress = progress(&status.volumes);
            let all = progress.volumes_done == progress.volumes_total;
            set_condition(
                &mut status.conditions,
                "VolumesRestored",
                if all {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                if all { "Restored" } else { "Copying" },
                format!(
                    "{} of {} volumes restored",
                    progress.volumes_done, progress.volumes_total
                ),
                self.restore.metadata.generation,
            );
            status.progress = Some(progress);
            if !all {
                return Ok(Action::requeue(self.ctx.poll));
            }
            status.phase = Some(Phase::Finishing);
        }
        if status.phase == Some(Phase::Finishing) {
            let Some(source) = self.source(status).await? else {
                return Ok(Action::requeue(self.ctx.poll));
            };
            self.apply_objects(status, &source).await?;
        }
        Ok(Action::await_change())
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
            if volume.volume_mode != "Block" {
                return Err(Error::InvalidSpec {
                    what: "volume",
                    reason: format!(
                        "PVC {}/{} is {}; restoring non-Block volumes is not supported yet",
                        volume.namespace, volume.pvc, volume.volume_mode
                    ),
                });
            }
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

    /// Create the PVC (labelled with this run) and its restore datamover.
    async fn restore_volume(
        &self,
        claim: Value,
        volume: &VolumeStatus,
        namespace: &str,
        target: &TargetAccess,
    ) -> Result<()> {
        let client = &self.ctx.client;
        let mut pvc: PersistentVolumeClaim =
            serde_json::from_value(claim).map_err(|e| Error::InvalidSpec {
                what: "archived PVC",
                reason: e.to_string(),
            })?;
        pvc.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL_RUN.to_owned(), label_value(&self.name));
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        match api.create(&PostParams::default(), &pvc).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = api
                    .get(&volume.pvc)
                    .await
                    .map_err(Error::kube(format!("get PVC {namespace}/{}", volume.pvc)))?;
                let run = existing
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_RUN));
                if run != Some(&label_value(&self.name)) {
                    return Err(Error::InvalidSpec {
                        what: "volume",
                        reason: format!(
                            "PVC {namespace}/{} already exists; delete it or restore into another namespace",
                            volume.pvc
                        ),
                    });
                }
            }
            Err(source) => {
                return Err(Error::Kube {
                    operation: format!("create PVC {namespace}/{}", volume.pvc),
                    source,
                });
            }
        }
        let key = VolumeKey::new(&self.name, namespace, &volume.pvc);
        let mut spec = DatamoverSpec::new(
            key,
            &self.ctx.image,
            &volume.pvc,
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

    /// Apply everything but the restored PVCs, then delete the Jobs.
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
        status.phase = Some(Phase::Completed);
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
