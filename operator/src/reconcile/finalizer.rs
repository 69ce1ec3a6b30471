//! The `strata.io/cleanup` finalizer of Backups and Restores.
//!
//! A run's Jobs, temporary PVCs and snapshots are owned by it, so Kubernetes' garbage collector
//! removes them once the run is gone (docs "Garbage Collection"); but the collector does not
//! know that a datamover must stop before its claim goes, that a run's per-PVC Leases must be
//! released for the next Backup, nor what a Restore made in another namespace, where owner
//! references cannot reach. So each run carries this finalizer from its first reconcile: the
//! API server then only marks a deleted run (`metadata.deletionTimestamp`, docs "Finalizers"),
//! the reconciler cancels it, and removes the finalizer last, after which the object goes.
//!
//! Both patches are JSON patches (RFC 6902) whose `test` op makes them apply only to the
//! finalizers list they were computed from, so a finalizer another controller adds or removes
//! at the same time is never lost: the patch fails (422) and the next reconcile tries again.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// The finalizer Strata puts on the Backups and Restores it runs.
pub const FINALIZER: &str = "strata.io/cleanup";

/// Whether `object` carries [`FINALIZER`].
pub fn has_finalizer<K: Resource>(object: &K) -> bool {
    object
        .meta()
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// Whether `object` has been deleted and waits for its finalizers.
pub fn is_deleted<K: Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_some()
}

/// Add [`FINALIZER`] to `object` (in `namespace`), unless it has it; the object as this call's
/// patch left it, if it patched.
pub async fn add<K>(client: &Client, namespace: &str, object: &K) -> Result<Option<K>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    if has_finalizer(object) {
        return Ok(None);
    }
    let ops = match &object.meta().finalizers {
        // Absent: a test for null (which a missing member passes) guards the add.
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": Value::Null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        Some(list) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    };
    match patch(client, namespace, object, ops, "add the finalizer to").await {
        // The list changed since `object` was read (a stale copy, another controller's
        // finalizer): fine if ours is on it now, else the next reconcile tries again.
        Err(Error::Kube {
            source: kube::Error::Api(status),
            ..
        }) if status.code == 422 => {
            let name = object.meta().name.clone().unwrap_or_default();
            let current = Api::<K>::namespaced(client.clone(), namespace)
                .get(&name)
                .await
                .map_err(Error::kube(format!(
                    "get {} {namespace}/{name}",
                    K::kind(&())
                )))?;
            if has_finalizer(&current) {
                // `object` stays the one the call works on: stale, its status write will be
                // refused and the next call starts from a fresh read.
                Ok(None)
            } else {
                Err(Error::Kube {
                    operation: format!("add the finalizer to {} {namespace}/{name}", K::kind(&())),
                    source: kube::Error::Api(status),
                })
            }
        }
        other => other,
    }
}

/// Remove [`FINALIZER`] from `object` (in `namespace`); the API server then deletes an object
/// marked deleted whose list became empty.
pub async fn remove<K>(client: &Client, namespace: &str, object: &K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let Some(index) = object
        .meta()
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == FINALIZER)
    else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let ops = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    patch(client, namespace, object, ops, "remove the finalizer from")
        .await
        .map(drop)
}

async fn patch<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    ops: Value,
    what: &str,
) -> Result<Option<K>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let operation = format!("{what} {} {namespace}/{name}", K::kind(&()));
    let ops: json_patch::Patch = serde_json::from_value(ops).map_err(|err| Error::InvalidSpec {
        what: "finalizer patch",
        reason: err.to_string(),
    })?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
    {
        Ok(patched) => Ok(Some(patched)),
        // Deleted meanwhile: nothing left to guard.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(source) => Err(Error::Kube { operation, source }),
    }
}
