//! Operator instances: a custom resource, its definition, everything it owns and, optionally,
//! the operator that reconciles it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::str::FromStr;

use kube::api::DynamicObject;

use crate::inventory::Inventory;
use crate::object::{ObjectKey, ObjectRef, is};
use crate::{Error, Result};

/// `GROUP/KIND/NAME` of a custom resource, as `strata discover --operator` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRef {
    /// API group of the custom resource.
    pub group: String,
    /// Its kind.
    pub kind: String,
    /// Its name (in the application's namespace).
    pub name: String,
}

impl FromStr for OperatorRef {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [group, kind, name] if !group.is_empty() && !kind.is_empty() && !name.is_empty() => {
                Ok(OperatorRef {
                    group: (*group).to_owned(),
                    kind: (*kind).to_owned(),
                    name: (*name).to_owned(),
                })
            }
            _ => Err(Error::OperatorRef(text.to_owned())),
        }
    }
}

/// What an operator instance consists of.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorInstance {
    /// The custom resource.
    pub custom_resource: ObjectKey,
    /// Its CustomResourceDefinition, when the inventory has it.
    pub definition: Option<ObjectKey>,
    /// Objects reached from the custom resource through ownerReferences, transitively.
    pub owned: Vec<ObjectKey>,
    /// The operator itself, when asked for: its Deployment(s), ServiceAccount(s), RBAC,
    /// every CRD of the group, and the OLM Subscription, ClusterServiceVersion and
    /// OperatorGroup when OLM installed it.
    pub operator: Vec<ObjectKey>,
}

fn key_of(object: &DynamicObject) -> Option<ObjectKey> {
    ObjectRef::of(object).ok().map(|r| r.key())
}

fn str_at<'a>(value: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, k| v.get(*k))
        .and_then(|v| v.as_str())
}

/// Every object reached from the roots (by uid) through ownerReferences, transitively,
/// roots excluded. Cycles and diamonds are visited once.
pub fn owned_by(inventory: &Inventory, roots: &[&str]) -> Vec<ObjectKey> {
    let mut children: HashMap<&str, Vec<&DynamicObject>> = HashMap::new();
    for object in inventory.objects() {
        for owner in object.metadata.owner_references.iter().flatten() {
            children.entry(owner.uid.as_str()).or_default().push(object);
        }
    }
    let mut seen: BTreeSet<&str> = roots.iter().copied().collect();
    let mut queue: VecDeque<&str> = roots.iter().copied().collect();
    let mut found = Vec::new();
    while let Some(uid) = queue.pop_front() {
        for child in children.get(uid).into_iter().flatten() {
            let Some(child_uid) = child.metadata.uid.as_deref() else {
                continue;
            };
            if seen.insert(child_uid) {
                queue.push_back(child_uid);
                found.extend(key_of(child));
            }
        }
    }
    found
}

/// The CustomResourceDefinition serving a group and kind.
pub fn definition<'a>(
    inventory: &'a Inventory,
    group: &str,
    kind: &str,
) -> Option<&'a DynamicObject> {
    inventory.objects().iter().find(|o| {
        is(o, "apiextensions.k8s.io", "CustomResourceDefinition")
            && str_at(&o.data, &["spec", "group"]) == Some(group)
            && str_at(&o.data, &["spec", "names", "kind"]) == Some(kind)
    })
}

/// Resolve an operator instance in a namespace.
pub fn resolve(
    inventory: &Inventory,
    namespace: &str,
    reference: &OperatorRef,
    include_operator: bool,
) -> Result<OperatorInstance> {
    let cr = inventory
        .in_namespace(namespace)
        .chain(
            inventory
                .objects()
                .iter()
                .filter(|o| o.metadata.namespace.is_none()),
        )
        .find(|o| {
            is(o, &reference.group, &reference.kind)
                && o.metadata.name.as_deref() == Some(reference.name.as_str())
        })
        .ok_or_else(|| Error::NotFound {
            what: format!(
                "{}/{} {} in namespace {namespace}",
                reference.group, reference.kind, reference.name
            ),
        })?;
    let custom_resource = key_of(cr).ok_or_else(|| Error::NotFound {
        what: reference.name.clone(),
    })?;
    let crd = definition(inventory, &reference.group, &reference.kind);
    let owned = match cr.metadata.uid.as_deref() {
        Some(uid) => owned_by(inventory, &[uid]),
        None => Vec::new(),
    };
    let operator = if include_operator {
        operator_of(inventory, &reference.group, crd)
    } else {
        Vec::new()
    };
    Ok(OperatorInstance {
        custom_resource,
        definition: crd.and_then(key_of),
        owned,
        operator,
    })
}

