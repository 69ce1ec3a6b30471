//! The `Copying` step of a Backup: reading the datamover Jobs and the volume backups they
//! wrote, or finding that an earlier call already committed them.

use super::Run;
use crate::crd::{BackupStatus, VolumeStatus};
use crate::error::{Error, Result};
use crate::reconcile::volumes::{finished_jobs, progress, record_stuck};
use crate::status::{ConditionStatus, Phase, set_condition};
use strata_target::VolumeName;

impl Run<'_> {
    /// Read the datamovers; true once all succeeded.
    pub(super) async fn copy(&self, status: &mut BackupStatus) -> Result<bool> {
        let read = match finished_jobs(
            &self.ctx.client,
            |v| self.key(v),
            |v| v.started,
            &self.namespace,
            &mut status.volumes,
            self.ctx.datamover_start_timeout,
        )
        .await
        {
            Ok(read) => read,
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
        record_stuck(
            &mut status.conditions,
            &read.stuck,
            self.backup.metadata.generation,
        );
        let finished = read.finished;
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
        // Volumes waiting for a free slot (`maxParallelVolumes`) start as others finish.
        if status.volumes.iter().any(|v| !v.started && !v.done) {
            self.snapshot(status).await?;
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
}

/// The backup a finished datamover wrote: the volume's latest, which must be new.
fn written_backup(target: &strata_target::Target, volume: &VolumeStatus) -> Result<String> {
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
