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
//! |             | policy says; the locks go once the Completed status is written               |
//! | final       | nothing                                                                      |
//!
//! A call may run several steps when nothing needs waiting for; it writes the status once, at
//! the end. Every step tolerates having run before, so a call that crashed half-way is simply
//! repeated.
//!
//! This file holds the entry point, discovery and the locks; the snapshots and datamovers of
//! `Preparing` are in `prepare`, reading the Jobs of `Copying` in `copy`, and `Finishing` in
//! `commit`.
//!
//! An incremental's datamover lists the changed blocks through the CSI driver's
//! SnapshotMetadata service when the driver has one and the volume's base snapshot (from its
//! latest backup) remains ([`cbt`](super::cbt)); otherwise, and whenever that call fails inside
//! the Job, it compares digests. A full backup reads the whole volume: `GetMetadataAllocated`
//! would skip unallocated ranges, but trusting a driver's idea of "unallocated" for the image
//! every later incremental rests on is not worth the time it saves once per chain.

mod commit;
mod copy;
mod delete;
mod prepare;

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::controller::Action;

use super::lock::{self, Acquired};
use super::namespace_and_name;
use super::outcome::Call;
use super::stash;
use super::volumes::{Temporaries, cleanup, progress};
use super::{controller_of, finalizer};
use crate::context::{Context, TargetAccess, volume_name};
use crate::crd::{Backup, BackupStatus, CleanupPolicy, DeletionPolicy, VolumeStatus};
use crate::error::{Error, ErrorClass, Result};
use crate::status::{ConditionStatus, Phase, condition, quantity_bytes, set_condition};
use strata_csi::VolumeKey;
use strata_discovery::{Inventory, LiveSource, MetadataBackup, RestoreOrder, discover};
use strata_target::{AppBackupId, AppName};

/// One reconcile of a Backup.
struct Run<'a> {
    backup: &'a Backup,
    ctx: &'a Context,
    namespace: String,
    name: String,
    /// The Backup as the owner of what it makes.
    owner: OwnerReference,
}

/// Move `backup` one step forward and write its status; the returned action says when to look
/// again. A finished Backup (Completed or Failed) is left alone without any API call.
pub async fn reconcile_backup(backup: &Backup, ctx: &Context) -> Result<Action> {
    let mut status = backup.status.clone().unwrap_or_default();
    if finalizer::is_deleted(backup) {
        if finalizer::has_finalizer(backup) {
            let run = Run::new(backup, ctx)?;
            if backup.spec.deletion_policy == DeletionPolicy::Delete {
                return run.delete_with_data(&status).await;
            }
            run.cancel(&status).await?;
            finalizer::remove(&ctx.client, &run.namespace, backup).await?;
        }
        return Ok(Action::await_change());
    }
    if status.phase.is_some_and(Phase::is_final) {
        return Ok(Action::await_change());
    }
    // The finalizer first. The rest of the call works on the object as that patch left it,
    // so the status write carries its resourceVersion, but only if the status is still the
    // one read: else the status computed here would overwrite a newer one.
    let namespace = backup.metadata.namespace.clone().unwrap_or_default();
    let added = finalizer::add(&ctx.client, &namespace, backup).await?;
    let backup = match &added {
        Some(patched) if patched.status == backup.status => patched,
        _ => backup,
    };
    let run = Run::new(backup, ctx)?;
    let call = Call::new(ctx, backup, &run.namespace, &run.name);
    if let Some(wait) = call.backing_off() {
        return Ok(Action::requeue(wait));
    }
    let before = status.clone();
    let outcome = match run.step(&mut status).await {
        Err(err)
            if err.class() == ErrorClass::Permanent
                && backup.spec.cleanup == CleanupPolicy::Always =>
        {
            // A cleanup that fails is the error retried; the step fails again next time.
            run.cleanup(&status).await.and(Err(err))
        }
        outcome => outcome,
    };
    let action = call.end(&before, &mut status, outcome).await?;
    ctx.metrics.backup_status_written(&before, &status);
    // Locks go only once the final status is written: released earlier, a failed status write
    // would re-run the commit (prune, base snapshots) while the next Backup holds the volumes.
    // Should this release fail, the locks are stale (their holder finished) and taken over.
    if status.phase.is_some_and(Phase::is_final) {
        run.unlock(&status).await?;
    }
    Ok(action)
}

impl<'a> Run<'a> {
    fn new(backup: &'a Backup, ctx: &'a Context) -> Result<Self> {
        let (namespace, name) = namespace_and_name(backup, "Backup")?;
        Ok(Run {
            backup,
            ctx,
            namespace,
            name,
            owner: controller_of(backup, "Backup")?,
        })
    }

    /// Cancel the run of a deleted Backup before its finalizer goes: stop its datamovers
    /// (deleting a Job deletes its pods, whose processes are killed; the target's writer they
    /// leave is crash-safe and collected by the next commit's gc), delete its temporary PVCs
    /// and snapshots (never a snapshot a commit kept as a changed-block base), its metadata
    /// stash, and release its locks. What it wrote into the target stays (`deletionPolicy`
    /// Retain): an uncommitted volume backup is no application backup, and a committed one is
    /// kept. A Completed Backup has nothing left to cancel.
    async fn cancel(&self, status: &BackupStatus) -> Result<()> {
        if status.phase == Some(Phase::Completed) {
            return Ok(());
        }
        self.stop(status).await?;
        self.unlock(status).await
    }

    /// [`Run::cancel`] but for the locks, which a deletion with the data keeps until the
    /// target is done.
    async fn stop(&self, status: &BackupStatus) -> Result<()> {
        if status.phase == Some(Phase::Completed) {
            return Ok(());
        }
        cleanup(
            &self.ctx.client,
            |v| self.key(v),
            &self.namespace,
            &status.volumes,
            Temporaries::AllButBase,
        )
        .await?;
        stash::remove(&self.ctx.client, &self.namespace, &self.owner).await
    }

