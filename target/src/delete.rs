//! Deleting a backup at the head of its chain (whole-chain pruning, abandoned chains).
//!
//! The deleter first takes the backup's child slot itself (create-only), so no writer can
//! start an overlay on a backup that is going away, and a backup that has a child (committed
//! or in progress) is refused. Then the manifest goes first, so readers stop seeing the backup
//! before any of its data disappears, and the parent becomes the head of its chain again.
//!
//! A backup a live reader reads is refused ([`Error::BeingRead`]), checked twice: before
//! anything changes, and again once the manifest is gone, before any data goes. A reader
//! records itself before it reads manifests, so one that started between the two checks and
//! found the backup is seen by the second, and the delete is undone (the manifest put back as
//! it was stored, the child slot freed); one that starts after the manifest went does not find
//! the backup.

use chrono::Utc;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::layout::image_name;
use crate::manifest::{Reservation, from_json, to_json};
use crate::name::{BackupId, VolumeName};
use crate::target::{Created, Target};

impl Target {
    /// Deletes committed backup `id` of `volume`, which must have no child. Returns its
    /// manifest. Fails with [`Error::HasChild`] when another backup extends it, and with
    /// [`Error::BeingRead`] when a live reader reads it.
    pub fn delete_backup(
        &self,
        volume: &VolumeName,
        id: &BackupId,
    ) -> Result<crate::BackupManifest> {
        let (volume, id) = (volume.clone(), id.clone());
        self.block("delete backup", move |inner| async move {
            let (manifest, stored) = inner.manifest_and_bytes(&volume, &id).await?;
            let being_read = || Error::BeingRead {
                volume: volume.to_string(),
                id: id.to_string(),
            };
            // A live reader's chain is not cut under it (`crate::ReadLease`).
            if inner.reads(&volume, &id).await? {
                return Err(being_read());
            }
            let slot = inner.layout.child_slot(&volume, &id);
            let tombstone = Reservation {
                backup: id.clone(),
                parent: None,
                writer: format!("delete-{:016x}", rand::random::<u64>()),
                created: Utc::now(),
            };
            if let Created::Exists(other) =
                inner.put_create(&slot, to_json(&tombstone).into()).await?
            {
                let child: Reservation = from_json("child slot", slot.as_ref(), &other)?;
                // A tombstone naming the backup itself is an interrupted earlier delete: go on.
                if child.backup != id {
                    return Err(Error::HasChild {
                        volume: volume.to_string(),
                        id: id.to_string(),
                        child: child.backup.to_string(),
                    });
                }
            }
            crate::failpoint::hit("delete-slot-taken");
            let manifest_path = inner.layout.manifest(&volume, &id);
            inner.delete(&manifest_path).await?;
            // A reader records itself before it reads a manifest, so one that found this
            // backup before the manifest went is listed now; one that starts later does not
            // find it. Seen now, the delete is undone: the manifest put back, the slot freed.
            if inner.reads(&volume, &id).await? {
                // Put back only what still restores: a gc that ran in between found the id
                // uncommitted and may have removed its data (the image goes with the rest).
                let image = inner.layout.image(&volume, &manifest.image.object);
                match inner.options.retry.run(|| inner.store.head(&image)).await {
                    Ok(meta) if meta.size == manifest.image.size => {
                        inner.put(&manifest_path, stored).await?;
                        inner.delete(&slot).await?;
                        return Err(being_read());
                    }
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(err) => return Err(Error::store("head", &image, err)),
                }
            }
            inner
                .delete(&inner.layout.image(&volume, &manifest.image.object))
                .await?;
            inner
                .delete(&inner.layout.image(&volume, &image_name(&id)))
                .await?;
            for file in inner.list(&inner.layout.files_dir(&volume, &id)).await? {
                inner.delete(&file.location).await?;
            }
            inner
                .delete(&inner.layout.damage_mark(&volume, &id))
                .await?;
            if let Some(parent) = &manifest.parent {
                let parent_slot = inner.layout.child_slot(&volume, parent);
                if let Ok(bytes) = inner.get_bytes(&parent_slot).await {
                    let holder: Reservation =
                        from_json("child slot", parent_slot.as_ref(), &bytes)?;
                    if holder.backup == id {
                        inner.delete(&parent_slot).await?;
                    }
                }
            }
            inner.delete(&inner.layout.claim(&volume, &id)).await?;
            inner.delete(&slot).await?;
            Ok(manifest)
        })
    }
}

impl crate::target::Inner {
    /// Whether a live reader of `volume` reads backup `id` (or has not said yet what it reads).
    async fn reads(&self, volume: &VolumeName, id: &BackupId) -> Result<bool> {
        let readers = self.live_readers(volume).await?;
        Ok(readers
            .iter()
            .any(|read| read.is_empty() || read.contains(id)))
    }
}
