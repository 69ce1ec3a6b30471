//! The `Finishing` step of a Restore: applying the other objects, deleting the Jobs, and
//! deleting each staging PVC and snapshot once its PVC is Bound.

use futures::future::try_join_all;

use super::{Run, Source, is_claim};
use crate::crd::RestoreStatus;
use crate::error::{Error, Result};
use crate::reconcile::access::revoke;
use crate::reconcile::staging::{awaits_binding, clean_up_once_bound};
use crate::reconcile::volumes::{Temporaries, cleanup};
use crate::status::{ConditionStatus, set_condition};
use strata_discovery::restore::apply;

impl Run<'_> {
    /// Apply everything but the restored PVCs, then delete the Jobs; the counts in the status
    /// record that it was done.
    pub(super) async fn apply_objects(
        &self,
        status: &mut RestoreStatus,
        source: &Source,
    ) -> Result<()> {
        let restored = self.restored_namespace(&source.namespace);
        let mut plan = self.plan(&source.metadata)?;
        // The claims were made with the volumes, the Namespaces before them.
        plan.objects.retain(|o| {
            let namespace = o["kind"] == "Namespace" && o["apiVersion"] == "v1";
            let claim = status
                .volumes
                .iter()
                .any(|v| is_claim(o, &restored, &v.pvc));
            !namespace && !claim
        });
        let report = apply(&self.ctx.client, &plan, &self.apply_options())
            .await
            .map_err(Error::discovery("apply the objects"))?;
        cleanup(
            &self.ctx.client,
            |v| self.key(&restored, &v.pvc),
            &restored,
            &status.volumes,
            Temporaries::JobOnly,
        )
        .await?;
        revoke(&self.ctx.client, &self.owner, &self.namespace, &restored).await?;
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

    /// Delete the staging objects of the volumes whose PVC is Bound; true once none is left.
    pub(super) async fn clean_up_staging(&self, status: &mut RestoreStatus) -> Result<bool> {
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
                    let key = self.key(&restored, &volume.pvc);
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
}