    /// Look again after a wait: every wait of a Backup ends with a change the run loop watches
    /// (a snapshot, a Job, another Backup), so this is the safety net.
    fn requeue(&self) -> Action {
        Action::requeue(self.ctx.resync)
    }

    /// The names, labels and owner of the objects made for `volume`.
    fn key(&self, volume: &VolumeStatus) -> VolumeKey {
        VolumeKey::of_run(&self.owner, &self.namespace, &self.namespace, &volume.pvc)
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
        TargetAccess::resolve(self.ctx, &self.namespace, &self.backup.spec.target_ref.name).await
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
        let app = AppName::new(&app_name).map_err(Error::target("application name"))?;
        let id = AppBackupId::new(&self.name).map_err(Error::target("backup id"))?;
        // The Target's health before each run (issue 16, deliverable 3): it opens and takes a
        // write, so a Target that cannot hold this backup (unreachable, refusing writes, wrong
        // credentials) stops it before any snapshot is taken, with the cause's condition.
        // A Backup made again under the name of one already committed (its object deleted,
        // the backup kept) could never commit: it is stopped here rather than at the end.
        let target = self.target().await?;
        let url = target.url.clone();
        target
            .with(move |t| {
                t.check_writable()
                    .map_err(Error::target(format!("write a probe to {url}")))?;
                // Only this id's manifest is read: a damaged other backup of the
                // application must not stop its next backups.
                let taken = match t.app_backup(&app, &id) {
                    Ok(_) | Err(strata_target::Error::Corrupt { .. }) => true,
                    Err(strata_target::Error::NotFound { .. }) => false,
                    Err(err) => {
                        return Err(Error::target(format!("read backup {app}/{id}"))(err));
                    }
                };
                if taken {
                    return Err(Error::InvalidSpec {
                        what: "metadata.name",
                        reason: format!(
                            "application {app} already has a backup {id} in {url}; \
                             name this Backup otherwise"
                        ),
                    });
                }
                Ok(())
            })
            .await?;
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
        let mut app = discover(&inventory, &app_spec)
            .map_err(Error::discovery("discover the application"))?;
        let forbidden: Vec<String> = inventory
            .forbidden_kinds()
            .iter()
            .map(|k| match k.group.as_str() {
                "" => k.plural.clone(),
                group => format!("{}.{group}", k.plural),
            })
            .collect();
        // An excluded PVC keeps its object in the archive (a restore provisions it empty)
        // but has no volume backup.
        for wanted in &spec.volumes.include {
            if !app.volumes.iter().any(|v| &v.pvc == wanted) {
                return Err(Error::InvalidSpec {
                    what: "spec.volumes.include",
                    reason: format!("the application has no PVC {wanted:?}"),
                });
            }
        }
        app.volumes.retain(|v| spec.volumes.selects(&v.pvc));
        let metadata = MetadataBackup::from_application(&app, &RestoreOrder::default())
            .map_err(Error::discovery("sanitize the objects"))?;
        let archive = metadata
            .write_archive(Vec::new())
            .map_err(Error::discovery("write the metadata archive"))?;
        stash::store(client, &self.namespace, self.owner.clone(), archive).await?;
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
        let mut discovered = format!(
            "{} objects, {} volumes",
            metadata.objects.len(),
            status.volumes.len()
        );
        // An operator's own objects include cluster-scoped ones (ClusterRoles, webhooks) the
        // least-privilege roles may not read: say which kinds could not be looked at.
        if spec.application.include_operators && !forbidden.is_empty() {
            discovered.push_str(&format!(
                "; not readable under the controller's RBAC, so left out: {}",
                forbidden.join(", ")
            ));
        }
        set_condition(
            &mut status.conditions,
            "Discovered",
            ConditionStatus::True,
            "Discovered",
            discovered,
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
        stash::remove(&self.ctx.client, &self.namespace, &self.owner).await?;
        let held: BTreeSet<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        self.discover(status).await?;
        let now: BTreeSet<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        // Locks are taken in name order only from nothing held: with a new PVC to lock, all
        // are released and taken again in order, else two Backups could each hold what the
        // other waits for. PVCs no longer found are released either way.
        let release: Vec<String> = if now.is_subset(&held) {
            held.difference(&now).cloned().collect()
        } else {
            held.into_iter().collect()
        };
        lock::release(&self.ctx.client, &self.namespace, &self.owner, &release).await?;
        self.try_lock(status).await
    }

    /// Take the locks of `status.volumes` and set the `VolumesLocked` condition.
    async fn try_lock(&self, status: &mut BackupStatus) -> Result<bool> {
        let pvcs: Vec<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        let acquired = lock::acquire(&self.ctx.client, &self.namespace, &self.owner, &pvcs).await?;
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
            Acquired::Contended { pvc } => {
                set_condition(
                    &mut status.conditions,
                    "VolumesLocked",
                    ConditionStatus::False,
                    "LockContended",
                    format!("the lock of PVC {pvc} changed hands while being taken; trying again"),
                    generation,
                );
                Ok(false)
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
        lock::release(&self.ctx.client, &self.namespace, &self.owner, &pvcs).await
    }

    async fn cleanup(&self, status: &BackupStatus) -> Result<()> {
        cleanup(
            &self.ctx.client,
            |v| self.key(v),
            &self.namespace,
            &status.volumes,
            Temporaries::SnapshotAndClaim,
        )
        .await?;
        stash::remove(&self.ctx.client, &self.namespace, &self.owner).await
    }
}
