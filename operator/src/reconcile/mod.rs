//! The reconcilers of Backup and Restore, and the object helpers they share.

mod access;
mod backup;
mod cbt;
mod finalizer;
mod health;
mod jobs;
mod lock;
pub mod nodes;
mod outcome;
mod restore;
mod staging;
mod stash;
mod volumes;

pub use backup::reconcile_backup;
pub use cbt::{ANNOTATION_BACKUP, ANNOTATION_DRIVER, ANNOTATION_HANDLE, LABEL_BASE};
pub use finalizer::FINALIZER;
pub use health::{check as check_target, reconcile_target};
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
use serde_json::{Value, json};

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

/// Record a permanent failure in `conditions`.
fn fail(conditions: &mut Vec<Condition>, err: &Error, generation: Option<i64>) {
    set_condition(
        conditions,
        "Failed",
        ConditionStatus::True,
        err.reason(),
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

/// The merge patch (RFC 7386) that turns `before` into `after`: `after`, with a null for each
/// member `before` has and `after` lacks, in nested objects too. A merge patch leaves a member
/// it does not name as it was, and the statuses leave out what is unknown
/// (`skip_serializing_if`), so without the nulls a field that went away (a Target's message
/// once it is healthy again) would stay, stale, for ever.
fn merge_patch(before: &Value, after: &Value) -> Value {
    let (Value::Object(old), Value::Object(new)) = (before, after) else {
        return after.clone();
    };
    let mut patch = serde_json::Map::new();
    for (key, value) in new {
        let member = match old.get(key) {
            Some(was) => merge_patch(was, value),
            None => value.clone(),
        };
        patch.insert(key.clone(), member);
    }
    for key in old.keys().filter(|key| !new.contains_key(*key)) {
        patch.insert(key.clone(), Value::Null);
    }
    Value::Object(patch)
}

/// Write `status` as the status of the `K` `namespace/name`, by a merge patch carrying
/// `resource_version`, the version of the object the reconcile read; the version the write
/// made.
///
/// Optimistic concurrency (the API conventions, "Concurrency Control and Consistency"): the
/// API server refuses a patch whose `metadata.resourceVersion` is not the stored one with 409
/// Conflict. A status is computed from the object as read, and there can be two writers: the
/// controller's cache may hand a reconcile a copy older than its own last status write (the
/// watch event not yet seen), and during a rolling update two controllers run. Without the
/// check, such a write would put an older phase back or forget the ids a newer one recorded;
/// with it, the write fails as a transient error and the next call starts from a fresh read.
///
/// `before` is the status as read, when the write replaces it whole: what it has and
/// `status` lacks is removed ([`merge_patch`]).
async fn patch_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    resource_version: Option<&str>,
    before: Option<&Value>,
    status: &impl Serialize,
) -> Result<Option<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let status = json!(status);
    let status = match before {
        Some(before) => merge_patch(before, &status),
        None => status,
    };
    let mut patch = json!({ "status": status });
    if let Some(version) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    let written = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(Error::kube(format!(
            "update status of {} {namespace}/{name}",
            K::kind(&())
        )))?;
    Ok(written.meta().resource_version.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_removes_what_went_away_nested_too_and_replaces_arrays() {
        let before = json!({"phase": "Copying", "message": "stale",
                            "progress": {"volumesDone": 1, "bytesTotal": 9},
                            "conditions": [{"type": "Retrying"}]});
        let after = json!({"phase": "Completed", "progress": {"volumesDone": 2},
                           "conditions": []});
        let patch = merge_patch(&before, &after);
        assert_eq!(
            patch,
            json!({"phase": "Completed", "message": null,
                   "progress": {"volumesDone": 2, "bytesTotal": null}, "conditions": []})
        );
        let mut applied = before.clone();
        json_patch::merge(&mut applied, &patch);
        assert_eq!(applied, after);
    }
}
