//! Reconciling a Restore: the reverse of a backup, one step per call.
//!
//! | phase       | the call                                                                     |
//! |-------------|------------------------------------------------------------------------------|
//! | (none)      | validates (the Backup is Completed, its archive reads), applies the          |
//! |             | Namespace, recreates the Block PVCs, makes a Block staging PVC for each      |
//! |             | Filesystem one, and starts a restore datamover per volume                    |
//! | `Copying`   | reads the Jobs; a failed one fails the Restore with the Job's message; a     |
//! |             | filled staging PVC is snapshotted, and its Filesystem PVC made from that     |
//! | `Finishing` | applies the other objects in restore order (server-side apply), deletes Jobs;|
//! |             | deletes each staging PVC and snapshot once its PVC is Bound                  |
//! | final       | nothing                                                                      |
//!
//! The volumes are filled before the workloads that use them exist, so no pod sees a
//! half-restored volume. The datamover writes the raw device: a `volumeMode: Block` PVC is
//! recreated and filled in place; a Filesystem PVC is filled through a Block staging PVC and a
//! snapshot of it, from which the PVC is provisioned (see the `staging` module). No step waits
//! for a PVC to bind before the workloads are applied, as a `WaitForFirstConsumer` PVC binds
//! only once a pod uses it; the staging snapshot is kept until then, with the Restore in
//! `Finishing` and condition `StagingCleanedUp` False.
//!
//! A call may run several steps; it writes the status once, at the end. Every step tolerates
//! having run before (deterministic names, create-or-adopt), so an interrupted call is repeated;
//! Finishing, which deletes the Jobs that Copying reads, starts only in a call that finds the
//! status already saying Finishing.
//!
//! This file holds the entry point and what every step reads (the Backup, its archive, the
//! restore plan); the first step is in `prepare`, `Copying` in `copy`, `Finishing` in `finish`.

mod copy;
mod finish;
mod prepare;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::runtime::controller::Action;
use serde_json::Value;

use super::namespace_and_name;
use super::outcome::Call;
use super::volumes::label_restored;
use super::volumes::{Temporaries, cleanup, cleanup_labelled};
use super::{controller_of, finalizer};
use crate::context::{Context, TargetAccess};
use crate::crd::{Backup, BackupStatus, ExistingObjects, Restore, RestoreStatus};
use crate::error::{Error, ErrorClass, Result};
use crate::status::{ConditionStatus, Phase, set_condition};
use strata_csi::{Role, VolumeKey};
use strata_discovery::restore::{ApplyOptions, ExistingPolicy};
use strata_discovery::{
    LiveSource, MetadataBackup, ObjectSource, RestoreOrder, RestorePlan, Transforms,
};
use strata_target::{AppBackupId, AppName, Target};

/// One reconcile of a Restore.
struct Run<'a> {
    restore: &'a Restore,
    ctx: &'a Context,
    namespace: String,
    name: String,
    /// The Restore as the owner of what it makes in its own namespace.
    owner: OwnerReference,
}

/// What the Backup being restored provides.
struct Source {
    backup: BackupStatus,
    target: TargetAccess,
    metadata: MetadataBackup,
    /// Namespace of the backed-up application.
    namespace: String,
}

/// Move `restore` one step forward and write its status; the returned action says when to look
/// again. A finished Restore is left alone without any API call.
pub async fn reconcile_restore(restore: &Restore, ctx: &Context) -> Result<Action> {
    let mut status = restore.status.clone().unwrap_or_default();
    if finalizer::is_deleted(restore) {
        if finalizer::has_finalizer(restore) {
            let run = Run::new(restore, ctx)?;
            run.cancel(&status).await?;
            finalizer::remove(&ctx.client, &run.namespace, restore).await?;
        }
        return Ok(Action::await_change());
    }
    if status.phase.is_some_and(Phase::is_final) {
        return Ok(Action::await_change());
    }
    // The finalizer first. The rest of the call works on the object as that patch left it,
    // so the status write carries its resourceVersion, but only if the status is still the
    // one read: else the status computed here would overwrite a newer one.
    let namespace = restore.metadata.namespace.clone().unwrap_or_default();
    let added = finalizer::add(&ctx.client, &namespace, restore).await?;
    let restore = match &added {
        Some(patched) if patched.status == restore.status => patched,
        _ => restore,
    };
    let run = Run::new(restore, ctx)?;
    let call = Call::new(ctx, restore, &run.namespace, &run.name);
    if let Some(wait) = call.backing_off() {
        return Ok(Action::requeue(wait));
    }
    let before = status.clone();
    let outcome = match run.step(&mut status).await {
        // The run's copies of the credentials go with it, and its datamovers still running;
        // a failed removal is retried.
        Err(err) if err.class() == ErrorClass::Permanent => {
            let stopped = match run.revoke_access().await {
                Ok(()) => run.stop_datamovers(&status).await,
                Err(failed) => Err(failed),
            };
            stopped.and(Err(err))
        }
        outcome => outcome,
    };
    let action = call.end(&before, &mut status, outcome).await?;
    ctx.metrics.restore_status_written(&before, &status);
    Ok(action)
}

