//! The order objects are restored in, as a table callers can replace.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::object::group_of;

/// One row of the order table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEntry {
    /// A kind, by group (empty for core) and name.
    Kind {
        /// API group.
        group: String,
        /// Kind.
        kind: String,
    },
    /// Every built-in kind the table does not name.
    OtherBuiltIn,
    /// Every custom resource (a kind served by a CustomResourceDefinition).
    CustomResources,
}

/// The default table, one row a line: `group/Kind`, `Kind` for the core group, `*` for other
/// built-in kinds, `custom-resources` for custom resources.
///
/// Why this order: definitions and namespaces first, since everything else lives in or is
/// typed by them; storage before the claims that name it, and claims before the workloads that
/// mount them (so restored data is bound before a Pod can start on an empty volume);
/// identities and RBAC, then the Secrets and ConfigMaps pods read at start; Services before
/// anything that calls them. Webhook configurations and API services come after the workloads
/// that serve them: registered earlier, a webhook whose backend is not yet running rejects
/// every object it intercepts. Custom resources come last, once their definitions are
/// established and their operators (workloads) are running.
pub const DEFAULT_ORDER: &str = "\
apiextensions.k8s.io/CustomResourceDefinition
Namespace
storage.k8s.io/StorageClass
snapshot.storage.k8s.io/VolumeSnapshotClass
scheduling.k8s.io/PriorityClass
PersistentVolume
PersistentVolumeClaim
ServiceAccount
rbac.authorization.k8s.io/ClusterRole
rbac.authorization.k8s.io/Role
rbac.authorization.k8s.io/ClusterRoleBinding
rbac.authorization.k8s.io/RoleBinding
Secret
ConfigMap
LimitRange
ResourceQuota
networking.k8s.io/NetworkPolicy
Service
Endpoints
discovery.k8s.io/EndpointSlice
policy/PodDisruptionBudget
apps/Deployment
apps/StatefulSet
apps/DaemonSet
apps/ReplicaSet
ReplicationController
batch/CronJob
batch/Job
Pod
autoscaling/HorizontalPodAutoscaler
networking.k8s.io/IngressClass
networking.k8s.io/Ingress
*
admissionregistration.k8s.io/ValidatingAdmissionPolicy
admissionregistration.k8s.io/ValidatingAdmissionPolicyBinding
admissionregistration.k8s.io/MutatingWebhookConfiguration
admissionregistration.k8s.io/ValidatingWebhookConfiguration
apiregistration.k8s.io/APIService
custom-resources
";

/// A restore order table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOrder {
    entries: Vec<OrderEntry>,
}

impl Default for RestoreOrder {
    fn default() -> Self {
        RestoreOrder::parse(DEFAULT_ORDER)
    }
}

impl RestoreOrder {
    /// A table from its text form (see [`DEFAULT_ORDER`]); blank lines and `#` comments are
    /// skipped. Kinds the table does not place go with `*` (built-in) or `custom-resources`,
    /// or last when the table lacks those rows.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| match line {
                "*" => OrderEntry::OtherBuiltIn,
                "custom-resources" => OrderEntry::CustomResources,
                _ => {
                    let (group, kind) = line.rsplit_once('/').unwrap_or(("", line));
                    OrderEntry::Kind {
                        group: group.to_owned(),
                        kind: kind.to_owned(),
                    }
                }
            })
            .collect();
        RestoreOrder { entries }
    }

    /// The rows.
    pub fn entries(&self) -> &[OrderEntry] {
        &self.entries
    }

    /// The rank of a kind: its row's index; lower restores first.
    pub fn rank(&self, group: &str, kind: &str, custom: bool) -> usize {
        let exact = self.entries.iter().position(
            |e| matches!(e, OrderEntry::Kind { group: g, kind: k } if g == group && k == kind),
        );
        let fallback = if custom {
            OrderEntry::CustomResources
        } else {
            OrderEntry::OtherBuiltIn
        };
        exact
            .or_else(|| self.entries.iter().position(|e| *e == fallback))
            .unwrap_or(self.entries.len())
    }

    /// Sort objects for restore: by rank, then namespace and name for a stable result; then
    /// move each object after its owners (by ownerReference) when they are restored too, so
    /// that a restore can point the reference at the new owner. PVCs never move: their data
    /// must be bound before any workload starts.
    ///
    /// A kind is custom when a CustomResourceDefinition among the objects defines it or its
    /// group is not a built-in one (the core group, dotless groups like `apps`, `*.k8s.io`).
    pub fn sort(&self, objects: &mut Vec<Value>) {
        let crds: BTreeSet<(String, String)> = objects
            .iter()
            .filter(|o| field(o, "/kind") == "CustomResourceDefinition")
            .map(|o| {
                (
                    field(o, "/spec/group").to_owned(),
                    field(o, "/spec/names/kind").to_owned(),
                )
            })
            .collect();
        let rank = |o: &Value| {
            let group = group_of(field(o, "/apiVersion"));
            let kind = field(o, "/kind");
            let builtin_group =
                group.is_empty() || !group.contains('.') || group.ends_with(".k8s.io");
            let custom = crds.contains(&(group.to_owned(), kind.to_owned())) || !builtin_group;
            self.rank(group, kind, custom)
        };
        objects.sort_by_cached_key(|o| {
            (
                rank(o),
                field(o, "/metadata/namespace").to_owned(),
                field(o, "/metadata/name").to_owned(),
            )
        });
        owners_first(objects);
    }
}

pub(crate) fn field<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

/// Move dependents after their owners, keeping the table order otherwise: an object waits
/// until every owner in the plan is placed, then follows in its original position relative to
/// the other waiting objects. Objects in an ownership cycle keep their order at the end.
fn owners_first(objects: &mut Vec<Value>) {
    type Identity = (String, String, String);
    let identity = |o: &Value| -> Identity {
        (
            field(o, "/kind").to_owned(),
            field(o, "/metadata/namespace").to_owned(),
            field(o, "/metadata/name").to_owned(),
        )
    };
    let present: BTreeSet<Identity> = objects.iter().map(identity).collect();
    let owners_of = |o: &Value| -> Vec<Identity> {
        if field(o, "/kind") == "PersistentVolumeClaim" {
            return Vec::new();
        }
        let ns = field(o, "/metadata/namespace");
        let refs = o
            .pointer("/metadata/ownerReferences")
            .and_then(|r| r.as_array());
        refs.into_iter()
            .flatten()
            .map(|r| {
                (
                    field(r, "/kind").to_owned(),
                    ns.to_owned(),
                    field(r, "/name").to_owned(),
                )
            })
            .filter(|id| present.contains(id))
            .collect()
    };
    let mut placed: BTreeSet<Identity> = BTreeSet::new();
    let mut ordered = Vec::with_capacity(objects.len());
    let mut waiting: Vec<(Value, Vec<Identity>)> = Vec::new();
    for object in objects.drain(..) {
        let owners = owners_of(&object);
        if !owners.iter().all(|o| placed.contains(o)) {
            waiting.push((object, owners));
            continue;
        }
        placed.insert(identity(&object));
        ordered.push(object);
        loop {
            let ready = waiting
                .iter()
                .position(|(_, owners)| owners.iter().all(|o| placed.contains(o)));
            let Some(index) = ready else { break };
            let (object, _) = waiting.remove(index);
            placed.insert(identity(&object));
            ordered.push(object);
        }
    }
    ordered.extend(waiting.into_iter().map(|(object, _)| object));
    *objects = ordered;
}
