//! Applying a restore plan with server-side apply.

use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::{RestorePlan, reference};
use crate::object::ObjectRef;
use crate::source::{LiveSource, ObjectSource, ResourceKind};
use crate::{Error, Result};

/// What to do with an object that already exists in the target cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingPolicy {
    /// Leave it as it is.
    #[default]
    Skip,
    /// Server-side apply over it, taking ownership of the fields the backup sets.
    Update,
}

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Field manager name for server-side apply.
    pub field_manager: String,
    /// Policy for existing objects.
    pub existing: ExistingPolicy,
    /// How long to wait for a custom resource's kind to be served after its CRD is applied.
    pub definition_timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            field_manager: "strata".to_owned(),
            existing: ExistingPolicy::Skip,
            definition_timeout: Duration::from_secs(60),
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Objects created or updated.
    pub applied: Vec<ObjectRef>,
    /// Objects left alone because they existed.
    pub skipped: Vec<ObjectRef>,
}

fn api(client: &Client, kind: &ResourceKind, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) if kind.namespaced => {
            Api::namespaced_with(client.clone(), ns, &kind.api_resource())
        }
        _ => Api::all_with(client.clone(), &kind.api_resource()),
    }
}

/// Find the served kind of an object, rediscovering (until the timeout) when it is not served
/// yet: a custom resource whose CRD was just applied is served once the CRD is established.
async fn served_kind(
    source: &LiveSource,
    kinds: &mut Vec<ResourceKind>,
    reference: &ObjectRef,
    timeout: Duration,
) -> Result<ResourceKind> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        let found = kinds
            .iter()
            .find(|k| k.group == reference.group() && k.kind == reference.kind);
        if let Some(kind) = found {
            return Ok(kind.clone());
        }
        if Instant::now() >= deadline {
            return Err(Error::NotFound {
                what: format!("served API kind for {reference}"),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        *kinds = source.kinds().await?;
    }
}

/// Point ownerReferences at the owners' uids in the target cluster; drop those whose owner is
/// not there (the garbage collector would delete an object whose owner uid does not exist).
async fn rebind_owners(
    client: &Client,
    kinds: &[ResourceKind],
    object: &mut Value,
    namespace: Option<&str>,
) -> Result<()> {
    let Some(owners) = object
        .pointer_mut("/metadata/ownerReferences")
        .and_then(|o| o.as_array_mut())
    else {
        return Ok(());
    };
    let mut kept = Vec::new();
    for mut owner in owners.drain(..) {
        let text = |k: &str| {
            owner
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let owner_ref = ObjectRef {
            api_version: text("apiVersion"),
            kind: text("kind"),
            namespace: namespace.map(str::to_owned),
            name: text("name"),
        };
        let Some(kind) = kinds
            .iter()
            .find(|k| k.group == owner_ref.group() && k.kind == owner_ref.kind)
        else {
            continue;
        };
        let live = api(client, kind, namespace)
            .get_opt(&owner_ref.name)
            .await
            .map_err(|e| Error::kube(format!("reading owner {owner_ref}"), e))?;
        if let Some(uid) = live.and_then(|o| o.metadata.uid) {
            owner["uid"] = Value::String(uid);
            kept.push(owner);
        }
    }
    let empty = kept.is_empty();
    *owners = kept;
    if empty && let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("ownerReferences");
    }
    Ok(())
}

/// Apply a plan in order with server-side apply (`PATCH` with
/// `application/apply-patch+yaml`, forced, under the options' field manager).
pub async fn apply(
    client: &Client,
    plan: &RestorePlan,
    options: &ApplyOptions,
) -> Result<ApplyReport> {
    let source = LiveSource::new(client.clone());
    let mut kinds = source.kinds().await?;
    let mut report = ApplyReport::default();
    let params = PatchParams::apply(&options.field_manager).force();
    for object in &plan.objects {
        let reference = reference(object)?;
        let kind = served_kind(&source, &mut kinds, &reference, options.definition_timeout).await?;
        let namespace = reference.namespace.as_deref().filter(|_| kind.namespaced);
        let api = api(client, &kind, namespace);
        let existing = api
            .get_opt(&reference.name)
            .await
            .map_err(|e| Error::kube(format!("reading {reference}"), e))?;
        if existing.is_some() && options.existing == ExistingPolicy::Skip {
            report.skipped.push(reference);
            continue;
        }
        let mut object = object.clone();
        rebind_owners(client, &kinds, &mut object, namespace).await?;
        api.patch(&reference.name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| Error::kube(format!("applying {reference}"), e))?;
        report.applied.push(reference);
    }
    Ok(report)
}
