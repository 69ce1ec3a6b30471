//! Where everything lives in a repository (format version 1).
//!
//! ```text
//! <prefix>/strata-repository.json               marker: {"format": "strata-target", "version": 1}
//! <prefix>/volumes/<volume>/images/<id>.qcow2    the chain's images, one folder per volume;
//!                                                overlays name their parent "<parent>.qcow2"
//! <prefix>/volumes/<volume>/backups/<id>.json    manifest: the commit point of a backup
//! <prefix>/volumes/<volume>/claims/<id>.json     reservation of an id, made before any upload
//! <prefix>/volumes/<volume>/children/<id>.json   reservation of the one child that extends <id>
//! <prefix>/volumes/<volume>/files/<id>/<name>    side files of a backup (digest manifests, ...)
//! <prefix>/volumes/<volume>/writers/<token>.json the record of a live writer (lock or lease)
//! <prefix>/volumes/<volume>/takeovers/<id>/<token>.json
//!                                                the one writer taking over <token>'s slot on <id>
//! <prefix>/volumes/<volume>/images/<id>.<token>.qcow2   merged image a fold wrote for <id>
//! <prefix>/volumes/<volume>/files/<id>/<token>/<name>   side files a fold wrote for <id>
//! <prefix>/volumes/<volume>/folds/<parent>.json  intent of a fold of <parent> into its child
//! <prefix>/volumes/<volume>/retired/<token>.json objects a committed fold superseded (for gc)
//! <prefix>/volumes/<volume>/readers/<token>.json the record of a live reader (lock or lease)
//! <prefix>/volumes/<volume>/damaged/<id>.json    what a check found damaged in backup <id>
//! <prefix>/applications/<app>/<id>.json          application backup manifest (commit point)
//! <prefix>/applications/<app>/<id>.archive       its metadata archive
//! ```
//!
//! Every name in a key is one checked segment (see [`crate::name`]), so keys never escape the
//! prefix. Staging files of filesystem uploads are `images/<id>.qcow2.<token>.partial`.

use object_store::path::Path;

use crate::error::{Error, Result};
use crate::manifest::SideFile;
use crate::name::{AppBackupId, AppName, BackupId, FileName, VolumeName};

/// The format name written in the repository marker.
pub const FORMAT_NAME: &str = "strata-target";
/// The layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The marker object's name, directly under the target's prefix.
pub const MARKER: &str = "strata-repository.json";
/// The extension of image objects; backing names are `<parent id>` plus this.
pub const IMAGE_EXTENSION: &str = ".qcow2";

/// Object keys of one repository, relative to the object store's root.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    prefix: Path,
}

impl Layout {
    pub(crate) fn new(prefix: Path) -> Self {
        Self { prefix }
    }

