//! A snapshot of the objects discovery works on, indexed by identity and uid.

use std::collections::HashMap;

use kube::api::DynamicObject;

use crate::Result;
use crate::object::{ObjectKey, ObjectRef};
use crate::source::{ObjectSource, ResourceKind};

/// Kinds never read: ephemeral or node-level state that no application restore wants
/// (events, nodes, live metrics, the deprecated component statuses).
pub const UNREAD_KINDS: &[(&str, &str)] = &[
    ("", "Event"),
    ("events.k8s.io", "Event"),
    ("", "Node"),
    ("", "ComponentStatus"),
    ("metrics.k8s.io", "PodMetrics"),
    ("metrics.k8s.io", "NodeMetrics"),
];

/// Every object of the chosen namespaces plus every cluster-scoped object, read once.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    objects: Vec<DynamicObject>,
    kinds: Vec<ResourceKind>,
    by_key: HashMap<ObjectKey, usize>,
    by_uid: HashMap<String, usize>,
    forbidden: Vec<ResourceKind>,
}

impl Inventory {
    /// Read the namespaced objects of `namespaces` and all cluster-scoped objects from a source.
    pub async fn collect<S: ObjectSource>(source: &S, namespaces: &[String]) -> Result<Self> {
        let kinds = source.kinds().await?;
        let mut objects = Vec::new();
        let mut forbidden = Vec::new();
        for kind in &kinds {
            if UNREAD_KINDS.contains(&(kind.group.as_str(), kind.kind.as_str())) {
                continue;
            }
            if kind.namespaced {
                for ns in namespaces {
                    objects.extend(source.list(kind, Some(ns)).await?);
                }
            } else {
                // A least-privilege controller may read only the cluster-scoped kinds an
                // application refers to (Namespaces, PersistentVolumes, StorageClasses,
                // definitions): the others it may not list are left out, as if empty.
                match source.list(kind, None).await {
                    Ok(listed) => objects.extend(listed),
                    Err(err) if err.is_forbidden() => forbidden.push(kind.clone()),
                    Err(err) => return Err(err),
                }
            }
        }
        let mut inventory = Self::from_objects(objects, kinds);
        inventory.forbidden = forbidden;
        Ok(inventory)
    }

    /// The cluster-scoped kinds [`Inventory::collect`] left out because listing them was
    /// forbidden: objects of these kinds an application refers to are not in it.
    pub fn forbidden_kinds(&self) -> &[ResourceKind] {
        &self.forbidden
    }

    /// An inventory over objects already read. Objects without a name or kind are dropped;
    /// a second copy of the same object (read through another version) is ignored.
    pub fn from_objects(objects: Vec<DynamicObject>, kinds: Vec<ResourceKind>) -> Self {
        let mut inventory = Inventory {
            kinds,
            ..Default::default()
        };
        for object in objects {
            let Ok(reference) = ObjectRef::of(&object) else {
                continue;
            };
            let key = reference.key();
            if inventory.by_key.contains_key(&key) {
                continue;
            }
            let index = inventory.objects.len();
            if let Some(uid) = &object.metadata.uid {
                inventory.by_uid.insert(uid.clone(), index);
            }
            inventory.by_key.insert(key, index);
            inventory.objects.push(object);
        }
        inventory
    }

    /// Every object.
    pub fn objects(&self) -> &[DynamicObject] {
        &self.objects
    }

    /// The kinds the source reported.
    pub fn kinds(&self) -> &[ResourceKind] {
        &self.kinds
    }

    /// The object with this identity.
    pub fn get(&self, key: &ObjectKey) -> Option<&DynamicObject> {
        self.by_key.get(key).and_then(|&i| self.objects.get(i))
    }

    /// The object with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<&DynamicObject> {
        self.by_uid.get(uid).and_then(|&i| self.objects.get(i))
    }

    /// Whether the kind is namespaced, as far as the source or the objects tell.
    pub fn is_namespaced(&self, group: &str, kind: &str) -> Option<bool> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind)
            .map(|k| k.namespaced)
    }

    /// Objects in one namespace.
    pub fn in_namespace<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a DynamicObject> + 'a {
        self.objects
            .iter()
            .filter(move |o| o.metadata.namespace.as_deref() == Some(namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// A cluster whose RBAC lets the reader list ConfigMaps in `shop` and Namespaces, and
    /// refuses ClusterRoles (cluster-scoped) and Secrets (namespaced).
    struct Partial;

    fn forbidden(what: &str) -> Error {
        let status = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        Error::kube(what, kube::Error::Api(Box::new(status)))
    }

    impl ObjectSource for Partial {
        async fn kinds(&self) -> Result<Vec<ResourceKind>> {
            Ok(vec![
                ResourceKind::guess("", "v1", "Namespace", false),
                ResourceKind::guess("rbac.authorization.k8s.io", "v1", "ClusterRole", false),
                ResourceKind::guess("", "v1", "ConfigMap", true),
                ResourceKind::guess("", "v1", "Secret", true),
            ])
        }

        async fn list(
            &self,
            kind: &ResourceKind,
            _namespace: Option<&str>,
        ) -> Result<Vec<DynamicObject>> {
            let object = |kind: &str, namespace: Option<&str>, name: &str| {
                let mut value = serde_json::json!({"apiVersion": "v1", "kind": kind,
                    "metadata": {"name": name}});
                if let Some(ns) = namespace {
                    value["metadata"]["namespace"] = ns.into();
                }
                serde_json::from_value::<DynamicObject>(value).unwrap()
            };
            match kind.kind.as_str() {
                "Namespace" => Ok(vec![object("Namespace", None, "shop")]),
                "ConfigMap" => Ok(vec![object("ConfigMap", Some("shop"), "settings")]),
                other => Err(forbidden(&format!("listing {other}"))),
            }
        }
    }

    #[tokio::test]
    async fn a_forbidden_cluster_scoped_kind_is_skipped_and_a_forbidden_namespaced_one_fails() {
        let err = Inventory::collect(&Partial, &["shop".to_owned()])
            .await
            .unwrap_err();
        assert!(err.is_forbidden(), "{err}");
        assert!(err.to_string().contains("listing Secret"), "{err}");

        struct NoSecrets;
        impl ObjectSource for NoSecrets {
            async fn kinds(&self) -> Result<Vec<ResourceKind>> {
                let mut kinds = Partial.kinds().await?;
                kinds.retain(|k| k.kind != "Secret");
                Ok(kinds)
            }
            async fn list(
                &self,
                kind: &ResourceKind,
                namespace: Option<&str>,
            ) -> Result<Vec<DynamicObject>> {
                Partial.list(kind, namespace).await
            }
        }
        let inventory = Inventory::collect(&NoSecrets, &["shop".to_owned()])
            .await
            .unwrap();
        let names: Vec<&str> = inventory
            .objects()
            .iter()
            .filter_map(|o| o.metadata.name.as_deref())
            .collect();
        assert_eq!(names, ["shop", "settings"]);
        let skipped: Vec<&str> = inventory
            .forbidden_kinds()
            .iter()
            .map(|k| k.kind.as_str())
            .collect();
        assert_eq!(skipped, ["ClusterRole"]);
    }
}
