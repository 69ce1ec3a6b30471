//! Application backups: a metadata archive plus references to the volume backups taken with it.

use bytes::Bytes;
use chrono::Utc;

use crate::error::{Error, Result};
use crate::layout::FORMAT_VERSION;
use crate::manifest::{AppManifest, VolumeBackupRef, crc32, from_json, to_json};
use crate::name::{AppBackupId, AppName};
use crate::target::{Created, Inner, Target};

/// Largest metadata archive an application backup may hold (64 MiB, the budget the discovery
/// crate reads an archive's text within): a larger one is refused when stored, and a manifest
/// claiming one, when read back, before anything is downloaded, since the archive is read
/// whole into memory.
pub const MAX_APP_ARCHIVE: u64 = 64 << 20;

impl Target {
    /// Stores an application backup: the archive first, then its manifest, create-only, as the
    /// commit. Fails with [`Error::BackupExists`] when the id is taken, and with
    /// [`Error::Upload`] for an archive of more than [`MAX_APP_ARCHIVE`] bytes.
    pub fn put_app_backup(
        &self,
        app: &AppName,
        id: &AppBackupId,
        volumes: Vec<VolumeBackupRef>,
        archive: Bytes,
    ) -> Result<AppManifest> {
        if archive.len() as u64 > MAX_APP_ARCHIVE {
            return Err(Error::Upload {
                path: format!("application {app} backup {id}"),
                reason: format!(
                    "its metadata archive has {} bytes, more than the {MAX_APP_ARCHIVE} allowed",
                    archive.len()
                ),
            });
        }
        let manifest = AppManifest {
            format_version: FORMAT_VERSION,
            app: app.clone(),
            id: id.clone(),
            created: Utc::now(),
            volumes,
            archive_size: archive.len() as u64,
            archive_checksums: crc32(&archive),
        };
        let doc = manifest.clone();
        self.block("put application backup", move |inner| async move {
            let manifest_path = inner.layout.app_manifest(&doc.app, &doc.id);
            let exists = || Error::BackupExists {
                volume: format!("application {}", doc.app),
                id: doc.id.to_string(),
            };
            match inner.get_bytes(&manifest_path).await {
                Ok(_) => return Err(exists()),
                Err(Error::NotFound { .. }) => {}
                Err(err) => return Err(err),
            }
            inner
                .put(&inner.layout.app_archive(&doc.app, &doc.id), archive)
                .await?;
            match inner
                .put_create(&manifest_path, to_json(&doc).into())
                .await?
            {
                Created::New => Ok(()),
                Created::Exists(_) => Err(exists()),
            }
        })?;
        Ok(manifest)
    }

    /// The committed backups of application `app`, oldest first.
    pub fn app_backups(&self, app: &AppName) -> Result<Vec<AppManifest>> {
        let prefix_app = app.clone();
        self.list_app_manifests("list application backups", move |layout| {
            layout.applications(&prefix_app)
        })
    }

    /// The committed backups of every application in the target, oldest first: what a volume
    /// backup may be referenced by (several applications may back up the same volume).
    pub fn all_app_backups(&self) -> Result<Vec<AppManifest>> {
        self.list_app_manifests("list all application backups", |layout| {
            layout.all_applications()
        })
    }

    /// The manifest of one committed application backup; [`Error::NotFound`] when there is
    /// none (never committed, or expired by retention).
    pub fn app_backup(&self, app: &AppName, id: &AppBackupId) -> Result<AppManifest> {
        let (app, id) = (app.clone(), id.clone());
        self.block("read application backup", move |inner| async move {
            read_app_manifest(&inner, &app, &id).await
        })
    }

    /// Expires application backup `id` of `app`: its manifest goes first (the commit point,
    /// so listings and restores stop seeing it at once), then its archive. Deleting an absent
    /// backup succeeds, so an expiry interrupted between the two (crash point
    /// `app-manifest-deleted`) is finished by running it again; an archive left without its
    /// manifest is never listed or read, and
    /// [`Target::gc`] removes it. The volume backups it names are left alone: removing
    /// those that no remaining application backup names is the caller's retention policy.
    pub fn delete_app_backup(&self, app: &AppName, id: &AppBackupId) -> Result<()> {
        let (app, id) = (app.clone(), id.clone());
        self.block("delete application backup", move |inner| async move {
            inner.delete(&inner.layout.app_manifest(&app, &id)).await?;
            crate::failpoint::hit("app-manifest-deleted");
            inner.delete(&inner.layout.app_archive(&app, &id)).await
        })
    }

    fn list_app_manifests(
        &self,
        operation: &'static str,
        prefix: impl FnOnce(&crate::layout::Layout) -> object_store::path::Path + Send + 'static,
    ) -> Result<Vec<AppManifest>> {
        self.block(operation, move |inner| async move {
            let mut out = Vec::new();
            for meta in inner.list(&prefix(&inner.layout)).await? {
                if meta.location.as_ref().ends_with(".json") {
                    let bytes = inner.get_bytes(&meta.location).await?;
                    out.push(from_json::<AppManifest>(
                        "application manifest",
                        meta.location.as_ref(),
                        &bytes,
                    )?);
                }
            }
            out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            Ok(out)
        })
    }

    /// The metadata archive of a committed application backup, checked against its manifest.
    pub fn read_app_archive(&self, app: &AppName, id: &AppBackupId) -> Result<Bytes> {
        let (app, id) = (app.clone(), id.clone());
        self.block("read application archive", move |inner| async move {
            let manifest = read_app_manifest(&inner, &app, &id).await?;
            let path = inner.layout.app_archive(&app, &id);
            if manifest.archive_size > MAX_APP_ARCHIVE {
                return Err(Error::Corrupt {
                    what: "application manifest",
                    path: inner.layout.app_manifest(&app, &id).to_string(),
                    reason: format!(
                        "its archive has {} bytes, more than the {MAX_APP_ARCHIVE} allowed",
                        manifest.archive_size
                    ),
                });
            }
            let archive = inner
                .get_bytes_limited(&path, manifest.archive_size)
                .await?;
            if archive.len() as u64 != manifest.archive_size
                || crc32(&archive) != manifest.archive_checksums
            {
                return Err(Error::Corrupt {
                    what: "application archive",
                    path: path.to_string(),
                    reason: "size or CRC differs from the manifest".into(),
                });
            }
            Ok(archive)
        })
    }
}

/// The manifest of application backup `app/id`, [`Error::NotFound`] naming it when absent.
async fn read_app_manifest(inner: &Inner, app: &AppName, id: &AppBackupId) -> Result<AppManifest> {
    let path = inner.layout.app_manifest(app, id);
    match inner.get_bytes(&path).await {
        Ok(bytes) => from_json("application manifest", path.as_ref(), &bytes),
        Err(Error::NotFound { .. }) => Err(Error::NotFound {
            what: "application backup",
            name: format!("{app}/{id}"),
        }),
        Err(err) => Err(err),
    }
}
