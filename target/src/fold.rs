//! Retention that never rewrites in place: folding the oldest backup of a chain into its child.
//!
//! The caller writes a merged image standing for the child's backup point (the parent's and
//! the child's clusters, over the parent's own backing file, if any) through the sink handed to
//! it. No object a reader may hold is ever rewritten; in this order:
//!
//! 1. The intent record `folds/<parent>.json` is created (create-only) before anything else:
//!    it names the parent, the child, the writer token, the new objects and the objects the
//!    fold will supersede. A second fold of the same parent fails here with
//!    [`Error::FoldInProgress`].
//! 2. The merged image is stored under a new name, `images/<child>.<token>.qcow2`, and the new
//!    side files under `files/<child>/<token>/`.
//! 3. The commit: the child's manifest is switched to name the new objects and the parent's
//!    parent. Where the store supports it this is a conditional put (`PutMode::Update` with the
//!    e-tag read at the start of the fold); the local filesystem has no compare-and-swap, so
//!    there it is an atomic whole-object put, which the exclusive intent record makes safe
//!    (backups only ever create manifests; only a fold rewrites one).
//! 4. Roll forward: on a folder, `<child>.qcow2` is re-pointed to the merged image (a hard
//!    link to a temporary name renamed over it), so qemu-img following the overlays' backing
//!    names finds the current image; the superseded objects are listed in
//!    `retired/<token>.json` for [`Target::gc`]; the parent's manifest is deleted; the
//!    grandparent's child slot is handed to the child; the parent's reservations and, last,
//!    the intent are removed.
//!
//! A reader that opened the chain before the fold keeps reading the objects it opened, which
//! stay as they are until `gc` removes them once the retired record is older than its grace
//! period. A crash at any step leaves every point restorable; [`Target::recover_folds`]
//! (called at the start of the facade's `prune`, and by `gc` for intents older than the grace
//! period) rolls a fold forward when the child's manifest already names the new image, and
//! back otherwise (see [`crate::fold_recovery`]).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::fold_recovery::{FoldIntent, roll_forward};
use crate::layout::{fold_image_name, image_name};
use crate::liveness::WriterLease;
use crate::manifest::{BackupManifest, Reservation, SideFile, crc32, from_json, to_json};
use crate::name::{BackupId, FileName, VolumeName};
use crate::side::SideBody;
use crate::sink::ImageUpload;
use crate::target::{Created, Inner, Target};

impl Target {
    /// Folds backup `parent` of `volume` into its one child, which must be committed.
    ///
    /// `write` receives the sink for the child's new image and the backing name the image must
    /// carry (`None` when `parent` is the base of its chain), must finish the image, and returns
    /// side files that replace the child's of the same names. Returns the child's new manifest.
    /// On failure the fold is rolled back or forward on the spot when the store allows; what is
    /// left is recovered by [`recover_folds`](Self::recover_folds).
    pub fn fold_into_child(
        &self,
        volume: &VolumeName,
        parent: &BackupId,
        write: impl FnOnce(ImageUpload, Option<String>) -> Result<Vec<(FileName, SideBody)>>,
    ) -> Result<BackupManifest> {
        let parent_manifest = self.backup(volume, parent)?;
        let child_id = self.child_of(volume, parent)?;
        let (child, version) = self.manifest_with_version(volume, &child_id)?;
        let token = format!("fold-{:016x}", rand::random::<u64>());
        let intent = FoldIntent {
            parent: parent.clone(),
            child: child.id.clone(),
            grandparent: parent_manifest.parent.clone(),
            writer: token.clone(),
            image: fold_image_name(&child.id, &token),
            files: format!("files/{}/{token}", child.id),
            superseded: superseded_objects(&parent_manifest, &child),
            created: Utc::now(),
        };
        let (volume_c, doc) = (volume.clone(), intent.clone());
        // The fold proves itself alive as a backup writer does, so that a concurrent prune's
        // or gc's recovery leaves its intent alone (see `recover_folds`).
        let lease = self.block("begin fold", move |inner| async move {
            let holder = Reservation {
                backup: doc.child.clone(),
                parent: Some(doc.parent.clone()),
                writer: doc.writer.clone(),
                created: doc.created,
            };
            let lease = WriterLease::acquire(&inner, &volume_c, &holder).await?;
            let path = inner.layout.fold_intent(&volume_c, &doc.parent);
            match inner.put_create(&path, to_json(&doc).into()).await? {
                Created::New => {
                    // One fold of a volume at a time: two folds of neighbouring parents
                    // (G into P and P into C) would each merge the chain as it was before
                    // the other. Every fold makes its intent, then looks for another's: of
                    // two that race, at least one sees the other and steps back (both may;
                    // the next prune folds).
                    let folds = inner
                        .list(&inner.layout.volume_dir(&volume_c, "folds"))
                        .await?;
                    let Some(other) = folds.iter().find(|meta| meta.location != path) else {
                        return Ok(lease);
                    };
                    let writer = match inner.get_bytes(&other.location).await {
                        Ok(bytes) => FoldIntent::parse(other.location.as_ref(), &bytes)
                            .map(|other| other.writer)
                            .unwrap_or_else(|_| "unknown".into()),
                        Err(_) => "unknown".into(),
                    };
                    inner.delete(&path).await?;
                    lease.release(&inner).await?;
                    Err(Error::FoldInProgress {
                        volume: volume_c.to_string(),
                        parent: other
                            .location
                            .filename()
                            .and_then(|name| name.strip_suffix(".json"))
                            .unwrap_or_default()
                            .to_owned(),
                        writer,
                    })
                }
                Created::Exists(other) => {
                    lease.release(&inner).await?;
                    let other = FoldIntent::parse(path.as_ref(), &other)?;
                    Err(Error::FoldInProgress {
                        volume: volume_c.to_string(),
                        parent: doc.parent.to_string(),
                        writer: other.writer,
                    })
                }
            }
        })?;
        let lease = Arc::new(lease);
        let outcome = self.fold_under_intent(
            volume,
            &parent_manifest,
            child,
            version,
            (&intent, &lease),
            write,
        );
        if outcome.is_err() {
            // Best effort: whatever this cannot finish, the next prune (or gc) recovers.
            let _ = self.recover_fold(volume, &intent);
        }
        // Best effort too: a leftover record of a finished fold is removed by gc.
        let _ = self.block("end fold", move |inner| async move {
            lease.release(&inner).await
        });
        outcome
    }

