//! Which objects a Restore may create: the cluster's restore policy.
//!
//! A Restore applies the objects of an archive read back from shared storage, so what it
//! would create is untrusted input, and the Kubernetes API does not say who created the
//! Restore (a SubjectAccessReview for that user would need an admission webhook to learn it).
//! The controller therefore checks every object of the restore plan, after namespace mapping
//! and before anything is written, against a policy the cluster's administrator sets with
//! the controller's flags (and `strata install`, which also grants exactly those kinds in the
//! controller's ClusterRole):
//!
//! - **Kinds** ([`RestorePolicy::kinds`]), named as RBAC names resources: `deployments.apps`,
//!   or the bare plural for the core group (`configmaps`). The default,
//!   [`DEFAULT_RESTORE_KINDS`], is the namespaced objects an application is made of; roles,
//!   bindings, webhooks, definitions and every other cluster-scoped kind are refused unless
//!   added (`--restore-kind`). Namespaces are checked as destinations, not as kinds.
//! - **Namespaces** ([`RestorePolicy::namespaces`]): a Restore writes into its own namespace;
//!   into another only where a grant `FROM=INTO` names the Restore's namespace (or `*`) and
//!   the destination (exactly, or by a prefix ending in `*`), e.g. `shop=shop-*`
//!   (`--restore-into`).
//!
//! A refused plan fails the Restore with reason `NotAuthorized`, naming every object refused.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use strata_discovery::ResourceKind;

use crate::context::is_dns_label;

/// A kind as RBAC names it: API group and plural resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupResource {
    /// API group, empty for core.
    pub group: String,
    /// Plural resource name, e.g. `deployments`.
    pub resource: String,
}

impl GroupResource {
    /// `resource` of `group`.
    pub fn new(group: &str, resource: &str) -> Self {
        GroupResource {
            group: group.to_owned(),
            resource: resource.to_owned(),
        }
    }
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// A policy entry that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid restore policy entry {entry:?}: {reason}")]
pub struct PolicyParseError {
    entry: String,
    reason: &'static str,
}

fn parse_error(entry: &str, reason: &'static str) -> PolicyParseError {
    PolicyParseError {
        entry: entry.to_owned(),
        reason,
    }
}

/// Whether `s` is a DNS subdomain (RFC 1123) as resource names and groups are.
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl FromStr for GroupResource {
    type Err = PolicyParseError;

    /// `resource` (core) or `resource.group`, as `kubectl` and RBAC write them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !is_dns_name(s) {
            return Err(parse_error(
                s,
                "expected RESOURCE or RESOURCE.GROUP in lower case, e.g. deployments.apps",
            ));
        }
        Ok(match s.split_once('.') {
            Some((resource, group)) => GroupResource::new(group, resource),
            None => GroupResource::new("", s),
        })
    }
}

/// Where Restores of one namespace may write besides their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceGrant {
    /// The Restore's namespace, or `*` for any.
    pub from: String,
    /// The destination: a name, a prefix ending in `*`, or `*` alone for any.
    pub into: String,
}

impl NamespaceGrant {
    fn allows(&self, from: &str, into: &str) -> bool {
        (self.from == "*" || self.from == from)
            && match self.into.strip_suffix('*') {
                Some(prefix) => into.starts_with(prefix),
                None => self.into == into,
            }
    }
}

impl fmt::Display for NamespaceGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.from, self.into)
    }
}

impl FromStr for NamespaceGrant {
    type Err = PolicyParseError;

    /// `FROM=INTO`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((from, into)) = s.split_once('=') else {
            return Err(parse_error(s, "expected FROM=INTO, e.g. shop=shop-copy"));
        };
        let name_or_any = |n: &str| n == "*" || (is_dns_name(n) && !n.contains('.'));
        let prefix_ok = into
            .strip_suffix('*')
            .is_none_or(|p| p.is_empty() || is_dns_name(p.trim_end_matches('-')));
        if !name_or_any(from) || !(name_or_any(into) || into.ends_with('*') && prefix_ok) {
            return Err(parse_error(
                s,
                "each side must be a namespace name or *, the destination may end in *",
            ));
        }
        Ok(NamespaceGrant {
            from: from.to_owned(),
            into: into.to_owned(),
        })
    }
}