impl<'a> Run<'a> {
    fn new(restore: &'a Restore, ctx: &'a Context) -> Result<Self> {
        let (namespace, name) = namespace_and_name(restore, "Restore")?;
        Ok(Run {
            restore,
            ctx,
            namespace,
            name,
            owner: controller_of(restore, "Restore")?,
        })
    }

    /// Cancel the run of a deleted Restore before its finalizer goes: delete its datamover
    /// Jobs and its staging PVCs and snapshots, by name, as they may be in a namespace its
    /// owner references cannot reach. (The Backup restored, in the Restore's namespace, may be
    /// gone, so the restored namespace comes from the mapping alone.) What it restored stays:
    /// those PVCs and objects are the application's now.
    async fn cancel(&self, status: &RestoreStatus) -> Result<()> {
        if status.phase == Some(Phase::Completed) {
            return Ok(());
        }
        let restored = self.restored_namespace(&self.namespace);
        let staged: Vec<_> = status
            .volumes
            .iter()
            .filter(|v| v.staging.is_some())
            .cloned()
            .collect();
        self.revoke_access().await?;
        let key = |v: &crate::crd::VolumeStatus| self.key(&restored, &v.pvc);
        cleanup(
            &self.ctx.client,
            key,
            &restored,
            &status.volumes,
            Temporaries::JobOnly,
        )
        .await?;
        cleanup(
            &self.ctx.client,
            key,
            &restored,
            &staged,
            Temporaries::SnapshotAndClaim,
        )
        .await?;
        // What the status does not name (a status write lost after the objects were made),
        // found by the run's labels: in a mapped namespace no owner reference reaches it.
        cleanup_labelled(&self.ctx.client, &restored, &self.owner.uid).await
    }

    /// Delete the run's datamover Jobs that have not ended ([`super::jobs::stop_job`]): a
    /// failed Restore's other volumes are of no use, and their Jobs would hold datamover slots
    /// for up to their deadline.
    async fn stop_datamovers(&self, status: &RestoreStatus) -> Result<()> {
        let restored = self.restored_namespace(&self.namespace);
        for volume in &status.volumes {
            let job = self.key(&restored, &volume.pvc).name(Role::Datamover);
            super::jobs::stop_job(&self.ctx.client, &restored, &job).await?;
        }
        Ok(())
    }

    /// Remove the credentials and ServiceAccount made for the run in a mapped namespace.
    async fn revoke_access(&self) -> Result<()> {
        let destinations: std::collections::BTreeSet<&String> =
            self.restore.spec.namespace_mapping.values().collect();
        for namespace in destinations {
            super::access::revoke(&self.ctx.client, &self.owner, &self.namespace, namespace)
                .await?;
        }
        Ok(())
    }

    /// The names and owner of the objects restoring `namespace/pvc` makes: named with the
    /// Restore's uid; owned by it when in its namespace, else found by their run labels.
    fn key(&self, namespace: &str, pvc: &str) -> VolumeKey {
        VolumeKey::of_run(&self.owner, &self.namespace, namespace, pvc)
    }

    /// Where the application's namespace is restored to.
    fn restored_namespace(&self, source: &str) -> String {
        self.restore
            .spec
            .namespace_mapping
            .get(source)
            .cloned()
            .unwrap_or_else(|| source.to_owned())
    }

