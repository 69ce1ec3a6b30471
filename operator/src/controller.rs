//! The controller's run loop: kube-runtime `Controller`s for Backups and Restores around
//! [`reconcile_backup`] and [`reconcile_restore`], and for Targets around
//! [`reconcile_target`], until SIGTERM or Ctrl-C. Backups and Restores also watch the Jobs,
//! PVCs and VolumeSnapshots they make (`run_of`), so a snapshot turning ready or a datamover
//! ending is reconciled when it happens; a Backup waiting for another's locks, or for a free
//! datamover slot on some node (a Backup or a Restore), and a Restore waiting for its Backup are
//! woken by that Backup's or that datamover Job's change (`lock_waiters`, `slot_waiters`,
//! `restore_slot_waiters`, `restores_of`). The
//! runs' requeue (`Context::resync`) is then only a safety net. Each reconcile of a run is counted and timed in the context's
//! [`crate::metrics::Metrics`]; the context's [`crate::endpoint::Health`] learns when both
//! watches have listed their resources.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::time::Instant;

use crate::backoff::ObjectKey;
use crate::crd::{Backup, Restore, Target};
use crate::metrics::{Kind, Outcome};
use crate::reconcile::error_chain;
use crate::reconcile::nodes::SLOT_CONDITION;
use crate::status::{Condition, ConditionStatus, Phase};
use crate::{Context, Error, reconcile_backup, reconcile_restore, reconcile_target};
use strata_csi::VolumeSnapshot;
use strata_csi::naming::LABEL_RUN_UID;

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Watch only the objects Strata made (`app.kubernetes.io/managed-by=strata`).
fn owned() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        strata_csi::naming::MANAGED_BY
    ))
}

/// The run of kind `K` an object Strata made belongs to: its controller ownerReference, or, in
/// another namespace than the run's (where an ownerReference cannot point), the run whose uid
/// its `strata.io/run-uid` label carries, found in the runs' watch cache `runs`.
fn run_of<K, O>(runs: Store<K>) -> impl Fn(O) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    O: Resource,
{
    move |object| {
        let meta = object.meta();
        let owner = meta.owner_references.iter().flatten().find(|o| {
            o.controller == Some(true)
                && o.kind == K::kind(&())
                && o.api_version == K::api_version(&())
        });
        if let (Some(owner), Some(namespace)) = (owner, meta.namespace.as_deref()) {
            return Some(ObjectRef::new(&owner.name).within(namespace));
        }
        let uid = meta.labels.as_ref()?.get(LABEL_RUN_UID)?;
        runs.state()
            .iter()
            .find(|run| run.meta().uid.as_deref() == Some(uid.as_str()))
            .map(|run| ObjectRef::from_obj(&**run))
    }
}

/// `controller` also reconciling a run when a PVC or VolumeSnapshot it made changes.
fn watch_claims_and_snapshots<K>(
    controller: Controller<K>,
    client: &Client,
    namespace: Option<&str>,
    runs: &Store<K>,
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    controller
        .watches(
            api::<PersistentVolumeClaim>(client, namespace),
            owned(),
            run_of(runs.clone()),
        )
        .watches(
            api::<VolumeSnapshot>(client, namespace),
            owned(),
            run_of(runs.clone()),
        )
}

/// Whether `conditions` has condition `type_` False: the run waits for what it names.
fn waits(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::False)
}

/// The Backups that are not final and whose status says `waiting`.
fn backups_waiting(
    backups: &Store<Backup>,
    waiting: impl Fn(&Backup, &crate::crd::BackupStatus) -> bool,
) -> Vec<ObjectRef<Backup>> {
    backups
        .state()
        .iter()
        .filter(|b| {
            b.status.as_ref().is_some_and(|status| {
                !status.phase.is_some_and(Phase::is_final) && waiting(b, status)
            })
        })
        .map(|b| ObjectRef::from_obj(&**b))
        .collect()
}

/// The other Backups of a changed Backup's namespace that wait for volume locks: a Backup's
/// end (its final status) lets them take over the locks it held.
fn lock_waiters(backups: Store<Backup>) -> impl Fn(Backup) -> Vec<ObjectRef<Backup>> {
    move |changed| {
        let mut woken = backups_waiting(&backups, |b, status| {
            b.namespace() == changed.namespace()
                && b.name_any() != changed.name_any()
                && waits(&status.conditions, "VolumesLocked")
        });
        // A deleted Backup removing its data (often Completed, so not among the above) waits
        // for the same locks.
        woken.extend(
            backups
                .state()
                .iter()
                .filter(|b| {
                    b.meta().deletion_timestamp.is_some()
                        && b.namespace() == changed.namespace()
                        && b.name_any() != changed.name_any()
                        && b.status
                            .as_ref()
                            .is_some_and(|s| waits(&s.conditions, "Deleting"))
                })
                .map(|b| ObjectRef::from_obj(&**b)),
        );
        woken
    }
}

/// The Backup a changed Restore names: a deleted Backup whose data a Restore reads waits for
/// that Restore to end.
fn backup_of(restore: Restore) -> Vec<ObjectRef<Backup>> {
    let mut backup = ObjectRef::new(&restore.spec.backup_ref.name);
    if let Some(namespace) = restore.namespace() {
        backup = backup.within(&namespace);
    }
    vec![backup]
}

/// The Backups waiting for a datamover slot on some node ([`SLOT_CONDITION`]): any datamover
/// Job's change may free one, whichever run it belongs to.
fn slot_waiters(backups: Store<Backup>) -> impl Fn(Job) -> Vec<ObjectRef<Backup>> {
    let owner = run_of::<Backup, Job>(backups.clone());
    move |job| {
        let mut woken = backups_waiting(&backups, |_, status| {
            waits(&status.conditions, SLOT_CONDITION)
        });
        woken.extend(owner(job));
        woken
    }
}

