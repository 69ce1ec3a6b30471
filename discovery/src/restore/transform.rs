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
        // The rendered objects name their namespace too (many charts set
        // `metadata.namespace` in every template): left as they were, `helm upgrade` or
        // `helm uninstall` of the restored copy would work on the source namespace's
        // objects.
        stored.release.manifest =
            map_manifest_namespaces(&stored.release.manifest, &self.namespaces);
        if let Some(hooks) = stored.release.hooks.as_mut().and_then(Value::as_array_mut) {
            for hook in hooks {
                if let Some(Value::String(manifest)) = hook.get_mut("manifest") {
                    *manifest = map_manifest_namespaces(manifest, &self.namespaces);
                }
            }
        }
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

/// `manifest`, a YAML stream Helm rendered, with each document's `metadata.namespace` mapped
/// by `mapping`. A line edit of the `namespace:` line directly under a document's top-level
/// `metadata:` (its first indentation level), so that everything else stays as Helm wrote it:
/// the `# Source:` comments, the order, the quoting (kept as found).
fn map_manifest_namespaces(manifest: &str, mapping: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(manifest.len());
    // Inside a top-level `metadata:` block, and the indentation of its keys once seen.
    let mut metadata: Option<Option<usize>> = None;
    for line in manifest.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let text = body.trim_start();
        let indent = body.len() - text.len();
        if text.is_empty() || text.starts_with('#') {
            out.push_str(line);
            continue;
        }
        if indent == 0 {
            metadata = (text == "metadata:").then_some(None);
            out.push_str(line);
            continue;
        }
        let Some(level) = metadata.as_mut() else {
            out.push_str(line);
            continue;
        };
        let level = *level.get_or_insert(indent);
        let mapped = (indent == level)
            .then(|| text.strip_prefix("namespace:"))
            .flatten()
            .and_then(|value| {
                let value = value.trim();
                let (quote, bare) = match value.as_bytes().first() {
                    Some(b'"') => ("\"", value.trim_matches('"')),
                    Some(b'\'') => ("'", value.trim_matches('\'')),
                    _ => ("", value),
                };
                mapping.get(bare).map(|to| (quote, to))
            });
        match mapped {
            Some((quote, to)) => {
                out.push_str(&body[..indent]);
                out.push_str(&format!("namespace: {quote}{to}{quote}"));
                out.push_str(ending);
            }
            None => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod manifest_tests {
    use super::*;

    #[test]
    fn namespaces_under_metadata_are_mapped_and_nothing_else() {
        let mapping = BTreeMap::from([("shop".to_owned(), "shop-copy".to_owned())]);
        let lines = |namespaces: [&str; 2]| {
            [
                "---",
                "# Source: c/templates/a.yaml",
                "apiVersion: v1",
                "kind: ConfigMap",
                "metadata:",
                "  name: a",
                namespaces[0],
                "data:",
                "  namespace: shop",
                "---",
                "apiVersion: v1",
                "kind: Service",
                "metadata:",
                "  name: b",
                "  labels:",
                "    namespace: shop",
                namespaces[1],
                "spec:",
                "  type: ClusterIP",
                "---",
                "kind: Role",
                "metadata:",
                "  namespace: 'other'",
                "",
            ]
            .join("\n")
        };
        let manifest = lines(["  namespace: \"shop\"", "  namespace: shop"]);
        let expected = lines(["  namespace: \"shop-copy\"", "  namespace: shop-copy"]);
        assert_eq!(map_manifest_namespaces(&manifest, &mapping), expected);
    }
}
