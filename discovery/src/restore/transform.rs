//! Changes made to objects on their way into the target cluster.

use std::collections::BTreeMap;

use serde_json::Value;

use super::order::field;
use crate::helm;
use crate::{Error, Result};

/// A JSON patch (RFC 6902) for the objects it targets.
#[derive(Debug, Clone)]
pub struct TargetedPatch {
    /// Only objects of this kind, when set.
    pub kind: Option<String>,
    /// Only objects of this name, when set.
    pub name: Option<String>,
    /// The patch.
    pub patch: json_patch::Patch,
}

/// Transforms applied to every object of a restore, in field order.
#[derive(Debug, Clone, Default)]
pub struct Transforms {
    /// Source namespace → target namespace. Applies to `metadata.namespace`, Namespace objects,
    /// RBAC subjects, Helm's release-namespace annotation and the namespace inside Helm release
    /// records (re-encoded, so the release is found in its new namespace).
    pub namespaces: BTreeMap<String, String>,
    /// Source storage class → target storage class, for PVCs and StatefulSet claim templates.
    pub storage_classes: BTreeMap<String, String>,
    /// Labels to set on every object.
    pub set_labels: BTreeMap<String, String>,
    /// Labels to remove from every object.
    pub remove_labels: Vec<String>,
    /// Annotations to set on every object.
    pub set_annotations: BTreeMap<String, String>,
    /// Annotations to remove from every object.
    pub remove_annotations: Vec<String>,
    /// JSON patches, applied last.
    pub patches: Vec<TargetedPatch>,
}

fn map_string(value: Option<&mut Value>, mapping: &BTreeMap<String, String>) {
    if let Some(slot) = value
        && let Some(new) = slot.as_str().and_then(|old| mapping.get(old))
    {
        *slot = Value::String(new.clone());
    }
}

fn edit_map(object: &mut Value, key: &str, set: &BTreeMap<String, String>, remove: &[String]) {
    if set.is_empty() && remove.is_empty() {
        return;
    }
    let Some(metadata) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) else {
        return;
    };
    let map = metadata
        .entry(key)
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(map) = map.as_object_mut() {
        for k in remove {
            map.remove(k);
        }
        for (k, v) in set {
            map.insert(k.clone(), Value::String(v.clone()));
        }
        if map.is_empty() {
            metadata.remove(key);
        }
    }
}

impl Transforms {
    /// Apply every transform to one (sanitized) object.
    pub fn apply(&self, mut object: Value) -> Result<Value> {
        if !self.namespaces.is_empty() {
            self.map_namespaces(&mut object)?;
        }
        if !self.storage_classes.is_empty() {
            map_string(
                object.pointer_mut("/spec/storageClassName"),
                &self.storage_classes,
            );
            if let Some(templates) = object
                .pointer_mut("/spec/volumeClaimTemplates")
                .and_then(|t| t.as_array_mut())
            {
                for t in templates {
                    map_string(
                        t.pointer_mut("/spec/storageClassName"),
                        &self.storage_classes,
                    );
                }
            }
        }
        edit_map(&mut object, "labels", &self.set_labels, &self.remove_labels);
        edit_map(
            &mut object,
            "annotations",
            &self.set_annotations,
            &self.remove_annotations,
        );
        for p in &self.patches {
            let kind_ok = p
                .kind
                .as_deref()
                .is_none_or(|k| k == field(&object, "/kind"));
            let name_ok = p
                .name
                .as_deref()
                .is_none_or(|n| n == field(&object, "/metadata/name"));
            if kind_ok && name_ok {
                let what = format!(
                    "{} {}",
                    field(&object, "/kind"),
                    field(&object, "/metadata/name")
                );
                json_patch::patch(&mut object, &p.patch).map_err(|source| Error::Patch {
                    object: what,
                    source,
                })?;
            }
        }
        Ok(object)
    }

    fn map_namespaces(&self, object: &mut Value) -> Result<()> {
        let mapping = &self.namespaces;
        map_string(object.pointer_mut("/metadata/namespace"), mapping);
        if field(object, "/kind") == "Namespace" && field(object, "/apiVersion") == "v1" {
            map_string(object.pointer_mut("/metadata/name"), mapping);
            if let Some(labels) = object
                .pointer_mut("/metadata/labels")
                .and_then(|l| l.as_object_mut())
                && let Some(name) = labels
                    .get("kubernetes.io/metadata.name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| mapping.get(n))
            {
                labels.insert(
                    "kubernetes.io/metadata.name".into(),
                    Value::String(name.clone()),
                );
            }
        }
        map_string(
            object.pointer_mut(&format!(
                "/metadata/annotations/{}",
                helm::RELEASE_NAMESPACE_ANNOTATION.replace('/', "~1")
            )),
            mapping,
        );
        if let Some(subjects) = object.get_mut("subjects").and_then(|s| s.as_array_mut()) {
            for s in subjects {
                map_string(s.get_mut("namespace"), mapping);
            }
        }
        self.map_helm_record(object)
    }

    /// Rewrite the namespace inside a Helm storage record.
    fn map_helm_record(&self, object: &mut Value) -> Result<()> {
        let Ok(record) = serde_json::from_value::<kube::api::DynamicObject>(object.clone()) else {
            return Ok(());
        };
        let Some(mut stored) = helm::read_record(&record)? else {
            return Ok(());
        };
        let Some(target) = self.namespaces.get(&stored.release.namespace) else {
            return Ok(());
        };
        stored.release.namespace = target.clone();
        let encoded = match stored.driver {
            helm::Driver::Secret => helm::encode_secret_data(&stored.release)?,
            helm::Driver::ConfigMap => helm::encode_release(&stored.release)?,
        };
        if let Some(slot) = object.pointer_mut("/data/release") {
            *slot = Value::String(encoded);
        }
        Ok(())
    }
}
