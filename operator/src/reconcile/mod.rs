//! The reconcilers of Backup and Restore, and the object helpers they share.

mod backup;
mod cbt;
mod finalizer;
mod jobs;
mod lock;
mod restore;
mod staging;
mod stash;
mod volumes;

pub use backup::reconcile_backup;
pub use cbt::{ANNOTATION_BACKUP, ANNOTATION_DRIVER, ANNOTATION_HANDLE, LABEL_BASE};
pub use finalizer::FINALIZER;
pub use jobs::{JobOutcome, job_outcome};
pub use lock::lock_name;
pub use restore::reconcile_restore;
pub use stash::stash_name;

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{Error, Result};
use crate::status::{Condition, ConditionStatus, set_condition};

/// `err` and its causes on one line, as a condition message.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Reason of the `Failed` condition for `err`.
fn failure_reason(err: &Error) -> &'static str {
    match err {
        Error::InvalidSpec { .. } | Error::MissingMetadata { .. } => "InvalidSpec",
        Error::JobFailed { .. } => "JobFailed",
        Error::Csi { .. } => "VolumeStepFailed",
        Error::Discovery { .. } => "DiscoveryFailed",
        Error::Target { .. } | Error::Retention { .. } => "TargetFailed",
        _ => "Error",
    }
}

/// Record a permanent failure in `conditions`.
fn fail(conditions: &mut Vec<Condition>, err: &Error, generation: Option<i64>) {
    set_condition(
        conditions,
        "Failed",
        ConditionStatus::True,
        failure_reason(err),
        error_chain(err),
        generation,
    );
}

/// The namespace and name of `object`, a `kind` the reconcilers need both of.
fn namespace_and_name<K: Resource>(object: &K, kind: &'static str) -> Result<(String, String)> {
    let meta = object.meta();
    let namespace = meta.namespace.clone().ok_or(Error::MissingMetadata {
        kind,
        field: "metadata.namespace",
    })?;
    let name = meta.name.clone().ok_or(Error::MissingMetadata {
        kind,
        field: "metadata.name",
    })?;
    Ok((namespace, name))
}

/// The controller owner reference to `object`, a `kind` with a uid; it blocks the owner's
/// foreground deletion until the garbage collector removed the owned object.
fn controller_of<K: Resource<DynamicType = ()>>(
    object: &K,
    kind: &'static str,
) -> Result<OwnerReference> {
    let owner = object
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata {
            kind,
            field: "metadata.uid",
        })?;
    Ok(OwnerReference {
        block_owner_deletion: Some(true),
        ..owner
    })
}

/// Write `status` as the status of the `K` `namespace/name`, by a merge patch.
async fn patch_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &impl Serialize,
) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map_err(Error::kube(format!(
        "update status of {} {namespace}/{name}",
        K::kind(&())
    )))?;
    Ok(())
}
