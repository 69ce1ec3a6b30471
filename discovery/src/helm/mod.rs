//! Helm releases: reading their storage records and resolving the objects they own.
//!
//! A Helm 3 release lives in its namespace as one storage record per revision: a Secret of
//! type `helm.sh/release.v1` named `sh.helm.release.v1.<release>.v<revision>` (or, with the
//! ConfigMap driver, a ConfigMap of the same name), labelled `owner=helm`, `name=<release>`,
//! `status=<status>` and `version=<revision>`. Backing up every record, not only the live
//! revision's objects, is what lets `helm history`, `helm upgrade` and `helm rollback` keep
//! working after a restore.

mod codec;
mod release;

use std::collections::BTreeMap;

use kube::api::{DynamicObject, ObjectMeta, TypeMeta};

pub use codec::{
    Driver, GZIP_MAGIC, MAX_RELEASE_BYTES, decode_release, decode_secret_data, encode_release,
    encode_secret_data,
};
pub use release::{Info, Release, STATUS_DEPLOYED};

use crate::inventory::Inventory;
use crate::object::{ObjectKey, ObjectRef, annotation, is, label};
use crate::{Error, Result};

/// The Secret type of Helm 3 release records.
pub const SECRET_TYPE: &str = "helm.sh/release.v1";
/// The label Helm sets on objects it manages (`app.kubernetes.io/managed-by=Helm`).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The annotation naming the owning release.
pub const RELEASE_NAME_ANNOTATION: &str = "meta.helm.sh/release-name";
/// The annotation naming the owning release's namespace.
pub const RELEASE_NAMESPACE_ANNOTATION: &str = "meta.helm.sh/release-namespace";

/// One decoded storage record.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRecord {
    /// The Secret or ConfigMap.
    pub reference: ObjectRef,
    /// Which driver wrote it.
    pub driver: Driver,
    /// The decoded revision.
    pub release: Release,
}

/// A release and all its revisions found in a namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct HelmRelease {
    /// Release name.
    pub name: String,
    /// Namespace of the release (and of its records).
    pub namespace: String,
    /// Decoded records, oldest revision first.
    pub records: Vec<StorageRecord>,
    /// Records that carry the release's labels but could not be decoded, with the reason.
    /// They are still backed up, as Helm would still see them.
    pub undecodable: Vec<(ObjectRef, String)>,
}

impl HelmRelease {
    /// The live revision: the newest with status `deployed`, or else the newest of all (a
    /// release whose only install failed).
    pub fn current(&self) -> Option<&StorageRecord> {
        self.records
            .iter()
            .rev()
            .find(|r| r.release.info.status == STATUS_DEPLOYED)
            .or_else(|| self.records.last())
    }

    /// Every storage record object, decodable or not.
    pub fn record_refs(&self) -> impl Iterator<Item = &ObjectRef> {
        self.records
            .iter()
            .map(|r| &r.reference)
            .chain(self.undecodable.iter().map(|(r, _)| r))
    }
}

/// The name Helm gives the record of a revision.
pub fn record_name(release: &str, version: u32) -> String {
    format!("sh.helm.release.v1.{release}.v{version}")
}

fn record_meta(release: &Release) -> ObjectMeta {
    let labels = BTreeMap::from([
        ("name".to_owned(), release.name.clone()),
        ("owner".to_owned(), "helm".to_owned()),
        ("status".to_owned(), release.info.status.clone()),
        ("version".to_owned(), release.version.to_string()),
    ]);
    ObjectMeta {
        name: Some(record_name(&release.name, release.version)),
        namespace: Some(release.namespace.clone()),
        labels: Some(labels),
        ..Default::default()
    }
}

/// The Secret the Secret driver writes for a revision.
pub fn secret_record(release: &Release) -> Result<DynamicObject> {
    Ok(DynamicObject {
        types: Some(TypeMeta {
            api_version: "v1".into(),
            kind: "Secret".into(),
        }),
        metadata: record_meta(release),
        data: serde_json::json!({"type": SECRET_TYPE, "data": {"release": encode_secret_data(release)?}}),
    })
}

/// The ConfigMap the ConfigMap driver writes for a revision.
pub fn configmap_record(release: &Release) -> Result<DynamicObject> {
    Ok(DynamicObject {
        types: Some(TypeMeta {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
        }),
        metadata: record_meta(release),
        data: serde_json::json!({"data": {"release": encode_release(release)?}}),
    })
}

