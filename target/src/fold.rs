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
//! A fold that stops after the child's image is replaced but before its manifest is switched
//! leaves a recognizable state: the child's image no longer names the parent as its backing
//! file. [`Target::finish_fold`] ends such a fold without merging again (the facade's `prune`
//! looks for this state before folding anything else).
//!
//! Readers must not hold the child's image open on an object store while it is replaced
//! (ranged reads would mix the two versions); on a folder they keep reading the old file.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;

use crate::error::{Error, Result};
use crate::layout::image_name;
use crate::manifest::{BackupManifest, ImageInfo, Reservation, SideFile, crc32, to_json};
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
        let child = self.child_of(volume, parent)?;
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
        self.switch(volume, &parent_manifest, child, image, files)
    }

    /// Finishes a fold of backup `parent` into its child that stopped after the child's image
    /// was replaced but before its manifest was switched (the child's image no longer names
    /// `parent` as its backing file, while its manifest still does).
    ///
    /// The image's size and CRC-32 are measured from the stored object and `files` (the side
    /// files that describe the new image, recomputed by the caller) replace the child's; then
    /// the fold ends as [`fold_into_child`](Self::fold_into_child) does.
    pub fn finish_fold(
        &self,
        volume: &VolumeName,
        parent: &BackupId,
        files: Vec<(FileName, Bytes)>,
    ) -> Result<BackupManifest> {
        let parent_manifest = self.backup(volume, parent)?;
        let child = self.child_of(volume, parent)?;
        let (size, crc) = self.measure_image(volume, &child.image.object)?;
        let mut image = child.image.clone();
        image.size = size;
        image.checksums.crc32 = crc;
        self.switch(volume, &parent_manifest, child, image, files)
    }

    fn child_of(&self, volume: &VolumeName, parent: &BackupId) -> Result<BackupManifest> {
        self.backups(volume)?
            .into_iter()
            .find(|m| m.parent.as_ref() == Some(parent))
            .ok_or_else(|| Error::NotFound {
                what: "child backup",
                name: format!("{volume}/{parent}"),
            })
    }

    /// Rewrites the child's side files and manifest to stand on the parent's parent, hands it
    /// the grandparent's child slot, then deletes the parent.
    fn switch(
        &self,
        volume: &VolumeName,
        parent_manifest: &BackupManifest,
        child: BackupManifest,
        image: ImageInfo,
        files: Vec<(FileName, Bytes)>,
    ) -> Result<BackupManifest> {
        let parent = &parent_manifest.id;
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