    fn key<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.clone().join(part);
        }
        path
    }

    pub(crate) fn marker(&self) -> Path {
        self.key([MARKER])
    }

    /// Where [`crate::Target::check_writable`] writes its probe.
    pub(crate) fn probe(&self, name: &str) -> Path {
        self.key(["probes", name])
    }

    pub(crate) fn volumes(&self) -> Path {
        self.key(["volumes"])
    }

    pub(crate) fn volume(&self, volume: &VolumeName) -> Path {
        self.key(["volumes", volume.as_str()])
    }

    pub(crate) fn volume_dir(&self, volume: &VolumeName, dir: &'static str) -> Path {
        self.key(["volumes", volume.as_str(), dir])
    }

    pub(crate) fn image(&self, volume: &VolumeName, image_name: &str) -> Path {
        self.key(["volumes", volume.as_str(), "images", image_name])
    }

    pub(crate) fn manifest(&self, volume: &VolumeName, id: &BackupId) -> Path {
        self.key(["volumes", volume.as_str(), "backups", &json(id.as_str())])
    }

    pub(crate) fn claim(&self, volume: &VolumeName, id: &BackupId) -> Path {
        self.key(["volumes", volume.as_str(), "claims", &json(id.as_str())])
    }

    pub(crate) fn child_slot(&self, volume: &VolumeName, parent: &BackupId) -> Path {
        self.key([
            "volumes",
            volume.as_str(),
            "children",
            &json(parent.as_str()),
        ])
    }

    pub(crate) fn writer(&self, volume: &VolumeName, token: &str) -> Path {
        self.key(["volumes", volume.as_str(), "writers", &json(token)])
    }

    /// The record of a live reader of the volume (see `crate::ReadLease`).
    pub(crate) fn reader(&self, volume: &VolumeName, token: &str) -> Path {
        self.key(["volumes", volume.as_str(), "readers", &json(token)])
    }

    /// A probe written to read the store's clock (see `Inner::store_now`).
    pub(crate) fn clock_probe(&self, volume: &VolumeName, token: &str) -> Path {
        self.key(["volumes", volume.as_str(), "clock", token])
    }

    pub(crate) fn takeover(&self, volume: &VolumeName, parent: &BackupId, token: &str) -> Path {
        self.key([
            "volumes",
            volume.as_str(),
            "takeovers",
            parent.as_str(),
            &json(token),
        ])
    }

    pub(crate) fn files_dir(&self, volume: &VolumeName, id: &BackupId) -> Path {
        self.key(["volumes", volume.as_str(), "files", id.as_str()])
    }

    pub(crate) fn file(&self, volume: &VolumeName, id: &BackupId, name: &FileName) -> Path {
        self.key([
            "volumes",
            volume.as_str(),
            "files",
            id.as_str(),
            name.as_str(),
        ])
    }

    /// The key of a side file's object, as its manifest entry names it.
    pub(crate) fn side_file(
        &self,
        volume: &VolumeName,
        id: &BackupId,
        file: &SideFile,
    ) -> Result<Path> {
        match &file.object {
            None => Ok(self.file(volume, id, &file.name)),
            Some(object) => self.under(self.files_dir(volume, id), object),
        }
    }

    /// The damage mark of backup `id` (see `crate::damage`).
    pub(crate) fn damage_mark(&self, volume: &VolumeName, id: &BackupId) -> Path {
        self.key(["volumes", volume.as_str(), "damaged", &json(id.as_str())])
    }

    /// The intent record of a fold of `parent` into its child.
    pub(crate) fn fold_intent(&self, volume: &VolumeName, parent: &BackupId) -> Path {
        self.key(["volumes", volume.as_str(), "folds", &json(parent.as_str())])
    }

    /// The record of the objects a committed fold (by writer `token`) superseded.
    pub(crate) fn retired(&self, volume: &VolumeName, token: &str) -> Path {
        self.key(["volumes", volume.as_str(), "retired", &json(token)])
    }

    /// The key of `relative` (`images/<name>`, `files/<id>/<name>`, ...) in `volume`'s folder.
    pub(crate) fn in_volume(&self, volume: &VolumeName, relative: &str) -> Result<Path> {
        self.under(self.volume(volume), relative)
    }

    /// `base` joined with the `/`-separated `relative` name read from a stored record, whose
    /// segments must stay inside `base`.
    fn under(&self, base: Path, relative: &str) -> Result<Path> {
        let mut path = base;
        for segment in relative.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(Error::InvalidName {
                    kind: "object",
                    name: relative.to_string(),
                    reason: "must not contain empty, '.' or '..' segments",
                });
            }
            path = path.clone().join(segment);
        }
        Ok(path)
    }

    pub(crate) fn all_applications(&self) -> Path {
        self.key(["applications"])
    }

    pub(crate) fn applications(&self, app: &AppName) -> Path {
        self.key(["applications", app.as_str()])
    }

    pub(crate) fn app_manifest(&self, app: &AppName, id: &AppBackupId) -> Path {
        self.key(["applications", app.as_str(), &json(id.as_str())])
    }

    pub(crate) fn app_archive(&self, app: &AppName, id: &AppBackupId) -> Path {
        self.key(["applications", app.as_str(), &format!("{id}.archive")])
    }
}

/// The image object name (and backing name) of a backup.
pub fn image_name(id: &BackupId) -> String {
    format!("{id}{IMAGE_EXTENSION}")
}

/// The object name of the merged image a fold by writer `token` writes for backup `child`.
pub(crate) fn fold_image_name(child: &BackupId, token: &str) -> String {
    format!("{child}.{token}{IMAGE_EXTENSION}")
}

fn json(name: &str) -> String {
    format!("{name}.json")
}

/// The id named by the last segment of `path` when it ends in `suffix`.
pub(crate) fn id_from_key(path: &Path, suffix: &str) -> Option<String> {
    let last = path.filename()?;
    last.strip_suffix(suffix).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_the_prefix() -> crate::Result<()> {
        let layout = Layout::new(Path::from("backups/prod"));
        let v = VolumeName::new("data")?;
        let id = BackupId::new("b1")?;
        assert_eq!(
            layout.marker().as_ref(),
            "backups/prod/strata-repository.json"
        );
        assert_eq!(
            layout.manifest(&v, &id).as_ref(),
            "backups/prod/volumes/data/backups/b1.json"
        );
        assert_eq!(
            layout.image(&v, &image_name(&id)).as_ref(),
            "backups/prod/volumes/data/images/b1.qcow2"
        );
        assert_eq!(
            id_from_key(&layout.claim(&v, &id), ".json").as_deref(),
            Some("b1")
        );
        let root = Layout::new(Path::default());
        assert_eq!(root.marker().as_ref(), "strata-repository.json");
        Ok(())
    }
}
