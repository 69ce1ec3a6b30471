//! The first step of a Restore: recreating the Namespace and the PVCs (or their Block staging
//! PVCs) and starting a restore datamover per volume.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::try_join_all;
use serde_json::Value;

use super::{Run, Source, is_claim};
use crate::context::{TargetAccess, volume_name};
use crate::crd::{RestoreStatus, Staging, VolumeStatus};
use crate::error::{Error, Result};
use crate::reconcile::access::{RunAccess, grant};
use crate::reconcile::jobs::create_job;
use crate::reconcile::nodes::{NodeSlots, exclude, record_slots};
use crate::reconcile::staging::{create_staging, needs_staging, request_at_least};
use crate::reconcile::volumes::{create_claim, progress};
use crate::status::{ConditionStatus, Phase, quantity_bytes, set_condition};
use strata_csi::Role;
use strata_csi::datamover::{Attach, DatamoverSpec, restore_job};
use strata_discovery::RestorePlan;
use strata_discovery::restore::{ExistingPolicy, apply};

impl Run<'_> {
    /// Validate, recreate the PVCs and start a restore datamover per volume.
    pub(super) async fn prepare(&self, status: &mut RestoreStatus, source: &Source) -> Result<()> {
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
                staging: needs_staging(&volume.volume_mode).then_some(Staging::Filling),
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
        // An existing Namespace is never applied over, whatever `existingObjects` says: its
        // labels (Pod Security levels among them) are the administrator's, not the archive's.
        let mut options = self.apply_options();
        options.existing = ExistingPolicy::Skip;
        apply(&self.ctx.client, &namespaces, &options)
            .await
            .map_err(Error::discovery("apply the Namespace"))?;
        let access = self.grant_access(source, &restored).await?;
        try_join_all(
            claims
                .into_iter()
                .zip(&volumes)
                .map(|(claim, volume)| self.restore_claim(claim, volume, &restored)),
        )
        .await?;
        status.backup_id = source.backup.backup_id.clone();
        status.progress = Some(progress(&volumes));
        status.volumes = volumes;
        self.start_datamovers(status, &restored, &source.target, &access)
            .await?;
        status.phase = Some(Phase::Copying);
        Ok(())
    }

    /// The run's credentials and ServiceAccount in the restored namespace (made there once,
    /// found again after).
    pub(super) async fn grant_access(&self, source: &Source, restored: &str) -> Result<RunAccess> {
        grant(
            &self.ctx.client,
            &self.owner,
            &self.namespace,
            restored,
            source.target.credentials_secret.as_deref(),
            self.ctx.datamover_service_account.as_deref(),
        )
        .await
    }

    /// Create the PVC (labelled with this run), or for a Filesystem one its Block staging PVC.
    async fn restore_claim(
        &self,
        claim: Value,
        volume: &VolumeStatus,
        namespace: &str,
    ) -> Result<()> {
        let client = &self.ctx.client;
        let mut pvc = self.restored_claim(claim)?;
        let key = self.key(namespace, &volume.pvc);
        if volume.staging.is_some() {
            create_staging(client, &key, &pvc, volume.size_bytes, &self.name).await?;
        } else {
            // Written in place: the device must hold the whole backed-up volume.
            request_at_least(&mut pvc, volume.size_bytes);
            create_claim(client, &pvc, &self.name).await?;
        }
        Ok(())
    }

    /// Start the restore datamover of each volume not started yet, on a node with a free
    /// slot under the controller's `--max-datamovers-per-node`, as a Backup does; the others
    /// wait, under condition `DatamoverSlots`, for a datamover to end (`copy` calls this again).
    pub(super) async fn start_datamovers(
        &self,
        status: &mut RestoreStatus,
        namespace: &str,
        target: &TargetAccess,
        access: &RunAccess,
    ) -> Result<()> {
        let waiting: Vec<usize> = (0..status.volumes.len())
            .filter(|&i| !status.volumes[i].started && !status.volumes[i].done)
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let _counting = self.ctx.datamover_slots.lock().await;
        let mut slots = NodeSlots::read(&self.ctx.client, self.ctx.max_datamovers_per_node).await?;
        let excluded: Vec<_> = waiting.iter().map_while(|_| slots.take()).collect();
        try_join_all(waiting.iter().zip(&excluded).map(|(&i, excluded)| {
            self.start_datamover(&status.volumes[i], namespace, target, access, excluded)
        }))
        .await?;
        for &i in &waiting[..excluded.len()] {
            status.volumes[i].started = true;
        }
        record_slots(
            &mut status.conditions,
            waiting.len() - excluded.len(),
            &slots,
            self.restore.metadata.generation,
        );
        Ok(())
    }

    /// The restore datamover filling `volume`'s PVC (its staging PVC for a Filesystem one),
    /// kept off the `excluded_nodes`.
    async fn start_datamover(
        &self,
        volume: &VolumeStatus,
        namespace: &str,
        target: &TargetAccess,
        access: &RunAccess,
        excluded_nodes: &BTreeSet<String>,
    ) -> Result<()> {
        let client = &self.ctx.client;
        let key = self.key(namespace, &volume.pvc);
        let filled = if volume.staging.is_some() {
            key.name(Role::Volume)
        } else {
            volume.pvc.clone()
        };
        let mut spec = DatamoverSpec::new(
            key,
            &self.ctx.image,
            filled,
            Attach::Block,
            &target.url,
            &volume.volume,
        );
        spec.node_affinity = exclude(spec.node_affinity.take(), excluded_nodes);
        spec.credentials_secret = access.credentials_secret.clone();
        spec.service_account = access.service_account.clone();
        spec.target_mount = target.mount.clone();
        spec.active_deadline_seconds = self
            .ctx
            .datamover_deadline
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let job = restore_job(&spec, volume.backup_id.as_deref())
            .map_err(Error::csi(format!("datamover of {}", volume.pvc)))?;
        create_job(client, &job).await?;
        Ok(())
    }
}
