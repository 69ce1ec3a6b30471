//! The `Copying` step of a Restore: reading the datamover Jobs and provisioning the Filesystem
//! PVCs from the snapshots of their filled staging volumes.

use futures::future::try_join_all;

use super::{Run, Source, is_claim};
use crate::crd::RestoreStatus;
use crate::error::{Error, Result};
use crate::reconcile::staging::{awaits_snapshot, provision};
use crate::reconcile::volumes::{finished_jobs, progress, record_stuck};
use crate::status::{ConditionStatus, Phase, set_condition};

impl Run<'_> {
    /// Read the datamovers, and make the Filesystem PVCs of the filled staging volumes; once
    /// every volume is settled, move to Finishing.
    pub(super) async fn copy(&self, status: &mut RestoreStatus) -> Result<()> {
        let restored = self.restored_namespace(&self.source_namespace().await?);
        if status.volumes.iter().any(|v| !v.started && !v.done) {
            let Some(source) = self.source(status).await? else {
                return Ok(());
            };
            let access = self.grant_access(&source, &restored).await?;
            self.start_datamovers(status, &restored, &source.target, &access)
                .await?;
        }
        let read = finished_jobs(
            &self.ctx.client,
            |v| self.key(&restored, &v.pvc),
            |v| v.started,
            &restored,
            &mut status.volumes,
            self.ctx.datamover_start_timeout,
        )
        .await?;
        record_stuck(
            &mut status.conditions,
            &read.stuck,
            self.restore.metadata.generation,
        );
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
                        let key = self.key(restored, &volume.pvc);
                        provision(
                            &self.ctx.client,
                            &key,
                            volume,
                            claim,
                            class,
                            &self.name,
                            self.ctx.snapshot_ready_timeout,
                        )
                        .await
                    }
                }),
        )
        .await?;
        Ok(())
    }
}
