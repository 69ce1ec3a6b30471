//! Cleaning objects of cluster-specific state, and leaving out objects a restore must not
//! recreate.

use kube::api::DynamicObject;
use serde::Serialize;
use serde_json::Value;

use crate::inventory::Inventory;
use crate::object::{ObjectKey, annotation, is, kind_of, label};

/// Why an object is left out of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum Exclusion {
    /// Events are history, not state.
    Event,
    /// Nodes belong to the cluster, not the application.
    Node,
    /// Endpoints or EndpointSlices that the control plane derives from a Service's selector.
    ServiceEndpoints,
    /// A Pod whose phase is `Succeeded` or `Failed`.
    CompletedPod,
    /// A Job with a `Complete` or `Failed` condition.
    CompletedJob,
    /// A token Secret the token controller generated for a ServiceAccount (pre-1.24 clusters).
    GeneratedToken,
    /// An object a workload controller recreates (Pods of ReplicaSets, StatefulSets,
    /// DaemonSets and Jobs; ReplicaSets of Deployments; ControllerRevisions; Jobs of CronJobs).
    ControllerManaged {
        /// Kind of the controlling owner.
        owner_kind: String,
    },
}

/// Owners whose dependents the owner recreates by itself.
const WORKLOAD_CONTROLLERS: &[(&str, &str)] = &[
    ("apps", "Deployment"),
    ("apps", "ReplicaSet"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("batch", "Job"),
    ("batch", "CronJob"),
];

/// Whether an object is left out of a backup, and why.
pub fn exclusion(inventory: &Inventory, object: &DynamicObject) -> Option<Exclusion> {
    if is(object, "", "Event") || is(object, "events.k8s.io", "Event") {
        return Some(Exclusion::Event);
    }
    if is(object, "", "Node") {
        return Some(Exclusion::Node);
    }
    if is(object, "", "Endpoints") {
        let service = ObjectKey::new(
            "",
            "Service",
            object.metadata.namespace.as_deref(),
            object.metadata.name.as_deref()?,
        );
        let selects = inventory
            .get(&service)
            .and_then(|s| s.data.pointer("/spec/selector"))
            .and_then(|s| s.as_object());
        if selects.is_some_and(|s| !s.is_empty()) {
            return Some(Exclusion::ServiceEndpoints);
        }
    }
    if is(object, "discovery.k8s.io", "EndpointSlice")
        && label(object, "endpointslice.kubernetes.io/managed-by")
            .is_some_and(|m| m.ends_with(".k8s.io"))
    {
        return Some(Exclusion::ServiceEndpoints);
    }
    if is(object, "", "Pod")
        && matches!(
            object
                .data
                .pointer("/status/phase")
                .and_then(|p| p.as_str()),
            Some("Succeeded" | "Failed")
        )
    {
        return Some(Exclusion::CompletedPod);
    }
    if is(object, "batch", "Job") {
        let conditions = object
            .data
            .pointer("/status/conditions")
            .and_then(|c| c.as_array());
        let done = conditions.into_iter().flatten().any(|c| {
            matches!(
                c.get("type").and_then(|t| t.as_str()),
                Some("Complete" | "Failed")
            ) && c.get("status").and_then(|s| s.as_str()) == Some("True")
        });
        if done {
            return Some(Exclusion::CompletedJob);
        }
    }
    if is_generated_token(object) {
        return Some(Exclusion::GeneratedToken);
    }
    if !is(object, "", "PersistentVolumeClaim") {
        let controller = object
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        if let Some(owner) = controller {
            let group = crate::object::group_of(&owner.api_version);
            if WORKLOAD_CONTROLLERS.contains(&(group, owner.kind.as_str())) {
                return Some(Exclusion::ControllerManaged {
                    owner_kind: owner.kind.clone(),
                });
            }
        }
    }
    None
}

/// A `kubernetes.io/service-account-token` Secret named `<serviceaccount>-token-<suffix>`,
/// the form the legacy token controller generated.
fn is_generated_token(object: &DynamicObject) -> bool {
    let token_type = object.data.get("type").and_then(|t| t.as_str())
        == Some("kubernetes.io/service-account-token");
    let (Some(sa), Some(name)) = (
        annotation(object, "kubernetes.io/service-account.name"),
        object.metadata.name.as_deref(),
    ) else {
        return false;
    };
    token_type
        && is(object, "", "Secret")
        && name
            .strip_prefix(sa)
            .is_some_and(|rest| rest.starts_with("-token-"))
}

/// Metadata fields the API server assigns.
const SERVER_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// PVC annotations recording a binding made on the source cluster.
const PVC_BINDING_ANNOTATIONS: &[&str] = &[
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "pv.kubernetes.io/migrated-to",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

/// Labels the Job controller puts on a Job's selector and template, carrying the old uid.
const JOB_UID_LABELS: &[&str] = &["controller-uid", "batch.kubernetes.io/controller-uid"];

fn remove_keys(value: &mut Value, pointer: &str, keys: &[&str]) {
    if let Some(map) = value.pointer_mut(pointer).and_then(|m| m.as_object_mut()) {
        for key in keys {
            map.remove(*key);
        }
    }
}

fn remove_if_empty(value: &mut Value, pointer: &str, key: &str) {
    if let Some(map) = value.pointer_mut(pointer).and_then(|m| m.as_object_mut())
        && map
            .get(key)
            .and_then(|v| v.as_object())
            .is_some_and(|m| m.is_empty())
    {
        map.remove(key);
    }
}

/// The object as it should be stored: without status and server-assigned metadata, and
/// without what binds it to the source cluster (see [`Exclusion`] for what is left out whole).
///
/// - every object: `status`, and metadata `uid`, `resourceVersion`, `generation`,
///   `creationTimestamp`, `managedFields`, `selfLink`, deletion fields;
/// - Service: `clusterIP`/`clusterIPs` unless headless (`None`), `nodePort`s and
///   `healthCheckNodePort` (the target cluster allocates its own);
/// - PersistentVolumeClaim: `volumeName` and binding annotations, so it binds anew, and
///   `dataSource`/`dataSourceRef`, since a restore fills it from the backup;
/// - PersistentVolume: the `claimRef`'s uid and resourceVersion;
/// - Pod: `nodeName`;
/// - ServiceAccount: references to generated token Secrets;
/// - token Secrets kept (created by hand): their data, which the token controller refills,
///   and the old ServiceAccount uid annotation;
/// - Job: the generated selector and `controller-uid` labels, which carry the old uid.
///
/// `ownerReferences` are kept; a restore points them at the new owners' uids.
pub fn sanitize(object: &DynamicObject) -> crate::Result<Value> {
    let mut value = serde_json::to_value(object)
        .map_err(|e| crate::Error::json(crate::object::describe(object), e))?;
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
    }
    remove_keys(&mut value, "/metadata", SERVER_METADATA);
    match (crate::object::group_of_object(object), kind_of(object)) {
        ("", "Service") => {
            let headless = object
                .data
                .pointer("/spec/clusterIP")
                .and_then(|c| c.as_str())
                == Some("None");
            if !headless {
                remove_keys(&mut value, "/spec", &["clusterIP", "clusterIPs"]);
            }
            remove_keys(&mut value, "/spec", &["healthCheckNodePort"]);
            if let Some(ports) = value
                .pointer_mut("/spec/ports")
                .and_then(|p| p.as_array_mut())
            {
                for port in ports.iter_mut().filter_map(|p| p.as_object_mut()) {
                    port.remove("nodePort");
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            // A restored claim's data comes from the backup, never from the snapshot or claim
            // it was first provisioned from (usually gone, leaving the claim Pending). Its
            // volume is provisioned anew, so a `selector` (binding to a chosen pre-made
            // volume) goes too: the CSI external-provisioner refuses a claim that has one
            // ("claim Selector is not supported"), which would stay Pending for ever.
            remove_keys(
                &mut value,
                "/spec",
                &["volumeName", "dataSource", "dataSourceRef", "selector"],
            );
            remove_keys(&mut value, "/metadata/annotations", PVC_BINDING_ANNOTATIONS);
        }
        ("", "PersistentVolume") => {
            remove_keys(&mut value, "/spec/claimRef", &["uid", "resourceVersion"])
        }
        ("", "Pod") => remove_keys(&mut value, "/spec", &["nodeName"]),
        ("", "ServiceAccount") => {
            let name = object.metadata.name.clone().unwrap_or_default();
            if let Some(secrets) = value.get_mut("secrets").and_then(|s| s.as_array_mut()) {
                let generated = format!("{name}-token-");
                secrets.retain(|s| {
                    !s.get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| n.starts_with(&generated))
                });
            }
        }
        ("", "Secret")
            if object.data.get("type").and_then(|t| t.as_str())
                == Some("kubernetes.io/service-account-token") =>
        {
            if let Some(map) = value.as_object_mut() {
                map.remove("data");
            }
            // The token controller deletes a token Secret whose recorded ServiceAccount uid
            // differs from the live ServiceAccount's; the restored one gets a new uid.
            remove_keys(
                &mut value,
                "/metadata/annotations",
                &["kubernetes.io/service-account.uid"],
            );
        }
        ("batch", "Job") => {
            let manual = object
                .data
                .pointer("/spec/manualSelector")
                .and_then(|m| m.as_bool())
                == Some(true);
            if !manual {
                remove_keys(&mut value, "/spec", &["selector"]);
                remove_keys(&mut value, "/spec/template/metadata/labels", JOB_UID_LABELS);
                remove_keys(&mut value, "/metadata/labels", JOB_UID_LABELS);
            }
        }
        _ => {}
    }
    remove_if_empty(&mut value, "/metadata", "annotations");
    remove_if_empty(&mut value, "/metadata", "labels");
    Ok(value)
}
