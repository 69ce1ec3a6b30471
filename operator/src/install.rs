//! The manifests a cluster needs, as `strata install` prints them (in the manner of
//! `velero install`): the CRDs, the controller's namespace, ServiceAccount, RBAC and
//! Deployment, and for each application namespace the datamover's ServiceAccount and bindings.
//!
//! ```
//! use strata_operator::install::{Install, manifests};
//!
//! let mut install = Install::new("registry.example/strata:0.1.0");
//! install.app_namespaces.push("shop".to_owned());
//! let yaml = manifests(&install)?;
//! assert!(yaml.contains("kind: Deployment"));
//! assert!(yaml.contains("namespace: shop"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Permissions
//!
//! Least privilege, kind by kind:
//!
//! - **Reading applications.** Discovery reads every kind of an application's namespace, so
//!   the [`READER`] ClusterRole (get and list on every kind, no watch) is bound by a
//!   RoleBinding in each application namespace only; an install naming none binds it
//!   cluster-wide. Of the cluster-scoped kinds the controller reads only those applications
//!   refer to: Namespaces, PersistentVolumes, StorageClasses, CustomResourceDefinitions (and
//!   the snapshot kinds); discovery skips the others as forbidden.
//! - **Writing restored objects.** Get, create and patch only on the kinds of the restore
//!   policy ([`crate::policy`]: [`DEFAULT_RESTORE_KINDS`] plus `--restore-kind`), the same
//!   list the controller checks each Restore's plan against, and create/patch on Namespaces,
//!   whose names the policy's `--restore-into` grants gate. No RBAC objects, webhooks,
//!   definitions or other cluster-scoped kinds unless the administrator adds them.
//! - **What a run makes.** Snapshots, temporary claims, the metadata stash and per-run
//!   credentials (Secrets), per-run ServiceAccounts, Jobs and Leases: no `delete` beyond these,
//!   status writes only on its own resources. The run loop watches its Backups, Restores,
//!   Targets and the Jobs, claims and snapshots runs make; it lists pods (why a datamover has
//!   not started, and how many run on each node) and Nodes (the per-node bound). Secrets, ServiceAccounts and claims are granted
//!   in every namespace because a mapped restore writes them into its destination, which may
//!   not exist when the manifests are applied, so no RoleBinding could be made there.
//!
//! The datamover pods need the API only for changed-block tracking (KEP-3314): the init step
//! of an incremental Job reads its snapshot, the snapshot's content and the driver's
//! SnapshotMetadataService, and asks a token for the service's audience for its own account
//! (TokenRequest). Its ServiceAccount and RoleBinding live in each application namespace, the
//! ClusterRoleBinding for the cluster-scoped kinds names each of those accounts.
//!
//! # The controller's Deployment
//!
//! Two replicas with a `RollingUpdate` strategy (one surge pod, none unavailable): the replicas
//! elect a leader with a Lease in the controller's namespace (`strata_operator::leader`), and only
//! the leader reconciles, so an update or a lost node never runs two controllers at once and the
//! standby takes over within the lease duration (at once when the leader stops cleanly, since it
//! releases the Lease). Each replica serves `/healthz` (liveness), `/readyz` (readiness: the
//! leader once its watches started, a standby once it has seen the leader's Lease, so that a
//! rollout can wait for the new pods before stopping the old ones) and `/metrics`
//! on the `metrics` port, 8080 (`strata_operator::endpoint`). The pod name and namespace come from
//! the downward API, as the election's identity and the Lease's namespace. The election needs
//! get, create and update on Leases in the controller's namespace only: a Role there grants them
//! (get and update only on the election's Lease); the ClusterRole's get/create/delete on Leases are the
//! per-PVC locks'. It runs as the image's non-root user with a read-only root filesystem, no
//! capabilities and the `RuntimeDefault` seccomp profile.

use serde_json::{Value, json};

use crate::crd::crds_yaml;
use crate::leader::DEFAULT_LEASE_NAME;
use crate::policy::{DEFAULT_RESTORE_KINDS, GroupResource, NamespaceGrant};

