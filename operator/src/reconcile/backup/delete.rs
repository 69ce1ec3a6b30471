//! Deleting a Backup with `deletionPolicy: Delete`: the run is cancelled as for Retain, and the
//! application backup it committed is removed from the target before the finalizer goes.
//!
//! The target work is the facade's `strata::delete_app_backup` ([`Context::delete_app_backup`]):
//! the manifest goes first, then each volume backup it names that no other application backup
//! names is folded into its child (or deleted when it has none), the reference counting
//! retention uses. Folding rewrites a chain other Backups' backups rest on, so it runs under
//! the volumes' locks ([`lock`](crate::reconcile::lock)), as a commit's retention does: a
//! Backup writing one of these volumes is waited for (condition `Deleting` False, reason
//! `WaitingForBackup`); so is a Restore of this Backup that has not ended, whose datamovers read
//! these volume backups (reason `RestoreInProgress`). A failure keeps the finalizer, sets `Deleting` False with the cause as
//! reason, publishes a Warning Event and is retried with the controller's backoff. The policy is
//! read from the Backup as it is now, so a person whose target is gone for good lets the Backup
//! go by setting it to Retain; a run that never reached its commit does not open the target.
//!
//! Which application backup is this Backup's: id `metadata.name` whose manifest names exactly
//! the volume backups of `status.volumes`. A running Backup is deleted in any phase; should it
//! have committed before its status said so (a crash in `Finishing`), the manifest is found
//! and deleted the same way, so no restorable application backup outlives it. What a killed
//! run wrote without committing is no application backup (no Restore can name it): its
//! writers' leftovers go with the next commit's gc, and a finished but uncommitted volume
//! backup becomes an unnamed parent that the application's retention folds away. Deleting
//! those here would mean deciding which unnamed volume backups are this run's, which the
//! target does not record. A manifest of that id naming other volume backups (an earlier
//! Backup of the same name, deleted with Retain) is not this Backup's and is kept. A manifest
//! already gone while the Backup is Completed (an earlier attempt stopped after deleting it,
//! or retention expired it) still has its volume backups looked at, so a stopped deletion is
//! finished.
//!
//! [`Context::delete_app_backup`]: crate::Context::delete_app_backup

use kube::runtime::controller::Action;

use super::Run;
use crate::crd::{BackupStatus, Restore};
use crate::error::{Error, Result};
use crate::reconcile::finalizer;
use crate::reconcile::lock::{self, Acquired};
use crate::reconcile::outcome::Call;
use crate::status::{ConditionStatus, Phase, condition, set_condition};
use strata_target::{BackupId, VolumeBackupRef, VolumeName};

impl Run<'_> {
    /// Cancel the deleted Backup's run, delete its application backup from the target, then
    /// remove the finalizer; a failure is recorded and retried, the finalizer kept.
    pub(super) async fn delete_with_data(&self, status: &BackupStatus) -> Result<Action> {
        let call = Call::new(self.ctx, self.backup, &self.namespace, &self.name);
        if let Some(wait) = call.backing_off() {
            return Ok(Action::requeue(wait));
        }
        let mut written = status.clone();
        match self.restore_in_progress().await {
            Ok(Some(restore)) => {
                set_condition(
                    &mut written.conditions,
                    "Deleting",
                    ConditionStatus::False,
                    "RestoreInProgress",
                    format!(
                        "Restore {restore} is reading this Backup's data; it is removed after \
                         the Restore ends"
                    ),
                    self.backup.metadata.generation,
                );
                call.write(status, &written).await?;
                return Ok(self.requeue());
            }
            Ok(None) => {}
            Err(err) => return Err(call.deletion_failed(status, &mut written, err).await),
        }
        match self.remove_data(status).await {
            Ok(true) => {
                self.unlock(status).await?;
                finalizer::remove(&self.ctx.client, &self.namespace, self.backup).await?;
                call.succeeded();
                Ok(Action::await_change())
            }
            Ok(false) => {
                set_condition(
                    &mut written.conditions,
                    "Deleting",
                    ConditionStatus::False,
                    "WaitingForBackup",
                    "another Backup is writing these volumes; their data is removed after it"
                        .to_owned(),
                    self.backup.metadata.generation,
                );
                call.write(status, &written).await?;
                Ok(self.requeue())
            }
            Err(err) => {
                // Released, so that a target down for long blocks no other Backup of these
                // volumes; the next attempt takes them again.
                if let Err(unlock) = self.unlock(status).await {
                    eprintln!(
                        "Backup {}/{}: its locks were not released: {unlock}",
                        self.namespace, self.name
                    );
                }
                Err(call.deletion_failed(status, &mut written, err).await)
            }
        }
    }

    /// A Restore of this Backup that has not ended (nor been deleted): its volume backups are
    /// what that Restore's datamovers read, so they stay until it ends.
    async fn restore_in_progress(&self) -> Result<Option<String>> {
        let restores: kube::Api<Restore> =
            kube::Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let list = restores
            .list(&kube::api::ListParams::default())
            .await
            .map_err(Error::kube(format!("list Restores of {}", self.namespace)))?;
        Ok(list
            .items
            .into_iter()
            .find(|r| {
                r.spec.backup_ref.name == self.name
                    && r.metadata.deletion_timestamp.is_none()
                    && !r
                        .status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(Phase::is_final)
            })
            .and_then(|r| r.metadata.name))
    }

    /// Stop the run, lock its volumes and delete its application backup; false while another
    /// Backup holds a lock.
    async fn remove_data(&self, status: &BackupStatus) -> Result<bool> {
        self.stop(status).await?;
        let pvcs: Vec<String> = status.volumes.iter().map(|v| v.pvc.clone()).collect();
        let acquired = lock::acquire(&self.ctx.client, &self.namespace, &self.owner, &pvcs).await?;
        if acquired != Acquired::All {
            return Ok(false);
        }
        let completed = status.phase == Some(Phase::Completed);
        // Without every volume's backup id the run cannot have committed; nor without volumes,
        // unless it got as far as the commit (a run that failed before, on a missing or
        // invalid Target say, needs no target, which may be unreachable for good).
        let reached_commit = completed
            || status.phase == Some(Phase::Finishing)
            || condition(&status.conditions, "Committed").is_some();
        let Some(refs) = committed_refs(status).filter(|r| !r.is_empty() || reached_commit) else {
            return Ok(true);
        };
        let (app, id) = self.app_backup(status)?;
        let delete = self.ctx.delete_app_backup;
        self.target()
            .await?
            .with(move |t| {
                let ours = match t.app_backup(&app, &id) {
                    Ok(manifest) => manifest.volumes == refs,
                    Err(strata_target::Error::NotFound { .. }) => completed,
                    Err(err) => return Err(Error::target(format!("read {app}/{id}"))(err)),
                };
                if ours {
                    delete(t, &app, &id, &refs).map_err(|source| Error::DeleteData {
                        backup: format!("{app}/{id}"),
                        source,
                    })?;
                }
                Ok(())
            })
            .await?;
        Ok(true)
    }
}

/// The volume backups a run's application backup names, once every volume has one.
fn committed_refs(status: &BackupStatus) -> Option<Vec<VolumeBackupRef>> {
    status
        .volumes
        .iter()
        .map(|v| {
            Some(VolumeBackupRef {
                volume: VolumeName::new(&v.volume).ok()?,
                backup: BackupId::new(v.backup_id.clone()?).ok()?,
            })
        })
        .collect()
}
