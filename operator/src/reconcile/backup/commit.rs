//! The `Finishing` step of a Backup: committing the application backup, applying retention,
//! keeping each snapshot as its volume's changed-block base and retiring the previous one,
//! and deleting the temporaries.

use std::collections::HashSet;

use futures::future::try_join_all;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

use super::Run;
use crate::context::AppRetention;
use crate::crd::{Backup, BackupStatus, CleanupPolicy, Restore, VolumeStatus};
use crate::error::{Error, Result};
use crate::reconcile::volumes::{Temporaries, cleanup};
use crate::reconcile::{cbt, patch_status, stash};
use crate::status::{ConditionStatus, Phase, condition, set_condition};
use strata_csi::Role;
use strata_csi::client::delete_pvc;
use strata_target::{AppBackupId, BackupId, VolumeBackupRef, VolumeName};

impl Run<'_> {
    /// Commit the application backup, apply retention, clean up.
    pub(super) async fn commit(&self, status: &mut BackupStatus) -> Result<()> {
        // Gone only when an earlier call committed and cleaned up, then crashed before
        // writing the status; the target then holds the commit, checked below.
        let archive = match stash::load(&self.ctx.client, &self.namespace, &self.owner).await {
            Ok(archive) => Some(archive),
            Err(Error::NotFound { .. }) => None,
            Err(err) => return Err(err),
        };
        if let Some(archive) = &archive {
            let copied: Vec<(String, String)> = status
                .volumes
                .iter()
                .map(|v| (self.namespace.clone(), v.pvc.clone()))
                .collect();
            stash::check_volumes(archive, &copied)?;
        }
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
        let pinned = match keep_last {
            Some(_) => self.pinned_by_restores().await?,
            None => Vec::new(),
        };
        let prune = self.ctx.prune;
        let target = self.target().await?;
        let (retention, retention_failure, gc_failure) = target
            .with(move |t| {
                let stashed = archive.is_some();
                let earlier = match archive {
                    Some(archive) => {
                        match t.put_app_backup(&app, &id, refs.clone(), archive.into()) {
                            Ok(_) => false,
                            Err(strata_target::Error::BackupExists { .. }) => true,
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
                // Committed: retention failing now (a damaged older backup, a fold raced by
                // `strata prune`) must not fail the run that committed. It is reported in a
                // condition and applied again at the next commit.
                let (retention, retention_failure) = match keep_last {
                    Some(keep) => match prune(t, &app, keep.max(1), &pinned) {
                        Ok(retention) => (Some(retention), None),
                        Err(source) => (
                            None,
                            Some(crate::reconcile::error_chain(&Error::Retention {
                                app: app.to_string(),
                                source,
                            })),
                        ),
                    },
                    None => (None, None),
                };
                // What killed datamovers left behind (their writers' leftovers; their slots
                // are taken over by the next backup anyway). A failure here does not undo the
                // commit: it is reported in a condition and retried after the next commit.
                let failures: Vec<String> = refs
                    .iter()
                    .filter_map(|r| {
                        t.gc_volume(&r.volume, strata_target::DEFAULT_GC_GRACE)
                            .err()
                            .map(|err| {
                                format!("{}: {}", r.volume, crate::reconcile::error_chain(&err))
                            })
                    })
                    .collect();
                Ok((
                    retention,
                    retention_failure,
                    (!failures.is_empty()).then(|| failures.join("; ")),
                ))
            })
            .await?;
        let generation = self.backup.metadata.generation;
        let (gc_status, gc_reason, gc_message) = match gc_failure {
            None => (
                ConditionStatus::True,
                "Collected",
                "leftovers of dead writers removed".to_string(),
            ),
            Some(text) => (ConditionStatus::False, "GcFailed", text),
        };
        set_condition(
            &mut status.conditions,
            "GarbageCollected",
            gc_status,
            gc_reason,
            gc_message,
            generation,
        );
        set_condition(
            &mut status.conditions,
            "Committed",
            ConditionStatus::True,
            "Committed",
            format!("application backup {} written", self.name),
            generation,
        );
        match &retention_failure {
            Some(text) => set_condition(
                &mut status.conditions,
                "RetentionApplied",
                ConditionStatus::False,
                "RetentionFailed",
                format!("{text}; applied again at the next commit"),
                generation,
            ),
            None if keep_last.is_some() => set_condition(
                &mut status.conditions,
                "RetentionApplied",
                ConditionStatus::True,
                "Applied",
                "older application backups past retention removed".to_string(),
                generation,
            ),
            None => {}
        }
        if let Some(retention) = &retention {
            self.mark_expired(status, retention).await?;
        }
        let kept = self.keep_bases(status, &ids).await?;
        if self.backup.spec.cleanup != CleanupPolicy::Never {
            let (mut bases, mut others) = (Vec::new(), Vec::new());
            for (volume, kept) in status.volumes.iter().zip(&kept) {
                if *kept { &mut bases } else { &mut others }.push(volume.clone());
            }
            self.cleanup_keeping_bases(&bases, &others).await?;
        }
        // The locks go after the Completed status is written (see `reconcile_backup`).
        status.backup_id = Some(self.name.clone());
        status.phase = Some(Phase::Completed);
        Ok(())
    }

    /// The application backups a Restore under way in this namespace reads, which retention
    /// keeps: a Restore reads its Backup's archive again when it applies the objects, after
    /// the volumes are filled, so expiring it meanwhile would fail the Restore at its last
    /// step. A Restore names a Backup of its own namespace, whose application backup id is
    /// the Backup's name.
    async fn pinned_by_restores(&self) -> Result<Vec<AppBackupId>> {
        let api: Api<Restore> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let restores = api
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!("list Restores in {}", self.namespace)))?;
        Ok(restores
            .into_iter()
            .filter(|r| {
                !r.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(Phase::is_final)
            })
            .filter_map(|r| AppBackupId::new(&r.spec.backup_ref.name).ok())
            .collect())
    }

    /// Give each Completed Backup of this application whose application backup retention
    /// expired (its `status.backupId` is no longer among those kept) the condition `Expired`
    /// (True, reason `RetentionExpired`, naming this Backup). Its phase stays `Completed`: the
    /// run did complete, the phase is final (a final resource is never reconciled again), and
    /// tools that wait for `Completed` keep working; the condition says its data is gone, and
    /// a Restore of it fails validation. Matching by what remains rather than by what this
    /// call expired also marks what an earlier commit expired and then crashed before marking.
    async fn mark_expired(&self, status: &BackupStatus, retention: &AppRetention) -> Result<()> {
        let app = status
            .application_name
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        let kept: HashSet<String> = retention.kept.iter().map(|id| id.to_string()).collect();
        let api: Api<Backup> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let backups = api
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!("list Backups in {}", self.namespace)))?;
        for other in backups {
            let Some(mut other_status) = other.status.clone() else {
                continue;
            };
            let name = other.metadata.name.clone().unwrap_or_default();
            let expired = name != self.name
                && other_status.phase == Some(Phase::Completed)
                && other_status
                    .application_name
                    .as_deref()
                    .unwrap_or(&self.namespace)
                    == app
                && other_status
                    .backup_id
                    .as_ref()
                    .is_some_and(|id| !kept.contains(id))
                && condition(&other_status.conditions, "Expired").is_none();
            if !expired {
                continue;
            }
            set_condition(
                &mut other_status.conditions,
                "Expired",
                ConditionStatus::True,
                "RetentionExpired",
                format!(
                    "application backup {app}/{} was expired by the retention of Backup {}; \
                     it can no longer be restored",
                    other_status.backup_id.as_deref().unwrap_or_default(),
                    self.name
                ),
                other.metadata.generation,
            );
            patch_status::<Backup>(
                &self.ctx.client,
                &self.namespace,
                &name,
                other.metadata.resource_version.as_deref(),
                None,
                &json!({ "conditions": other_status.conditions }),
            )
            .await?;
        }
        Ok(())
    }

    /// Keep each volume's snapshot as its changed-block base (named with volume backup
    /// `ids[i]`), then delete the volume's previous bases; which volumes keep theirs.
    async fn keep_bases(&self, status: &BackupStatus, ids: &[String]) -> Result<Vec<bool>> {
        let client = &self.ctx.client;
        try_join_all(status.volumes.iter().zip(ids).map(|(v, id)| async move {
            let snapshot = self.key(v).name(Role::Snapshot);
            let kept = cbt::keep_as_base(client, &self.namespace, &snapshot, &v.pvc, id).await?;
            if kept {
                cbt::retire_bases(client, &self.namespace, &v.pvc, &snapshot).await?;
            }
            Ok::<_, Error>(kept)
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
        let key = |v: &VolumeStatus| self.key(v);
        cleanup(client, key, ns, others, Temporaries::SnapshotAndClaim).await?;
        cleanup(client, key, ns, bases, Temporaries::JobOnly).await?;
        for volume in bases {
            let claim = self.key(volume).name(Role::Volume);
            delete_pvc(client, ns, &claim)
                .await
                .map_err(Error::csi(format!("delete PVC {ns}/{claim}")))?;
        }
        stash::remove(client, ns, &self.owner).await
    }
}