/// Whether an object carries the labels of a Helm storage record (of any release).
pub fn is_record(object: &DynamicObject) -> bool {
    let owned = label(object, "owner") == Some("helm") && label(object, "name").is_some();
    let secret = is(object, "", "Secret")
        && object.data.get("type").and_then(|t| t.as_str()) == Some(SECRET_TYPE);
    owned && (secret || is(object, "", "ConfigMap"))
}

/// Decode a storage record; `Ok(None)` when the object is not one.
pub fn read_record(object: &DynamicObject) -> Result<Option<StorageRecord>> {
    if !is_record(object) {
        return Ok(None);
    }
    let reference = ObjectRef::of(object)?;
    let what = format!(
        "{}/{}",
        reference.namespace.as_deref().unwrap_or(""),
        reference.name
    );
    let data = object
        .data
        .get("data")
        .and_then(|d| d.get("release"))
        .and_then(|r| r.as_str());
    let Some(data) = data else {
        return Err(Error::HelmRecord {
            record: what,
            reason: "no data.release".to_owned(),
        });
    };
    let (driver, release) = if reference.kind == "Secret" {
        (Driver::Secret, decode_secret_data(data, &what)?)
    } else {
        (Driver::ConfigMap, decode_release(data, &what)?)
    };
    Ok(Some(StorageRecord {
        reference,
        driver,
        release,
    }))
}

/// Every release with records in a namespace, by name.
pub fn releases(inventory: &Inventory, namespace: &str) -> Vec<HelmRelease> {
    let mut found: BTreeMap<String, HelmRelease> = BTreeMap::new();
    for object in inventory.in_namespace(namespace).filter(|o| is_record(o)) {
        let Some(name) = label(object, "name") else {
            continue;
        };
        let entry = found.entry(name.to_owned()).or_insert_with(|| HelmRelease {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            records: Vec::new(),
            undecodable: Vec::new(),
        });
        match read_record(object) {
            Ok(Some(record)) => entry.records.push(record),
            Ok(None) => {}
            Err(e) => {
                if let Ok(r) = ObjectRef::of(object) {
                    entry.undecodable.push((r, e.to_string()));
                }
            }
        }
    }
    let mut releases: Vec<HelmRelease> = found.into_values().collect();
    for r in &mut releases {
        r.records.sort_by_key(|rec| rec.release.version);
    }
    releases
}

/// One release by name.
pub fn release(inventory: &Inventory, namespace: &str, name: &str) -> Result<HelmRelease> {
    releases(inventory, namespace)
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| Error::NotFound {
            what: format!("Helm release {name} in namespace {namespace}"),
        })
}

/// The objects a release owns, found in an inventory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedRelease {
    /// Objects of the live revision's manifest and objects annotated as the release's.
    pub objects: Vec<ObjectKey>,
    /// Manifest entries that do not exist (deleted by hand, or hooks Helm removed).
    pub missing: Vec<ObjectRef>,
}

/// Resolve the live revision's manifest against the inventory and add every object labelled
/// `app.kubernetes.io/managed-by=Helm` and annotated with the release's name (and namespace,
/// when the annotation is present).
pub fn resolve(inventory: &Inventory, release: &HelmRelease) -> Result<ResolvedRelease> {
    let mut resolved = ResolvedRelease::default();
    if let Some(current) = release.current() {
        for mut reference in current.release.manifest_objects()? {
            let group = reference.group().to_owned();
            let namespaced = inventory.is_namespaced(&group, &reference.kind);
            if reference.namespace.is_none() && namespaced != Some(false) {
                reference.namespace = Some(release.namespace.clone());
            }
            let mut key = reference.key();
            if inventory.get(&key).is_none() && namespaced.is_none() {
                key.namespace = None;
            }
            if inventory.get(&key).is_some() {
                resolved.objects.push(key);
            } else {
                resolved.missing.push(reference);
            }
        }
    }
    for object in inventory.objects() {
        let ours = label(object, MANAGED_BY) == Some("Helm")
            && annotation(object, RELEASE_NAME_ANNOTATION) == Some(release.name.as_str())
            && match annotation(object, RELEASE_NAMESPACE_ANNOTATION) {
                Some(ns) => ns == release.namespace,
                None => object
                    .metadata
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| ns == release.namespace),
            };
        if ours && let Ok(r) = ObjectRef::of(object) {
            let key = r.key();
            if !resolved.objects.contains(&key) {
                resolved.objects.push(key);
            }
        }
    }
    Ok(resolved)
}
