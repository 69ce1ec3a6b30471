//! The metadata backup: sanitized objects in restore order, written as a tar.gz of YAML.
//!
//! Layout (format `strata-metadata/1`):
//!
//! ```text
//! strata-metadata.json                      index: format, object paths in restore order, volumes
//! objects/0000-apiextensions.k8s.io-CustomResourceDefinition-_-pgclusters.example.com.yaml
//! objects/0001-core-Namespace-_-shop.yaml
//! objects/0007-apps-StatefulSet-shop-db.yaml
//! ```
//!
//! One YAML document per object, so the archive reads with `tar xzf` and any YAML tool, diffs
//! cleanly between backups, and restores with `kubectl apply -f objects/` in file order as a
//! last resort. tar.gz streams to any [`std::io::Write`] without seeking, which object stores
//! need. Entries are written with fixed mode, owner and time so equal backups are equal bytes.

use std::collections::HashMap;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::application::Application;
use crate::object::{ObjectRef, group_of};
use crate::restore::{RestoreOrder, reference};
use crate::sanitize::sanitize;
use crate::volumes::Volume;
use crate::{Error, Result, yaml};

/// Name of the format written in the index.
pub const FORMAT: &str = "strata-metadata/1";
/// Path of the index inside the archive.
pub const INDEX_PATH: &str = "strata-metadata.json";
/// Most entries read from an archive.
pub const MAX_ENTRIES: usize = 200_000;
/// Largest entry read (the API server stores objects up to about 1.5 MiB).
pub const MAX_ENTRY_BYTES: u64 = 16 << 20;
/// Most bytes read from all entries together. The archive is read back from shared storage,
/// so it is untrusted: its text and the objects parsed from it must fit well inside the
/// controller's memory limit (512 MiB, `strata install`), many times over what a real
/// application's objects take (a few MiB; the largest CRDs are about 1 MiB each).
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;
/// Longest entry name (a GNU long-name record) read from an archive.
const MAX_NAME_BYTES: u64 = 4096;

/// Sanitized objects in restore order, with the volumes they use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetadataBackup {
    /// The objects, first to restore first.
    pub objects: Vec<Value>,
    /// The volumes whose data the block backup carries.
    pub volumes: Vec<Volume>,
}

#[derive(Serialize, Deserialize)]
struct Index {
    format: String,
    objects: Vec<String>,
    volumes: Vec<Volume>,
}

impl MetadataBackup {
    /// Sanitize an application's objects and put them in restore order.
    pub fn from_application(app: &Application, order: &RestoreOrder) -> Result<Self> {
        let mut objects = app
            .objects
            .iter()
            .map(sanitize)
            .collect::<Result<Vec<_>>>()?;
        order.sort(&mut objects);
        Ok(MetadataBackup {
            objects,
            volumes: app.volumes.clone(),
        })
    }

    /// The objects' references, in restore order.
    pub fn references(&self) -> Result<Vec<ObjectRef>> {
        self.objects.iter().map(reference).collect()
    }

    /// Write the archive; returns the writer after the gzip trailer.
    pub fn write_archive<W: Write>(&self, writer: W) -> Result<W> {
        let io = |e| Error::io("writing metadata archive", "", e);
        let mut tar = tar::Builder::new(GzEncoder::new(writer, Compression::default()));
        let mut paths = Vec::with_capacity(self.objects.len());
        // Every number as wide as the last (at least four digits), so that the files sort in
        // restore order however many there are (`kubectl apply -f objects/` reads them so).
        let width = self
            .objects
            .len()
            .saturating_sub(1)
            .to_string()
            .len()
            .max(4);
        let mut documents = Vec::with_capacity(self.objects.len());
        for (i, object) in self.objects.iter().enumerate() {
            let r = reference(object)?;
            let group = if r.group().is_empty() {
                "core"
            } else {
                group_of(&r.api_version)
            };
            let ns = r.namespace.as_deref().unwrap_or("_");
            paths.push(format!(
                "objects/{i:0width$}-{group}-{}-{ns}-{}.yaml",
                r.kind, r.name
            ));
            documents.push(yaml::to_yaml(object, &r.to_string())?);
        }
        let index = Index {
            format: FORMAT.to_owned(),
            objects: paths.clone(),
            volumes: self.volumes.clone(),
        };
        let index =
            serde_json::to_vec_pretty(&index).map_err(|e| Error::json("archive index", e))?;
        append(&mut tar, INDEX_PATH, &index).map_err(io)?;
        for (path, doc) in paths.iter().zip(&documents) {
            append(&mut tar, path, doc.as_bytes()).map_err(io)?;
        }
        tar.into_inner().and_then(|gz| gz.finish()).map_err(io)
    }