    /// Steps 2 to 4 of the fold, once the intent record is ours and `lease` proves it alive.
    fn fold_under_intent(
        &self,
        volume: &VolumeName,
        parent_manifest: &BackupManifest,
        child: BackupManifest,
        version: Option<UpdateVersion>,
        (intent, lease): (&FoldIntent, &Arc<WriterLease>),
        write: impl FnOnce(ImageUpload, Option<String>) -> Result<Vec<(FileName, SideBody)>>,
    ) -> Result<BackupManifest> {
        let slot = Arc::new(Mutex::new(None));
        let sink = ImageUpload::new(
            self,
            volume,
            &intent.image,
            &intent.writer,
            slot.clone(),
            Some(child.virtual_size),
        )?;
        let files = write(sink, parent_manifest.parent.as_ref().map(image_name))?;
        let image = slot
            .lock()
            .map_err(|_| Error::Upload {
                path: intent.image.clone(),
                reason: "the image sink panicked".into(),
            })?
            .clone()
            .ok_or_else(|| Error::Upload {
                path: intent.image.clone(),
                reason: "the merged image was not finished".into(),
            })?;
        let mut manifest = child;
        manifest.parent = parent_manifest.parent.clone();
        manifest.image = image;
        for (name, body) in files {
            let mut entry = SideFile {
                name: name.clone(),
                size: 0,
                checksums: crc32(&[]),
                object: Some(format!("{}/{name}", intent.writer)),
            };
            let path = self.inner.layout.side_file(volume, &manifest.id, &entry)?;
            (entry.size, entry.checksums) = self.put_streamed(&path, body)?;
            manifest.files.retain(|f| f.name != name);
            manifest.files.push(entry);
        }
        let (volume_c, intent_c, doc) = (volume.clone(), intent.clone(), manifest.clone());
        let lease = lease.clone();
        self.block("fold backup", move |inner| async move {
            // As a backup's commit does: the lease is surely ours for half a lease more (a
            // fold stopped for longer than its lease may have been judged dead and rolled
            // back), then the intent is checked to be still ours, then the switch.
            lease.confirm(&inner).await?;
            check_intent_is_ours(&inner, &volume_c, &intent_c).await?;
            switch_manifest(&inner, &volume_c, &doc, version).await?;
            roll_forward(&inner, &volume_c, &intent_c).await
        })?;
        Ok(manifest)
    }