/// The operator serving an API group, found through OLM when it installed the operator and
/// otherwise through RBAC: the Deployments whose ServiceAccount is bound to a role granting
/// access to the group.
fn operator_of(inventory: &Inventory, group: &str, crd: Option<&DynamicObject>) -> Vec<ObjectKey> {
    let mut found: BTreeSet<ObjectKey> = inventory
        .objects()
        .iter()
        .filter(|o| {
            is(o, "apiextensions.k8s.io", "CustomResourceDefinition")
                && str_at(&o.data, &["spec", "group"]) == Some(group)
        })
        .filter_map(key_of)
        .collect();
    let crd_name = crd.and_then(|c| c.metadata.name.as_deref());
    let csvs: Vec<&DynamicObject> = inventory
        .objects()
        .iter()
        .filter(|o| is(o, "operators.coreos.com", "ClusterServiceVersion"))
        .filter(|csv| {
            let owned = csv
                .data
                .pointer("/spec/customresourcedefinitions/owned")
                .and_then(|v| v.as_array());
            owned
                .into_iter()
                .flatten()
                .any(|d| d.get("name").and_then(|n| n.as_str()) == crd_name && crd_name.is_some())
        })
        .collect();
    let mut service_accounts: BTreeSet<(String, String)> = BTreeSet::new();
    for csv in &csvs {
        let (Some(name), Some(ns)) = (
            csv.metadata.name.as_deref(),
            csv.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        found.extend(key_of(csv));
        for o in inventory.in_namespace(ns) {
            let installs = is(o, "operators.coreos.com", "Subscription")
                && [
                    str_at(&o.data, &["status", "installedCSV"]),
                    str_at(&o.data, &["status", "currentCSV"]),
                ]
                .contains(&Some(name));
            if installs || is(o, "operators.coreos.com", "OperatorGroup") {
                found.extend(key_of(o));
            }
        }
        if let Some(uid) = csv.metadata.uid.as_deref() {
            found.extend(owned_by(inventory, &[uid]));
        }
        let permissions = [
            "/spec/install/spec/permissions",
            "/spec/install/spec/clusterPermissions",
        ];
        for sa in permissions
            .iter()
            .filter_map(|p| csv.data.pointer(p))
            .filter_map(|v| v.as_array())
            .flatten()
        {
            if let Some(sa) = sa.get("serviceAccountName").and_then(|s| s.as_str()) {
                service_accounts.insert((ns.to_owned(), sa.to_owned()));
            }
        }
    }
    let roles: BTreeSet<(Option<String>, String, String)> = inventory
        .objects()
        .iter()
        .filter(|o| {
            is(o, "rbac.authorization.k8s.io", "ClusterRole")
                || is(o, "rbac.authorization.k8s.io", "Role")
        })
        .filter(|o| {
            let rules = o.data.get("rules").and_then(|r| r.as_array());
            rules.into_iter().flatten().any(|rule| {
                let groups = rule.get("apiGroups").and_then(|g| g.as_array());
                groups
                    .into_iter()
                    .flatten()
                    .any(|g| g.as_str() == Some(group))
            })
        })
        .filter_map(|o| {
            Some((
                o.metadata.namespace.clone(),
                crate::object::kind_of(o).to_owned(),
                o.metadata.name.clone()?,
            ))
        })
        .collect();
    for binding in inventory.objects().iter().filter(|o| is_binding(o)) {
        let role_kind = str_at(&binding.data, &["roleRef", "kind"]).unwrap_or_default();
        let role_name = str_at(&binding.data, &["roleRef", "name"]).unwrap_or_default();
        let role_ns = if role_kind == "Role" {
            binding.metadata.namespace.clone()
        } else {
            None
        };
        if roles.contains(&(role_ns, role_kind.to_owned(), role_name.to_owned())) {
            for subject in binding
                .data
                .get("subjects")
                .and_then(|s| s.as_array())
                .into_iter()
                .flatten()
            {
                if str_at(subject, &["kind"]) == Some("ServiceAccount") {
                    let ns = str_at(subject, &["namespace"])
                        .or(binding.metadata.namespace.as_deref())
                        .unwrap_or_default();
                    service_accounts.insert((
                        ns.to_owned(),
                        str_at(subject, &["name"]).unwrap_or_default().to_owned(),
                    ));
                }
            }
        }
    }
    let mut deployments = Vec::new();
    for deployment in inventory
        .objects()
        .iter()
        .filter(|o| is(o, "apps", "Deployment"))
    {
        let spec = deployment.data.pointer("/spec/template/spec");
        let sa = spec
            .and_then(|s| {
                s.get("serviceAccountName")
                    .or_else(|| s.get("serviceAccount"))
            })
            .and_then(|s| s.as_str());
        let ns = deployment.metadata.namespace.clone().unwrap_or_default();
        if let Some(sa) = sa
            && service_accounts.contains(&(ns.clone(), sa.to_owned()))
        {
            found.extend(key_of(deployment));
            deployments.push(deployment);
        }
    }
    found.extend(webhooks_of(inventory, &deployments));
    for (ns, sa) in &service_accounts {
        let key = ObjectKey::new("", "ServiceAccount", Some(ns), sa);
        if inventory.get(&key).is_some() {
            found.insert(key);
        }
        for binding in inventory.objects().iter().filter(|o| is_binding(o)) {
            let binds_sa = binding
                .data
                .get("subjects")
                .and_then(|s| s.as_array())
                .into_iter()
                .flatten()
                .any(|s| {
                    str_at(s, &["kind"]) == Some("ServiceAccount")
                        && str_at(s, &["name"]) == Some(sa.as_str())
                        && str_at(s, &["namespace"]).or(binding.metadata.namespace.as_deref())
                            == Some(ns.as_str())
                });
            if !binds_sa {
                continue;
            }
            found.extend(key_of(binding));
            let role_kind = str_at(&binding.data, &["roleRef", "kind"]).unwrap_or_default();
            let role_name = str_at(&binding.data, &["roleRef", "name"]).unwrap_or_default();
            let role_ns = if role_kind == "Role" {
                binding.metadata.namespace.as_deref()
            } else {
                None
            };
            let role = ObjectKey::new("rbac.authorization.k8s.io", role_kind, role_ns, role_name);
            if inventory.get(&role).is_some() {
                found.insert(role);
            }
        }
    }
    found.into_iter().collect()
}

/// The Services selecting the operator's pods and the admission webhook configurations and
/// API services that call those Services.
fn webhooks_of(inventory: &Inventory, deployments: &[&DynamicObject]) -> Vec<ObjectKey> {
    let mut services: BTreeSet<(String, String)> = BTreeSet::new();
    let mut found = Vec::new();
    for deployment in deployments {
        let Some(ns) = deployment.metadata.namespace.as_deref() else {
            continue;
        };
        let labels: std::collections::BTreeMap<String, String> = deployment
            .data
            .pointer("/spec/template/metadata/labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        for service in inventory.in_namespace(ns).filter(|o| is(o, "", "Service")) {
            let selector = service
                .data
                .pointer("/spec/selector")
                .and_then(crate::selector::Selector::from_json);
            if selector.is_some_and(|s| !s.requirements().is_empty() && s.matches(&labels))
                && let Some(name) = service.metadata.name.clone()
            {
                services.insert((ns.to_owned(), name));
                found.extend(key_of(service));
            }
        }
    }
    for config in inventory.objects() {
        let webhook = is(
            config,
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration",
        ) || is(
            config,
            "admissionregistration.k8s.io",
            "MutatingWebhookConfiguration",
        );
        let calls: Vec<&serde_json::Value> = if webhook {
            let hooks = config.data.get("webhooks").and_then(|w| w.as_array());
            hooks
                .into_iter()
                .flatten()
                .filter_map(|h| h.pointer("/clientConfig/service"))
                .collect()
        } else if is(config, "apiregistration.k8s.io", "APIService") {
            config.data.pointer("/spec/service").into_iter().collect()
        } else {
            continue;
        };
        let ours = calls.iter().any(|svc| {
            let ns = str_at(svc, &["namespace"]).unwrap_or_default().to_owned();
            services.contains(&(ns, str_at(svc, &["name"]).unwrap_or_default().to_owned()))
        });
        if ours {
            found.extend(key_of(config));
        }
    }
    found
}

fn is_binding(object: &DynamicObject) -> bool {
    is(object, "rbac.authorization.k8s.io", "ClusterRoleBinding")
        || is(object, "rbac.authorization.k8s.io", "RoleBinding")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn operator_ref_needs_three_parts() {
        let r: OperatorRef = "acid.zalan.do/postgresql/main".parse().unwrap();
        assert_eq!(
            (r.group.as_str(), r.kind.as_str(), r.name.as_str()),
            ("acid.zalan.do", "postgresql", "main")
        );
        assert!(matches!(
            "Kind/name".parse::<OperatorRef>(),
            Err(Error::OperatorRef(_))
        ));
        assert!(matches!(
            "g//n".parse::<OperatorRef>(),
            Err(Error::OperatorRef(_))
        ));
    }
}
