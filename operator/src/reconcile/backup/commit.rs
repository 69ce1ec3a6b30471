//! The `Finishing` step of a Backup: committing the application backup, applying retention,
//! keeping each snapshot as its volume's changed-block base and retiring the previous one,
//! and deleting the temporaries.

use futures::future::try_join_all;

use super::Run;
use crate::crd::{BackupStatus, CleanupPolicy, VolumeStatus};
use crate::error::{Error, Result};
use crate::reconcile::volumes::{Temporaries, cleanup};
use crate::reconcile::{cbt, stash};
use crate::status::{ConditionStatus, Phase, set_condition};
use strata_csi::Role;
use strata_csi::client::delete_pvc;
use strata_target::{BackupId, VolumeBackupRef, VolumeName};

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
        let prune = self.ctx.prune;
        let gc_failure = self
            .target()
            .await?
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
                if let Some(keep) = keep_last {
                    for r in &refs {
                        prune(t, &r.volume, keep.max(1)).map_err(|source| Error::Retention {
                            volume: r.volume.to_string(),
                            source,
                        })?;
                    }
                }
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
                Ok((!failures.is_empty()).then(|| failures.join("; ")))
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
