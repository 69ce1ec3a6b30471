//! The Helm release document, as far as backup needs to read it.

use serde::{Deserialize, Serialize};

use crate::object::ObjectRef;
use crate::{Result, yaml};

/// A Helm release revision (`pkg/release.Release` in the Helm sources). Fields this crate does
/// not read are kept verbatim in `extra` so that a decoded release encodes back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// Release name.
    pub name: String,
    /// Status and timestamps.
    #[serde(default)]
    pub info: Info,
    /// The chart, kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chart: Option<serde_json::Value>,
    /// User-supplied values, kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// The rendered templates: a YAML stream of every object the release owns.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest: String,
    /// Hooks, kept opaque.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<serde_json::Value>,
    /// Revision number, from 1.
    pub version: u32,
    /// The release's namespace.
    #[serde(default)]
    pub namespace: String,
    /// Other fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `pkg/release.Info`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Info {
    /// `deployed`, `superseded`, `failed`, `uninstalled`, `pending-upgrade`, ...
    #[serde(default)]
    pub status: String,
    /// Other fields (timestamps, description, notes).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Helm's status of the revision that is live.
pub const STATUS_DEPLOYED: &str = "deployed";

impl Release {
    /// The objects of the rendered manifest. A reference without a namespace is left without
    /// one; the caller decides whether the kind is namespaced (then it is in the release's).
    pub fn manifest_objects(&self) -> Result<Vec<ObjectRef>> {
        let what = format!(
            "manifest of Helm release {} revision {}",
            self.name, self.version
        );
        let mut refs = Vec::new();
        for doc in yaml::documents(&self.manifest, &what)? {
            let field = |path: &[&str]| {
                path.iter()
                    .try_fold(&doc, |v, k| v.get(*k))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            let (Some(api_version), Some(kind), Some(name)) = (
                field(&["apiVersion"]),
                field(&["kind"]),
                field(&["metadata", "name"]),
            ) else {
                return Err(crate::Error::MissingField {
                    what,
                    field: "apiVersion, kind or metadata.name in a document",
                });
            };
            refs.push(ObjectRef {
                api_version,
                kind,
                namespace: field(&["metadata", "namespace"]),
                name,
            });
        }
        Ok(refs)
    }
}
