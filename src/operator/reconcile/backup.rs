//! Reconciling a Backup: discover, snapshot, copy, commit, in that order, one step per call.
//!
//! | phase       | the call                                                                     |
//! |-------------|------------------------------------------------------------------------------|
//! | (none)      | discovers the application, stashes its metadata archive, lists its volumes   |
//! | `Preparing` | creates a VolumeSnapshot per PVC; once all are ready, a Block-mode PVC from  |
//! |             | each and a datamover Job per volume, all at once                             |
//! | `Copying`   | reads the Jobs; a failed one fails the Backup with the Job's message         |
//! | `Finishing` | commits the application backup (archive + volume backup ids), applies       |
//! |             | retention, deletes the temporary objects as the cleanup policy says          |
//! | final       | nothing                                                                      |
//!
//! A call may run several steps when nothing needs waiting for; it writes the status once, at
//! the end. Every step tolerates having run before, so a call that crashed half-way is simply
//! repeated.

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource};
use serde_json::json;

use super::fail;
use super::jobs::{Created, create_job};
use super::stash;
use super::volumes::{Temporaries, cleanup, finished_jobs, progress};
use crate::csi::client::{
    allow_volume_mode_change, create_or_get_pvc, create_or_get_snapshot, snapshot_class_for_pvc,
};
use crate::csi::datamover::{Attach, DatamoverSpec, backup_job};
use crate::csi::{
    ReadySnapshot, Role, VolumeKey, VolumeMode, changes_volume_mode, pvc_from_snapshot,
    ready_or_failed, volume_snapshot,
};
use crate::discovery::{Inventory, LiveSource, MetadataBackup, RestoreOrder, discover};
use crate::operator::context::{Context, TargetAccess, volume_name};
use crate::operator::crd::{Backup, BackupMode, BackupStatus, CleanupPolicy, VolumeStatus};
use crate::operator::error::{Error, Result};
use crate::operator::status::{ConditionStatus, Phase, quantity_bytes, set_condition};
use crate::target::{AppBackupId, AppName, BackupId, VolumeBackupRef, VolumeName};

/// One reconcile of a Backup.
struct Run<'a> {
    backup: &'a Backup,
    ctx: &'a Context,
    namespace: String,
    name: String,
}

/// Move `backup` one step forward and write its status; the returned action says when to look
/// again. A finished Backup (Completed or Failed) is left alone without any API call.
pub async fn reconcile_backup(backup: &Backup, ctx: &Context) -> Result<Action> {
    let mut status = backup.status.clone().unwrap_or_default();
    if status.phase.is_some_and(Phase::is_final) {
        return Ok(Action::await_change());
    }
    let run = Run {
        backup,
        ctx,
        namespace: backup
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingMetadata {
                kind: "Backup",
                field: "metadata.namespace",
            })?,
        name: backup.metadata.name.clone().ok_or(Error::MissingMetadata {
            kind: "Backup",
            field: "metadata.name",
        })?,
    };
    let before = status.clone();
    let generation = backup.metadata.generation;
    let action = match run.step(&mut status).await {
        Ok(action) => action,
        Err(err) if err.is_permanent() => {
            if backup.spec.cleanup == CleanupPolicy::Always {
                run.cleanup(&status).await?;
            }
            fail(&mut status.conditions, &err, generation);
            status.phase = Some(Phase::Failed);
            Action::await_change()
        }
        Err(err) => return Err(err),
    };
    status.observed_generation = generation;
    if status != before {
        let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &run.namespace);
        api.patch_status(
            &run.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(Error::kube(format!(
            "update status of Backup {}/{}",
            run.namespace, run.name
        )))?;
    }
    Ok(action)
}