/// The kinds restores may create by default: the namespaced objects applications are made of.
/// Pods, ReplicaSets and Endpoints are left out because their owners recreate them; RBAC
/// objects because the API server lets the controller create only roles whose permissions it
/// holds itself (RBAC's escalation check), so granting them is a decision for the cluster's
/// administrator.
pub const DEFAULT_RESTORE_KINDS: &[(&str, &str)] = &[
    ("", "configmaps"),
    ("", "secrets"),
    ("", "services"),
    ("", "serviceaccounts"),
    ("", "persistentvolumeclaims"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "networkpolicies"),
    ("policy", "poddisruptionbudgets"),
    ("autoscaling", "horizontalpodautoscalers"),
];

/// What Restores may create, checked before each applies anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePolicy {
    /// The kinds restored objects may have (Namespaces aside).
    pub kinds: BTreeSet<GroupResource>,
    /// Destinations other than the Restore's own namespace.
    pub namespaces: Vec<NamespaceGrant>,
}

impl Default for RestorePolicy {
    /// [`DEFAULT_RESTORE_KINDS`], into the Restore's own namespace only.
    fn default() -> Self {
        RestorePolicy {
            kinds: DEFAULT_RESTORE_KINDS
                .iter()
                .map(|(group, resource)| GroupResource::new(group, resource))
                .collect(),
            namespaces: Vec::new(),
        }
    }
}

impl RestorePolicy {
    /// Whether a Restore in namespace `from` may write into namespace `into`.
    pub fn allows_namespace(&self, from: &str, into: &str) -> bool {
        from == into || self.namespaces.iter().any(|g| g.allows(from, into))
    }

    /// Every object of `objects` (a mapped restore plan) the policy refuses to a Restore in
    /// namespace `from`, one line each; empty when all are allowed. `served` maps kinds to
    /// resources; a kind it lacks is looked up among the plan's own CustomResourceDefinitions,
    /// and refused when neither knows it.
    pub fn refusals(&self, from: &str, objects: &[Value], served: &[ResourceKind]) -> Vec<String> {
        let mut refused = Vec::new();
        let mut seen_namespaces = BTreeSet::new();
        for object in objects {
            let (group, kind) = group_kind(object);
            let name = object["metadata"]["name"].as_str().unwrap_or("(no name)");
            let namespace = object["metadata"]["namespace"].as_str();
            if group.is_empty() && kind == "Namespace" {
                if !self.allows_namespace(from, name) && seen_namespaces.insert(name.to_owned()) {
                    refused.push(self.namespace_refusal(from, name));
                }
                continue;
            }
            let Some((resource, namespaced)) = resource_of(&group, &kind, served, objects) else {
                refused.push(format!(
                    "{kind} {name}: kind {kind} of group {:?} is not served by the cluster",
                    group
                ));
                continue;
            };
            let gr = GroupResource::new(&group, &resource);
            if !self.kinds.contains(&gr) {
                refused.push(format!(
                    "{kind} {name}: {gr} is not a kind the restore policy allows"
                ));
                continue;
            }
            if !namespaced {
                continue;
            }
            let Some(ns) = namespace else {
                refused.push(format!(
                    "{kind} {name}: a namespaced object with no namespace"
                ));
                continue;
            };
            if !self.allows_namespace(from, ns) && seen_namespaces.insert(ns.to_owned()) {
                refused.push(self.namespace_refusal(from, ns));
            }
        }
        refused
    }

