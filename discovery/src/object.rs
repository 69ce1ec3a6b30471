//! Object identity: how objects are named in plans and looked up in an inventory.

use kube::api::DynamicObject;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A reference to one Kubernetes object, as printed by `strata discover`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// `group/version`, or `version` for the core group.
    pub api_version: String,
    /// The kind, e.g. `StatefulSet`.
    pub kind: String,
    /// The namespace; `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
}

impl ObjectRef {
    /// The reference of an object, or an error naming the missing field.
    pub fn of(object: &DynamicObject) -> Result<Self> {
        let name = object
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::MissingField {
                what: describe(object),
                field: "metadata.name",
            })?;
        let types = object.types.as_ref().ok_or_else(|| Error::MissingField {
            what: describe(object),
            field: "apiVersion/kind",
        })?;
        if types.api_version.is_empty() || types.kind.is_empty() {
            return Err(Error::MissingField {
                what: describe(object),
                field: "apiVersion/kind",
            });
        }
        Ok(ObjectRef {
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
            namespace: object.metadata.namespace.clone(),
            name,
        })
    }

    /// The API group (empty for the core group).
    pub fn group(&self) -> &str {
        group_of(&self.api_version)
    }

    /// The version-independent key of this object.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            group: self.group().to_owned(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{} {}/{}", self.api_version, self.kind, ns, self.name),
            None => write!(f, "{}/{} {}", self.api_version, self.kind, self.name),
        }
    }
}

/// The identity of an object regardless of the API version it is read through: an object
/// served at `apps/v1` and `apps/v1beta2` is the same object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// API group, empty for core.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace, `None` when cluster-scoped.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> Self {
        ObjectKey {
            group: group.to_owned(),
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

/// The group part of an `apiVersion` (`apps/v1` → `apps`, `v1` → ``).
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// A short human description of an object for error messages.
pub(crate) fn describe(object: &DynamicObject) -> String {
    let kind = object.types.as_ref().map_or("?", |t| t.kind.as_str());
    let ns = object.metadata.namespace.as_deref().unwrap_or("");
    let name = object.metadata.name.as_deref().unwrap_or("?");
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

/// The object's kind, or "" when unknown.
pub(crate) fn kind_of(object: &DynamicObject) -> &str {
    object.types.as_ref().map_or("", |t| t.kind.as_str())
}

/// The object's API group, or "" when core or unknown.
pub(crate) fn group_of_object(object: &DynamicObject) -> &str {
    object
        .types
        .as_ref()
        .map_or("", |t| group_of(&t.api_version))
}

/// Whether the object is of the given group and kind.
pub(crate) fn is(object: &DynamicObject, group: &str, kind: &str) -> bool {
    kind_of(object) == kind && group_of_object(object) == group
}

/// A label of the object.
pub(crate) fn label<'a>(object: &'a DynamicObject, key: &str) -> Option<&'a str> {
    object
        .metadata
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// An annotation of the object.
pub(crate) fn annotation<'a>(object: &'a DynamicObject, key: &str) -> Option<&'a str> {
    object
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Parse one object from JSON, checking that it names itself.
pub fn object_from_value(value: serde_json::Value, what: &str) -> Result<DynamicObject> {
    let object: DynamicObject = serde_json::from_value(value).map_err(|e| Error::json(what, e))?;
    ObjectRef::of(&object)?;
    Ok(object)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn group_of_splits_api_version() {
        assert_eq!(group_of("apps/v1"), "apps");
        assert_eq!(group_of("v1"), "");
        assert_eq!(
            group_of("postgres-operator.crunchydata.com/v1beta1"),
            "postgres-operator.crunchydata.com"
        );
    }

    #[test]
    fn object_without_name_is_rejected() {
        let value = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}});
        let err = object_from_value(value, "test").unwrap_err();
        assert!(
            matches!(
                err,
                Error::MissingField {
                    field: "metadata.name",
                    ..
                }
            ),
            "{err}"
        );
    }
}
