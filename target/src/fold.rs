//! Retention: folding the oldest backup of a chain into its child.
//!
//! The caller writes a merged image standing for the child's backup point (the parent's and
//! the child's clusters, over the parent's own backing file, if any) through the sink handed to
//! it. Then, in this order: the child's image object is replaced (atomically: a rename on a
//! folder, a completed multipart upload on an object store), its side files and manifest are
//! rewritten to name the parent's parent, and the parent is deleted, manifest first. Every step
//! leaves a chain that reads each remaining point correctly: until the manifest switch, the
//! child's manifest still names the parent, but the new image no longer needs it.
//!
//! Readers must not hold the child's image open on an object store while it is replaced
//! (ranged reads would mix the two versions); on a folder they keep reading the old file.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;

use crate::error::{Error, Result};
use crate::layout::image_name;
use crate::manifest::{BackupManifest, Reservation, SideFile, crc32, to_json};
use crate::name::{BackupId, FileName, VolumeName};
use crate::sink::ImageUpload;
use crate::target::Target;

impl Target {
    /// Folds backup `parent` of `volume` into its one child, which must be committed.
    ///
    /// `write` receives the sink for the child's new image and the backing name the image must
    /// carry (`None` when `parent` is the base of its chain), must finish the image, and returns
    /// side files that replace the child's of the same names. Returns the child's new manifest.
    pub fn fold_into_child(
        &self,
        volume: &VolumeName,
        parent: &BackupId,
        write: impl FnOnce(ImageUpload, Option<String>) -> Result<Vec<(FileName, Bytes)>>,
    ) -> Result<BackupManifest> {
        let parent_manifest = self.backup(volume, parent)?;
        let child = self
            .backups(volume)?
            .into_iter()
            .find(|m| m.parent.as_ref() == Some(parent))
            .ok_or_else(|| Error::NotFound {
                what: "child backup",
                name: format!("{volume}/{parent}"),
            })?;
        let writer = format!("fold-{:016x}", rand::random::<u64>());
        let slot = Arc::new(Mutex::new(None));
        let sink = ImageUpload::new(self, volume, &child.id, &writer, slot.clone(), true)?;
        let files = write(sink, parent_manifest.parent.as_ref().map(image_name))?;
        let image = slot
            .lock()
            .map_err(|_| Error::Upload {
                path: image_name(&child.id),
                reason: "the image sink panicked".into(),
            })?
            .clone()
            .ok_or_else(|| Error::Upload {
                path: image_name(&child.id),
                reason: "the merged image was not finished".into(),
            })?;
        let mut manifest = child.clone();
        manifest.parent = parent_manifest.parent.clone();
        manifest.image = image;
        for (name, bytes) in &files {
            manifest.files.retain(|f| &f.name != name);
            manifest.files.push(SideFile {
                name: name.clone(),
                size: bytes.len() as u64,
                checksums: crc32(bytes),
            });
        }
        let (volume_c, child_id, parent_c) = (volume.clone(), child.id.clone(), parent.clone());
        let doc = manifest.clone();
        let grandparent = parent_manifest.parent.clone();
        self.block("fold backup", move |inner| async move {
            for (name, bytes) in files {
                inner
                    .put(&inner.layout.file(&volume_c, &child_id, &name), bytes)
                    .await?;
            }
            inner
                .put(
                    &inner.layout.manifest(&volume_c, &child_id),
                    to_json(&doc).into(),
                )
                .await?;
            if let Some(grandparent) = &grandparent {
                // The grandparent's one child is now the folded backup.
                let holder = Reservation {
                    backup: child_id.clone(),
                    parent: Some(grandparent.clone()),
                    writer: format!("fold-{child_id}"),
                    created: Utc::now(),
                };
                inner
                    .put(
                        &inner.layout.child_slot(&volume_c, grandparent),
                        to_json(&holder).into(),
                    )
                    .await?;
            }
            inner
                .delete(&inner.layout.manifest(&volume_c, &parent_c))
                .await?;
            inner
                .delete(&inner.layout.image(&volume_c, &image_name(&parent_c)))
                .await?;
            for file in inner
                .list(&inner.layout.files_dir(&volume_c, &parent_c))
                .await?
            {
                inner.delete(&file.location).await?;
            }
            for path in [
                inner.layout.child_slot(&volume_c, &parent_c),
                inner.layout.claim(&volume_c, &parent_c),
            ] {
                match inner.delete(&path).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(())
        })?;
        Ok(manifest)
    }
}