    /// The refusal of namespace `into` to a Restore in `from`, as [`Self::refusals`] words it.
    pub fn namespace_refusal(&self, from: &str, into: &str) -> String {
        format!(
            "namespace {into}: a Restore in namespace {from} may write only into {from}{}",
            if self.namespaces.is_empty() {
                " (no --restore-into grant)".to_owned()
            } else {
                format!(
                    " and where a grant allows ({})",
                    self.namespaces
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

/// The API group and kind of a JSON object (`apps/v1` → `apps`, `v1` → core).
fn group_kind(object: &Value) -> (String, String) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    // Split as the apply splits it, so the check and the apply see one group.
    let group = strata_discovery::group_of(api_version);
    let kind = object["kind"].as_str().unwrap_or_default();
    (group.to_owned(), kind.to_owned())
}

/// The plural resource of `group`/`kind` and whether it is namespaced: from the cluster's API
/// discovery, else from a CustomResourceDefinition among `objects`.
fn resource_of(
    group: &str,
    kind: &str,
    served: &[ResourceKind],
    objects: &[Value],
) -> Option<(String, bool)> {
    if let Some(k) = served.iter().find(|k| k.group == group && k.kind == kind) {
        return Some((k.plural.clone(), k.namespaced));
    }
    objects.iter().find_map(|o| {
        let spec = &o["spec"];
        let defines = group_kind(o)
            == (
                "apiextensions.k8s.io".to_owned(),
                "CustomResourceDefinition".to_owned(),
            )
            && spec["group"] == group
            && spec["names"]["kind"] == kind;
        let plural = spec["names"]["plural"].as_str()?;
        defines.then(|| (plural.to_owned(), spec["scope"] != "Cluster"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn served() -> Vec<ResourceKind> {
        vec![
            ResourceKind::guess("", "v1", "ConfigMap", true),
            ResourceKind::guess("apps", "v1", "Deployment", true),
            ResourceKind::guess(
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRoleBinding",
                false,
            ),
        ]
    }

    fn object(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Value {
        let mut o = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
        if let Some(ns) = namespace {
            o["metadata"]["namespace"] = json!(ns);
        }
        o
    }

    #[test]
    fn parses_kinds_and_grants_as_rbac_and_the_flags_write_them() {
        let gr: GroupResource = "deployments.apps".parse().unwrap();
        assert_eq!(gr, GroupResource::new("apps", "deployments"));
        assert_eq!(gr.to_string(), "deployments.apps");
        let core: GroupResource = "configmaps".parse().unwrap();
        assert_eq!(core, GroupResource::new("", "configmaps"));
        for bad in ["", "Deployments", "a..b", "-x", "x/y"] {
            let err = bad.parse::<GroupResource>().unwrap_err().to_string();
            assert!(err.contains("RESOURCE.GROUP"), "{bad}: {err}");
        }
        let grant: NamespaceGrant = "shop=shop-*".parse().unwrap();
        assert!(grant.allows("shop", "shop-copy"));
        assert!(!grant.allows("shop", "kube-system"));
        assert!(!grant.allows("other", "shop-copy"));
        assert!("*=*".parse::<NamespaceGrant>().unwrap().allows("a", "b"));
        for bad in ["shop", "Shop=x", "shop=a.b", "=x"] {
            let err = bad.parse::<NamespaceGrant>().unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_other_namespaces_and_kinds_one_line_each() {
        let policy = RestorePolicy::default();
        let objects = vec![
            object("v1", "Namespace", None, "copy"),
            object("v1", "ConfigMap", Some("copy"), "settings"),
            object("apps/v1", "Deployment", Some("shop"), "web"),
            object(
                "rbac.authorization.k8s.io/v1",
                "ClusterRoleBinding",
                None,
                "admin",
            ),
            object("example.com/v1", "Widget", Some("shop"), "w"),
        ];
        let refused = policy.refusals("shop", &objects, &served());
        assert_eq!(
            refused,
            [
                "namespace copy: a Restore in namespace shop may write only into shop (no \
                 --restore-into grant)",
                "ClusterRoleBinding admin: clusterrolebindings.rbac.authorization.k8s.io is not \
                 a kind the restore policy allows",
                "Widget w: kind Widget of group \"example.com\" is not served by the cluster",
            ]
        );
        let mut granted = policy.clone();
        granted.namespaces.push("shop=copy".parse().unwrap());
        assert_eq!(
            granted.refusals("shop", &objects[..3], &served()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_custom_kind_is_known_from_its_definition_in_the_plan() {
        let mut policy = RestorePolicy::default();
        policy.kinds.insert("widgets.example.com".parse().unwrap());
        let definition = json!({"apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"kind": "Widget", "plural": "widgets"}}});
        let widget = object("example.com/v1", "Widget", Some("shop"), "w");
        let refused = policy.refusals("shop", &[definition.clone(), widget], &served());
        // The definition itself is cluster-scoped and not allowed; the Widget is.
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].starts_with("CustomResourceDefinition widgets.example.com: kind"));
    }
}
