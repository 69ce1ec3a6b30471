//! The controller's run loop: kube-runtime `Controller`s for Backups and Restores around
//! [`reconcile_backup`] and [`reconcile_restore`], and for Targets around
//! [`reconcile_target`], until SIGTERM or Ctrl-C. Backups and Restores also watch the Jobs
//! (and a Backup its PVCs) they own, so a datamover's end is reconciled when it happens rather
//! than at the next poll. Each reconcile of a run is counted and timed in the context's
//! [`crate::metrics::Metrics`]; the context's [`crate::endpoint::Health`] learns when both
//! watches have listed their resources.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::time::Instant;

use crate::backoff::ObjectKey;
use crate::crd::{Backup, Restore, Target};
use crate::metrics::{Kind, Outcome};
use crate::reconcile::error_chain;
use crate::{Context, Error, reconcile_backup, reconcile_restore, reconcile_target};

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
    )
    .owns(api::<Job>(&client, namespace), owned())
    .owns(api::<PersistentVolumeClaim>(&client, namespace), owned());
    let backup_store = backups.store();
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
    )
    .owns(api::<Job>(&client, namespace), owned());
    let restore_store = restores.store();
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