    /// Read an archive written by [`MetadataBackup::write_archive`].
    pub fn read_archive(reader: impl Read) -> Result<Self> {
        let io = |e| Error::io("reading metadata archive", "", e);
        let mut tar = tar::Archive::new(GzDecoder::new(reader));
        let mut index: Option<Index> = None;
        let mut documents: HashMap<String, String> = HashMap::new();
        let mut total = 0u64;
        let mut files = 0usize;
        // Raw entries: the tar reader would otherwise read a GNU long-name or PAX record
        // whole, however large, before any check here, and let a PAX `size` stand for the
        // header's. The writer uses ustar headers and GNU long names only
        // (`tar::Builder::append_data`), so those alone are read, each bounded.
        let mut long_name: Option<String> = None;
        for entry in tar.entries().map_err(io)?.raw(true) {
            let mut entry = entry.map_err(io)?;
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::GNULongName {
                let size = entry.header().size().map_err(io)?;
                if size > MAX_NAME_BYTES || long_name.is_some() {
                    return Err(Error::Archive {
                        entry: "a long-name record".into(),
                        reason: format!(
                            "holds {size} bytes or follows another (a name holds at most \
                             {MAX_NAME_BYTES})"
                        ),
                    });
                }
                let mut name = Vec::new();
                (&mut entry)
                    .take(MAX_NAME_BYTES)
                    .read_to_end(&mut name)
                    .map_err(io)?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                long_name = Some(String::from_utf8_lossy(&name).into_owned());
                continue;
            }
            let path = match long_name.take() {
                Some(name) => name,
                None => entry.path().map_err(io)?.to_string_lossy().into_owned(),
            };
            if kind != tar::EntryType::Regular {
                return Err(Error::Archive {
                    entry: path,
                    reason: format!("unexpected entry of type {kind:?}"),
                });
            }
            files += 1;
            if files > MAX_ENTRIES {
                return Err(Error::Limit {
                    what: "metadata archive entries".into(),
                    limit: MAX_ENTRIES as u64,
                });
            }
            if entry.header().size().map_err(io)? > MAX_ENTRY_BYTES {
                return Err(Error::Limit {
                    what: format!("archive entry {path:?}"),
                    limit: MAX_ENTRY_BYTES,
                });
            }
            let mut text = String::new();
            let read = entry
                .take(MAX_ENTRY_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(io)?;
            if read as u64 > MAX_ENTRY_BYTES {
                return Err(Error::Limit {
                    what: format!("archive entry {path:?}"),
                    limit: MAX_ENTRY_BYTES,
                });
            }
            // What was read counts, whatever the headers said.
            total += read as u64;
            if total > MAX_TOTAL_BYTES {
                return Err(Error::Limit {
                    what: "metadata archive size".into(),
                    limit: MAX_TOTAL_BYTES,
                });
            }
            if path == INDEX_PATH {
                let parsed: Index =
                    serde_json::from_str(&text).map_err(|e| Error::json("archive index", e))?;
                if parsed.format != FORMAT {
                    return Err(Error::Archive {
                        entry: path,
                        reason: format!("unknown format {:?}", parsed.format),
                    });
                }
                index = Some(parsed);
            } else if path.starts_with("objects/") {
                // Nothing is ever unpacked to disk (a document is found by its path in the
                // index), so a name with `..` in it (RBAC allows a Role named `a..b`) is
                // only a name.
                documents.insert(path, text);
            } else {
                return Err(Error::Archive {
                    entry: path,
                    reason: "unexpected entry".into(),
                });
            }
        }
        let index = index.ok_or_else(|| Error::Archive {
            entry: INDEX_PATH.into(),
            reason: "missing".into(),
        })?;
        // Each listed document is parsed once, and its text dropped as it is: an index naming
        // one document many times would otherwise multiply it.
        let mut listed = std::collections::HashSet::new();
        if let Some(path) = index
            .objects
            .iter()
            .find(|path| !listed.insert(path.as_str()))
        {
            return Err(Error::Archive {
                entry: path.clone(),
                reason: "listed in the index more than once".into(),
            });
        }
        let mut objects = Vec::with_capacity(index.objects.len().min(documents.len()));
        for path in &index.objects {
            let text = documents.remove(path).ok_or_else(|| Error::Archive {
                entry: path.clone(),
                reason: "listed in the index but absent".into(),
            })?;
            let mut docs = yaml::documents(&text, path)?;
            match (docs.pop(), docs.is_empty()) {
                // Cleaned again as a backup cleans it: the archive is untrusted, and a field
                // the backup removed (a claim's `volumeName`, binding it to a chosen volume,
                // say) must not come back through it.
                (Some(object), true) => objects.push(resanitize(object, path)?),
                _ => {
                    return Err(Error::Archive {
                        entry: path.clone(),
                        reason: "must hold exactly one object".into(),
                    });
                }
            }
        }
        Ok(MetadataBackup {
            objects,
            volumes: index.volumes,
        })
    }
}

/// `object` as [`sanitize`] leaves it.
fn resanitize(object: Value, path: &str) -> Result<Value> {
    let dynamic: kube::api::DynamicObject =
        serde_json::from_value(object).map_err(|e| Error::Archive {
            entry: path.to_string(),
            reason: format!("not a Kubernetes object: {e}"),
        })?;
    sanitize(&dynamic)
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, data)
}