/// The controller's namespace by default.
pub const DEFAULT_NAMESPACE: &str = "strata-system";
/// Name of the controller's ServiceAccount, ClusterRole, ClusterRoleBinding and Deployment.
pub const CONTROLLER: &str = "strata-controller";
/// Name of the Role and RoleBinding of the controller's leader election.
pub const LEADER_ELECTION: &str = "strata-controller-leader-election";
/// Name of the ClusterRole that reads every kind, bound in each application namespace.
pub const READER: &str = "strata-controller-read";
/// The controller's HTTP port (probes and metrics).
pub const METRICS_PORT: u16 = 8080;
/// Name of the datamover pods' ServiceAccount in each application namespace, and of the
/// ClusterRole its RoleBinding grants.
pub const DATAMOVER: &str = "strata-datamover";
/// The uid and gid the controller runs as (the image's user, distroless' "nonroot").
pub const CONTROLLER_UID: i64 = 65532;

/// What to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    /// The image holding `strata-controller` and `strata` (the controller and its datamovers).
    pub image: String,
    /// The controller's namespace.
    pub namespace: String,
    /// Application namespaces whose volumes are backed up: each gets the datamover's account.
    pub app_namespaces: Vec<String>,
    /// NFS exports of folder Targets, mounted into the controller where the Targets' URLs
    /// point (the datamovers mount them from the Target's `spec.nfs`).
    pub nfs_targets: Vec<NfsMount>,
    /// Kinds Restores may create besides [`DEFAULT_RESTORE_KINDS`] (`--restore-kind`): passed
    /// to the controller and granted in its ClusterRole.
    pub restore_kinds: Vec<GroupResource>,
    /// Namespaces Restores may write into besides their own (`--restore-into`).
    pub restore_into: Vec<NamespaceGrant>,
    /// The controller's `--max-datamovers-per-node`, when not its default.
    pub max_datamovers_per_node: Option<usize>,
}

/// An NFS export mounted at `path`: `PATH=SERVER:EXPORT` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsMount {
    /// Where the controller sees it: the folder Targets' URLs name it.
    pub path: String,
    /// NFS server.
    pub server: String,
    /// The exported path.
    pub export: String,
}

impl std::str::FromStr for NfsMount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let shape = || {
            format!(
                "{text:?} is not PATH=SERVER:EXPORT (e.g. /targets/nas=nas.example:/exports/strata)"
            )
        };
        let (path, rest) = text.split_once('=').ok_or_else(shape)?;
        let (server, export) = rest.split_once(':').ok_or_else(shape)?;
        if !path.starts_with('/') || !export.starts_with('/') || server.is_empty() {
            return Err(shape());
        }
        Ok(NfsMount {
            path: path.to_owned(),
            server: server.to_owned(),
            export: export.to_owned(),
        })
    }
}

impl Install {
    /// The controller in [`DEFAULT_NAMESPACE`], no application namespace yet.
    pub fn new(image: impl Into<String>) -> Self {
        Install {
            image: image.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            app_namespaces: Vec::new(),
            nfs_targets: Vec::new(),
            restore_kinds: Vec::new(),
            restore_into: Vec::new(),
            max_datamovers_per_node: None,
        }
    }
}

/// A refused [`Install`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// A namespace is not a DNS label (RFC 1123: at most 63 of `a-z0-9-`, alphanumeric ends).
    #[error(
        "namespace {name:?} is not a DNS label (a-z, 0-9 and '-', at most 63, alphanumeric ends)"
    )]
    Namespace {
        /// The name given.
        name: String,
    },
    /// The same application namespace was named twice.
    #[error("namespace {name} is named twice")]
    Duplicate {
        /// The name given.
        name: String,
    },
    /// The image is empty.
    #[error("the image must not be empty")]
    Image,
    /// Rendering YAML failed.
    #[error("rendering the manifests")]
    Render(#[from] serde_saphyr::SerializeError),
}

fn dns_label(name: &str) -> Result<(), InstallError> {
    if crate::context::is_dns_label(name) {
        Ok(())
    } else {
        Err(InstallError::Namespace {
            name: name.to_owned(),
        })
    }
}