    /// The id of the committed backup whose parent is `parent`, its only one.
    ///
    /// The child slot lets one child commit on a parent, but a writer cut off from the store
    /// for longer than its lease may still land its manifest after a takeover, and a store can
    /// be tampered with: a parent with two children is a fork, and folding it into one would
    /// delete the point the other is built on, so it is refused, naming both.
    fn child_of(&self, volume: &VolumeName, parent: &BackupId) -> Result<BackupId> {
        let children: Vec<BackupId> = self
            .backups(volume)?
            .into_iter()
            .filter(|m| m.parent.as_ref() == Some(parent))
            .map(|m| m.id)
            .collect();
        match children.as_slice() {
            [] => Err(Error::NotFound {
                what: "child backup",
                name: format!("{volume}/{parent}"),
            }),
            [child] => Ok(child.clone()),
            [..] => Err(Error::Corrupt {
                what: "backup chain",
                path: format!("{volume}/{parent}"),
                reason: format!(
                    "the chain forks there: {} backups ({}) are built on it, so it is not \
                     folded into one of them",
                    children.len(),
                    children
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// A committed manifest and the version (e-tag) a conditional update of it must match.
    fn manifest_with_version(
        &self,
        volume: &VolumeName,
        id: &BackupId,
    ) -> Result<(BackupManifest, Option<UpdateVersion>)> {
        let (volume, id) = (volume.clone(), id.clone());
        self.block("read backup", move |inner| async move {
            let path = inner.layout.manifest(&volume, &id);
            let (bytes, meta) = inner
                .get_limited("backup manifest", &path, crate::target::MAX_RECORD)
                .await?;
            let version = UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            };
            let manifest: BackupManifest = from_json("backup manifest", path.as_ref(), &bytes)?;
            if manifest.id != id || manifest.volume != volume {
                return Err(Error::Corrupt {
                    what: "backup manifest",
                    path: path.to_string(),
                    reason: format!("names backup {}/{}", manifest.volume, manifest.id),
                });
            }
            let version = (version.e_tag.is_some() || version.version.is_some()).then_some(version);
            Ok((manifest, version))
        })
    }
}

/// The objects (relative to the volume folder) that a fold of `parent` into `child` may
/// supersede: all of the parent's, and the child's as its manifest names them before the fold.
fn superseded_objects(parent: &BackupManifest, child: &BackupManifest) -> Vec<String> {
    let mut objects = named_objects(parent);
    let canonical = format!("images/{}", image_name(&parent.id));
    if !objects.contains(&canonical) {
        objects.push(canonical);
    }
    objects.extend(named_objects(child));
    objects
}

/// The objects a manifest names, relative to the volume folder.
pub(crate) fn named_objects(manifest: &BackupManifest) -> Vec<String> {
    let mut objects = vec![format!("images/{}", manifest.image.object)];
    for file in &manifest.files {
        let object = file.object.clone().unwrap_or_else(|| file.name.to_string());
        objects.push(format!("files/{}/{object}", manifest.id));
    }
    objects
}

/// Fails unless the intent record is still this fold's: a `prune` started meanwhile may have
/// rolled the fold back, and its new objects are gone then.
async fn check_intent_is_ours(
    inner: &Inner,
    volume: &VolumeName,
    intent: &FoldIntent,
) -> Result<()> {
    let path = inner.layout.fold_intent(volume, &intent.parent);
    let lost = || Error::Upload {
        path: path.to_string(),
        reason: "the fold's intent record was removed (rolled back by another prune or gc?)".into(),
    };
    let bytes = match inner.get_bytes(&path).await {
        Err(Error::NotFound { .. }) => return Err(lost()),
        other => other?,
    };
    let found = FoldIntent::parse(path.as_ref(), &bytes)?;
    if found.writer != intent.writer {
        return Err(lost());
    }
    Ok(())
}

/// The commit point of a fold: the child's manifest now names the merged image.
async fn switch_manifest(
    inner: &Inner,
    volume: &VolumeName,
    manifest: &BackupManifest,
    version: Option<UpdateVersion>,
) -> Result<()> {
    let path = inner.layout.manifest(volume, &manifest.id);
    let payload = PutPayload::from(Bytes::from(to_json(manifest)));
    if let Some(version) = version {
        let conditional = inner
            .options
            .retry
            .run(|| {
                let options = PutOptions::from(PutMode::Update(version.clone()));
                inner.store.put_opts(&path, payload.clone(), options)
            })
            .await;
        match conditional {
            Ok(_) => return Ok(()),
            // No compare-and-swap here (the local filesystem): the intent makes the fold the
            // only writer of this manifest, so a whole-object put is enough.
            Err(object_store::Error::NotImplemented { .. }) => {}
            Err(err) => return Err(Error::store("switch the manifest", &path, err)),
        }
    }
    inner
        .options
        .retry
        .run(|| inner.store.put(&path, payload.clone()))
        .await
        .map_err(|err| Error::store("switch the manifest", &path, err))?;
    Ok(())
}
