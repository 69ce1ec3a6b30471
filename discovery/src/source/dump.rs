//! Offline dumps: `kubectl get -o json` output or a folder of YAML/JSON manifests.

use std::collections::BTreeSet;
use std::future::{Future, ready};
use std::io::Read;
use std::path::{Path, PathBuf};

use kube::api::DynamicObject;

use super::{ObjectSource, ResourceKind};
use crate::object::{group_of, group_of_object, kind_of, object_from_value};
use crate::{Error, Result};

/// Largest dump read, in bytes (bounds memory use on hostile input).
pub const MAX_DUMP_BYTES: u64 = 1 << 30;
/// Most files read from a dump folder.
pub const MAX_DUMP_FILES: usize = 100_000;

/// Objects read from files, served as if from a cluster.
///
/// Accepts a JSON `List` (what `kubectl get -o json` prints; any kind ending in `List` with
/// `items`), a single object, or a folder whose `*.json`, `*.yaml` and `*.yml` files hold
/// one or more documents each (YAML streams separated by `---`), read in path order.
#[derive(Debug, Clone, Default)]
pub struct DumpSource {
    objects: Vec<DynamicObject>,
}

impl DumpSource {
    /// A source serving these objects.
    pub fn new(objects: Vec<DynamicObject>) -> Self {
        DumpSource { objects }
    }

    /// Every object in the dump.
    pub fn objects(&self) -> &[DynamicObject] {
        &self.objects
    }

    /// Read a JSON dump from a stream.
    pub fn from_json_reader(reader: impl Read, what: &str) -> Result<Self> {
        let text = read_bounded(reader, what)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(what, e))?;
        let mut objects = Vec::new();
        flatten(value, what, &mut objects)?;
        Ok(DumpSource { objects })
    }

    /// Read a dump file (JSON, or YAML documents) or a folder of them.
    pub fn from_path(path: &Path) -> Result<Self> {
        let mut objects = Vec::new();
        if path.is_dir() {
            let mut files = Vec::new();
            collect_files(path, &mut files)?;
            files.sort();
            for file in files {
                read_file(&file, &mut objects)?;
            }
        } else {
            read_file(path, &mut objects)?;
        }
        Ok(DumpSource { objects })
    }

    fn list_now(&self, kind: &ResourceKind, namespace: Option<&str>) -> Vec<DynamicObject> {
        self.objects
            .iter()
            .filter(|o| kind_of(o) == kind.kind && group_of_object(o) == kind.group)
            .filter(|o| namespace.is_none() || o.metadata.namespace.as_deref() == namespace)
            .cloned()
            .collect()
    }

    fn kinds_now(&self) -> Vec<ResourceKind> {
        let mut seen = BTreeSet::new();
        for o in &self.objects {
            if let Some(t) = &o.types {
                let version = t.api_version.rsplit('/').next().unwrap_or_default();
                let kind = ResourceKind::guess(
                    group_of(&t.api_version),
                    version,
                    &t.kind,
                    o.metadata.namespace.is_some(),
                );
                if !seen
                    .iter()
                    .any(|k: &ResourceKind| k.group == kind.group && k.kind == kind.kind)
                {
                    seen.insert(kind);
                }
            }
        }
        seen.into_iter().collect()
    }
}

impl ObjectSource for DumpSource {
    fn kinds(&self) -> impl Future<Output = Result<Vec<ResourceKind>>> + Send {
        ready(Ok(self.kinds_now()))
    }

    fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Vec<DynamicObject>>> + Send {
        ready(Ok(self.list_now(kind, namespace)))
    }
}

fn read_bounded(reader: impl Read, what: &str) -> Result<String> {
    let mut text = String::new();
    reader
        .take(MAX_DUMP_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("reading dump", what, e))?;
    if text.len() as u64 > MAX_DUMP_BYTES {
        return Err(Error::Limit {
            what: format!("dump {what}"),
            limit: MAX_DUMP_BYTES,
        });
    }
    Ok(text)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing dump folder", dir, e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error::io("listing dump folder", dir, e))?
            .path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "yaml" | "yml")
        ) {
            if files.len() >= MAX_DUMP_FILES {
                return Err(Error::Limit {
                    what: format!("files in {}", dir.display()),
                    limit: MAX_DUMP_FILES as u64,
                });
            }
            files.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path, objects: &mut Vec<DynamicObject>) -> Result<()> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening dump", path, e))?;
    let text = read_bounded(file, &what)?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        let value = serde_json::from_str(&text).map_err(|e| Error::json(&what, e))?;
        return flatten(value, &what, objects);
    }
    for value in crate::yaml::documents(&text, &what)? {
        flatten(value, &what, objects)?;
    }
    Ok(())
}

/// Push the objects of a document: the items of a `*List`, or the document itself.
fn flatten(value: serde_json::Value, what: &str, objects: &mut Vec<DynamicObject>) -> Result<()> {
    let is_list = value
        .get("kind")
        .and_then(|k| k.as_str())
        .is_some_and(|k| k.ends_with("List"));
    match value {
        serde_json::Value::Object(mut map) if is_list => {
            let items = match map.remove("items") {
                Some(serde_json::Value::Array(items)) => items,
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(Error::MissingField {
                        what: what.to_owned(),
                        field: "items (an array)",
                    });
                }
            };
            // The API server leaves `apiVersion`/`kind` out of typed list items (`SecretList`);
            // `kubectl get -o json` fills them in. Accept both.
            let list_kind = map
                .get("kind")
                .and_then(|k| k.as_str())
                .and_then(|k| k.strip_suffix("List"));
            let item_kind = list_kind.filter(|k| !k.is_empty()).map(str::to_owned);
            let list_api_version = map.get("apiVersion").cloned();
            for mut item in items {
                if let (Some(obj), Some(kind)) = (item.as_object_mut(), &item_kind) {
                    obj.entry("kind").or_insert_with(|| kind.clone().into());
                    if let Some(api_version) = &list_api_version {
                        obj.entry("apiVersion")
                            .or_insert_with(|| api_version.clone());
                    }
                }
                objects.push(object_from_value(item, what)?);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                objects.push(object_from_value(item, what)?);
            }
        }
        value => objects.push(object_from_value(value, what)?),
    }
    Ok(())
}