/// Every manifest as one multi-document YAML stream, for `kubectl apply -f -`: the CRDs, then
/// [`controller_objects`], then [`datamover_objects`] for each application namespace.
pub fn manifests(install: &Install) -> Result<String, InstallError> {
    if install.image.is_empty() {
        return Err(InstallError::Image);
    }
    dns_label(&install.namespace)?;
    for (i, name) in install.app_namespaces.iter().enumerate() {
        dns_label(name)?;
        if install.app_namespaces[..i].contains(name) {
            return Err(InstallError::Duplicate { name: name.clone() });
        }
    }
    let mut out = crds_yaml()?;
    let objects = controller_objects(install).into_iter().chain(
        install
            .app_namespaces
            .iter()
            .flat_map(|ns| datamover_objects(ns)),
    );
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&object)?);
    }
    Ok(out)
}

/// Get, create and patch (server-side apply) on the kinds Restores may create, one rule per
/// API group: [`DEFAULT_RESTORE_KINDS`] and the install's own.
fn restore_rules(install: &Install) -> Vec<Value> {
    let mut by_group: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    let defaults = DEFAULT_RESTORE_KINDS.iter().copied();
    let extra = install
        .restore_kinds
        .iter()
        .map(|k| (k.group.as_str(), k.resource.as_str()));
    for (group, resource) in defaults.chain(extra) {
        let resources = by_group.entry(group).or_default();
        if !resources.contains(&resource) {
            resources.push(resource);
        }
    }
    by_group
        .into_iter()
        .map(|(group, resources)| rule(&[group], &resources, &["get", "create", "patch"]))
        .collect()
}

/// The controller's command line: its image for the datamovers, their account, leader
/// election, and the install's restore policy.
fn controller_args(install: &Install) -> Vec<String> {
    let mut args = vec![
        "--datamover-image".to_owned(),
        install.image.clone(),
        "--datamover-service-account".to_owned(),
        DATAMOVER.to_owned(),
        "--leader-elect".to_owned(),
    ];
    if let Some(n) = install.max_datamovers_per_node {
        args.extend(["--max-datamovers-per-node".to_owned(), n.to_string()]);
    }
    for kind in &install.restore_kinds {
        args.extend(["--restore-kind".to_owned(), kind.to_string()]);
    }
    for grant in &install.restore_into {
        args.extend(["--restore-into".to_owned(), grant.to_string()]);
    }
    args
}

/// The [`READER`] role's bindings: a RoleBinding in each application namespace, or one
/// ClusterRoleBinding (every namespace) when the install names none.
fn reader_bindings(install: &Install) -> Vec<Value> {
    let role_ref =
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER });
    let subjects =
        json!([{ "kind": "ServiceAccount", "name": CONTROLLER, "namespace": install.namespace }]);
    if install.app_namespaces.is_empty() {
        return vec![json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": READER, "labels": labels() },
            "roleRef": role_ref, "subjects": subjects,
        })];
    }
    install
        .app_namespaces
        .iter()
        .map(|ns| {
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": { "name": READER, "namespace": ns, "labels": labels() },
                "roleRef": role_ref, "subjects": subjects,
            })
        })
        .collect()
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({ "apiGroups": groups, "resources": resources, "verbs": verbs })
}

/// Environment variable `name` from the downward API's `field` of the pod.
fn field_env(name: &str, field: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": field } } })
}

fn labels() -> Value {
    json!({ "app.kubernetes.io/name": CONTROLLER, "app.kubernetes.io/part-of": "strata" })
}