impl Run<'_> {
    fn requeue(&self) -> Action {
        Action::requeue(self.ctx.poll)
    }

    fn key(&self, volume: &VolumeStatus) -> VolumeKey {
        VolumeKey::new(&self.name, &self.namespace, &volume.pvc)
    }

    async fn target(&self) -> Result<TargetAccess> {
        TargetAccess::resolve(
            &self.ctx.client,
            &self.namespace,
            &self.backup.spec.target_ref.name,
        )
        .await
    }

    async fn step(&self, status: &mut BackupStatus) -> Result<Action> {
        if matches!(status.phase, None | Some(Phase::Pending)) {
            self.discover(status).await?;
        }
        if status.phase == Some(Phase::Preparing) && !self.snapshot(status).await? {
            return Ok(self.requeue());
        }
        if status.phase == Some(Phase::Copying) && !self.copy(status).await? {
            return Ok(self.requeue());
        }
        if status.phase == Some(Phase::Finishing) {
            self.commit(status).await?;
        }
        Ok(Action::await_change())
    }

    /// Discover the application, stash its metadata, list its volumes.
    async fn discover(&self, status: &mut BackupStatus) -> Result<()> {
        let spec = &self.backup.spec;
        if spec.application.is_empty() {
            return Err(Error::InvalidSpec {
                what: "spec.application",
                reason: "selects nothing: name Helm releases, operators or selectors".into(),
            });
        }
        let app_name = spec
            .application_name
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        AppName::new(&app_name).map_err(Error::target("application name"))?;
        AppBackupId::new(&self.name).map_err(Error::target("backup id"))?;
        self.target().await?;
        let app_spec = spec
            .application
            .app_spec(&self.namespace)
            .map_err(Error::discovery("spec.application.selectors"))?;
        let client = &self.ctx.client;
        let inventory = Inventory::collect(
            &LiveSource::new(client.clone()),
            std::slice::from_ref(&self.namespace),
        )
        .await
        .map_err(Error::discovery(format!(
            "read namespace {}",
            self.namespace
        )))?;
        let app = discover(&inventory, &app_spec)
            .map_err(Error::discovery("discover the application"))?;
        let metadata = MetadataBackup::from_application(&app, &RestoreOrder::default())
            .map_err(Error::discovery("sanitize the objects"))?;
        let archive = metadata
            .write_archive(Vec::new())
            .map_err(Error::discovery("write the metadata archive"))?;
        let owner = self
            .backup
            .controller_owner_ref(&())
            .ok_or(Error::MissingMetadata {
                kind: "Backup",
                field: "metadata.uid",
            })?;
        stash::store(client, &self.namespace, &self.name, owner, archive).await?;
        status.volumes = app
            .volumes
            .iter()
            .map(|v| {
                Ok(VolumeStatus {
                    pvc: v.pvc.clone(),
                    volume: volume_name(&v.namespace, &v.pvc)?.to_string(),
                    size_bytes: v.size.as_deref().and_then(quantity_bytes),
                    ..Default::default()
                })
            })
            .collect::<Result<_>>()?;
        status.application_name = Some(app_name);
        status.progress = Some(progress(&status.volumes));
        set_condition(
            &mut status.conditions,
            "Discovered",
            ConditionStatus::True,
            "Discovered",
            format!(
                "{} objects, {} volumes",
                metadata.objects.len(),
                status.volumes.len()
            ),
            self.backup.metadata.generation,
        );
        status.phase = Some(Phase::Preparing);
        Ok(())
    }

    /// Snapshot every volume; once all are ready, start a datamover per volume. True when the
    /// datamovers were started.
    async fn snapshot(&self, status: &mut BackupStatus) -> Result<bool> {
        let client = &self.ctx.client;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &self.namespace);
        let class = self.backup.spec.snapshot_class_name.as_deref();
        let snapshots = try_join_all(status.volumes.iter().map(|v| {
            let claims = claims.clone();
            async move {
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
                let ready = ready_or_failed(&snapshot)
                    .map_err(Error::csi(format!("snapshot {}", v.pvc)))?;
                Ok::<_, Error>((pvc, ready))
            }
        }))
        .await?;
        let total = snapshots.len();
        let ready: Vec<(PersistentVolumeClaim, ReadySnapshot)> = snapshots
            .into_iter()
            .filter_map(|(pvc, ready)| ready.map(|r| (pvc, r)))
            .collect();
        let generation = self.backup.metadata.generation;
        if ready.len() < total {
            set_condition(
                &mut status.conditions,
                "SnapshotsReady",
                ConditionStatus::False,
                "Waiting",
                format!("{} of {total} snapshots ready", ready.len()),
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
        let target = self.target().await?;
        let names: Vec<String> = status.volumes.iter().map(|v| v.volume.clone()).collect();
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
        let created = try_join_all(
            status
                .volumes
                .iter()
                .zip(&ready)
                .map(|(v, (pvc, snapshot))| self.start_datamover(v, pvc, snapshot, &target)),
        )
        .await?;
        for ((volume, created), previous) in status.volumes.iter_mut().zip(created).zip(previous) {
            // A Job found rather than created may already have written its backup, so the
            // latest id now proves nothing; the id is then taken as it is when the Job ends.
            if created == Created::New {
                volume.previous_backup_id = previous;
            }
        }
        status.phase = Some(Phase::Copying);
        Ok(true)
    }

    /// The temporary Block-mode PVC from `snapshot` and the datamover Job reading it.
    async fn start_datamover(
        &self,
        volume: &VolumeStatus,
        pvc: &PersistentVolumeClaim,
        snapshot: &ReadySnapshot,
        target: &TargetAccess,
    ) -> Result<Created> {
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
        let claim = pvc_from_snapshot(
            &key,
            pvc,
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
        let mut job =
            backup_job(&spec, None).map_err(Error::csi(format!("datamover of {}", volume.pvc)))?;
        if self.backup.spec.mode == BackupMode::Full {
            for container in job
                .spec
                .iter_mut()
                .flat_map(|s| s.template.spec.iter_mut())
                .flat_map(|p| p.containers.iter_mut())
            {
                if let Some(args) = container.args.as_mut() {
                    // `strata backup --full ...`: a new base image instead of an overlay.
                    args.insert(2.min(args.len()), "--full".to_owned());
                }
            }
        }
        create_job(client, &job, &self.name).await
    }

    /// Read the datamovers; true once all succeeded.
    async fn copy(&self, status: &mut BackupStatus) -> Result<bool> {
        let finished = finished_jobs(
            &self.ctx.client,
            &self.name,
            &self.namespace,
            &mut status.volumes,
        )
        .await?;
        if !finished.is_empty() {
            let target = self.target().await?;
            let volumes: Vec<VolumeStatus> = finished
                .iter()
                .filter_map(|i| status.volumes.get(*i).cloned())
                .collect();
            let ids = target
                .with(move |t| {
                    volumes
                        .iter()
                        .map(|v| written_backup(t, v))
                        .collect::<Result<Vec<_>>>()
                })
                .await?;
            for (index, id) in finished.into_iter().zip(ids) {
                if let Some(volume) = status.volumes.get_mut(index) {
                    volume.backup_id = Some(id);
                }
            }
        }
        let progress = progress(&status.volumes);
        let all = progress.volumes_done == progress.volumes_total;
        set_condition(
            &mut status.conditions,
            "VolumesCopied",
            if all {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            if all { "Copied" } else { "Copying" },
            format!(
                "{} of {} volumes copied",
                progress.volumes_done, progress.volumes_total
            ),
            self.backup.metadata.generation,
        );
        status.progress = Some(progress);
        if all {
            status.phase = Some(Phase::Finishing);
        }
        Ok(all)
    }

    /// Commit the application backup, apply retention, clean up.
    async fn commit(&self, status: &mut BackupStatus) -> Result<()> {
        let archive = stash::load(&self.ctx.client, &self.namespace, &self.name).await?;
        let app = AppName::new(
            status
                .application_name
                .clone()
                .unwrap_or_else(|| self.namespace.clone()),
        )
        .map_err(Error::target("application name"))?;
        let id = AppBackupId::new(&self.name).map_err(Error::target("backup id"))?;
        let refs = status
            .volumes
            .iter()
            .map(|v| {
                Ok(VolumeBackupRef {
                    volume: VolumeName::new(&v.volume).map_err(Error::target("volume name"))?,
                    backup: BackupId::new(v.backup_id.clone().unwrap_or_default())
                        .map_err(Error::target(format!("backup id of {}", v.volume)))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let keep_last = self.backup.spec.retention.map(|r| r.keep_last as usize);
        self.target()
            .await?
            .with(move |t| {
                match t.put_app_backup(&app, &id, refs.clone(), archive.into()) {
                    Ok(_) => {}
                    Err(crate::target::Error::BackupExists { .. }) => {
                        // Committed by an earlier call that crashed before writing the status:
                        // fine if it is this run's commit.
                        let ours = t
                            .app_backups(&app)
                            .map_err(Error::target(format!("list backups of {app}")))?
                            .iter()
                            .any(|m| m.id == id && m.volumes == refs);
                        if !ours {
                            return Err(Error::InvalidSpec {
                                what: "metadata.name",
                                reason: format!(
                                    "application {app} already has a backup {id} with other volumes"
                                ),
                            });
                        }
                    }
                    Err(err) => return Err(Error::target(format!("commit {app}/{id}"))(err)),
                }
                if let Some(keep) = keep_last {
                    for r in &refs {
                        crate::prune(t, &r.volume, keep.max(1)).map_err(|source| {
                            Error::Retention {
                                volume: r.volume.to_string(),
                                source: Box::new(source),
                            }
                        })?;
                    }
                }
                Ok(())
            })
            .await?;
        let generation = self.backup.metadata.generation;
        set_condition(
            &mut status.conditions,
            "Committed",
            ConditionStatus::True,
            "Committed",
            format!("application backup {} written", self.name),
            generation,
        );
        if self.backup.spec.cleanup != CleanupPolicy::Never {
            self.cleanup(status).await?;
        }
        status.backup_id = Some(self.name.clone());
        status.phase = Some(Phase::Completed);
        Ok(())
    }

    async fn cleanup(&self, status: &BackupStatus) -> Result<()> {
        cleanup(
            &self.ctx.client,
            &self.name,
            &self.namespace,
            &status.volumes,
            Temporaries::SnapshotAndClaim,
        )
        .await?;
        stash::remove(&self.ctx.client, &self.namespace, &self.name).await
    }
}

/// The backup a finished datamover wrote: the volume's latest, which must be new.
fn written_backup(target: &crate::target::Target, volume: &VolumeStatus) -> Result<String> {
    let name = VolumeName::new(&volume.volume).map_err(Error::target("volume name"))?;
    let latest = target
        .latest(&name)
        .map_err(Error::target(format!("latest backup of {name}")))?
        .map(|m| m.id.to_string());
    match latest {
        Some(id) if volume.previous_backup_id.as_ref() != Some(&id) => Ok(id),
        _ => Err(Error::InvalidSpec {
            what: "datamover",
            reason: format!("its Job succeeded but volume {name} has no new backup"),
        }),
    }
}