    /// One step; the waits for the Backup, the Jobs and the staging snapshots end with a change
    /// the run loop watches (so `resync` is a safety net), that for a restored claim to bind
    /// does not (`poll`).
    async fn step(&self, status: &mut RestoreStatus) -> Result<Action> {
        let watched = Action::requeue(self.ctx.resync);
        if matches!(status.phase, None | Some(Phase::Pending | Phase::Preparing)) {
            let Some(source) = self.source(status).await? else {
                return Ok(watched);
            };
            self.prepare(status, &source).await?;
        }
        if status.phase == Some(Phase::Copying) {
            self.copy(status).await?;
            // Finishing deletes the Jobs, which Copying reads: it runs in the next call, once
            // the status says Finishing (its write is a watched change), so a call interrupted
            // before writing the status never leaves a Copying run without its Jobs.
            return Ok(watched);
        }
        if status.phase == Some(Phase::Finishing) {
            if status.objects_applied.is_none() {
                let Some(source) = self.source(status).await? else {
                    return Ok(watched);
                };
                self.apply_objects(status, &source).await?;
            }
            if !self.clean_up_staging(status).await? {
                return Ok(Action::requeue(self.ctx.poll));
            }
            status.phase = Some(Phase::Completed);
        }
        Ok(Action::await_change())
    }

    /// The namespace of the Backup being restored (the Backup's own).
    async fn source_namespace(&self) -> Result<String> {
        Ok(self.backup().await?.metadata.namespace.unwrap_or_default())
    }

    async fn backup(&self) -> Result<Backup> {
        let name = &self.restore.spec.backup_ref.name;
        let backups: Api<Backup> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        backups
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("get Backup {}/{name}", self.namespace)))?
            .ok_or_else(|| Error::InvalidSpec {
                what: "spec.backupRef",
                reason: format!("Backup {}/{name} does not exist", self.namespace),
            })
    }

    /// The Backup, its target and its metadata; `None` (with a condition) while the Backup is
    /// still running.
    async fn source(&self, status: &mut RestoreStatus) -> Result<Option<Source>> {
        let backup = self.backup().await?;
        let name = &self.restore.spec.backup_ref.name;
        let backup_status = backup.status.clone().unwrap_or_default();
        match backup_status.phase {
            Some(Phase::Completed) => {}
            Some(Phase::Failed) => {
                return Err(Error::InvalidSpec {
                    what: "spec.backupRef",
                    reason: format!("Backup {name} failed"),
                });
            }
            phase => {
                set_condition(
                    &mut status.conditions,
                    "Validated",
                    ConditionStatus::False,
                    "BackupNotCompleted",
                    format!("Backup {name} is {phase:?}; waiting for it to complete"),
                    self.restore.metadata.generation,
                );
                return Ok(None);
            }
        }
        let (Some(app), Some(id)) = (
            backup_status.application_name.clone(),
            backup_status.backup_id.clone(),
        ) else {
            return Err(Error::InvalidSpec {
                what: "spec.backupRef",
                reason: format!("Backup {name} is Completed but names no application backup"),
            });
        };
        let app = AppName::new(app).map_err(Error::target("application name"))?;
        let id = AppBackupId::new(id).map_err(Error::target("backup id"))?;
        let target =
            TargetAccess::resolve(self.ctx, &self.namespace, &backup.spec.target_ref.name).await?;
        let archive = target
            .with_existing(move |t| {
                check_present(t, &app, &id)?;
                t.read_app_archive(&app, &id)
                    .map_err(Error::target(format!("read the archive of {app}/{id}")))
            })
            .await?;
        let metadata = MetadataBackup::read_archive(&archive[..])
            .map_err(Error::discovery("read the metadata archive"))?;
        self.authorize(&metadata).await?;
        Ok(Some(Source {
            backup: backup_status,
            target,
            metadata,
            namespace: backup.metadata.namespace.unwrap_or_default(),
        }))
    }

    /// Refuses the whole Restore, before anything is written, when the cluster's restore
    /// policy ([`crate::policy`]) refuses any object of its mapped plan: the archive comes from
    /// shared storage, so what it holds is not trusted to be what the Backup saved.
    async fn authorize(&self, metadata: &MetadataBackup) -> Result<()> {
        let plan = self.plan(metadata)?;
        let served = LiveSource::new(self.ctx.client.clone())
            .kinds()
            .await
            .map_err(Error::discovery("discover the API's kinds"))?;
        let policy = &self.ctx.restore_policy;
        let mut refused = policy.refusals(&self.namespace, &plan.objects, &served);
        // The run writes into each mapped destination (its credentials, its account) whatever
        // the archive holds.
        for into in self.restore.spec.namespace_mapping.values() {
            if !policy.allows_namespace(&self.namespace, into)
                && !refused
                    .iter()
                    .any(|r| r.starts_with(&format!("namespace {into}:")))
            {
                refused.push(policy.namespace_refusal(&self.namespace, into));
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(Error::NotAuthorized { refused })
        }
    }

    fn plan(&self, metadata: &MetadataBackup) -> Result<RestorePlan> {
        let transforms = Transforms {
            namespaces: self.restore.spec.namespace_mapping.clone(),
            storage_classes: self.restore.spec.storage_class_mapping.clone(),
            ..Default::default()
        };
        RestorePlan::new(
            metadata.objects.clone(),
            &RestoreOrder::default(),
            &transforms,
        )
        .map_err(Error::discovery("plan the restore"))
    }

    fn apply_options(&self) -> ApplyOptions {
        ApplyOptions {
            field_manager: self.ctx.field_manager.clone(),
            existing: match self.restore.spec.existing_objects {
                ExistingObjects::Skip => ExistingPolicy::Skip,
                ExistingObjects::Update => ExistingPolicy::Update,
            },
            ..Default::default()
        }
    }

    /// The archived (mapped) claim `claim`, labelled with this run, without the source
    /// cluster's owner references and finalizers.
    ///
    /// Claims are created before the objects that own them are applied (those come in
    /// Finishing, with new uids): a claim naming an owner uid this cluster does not have is
    /// deleted by the garbage collector as soon as no pod uses it (a StatefulSet's claims
    /// with `persistentVolumeClaimRetentionPolicy: Delete`, an operator's claims such as a
    /// CloudNativePG cluster's), and the owner's controller then makes an empty one; with
    /// `OwnerReferencesPermissionEnforcement` the create is refused. A finalizer of a
    /// controller the cluster may not run would block the claim's deletion for ever. The
    /// owning controller adopts its claims again once it runs.
    fn restored_claim(&self, claim: Value) -> Result<PersistentVolumeClaim> {
        let mut pvc: PersistentVolumeClaim =
            serde_json::from_value(claim).map_err(|e| Error::InvalidSpec {
                what: "archived PVC",
                reason: e.to_string(),
            })?;
        pvc.metadata.owner_references = None;
        pvc.metadata.finalizers = None;
        label_restored(&mut pvc, &self.name);
        Ok(pvc)
    }
}