/// The controller's Namespace, ServiceAccount, ClusterRoles (its own, the reader's and the
/// datamovers'), ClusterRoleBinding, leader election Role and RoleBinding, Deployment, and
/// the reader's bindings.
pub fn controller_objects(install: &Install) -> Vec<Value> {
    let ns = install.namespace.as_str();
    let image = install.image.as_str();
    let mut mounts = vec![json!({ "name": "tmp", "mountPath": "/tmp" })];
    let mut volumes = vec![json!({ "name": "tmp", "emptyDir": {} })];
    for (i, target) in install.nfs_targets.iter().enumerate() {
        let name = format!("target-{i}");
        mounts.push(json!({ "name": name, "mountPath": target.path }));
        volumes.push(
            json!({ "name": name, "nfs": { "server": target.server, "path": target.export } }),
        );
    }
    let mut objects = vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": ns, "labels": labels() },
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": CONTROLLER, "namespace": ns, "labels": labels() },
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": CONTROLLER, "labels": labels() },
            "rules": ([
                // Its own resources.
                rule(&["strata.io"], &["targets", "backups", "restores"], &["get", "list", "watch"]),
                // The cleanup finalizer is added and removed by patching the object.
                rule(&["strata.io"], &["backups", "restores"], &["patch"]),
                rule(&["strata.io"], &["backups/status", "restores/status", "targets/status"], &["get", "patch", "update"]),
                // Owner references with blockOwnerDeletion need this (admission plugin
                // OwnerReferencesPermissionEnforcement).
                rule(&["strata.io"], &["backups/finalizers", "restores/finalizers"], &["update"]),
                // Discovery reads every kind of an application's namespace through the
                // READER role bound there; of the cluster-scoped kinds, those an application
                // refers to (the others are skipped when forbidden).
                rule(&[""], &["namespaces"], &["get", "list", "create", "patch"]),
                rule(&[""], &["persistentvolumes"], &["get", "list"]),
                rule(&["storage.k8s.io"], &["storageclasses"], &["get", "list"]),
                rule(&["apiextensions.k8s.io"], &["customresourcedefinitions"], &["get", "list"]),
                // Snapshots (kept bases are patched), temporary claims, datamover Jobs, the
                // metadata stash, one Lease per PVC, changed-block tracking.
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshots"], &["get", "list", "watch", "create", "patch", "delete"]),
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshotcontents"], &["get", "patch"]),
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshotclasses"], &["get", "list"]),
                rule(&[""], &["persistentvolumeclaims"], &["get", "list", "watch", "create", "delete"]),
                rule(&[""], &["secrets", "serviceaccounts"], &["get", "list", "create", "delete"]),
                // Why a datamover pod has not started (its pods, its Job's Events), in any
                // namespace a run copies into.
                rule(&[""], &["pods", "events"], &["get", "list"]),
                rule(&["batch"], &["jobs"], &["get", "list", "watch", "create", "delete"]),
                rule(&["coordination.k8s.io"], &["leases"], &["get", "create", "delete"]),
                rule(&["cbt.storage.k8s.io"], &["snapshotmetadataservices"], &["get"]),
                // Datamovers per node: the nodes, and the pods above.
                rule(&[""], &["nodes"], &["list"]),
                // Events on Backups and Restores (a repeat patches the first one's series).
                rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
            ].into_iter().chain(restore_rules(install)).collect::<Vec<_>>()),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": READER, "labels": labels() },
            "rules": [rule(&["*"], &["*"], &["get", "list"])],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": CONTROLLER, "labels": labels() },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER },
            "subjects": [{ "kind": "ServiceAccount", "name": CONTROLLER, "namespace": ns }],
        }),
        // What a datamover may do in its namespace (bound per namespace) ...
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": DATAMOVER, "labels": labels() },
            "rules": [
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshots"], &["get"]),
                {
                    "apiGroups": [""], "resources": ["serviceaccounts/token"],
                    "resourceNames": [DATAMOVER], "verbs": ["create"],
                },
            ],
        }),
        // ... and on the cluster-scoped kinds.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": format!("{DATAMOVER}-cluster"), "labels": labels() },
            "rules": [
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshotcontents"], &["get"]),
                rule(&["cbt.storage.k8s.io"], &["snapshotmetadataservices"], &["get"]),
            ],
        }),
        // Leader election: the Lease in the controller's own namespace. `create` cannot be
        // limited to a name (the name is in the body), `get` and `update` are.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": { "name": LEADER_ELECTION, "namespace": ns, "labels": labels() },
            "rules": [
                rule(&["coordination.k8s.io"], &["leases"], &["create"]),
                {
                    "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                    "resourceNames": [DEFAULT_LEASE_NAME], "verbs": ["get", "update"],
                },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": { "name": LEADER_ELECTION, "namespace": ns, "labels": labels() },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LEADER_ELECTION },
            "subjects": [{ "kind": "ServiceAccount", "name": CONTROLLER, "namespace": ns }],
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": CONTROLLER, "namespace": ns, "labels": labels() },
            "spec": {
                "replicas": 2,
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 },
                },
                "selector": { "matchLabels": { "app.kubernetes.io/name": CONTROLLER } },
                "template": {
                    "metadata": { "labels": labels() },
                    "spec": {
                        "serviceAccountName": CONTROLLER,
                        // The standby on another node than the leader, where there is one.
                        "affinity": { "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": { "matchLabels": { "app.kubernetes.io/name": CONTROLLER } },
                                },
                            }],
                        }},
                        "securityContext": {
                            "runAsNonRoot": true,
                            "runAsUser": CONTROLLER_UID,
                            "runAsGroup": CONTROLLER_UID,
                            "seccompProfile": { "type": "RuntimeDefault" },
                        },
                        "containers": [{
                            "name": "controller",
                            "image": image,
                            "command": ["/usr/local/bin/strata-controller"],
                            "args": controller_args(install),
                            // The election's identity and the Events' reportingInstance; the
                            // Lease's namespace.
                            "env": [
                                field_env(crate::events::POD_NAME_ENV, "metadata.name"),
                                field_env("POD_NAMESPACE", "metadata.namespace"),
                            ],
                            "ports": [{ "name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP" }],
                            "livenessProbe": {
                                "httpGet": { "path": "/healthz", "port": "metrics" },
                                "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
                            },
                            "readinessProbe": {
                                "httpGet": { "path": "/readyz", "port": "metrics" },
                                "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
                            },
                            "resources": {
                                "requests": { "cpu": "100m", "memory": "128Mi" },
                                "limits": { "memory": "512Mi" },
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": { "drop": ["ALL"] },
                            },
                            "volumeMounts": mounts,
                        }],
                        "volumes": volumes,
                    },
                },
            },
        }),
    ];
    objects.extend(reader_bindings(install));
    objects
}