/// For the Restores: a changed Job's own Restore, and the Restores waiting for a datamover
/// slot ([`SLOT_CONDITION`]), which any datamover Job's change may free.
fn restore_slot_waiters(restores: Store<Restore>) -> impl Fn(Job) -> Vec<ObjectRef<Restore>> {
    let owner = run_of::<Restore, Job>(restores.clone());
    move |job| {
        let mut woken: Vec<ObjectRef<Restore>> = restores
            .state()
            .iter()
            .filter(|r| {
                r.status.as_ref().is_some_and(|status| {
                    !status.phase.is_some_and(Phase::is_final)
                        && waits(&status.conditions, SLOT_CONDITION)
                })
            })
            .map(|r| ObjectRef::from_obj(&**r))
            .collect();
        woken.extend(owner(job));
        woken
    }
}

/// The Restores of a changed Backup (by `spec.backupRef`) that are not final: they wait for
/// it to complete.
fn restores_of(restores: Store<Restore>) -> impl Fn(Backup) -> Vec<ObjectRef<Restore>> {
    move |backup| {
        restores
            .state()
            .iter()
            .filter(|r| {
                r.namespace() == backup.namespace()
                    && r.spec.backup_ref.name == backup.name_any()
                    && !r
                        .status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(Phase::is_final)
            })
            .map(|r| ObjectRef::from_obj(&**r))
            .collect()
    }
}

/// A failed reconcile is retried after its object's backoff ([`crate::backoff`]): the delay
/// the reconciler recorded, or, for an error raised before it could, one recorded here.
fn retry<K: kube::Resource>(object: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = err.requeue_after().unwrap_or_else(|| {
        let key = ObjectKey::of(&*object);
        let version = object.meta().resource_version.as_deref();
        ctx.backoff
            .failed(&key, err.class(), version, Instant::now())
            .delay
    });
    eprintln!("retrying in {}s: {}", delay.as_secs(), error_chain(err));
    Action::requeue(delay)
}

/// Run `reconcile` and record its outcome and duration as a reconcile of `kind`.
async fn measured<T>(
    ctx: &Context,
    kind: Kind,
    reconcile: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let started = tokio::time::Instant::now();
    let result = reconcile.await;
    let outcome = match result {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Error,
    };
    ctx.metrics.reconciled(kind, outcome, started.elapsed());
    result
}

/// Reconciles the Backups and Restores of `namespace` (all namespaces when `None`) until the
/// process is asked to stop; each reconcile's outcome is logged on stderr.
pub async fn run(ctx: Context, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let ctx = Arc::new(ctx);
    let backups = Controller::new(
        api::<Backup>(&client, namespace),
        watcher::Config::default(),
    );
    let backup_store = backups.store();
    let backups = backups
        .watches(
            api::<Job>(&client, namespace),
            owned(),
            slot_waiters(backup_store.clone()),
        )
        .watches(
            api::<Backup>(&client, namespace),
            watcher::Config::default(),
            lock_waiters(backup_store.clone()),
        )
        .watches(
            api::<Restore>(&client, namespace),
            watcher::Config::default(),
            backup_of,
        );
    let backups = watch_claims_and_snapshots(backups, &client, namespace, &backup_store);
    let backups = backups
        .shutdown_on_signal()
        .run(
            |backup, ctx: Arc<Context>| async move {
                ctx.metrics.backup_seen(&backup);
                measured(&ctx, Kind::Backup, reconcile_backup(&backup, &ctx)).await
            },
            retry,
            ctx.clone(),
        )
        .for_each(|result| async move {
            match result {
                Ok((backup, _)) => eprintln!("reconciled Backup {backup}"),
                Err(err) => eprintln!("Backup controller: {err}"),
            }
        });
    let restores = Controller::new(
        api::<Restore>(&client, namespace),
        watcher::Config::default(),
    );
    let restore_store = restores.store();
    let restores = restores
        .watches(
            api::<Job>(&client, namespace),
            owned(),
            restore_slot_waiters(restore_store.clone()),
        )
        .watches(
            api::<Backup>(&client, namespace),
            watcher::Config::default(),
            restores_of(restore_store.clone()),
        );
    let restores = watch_claims_and_snapshots(restores, &client, namespace, &restore_store);
    let restores = restores
        .shutdown_on_signal()
        .run(
            |restore, ctx: Arc<Context>| async move {
                measured(&ctx, Kind::Restore, reconcile_restore(&restore, &ctx)).await
            },
            retry,
            ctx.clone(),
        )
        .for_each(|result| async move {
            match result {
                Ok((restore, _)) => eprintln!("reconciled Restore {restore}"),
                Err(err) => eprintln!("Restore controller: {err}"),
            }
        });
    // Target health: checked on every change and every `target_check_interval` (the
    // reconcile's requeue); a failed check is in the status, so errors here are API errors.
    let targets = Controller::new(
        api::<Target>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |target, ctx: Arc<Context>| async move { reconcile_target(&target, &ctx).await },
        retry,
        ctx.clone(),
    )
    .for_each(|result| async move {
        if let Err(err) = result {
            eprintln!("Target controller: {err}");
        }
    });
    let started = async {
        let ready = futures::join!(
            backup_store.wait_until_ready(),
            restore_store.wait_until_ready()
        );
        if ready.0.is_ok() && ready.1.is_ok() {
            ctx.health.watches_started();
        }
    };
    futures::join!(backups, restores, targets, started);
}