/// Whether `object` is PVC `namespace/name`.
fn is_claim(object: &Value, namespace: &str, name: &str) -> bool {
    object["apiVersion"] == "v1"
        && object["kind"] == "PersistentVolumeClaim"
        && object["metadata"]["namespace"] == namespace
        && object["metadata"]["name"] == name
}

/// Fails at once, naming the missing id, when application backup `app/id` is not in the
/// target (expired by retention, deleted) or names a volume backup that is not committed
/// there, instead of a target error in the middle of the copy.
fn check_present(target: &Target, app: &AppName, id: &AppBackupId) -> Result<()> {
    let manifest = match target.app_backup(app, id) {
        Ok(manifest) => manifest,
        Err(strata_target::Error::NotFound { .. }) => {
            return Err(Error::InvalidSpec {
                what: "spec.backupRef",
                reason: format!(
                    "application backup {app}/{id} is not in the target (expired by retention \
                     or deleted)"
                ),
            });
        }
        Err(err) => return Err(Error::target(format!("read application backup {app}/{id}"))(err)),
    };
    for r in &manifest.volumes {
        match target.backup(&r.volume, &r.backup) {
            Ok(_) => {}
            Err(strata_target::Error::NotFound { .. }) => {
                return Err(Error::InvalidSpec {
                    what: "spec.backupRef",
                    reason: format!(
                        "volume backup {}/{} of application backup {app}/{id} is not committed \
                         in the target",
                        r.volume, r.backup
                    ),
                });
            }
            Err(err) => {
                return Err(Error::target(format!(
                    "read volume backup {}/{}",
                    r.volume, r.backup
                ))(err));
            }
        }
    }
    Ok(())
}
