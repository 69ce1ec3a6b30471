//! Reconciling a Backup: discover, snapshot, copy, commit, in that order, one step per call.
//!
//! | phase       | the call                                                                     |
//! |-------------|------------------------------------------------------------------------------|
//! | (none)      | discovers the application, stashes its metadata archive, lists its volumes   |
//! | `Preparing` | locks its PVCs against other Backups ([`lock`](super::lock)), waiting while  |
//! |             | one holds them; creates a VolumeSnapshot per PVC; once all are ready, a      |
//! |             | Block-mode PVC from each and a datamover Job per volume, all at once         |
//! | `Copying`   | reads the Jobs; a failed one fails the Backup with the Job's message         |
//! | `Finishing` | commits the application backup (archive + volume backup ids), applies       |
//! |             | retention, keeps each snapshot as its volume's changed-block base and        |
//! |             | deletes the previous base, deletes the temporary objects as the cleanup      |
//! |             | policy says, releases the locks                                              |
//! | final       | nothing                                                                      |
//!
//! A call may run several steps when nothing needs waiting for; it writes the status once, at
//! the end. Every step tolerates having run before, so a call that crashed half-way is simply
//! repeated.
//!
//! An incremental's datamover lists the changed blocks through the CSI driver's
//! SnapshotMetadata service when the driver has one and the volume's base snapshot (from its
//! latest backup) remains ([`cbt`](super::cbt)); otherwise, and whenever that call fails inside
//! the Job, it compares digests. A full backup reads the whole volume: `GetMetadataAllocated`
//! would skip unallocated ranges, but trusting a driver's idea of "unallocated" for the image
//! every later incremental rests on is not worth the time it saves once per chain.

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::controller::Action;
use kube::{Api, Resource};