/// The datamover's ServiceAccount in application namespace `ns`, its RoleBinding to the
/// [`DATAMOVER`] ClusterRole there, and its ClusterRoleBinding for the cluster-scoped kinds.
pub fn datamover_objects(ns: &str) -> Vec<Value> {
    let subjects = json!([{ "kind": "ServiceAccount", "name": DATAMOVER, "namespace": ns }]);
    vec![
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": DATAMOVER, "namespace": ns, "labels": labels() },
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": { "name": DATAMOVER, "namespace": ns, "labels": labels() },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DATAMOVER },
            "subjects": subjects,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": format!("{DATAMOVER}-{ns}"), "labels": labels() },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                "name": format!("{DATAMOVER}-cluster"),
            },
            "subjects": subjects,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_namespaces_and_images_are_refused_by_name() {
        let mut install = Install::new("img");
        install.app_namespaces = vec!["shop".into(), "Shop_2".into()];
        let err = manifests(&install).unwrap_err();
        assert!(
            matches!(&err, InstallError::Namespace { name } if name == "Shop_2"),
            "{err}"
        );
        install.app_namespaces = vec!["shop".into(), "shop".into()];
        assert!(matches!(
            manifests(&install),
            Err(InstallError::Duplicate { .. })
        ));
        install.app_namespaces.clear();
        install.namespace = "-x".into();
        assert!(matches!(
            manifests(&install),
            Err(InstallError::Namespace { .. })
        ));
        install.namespace = "a".repeat(64);
        assert!(matches!(
            manifests(&install),
            Err(InstallError::Namespace { .. })
        ));
        install.namespace = "a".repeat(63);
        assert!(manifests(&install).is_ok());
        assert!(matches!(
            manifests(&Install::new("")),
            Err(InstallError::Image)
        ));
    }

    #[test]
    fn each_application_namespace_gets_its_account_and_both_bindings() {
        let objects = datamover_objects("shop");
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["ServiceAccount", "RoleBinding", "ClusterRoleBinding"]
        );
        for o in &objects[1..] {
            assert_eq!(o["subjects"][0]["namespace"], "shop");
            assert_eq!(o["subjects"][0]["name"], DATAMOVER);
        }
        assert_eq!(objects[2]["metadata"]["name"], "strata-datamover-shop");
    }
}