use super::cbt::{self, Plan};
use super::jobs::{Created, create_job};
use super::lock::{self, Acquired};
use super::stash;
use super::volumes::{Temporaries, cleanup, finished_jobs, progress};
use super::{fail, namespace_and_name, patch_status};
use crate::csi::client::{
    allow_volume_mode_change, create_or_get_pvc, create_or_get_snapshot, delete_pvc,
    snapshot_class_for_pvc,
};
use crate::csi::datamover::{self, Attach, DatamoverSpec, Step};
use crate::csi::metadata::backup_job_with_changed_blocks;
use crate::csi::{
    ReadySnapshot, Role, VolumeKey, VolumeMode, changes_volume_mode, pvc_from_snapshot,
    ready_or_failed, volume_snapshot,
};
use crate::discovery::{Inventory, LiveSource, MetadataBackup, RestoreOrder, discover};
use crate::operator::context::{Context, TargetAccess, volume_name};
use crate::operator::crd::{
    Backup, BackupMode, BackupStatus, ChangeSource, CleanupPolicy, VolumeStatus,
};
use crate::operator::error::{Error, Result};
use crate::operator::status::{ConditionStatus, Phase, condition, quantity_bytes, set_condition};
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
    let (namespace, name) = namespace_and_name(backup, "Backup")?;
    let run = Run {
        backup,
        ctx,
        namespace,
        name,
    };
    let before = status.clone();
    let generation = backup.metadata.generation;
    let action = match run.step(&mut status).await {
        Ok(action) => action,
        Err(err) if err.is_permanent() => {
            if backup.spec.cleanup == CleanupPolicy::Always {
                run.cleanup(&status).await?;
            }
            run.unlock(&status).await?;
            fail(&mut status.conditions, &err, generation);
            status.phase = Some(Phase::Failed);
            Action::await_change()
        }
        Err(err) => return Err(err),
    };
    status.observed_generation = generation;
    if status != before {
        patch_status::<Backup>(&ctx.client, &run.namespace, &run.name, &status).await?;
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

    fn owner(&self) -> Result<OwnerReference> {
        self.backup
            .controller_owner_ref(&())
            .ok_or(Error::MissingMetadata {
                kind: "Backup",
                field: "metadata.uid",
            })
    }

    /// The application and backup id this run commits in the target.
    fn app_backup(&self, status: &BackupStatus) -> Result<(AppName, AppBackupId)> {
        let app = AppName::new(
            status
                .application_name
                .clone()
                .unwrap_or_else(|| self.namespace.clone()),
        )
        .map_err(Error::target("application name"))?;
        let id = AppBackupId::new(&self.name).map_err(Error::target("backup id"))?;
        Ok((app, id))
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
        if status.phase == Some(Phase::Preparing) && !self.lock(status).await? {
            return Ok(self.requeue());
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
        stash::store(client, &self.namespace, &self.name, self.owner()?, archive).await?;
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

    /// Lock the volumes against other Backups; true once all are held. Locks are taken before
    /// the `VolumesLocked` condition says so, so a True condition means they are held.
    ///
    /// A Backup that had to wait discovers the application again once it holds the locks, so
    /// its metadata describes the objects as they are when the volumes are cut, not as they
    /// were before the wait; should that find other PVCs, they are locked in turn.
    async fn lock(&self, status: &mut BackupStatus) -> Result<bool> {
        let locked = condition(&status.conditions, "VolumesLocked").map(|c| c.status);
        if locked == Some(ConditionStatus::True) {
            return Ok(true);
        }
        if !self.try_lock(status).await? {
            return Ok(false);
        }
        if locked.is_none() {
            return Ok(true);
        }
        stash::remove(&self.ctx.client, &self.namespace, &self.name).await?;
        self.discover(status).await?;
        self.try_lock(status).await
    }

    /// Take the locks of `status.volumes` and set the `VolumesLocked` condition.
    async fn try_lock(&self, status: &mut BackupStatus) -> Result<bool> {
        let pvcs: Vec<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        let acquired =
            lock::acquire(&self.ctx.client, &self.namespace, &self.owner()?, &pvcs).await?;
        let generation = self.backup.metadata.generation;
        match acquired {
            Acquired::All => {
                set_condition(
                    &mut status.conditions,
                    "VolumesLocked",
                    ConditionStatus::True,
                    "Locked",
                    format!("{} volumes locked for this Backup", pvcs.len()),
                    generation,
                );
                Ok(true)
            }
            Acquired::HeldBy { holder, pvc } => {
                set_condition(
                    &mut status.conditions,
                    "VolumesLocked",
                    ConditionStatus::False,
                    "WaitingForBackup",
                    format!("Backup {holder} is backing up PVC {pvc}; waiting for it to finish"),
                    generation,
                );
                Ok(false)
            }
        }
    }

    /// Release this Backup's volume locks.
    async fn unlock(&self, status: &BackupStatus) -> Result<()> {
        let pvcs: Vec<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        lock::release(&self.ctx.client, &self.namespace, &self.owner()?, &pvcs).await
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
                Ok::<_, Error>(ready.map(|ready| Source {
                    pvc,
                    snapshot: ready,
                    driver: class.driver,
                }))
            }
        }))
        .await?;
        let total = snapshots.len();
        let ready: Vec<Source> = snapshots.into_iter().flatten().collect();
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
        let started = try_join_all(status.volumes.iter().zip(&ready).zip(&previous).map(
            |((v, source), previous)| self.start_datamover(v, source, previous.as_deref(), &target),
        ))
        .await?;
        let mut fallbacks = Vec::new();
        let mut any_new = false;
        for ((volume, (created, plan)), previous) in
            status.volumes.iter_mut().zip(started).zip(previous)
        {
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
                    fallbacks.push(format!("{}: {why}", volume.pvc));
                }
            }
        }
        if any_new && self.backup.spec.mode == BackupMode::Incremental {
            self.record_change_tracking(status, &fallbacks);
        }
        status.phase = Some(Phase::Copying);
        Ok(true)
    }

    /// The `ChangedBlockTracking` condition: whether every incremental lists changed blocks,
    /// and why the others compare digests.
    fn record_change_tracking(&self, status: &mut BackupStatus, fallbacks: &[String]) {
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
        let plan = match self.backup.spec.mode {
            BackupMode::Full => None,
            BackupMode::Incremental => {
                Some(cbt::plan(client, &self.namespace, &volume.pvc, driver, latest).await?)
            }
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
        Ok((create_job(client, &job, &self.name).await?, plan))
    }

    /// Read the datamovers; true once all succeeded.
    async fn copy(&self, status: &mut BackupStatus) -> Result<bool> {
        let finished = match finished_jobs(
            &self.ctx.client,
            &self.name,
            &self.namespace,
            &mut status.volumes,
        )
        .await
        {
            Ok(finished) => finished,
            Err(
                err @ Error::InvalidSpec {
                    what: "datamover Job",
                    ..
                },
            ) => {
                // Deleted by the cleanup of an earlier call that committed, then crashed
                // before writing the status?
                if self.committed_before(status).await? {
                    return Ok(true);
                }
                return Err(err);
            }
            Err(err) => return Err(err),
        };
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

    /// Whether the target already holds this run's application backup; if so, its volume
    /// backup ids go into `status` and the run moves on to `Finishing`, whose steps all
    /// tolerate having run.
    async fn committed_before(&self, status: &mut BackupStatus) -> Result<bool> {
        let (app, id) = self.app_backup(status)?;
        let committed = self
            .target()
            .await?
            .with(move |t| {
                Ok(t.app_backups(&app)
                    .map_err(Error::target(format!("list backups of {app}")))?
                    .into_iter()
                    .find(|m| m.id == id))
            })
            .await?;
        let Some(committed) = committed else {
            return Ok(false);
        };
        for volume in &mut status.volumes {
            let written = committed
                .volumes
                .iter()
                .find(|r| r.volume.as_str() == volume.volume);
            if let Some(written) = written {
                volume.backup_id = Some(written.backup.to_string());
                volume.done = true;
            }
        }
        if status.volumes.iter().any(|v| !v.done) {
            return Ok(false);
        }
        status.progress = Some(progress(&status.volumes));
        status.phase = Some(Phase::Finishing);
        Ok(true)
    }

    /// Commit the application backup, apply retention, clean up.
    async fn commit(&self, status: &mut BackupStatus) -> Result<()> {
        // Gone only when an earlier call committed and cleaned up, then crashed before
        // writing the status; the target then holds the commit, checked below.
        let archive = match stash::load(&self.ctx.client, &self.namespace, &self.name).await {
            Ok(archive) => Some(archive),
            Err(Error::NotFound { .. }) => None,
            Err(err) => return Err(err),
        };
        let (app, id) = self.app_backup(status)?;
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
        let ids: Vec<String> = refs.iter().map(|r| r.backup.to_string()).collect();
        let keep_last = self.backup.spec.retention.map(|r| r.keep_last as usize);
        self.target()
            .await?
            .with(move |t| {
                let stashed = archive.is_some();
                let earlier = match archive {
                    Some(archive) => {
                        match t.put_app_backup(&app, &id, refs.clone(), archive.into()) {
                            Ok(_) => false,
                            Err(crate::target::Error::BackupExists { .. }) => true,
                            Err(err) => {
                                return Err(Error::target(format!("commit {app}/{id}"))(err));
                            }
                        }
                    }
                    None => true,
                };
                // Committed by an earlier call that crashed before writing the status: fine
                // if it is this run's commit.
                let ours = !earlier
                    || t.app_backups(&app)
                        .map_err(Error::target(format!("list backups of {app}")))?
                        .iter()
                        .any(|m| m.id == id && m.volumes == refs);
                if !ours && stashed {
                    return Err(Error::InvalidSpec {
                        what: "metadata.name",
                        reason: format!(
                            "application {app} already has a backup {id} with other volumes"
                        ),
                    });
                }
                if !ours {
                    return Err(Error::InvalidSpec {
                        what: "metadata stash",
                        reason: format!("it disappeared before {app}/{id} was committed"),
                    });
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
        let kept = self.keep_bases(status, &ids).await?;
        if self.backup.spec.cleanup != CleanupPolicy::Never {
            let (mut bases, mut others) = (Vec::new(), Vec::new());
            for (volume, kept) in status.volumes.iter().zip(&kept) {
                if *kept { &mut bases } else { &mut others }.push(volume.clone());
            }
            self.cleanup_keeping_bases(&bases, &others).await?;
        }
        self.unlock(status).await?;
        status.backup_id = Some(self.name.clone());
        status.phase = Some(Phase::Completed);
        Ok(())
    }

    /// Keep each volume's snapshot as its changed-block base (named with volume backup
    /// `ids[i]`), then delete the volume's previous bases; which volumes keep theirs.
    async fn keep_bases(&self, status: &BackupStatus, ids: &[String]) -> Result<Vec<bool>> {
        let client = &self.ctx.client;
        let owner = self.owner()?;
        try_join_all(status.volumes.iter().zip(ids).map(|(v, id)| {
            let owner = owner.clone();
            async move {
                let snapshot = self.key(v).name(Role::Snapshot);
                let kept = cbt::keep_as_base(client, &self.namespace, &snapshot, &v.pvc, id, owner)
                    .await?;
                if kept {
                    cbt::retire_bases(client, &self.namespace, &v.pvc, &snapshot).await?;
                }
                Ok::<_, Error>(kept)
            }
        }))
        .await
    }

    /// Delete the temporaries of a committed run: all of them for `others`, all but the
    /// snapshot for `bases`.
    async fn cleanup_keeping_bases(
        &self,
        bases: &[VolumeStatus],
        others: &[VolumeStatus],
    ) -> Result<()> {
        let client = &self.ctx.client;
        let ns = &self.namespace;
        cleanup(
            client,
            &self.name,
            ns,
            others,
            Temporaries::SnapshotAndClaim,
        )
        .await?;
        cleanup(client, &self.name, ns, bases, Temporaries::JobOnly).await?;
        for volume in bases {
            let claim = self.key(volume).name(Role::Volume);
            delete_pvc(client, ns, &claim)
                .await
                .map_err(Error::csi(format!("delete PVC {ns}/{claim}")))?;
        }
        stash::remove(client, ns, &self.name).await
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

/// A volume's snapshot, ready, and where it came from.
struct Source {
    /// The PVC snapshotted.
    pvc: PersistentVolumeClaim,
    /// Its ready snapshot.
    snapshot: ReadySnapshot,
    /// The CSI driver of the snapshot class.
    driver: String,
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
