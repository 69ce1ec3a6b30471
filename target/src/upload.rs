//! Writing one backup: the writer's lease, reservations, the image, side files, and the commit.
//!
//! The protocol (all conditional puts are create-only, so it works on every store, including
//! the local filesystem, where object_store has no compare-and-swap):
//!
//! 0. The writer records itself in `writers/<token>.json` and proves it is alive from then on
//!    (a `flock` on a folder, a renewed lease on object storage: [`crate::liveness`]).
//! 1. `claims/<id>.json` is created. Failing that, another writer owns the id:
//!    [`Error::BackupExists`], before a single image byte is sent.
//! 2. For an overlay, `children/<parent>.json` is created: one child per parent. When it exists
//!    and names a committed backup or a live writer, the parent is no longer the head of its
//!    chain: [`Error::ParentNotHead`], naming the backup that extends it, and the claim is
//!    released. When it names a dead writer (or, on object storage, one whose lease lapses
//!    while this writer waits, at most one lease), the slot is taken over.
//! 3. The image streams in ([`ImageUpload`]) and side files are put.
//! 4. The writer confirms its lease, checks that its claim and child slot are still its own
//!    ([`Error::Superseded`] otherwise: it stalled and was taken over) and creates the
//!    manifest; its existence is the commit. Readers list manifests only.
//!
//! Dropping an upload before [`BackupUpload::commit`] removes what it wrote and releases its
//! reservations. A killed writer leaves them behind: the next writer takes its slot over, and
//! [`Target::gc`] removes the rest.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::layout::{FORMAT_VERSION, image_name};
use crate::liveness::WriterLease;
use crate::manifest::{
    BackupManifest, ImageInfo, Reservation, SideFile, crc32, from_json, to_json,
};
use crate::name::{BackupId, FileName, VolumeName};
use crate::side::SideBody;
use crate::sink::ImageUpload;
use crate::target::{Created, Target};

/// What a new backup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// Its id; a fresh time-sortable one when `None`.
    pub id: Option<BackupId>,
    /// The backup it is an overlay on; `None` for a full image.
    pub parent: Option<BackupId>,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// QCOW2 cluster size in bytes.
    pub cluster_size: u64,
}

/// A backup being written: reserved by [`Target::begin_backup`], streamed through
/// [`image_sink`](Self::image_sink) and [`put_file`](Self::put_file), made visible by
/// [`commit`](Self::commit) (see "Guarantees" in the crate docs).
#[derive(Debug)]
pub struct BackupUpload {
    target: Target,
    volume: VolumeName,
    id: BackupId,
    parent: Option<BackupId>,
    created: DateTime<Utc>,
    virtual_size: u64,
    cluster_size: u64,
    writer: String,
    /// Proves this writer alive until it commits or gives up (see [`crate::liveness`]).
    lease: Option<Arc<WriterLease>>,
    image: Arc<Mutex<Option<ImageInfo>>>,
    image_started: bool,
    files: Vec<SideFile>,
    full_reason: Option<String>,
    done: bool,
}

impl Target {
    /// Reserves a new backup of `volume` (and, for an overlay, the parent's one child slot).
    pub fn begin_backup(&self, volume: &VolumeName, spec: BackupSpec) -> Result<BackupUpload> {
        let id = spec.id.unwrap_or_else(BackupId::generate);
        let created = Utc::now();
        let writer = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let reservation = Reservation {
            backup: id.clone(),
            parent: spec.parent.clone(),
            writer: writer.clone(),
            created,
        };
        let volume_c = volume.clone();
        let lease = self.block("begin backup", move |inner| async move {
            let volume = volume_c;
            if let Some(parent) = &reservation.parent {
                let manifest = inner
                    .manifest(&volume, parent)
                    .await
                    .map_err(|err| match err {
                        Error::NotFound { .. } => crate::liveness::parent_gone(&volume, parent),
                        err => err,
                    })?;
                inner.check_extendable(&manifest).await?;
            }
            let lease = WriterLease::acquire(&inner, &volume, &reservation).await?;
            crate::failpoint::hit("before-claim");
            let claim = inner.layout.claim(&volume, &reservation.backup);
            if let Created::Exists(_) = inner
                .put_create(&claim, to_json(&reservation).into())
                .await?
            {
                lease.release(&inner).await?;
                return Err(Error::BackupExists {
                    volume: volume.to_string(),
                    id: reservation.backup.to_string(),
                });
            }
            if let Some(parent) = &reservation.parent {
                if let Err(err) = inner.take_child_slot(&volume, parent, &reservation).await {
                    inner.delete(&claim).await?;
                    lease.release(&inner).await?;
                    return Err(err);
                }
                // A delete of the parent may have finished between the first look and the
                // slot (a deleter holds the slot while it deletes, so not after it).
                if !inner.is_committed(&volume, parent).await? {
                    inner
                        .delete(&inner.layout.child_slot(&volume, parent))
                        .await?;
                    inner.delete(&claim).await?;
                    lease.release(&inner).await?;
                    return Err(crate::liveness::parent_gone(&volume, parent));
                }
            }
            crate::failpoint::hit("claimed");
            Ok(lease)
        })?;
        Ok(BackupUpload {
            target: self.clone(),
            volume: volume.clone(),
            id,
            parent: spec.parent,
            created,
            virtual_size: spec.virtual_size,
            cluster_size: spec.cluster_size,
            writer,
            lease: Some(Arc::new(lease)),
            image: Arc::new(Mutex::new(None)),
            image_started: false,
            files: Vec::new(),
            full_reason: None,
            done: false,
        })
    }
}

impl BackupUpload {
    /// The backup's id.
    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// The volume.
    pub fn volume(&self) -> &VolumeName {
        &self.volume
    }

    /// The parent it extends.
    pub fn parent(&self) -> Option<&BackupId> {
        self.parent.as_ref()
    }

    /// The image's object name, `<id>.qcow2`.
    pub fn image_name(&self) -> String {
        image_name(&self.id)
    }

    /// The backing file name the overlay's header must carry: `<parent>.qcow2`, relative, so
    /// the chain resolves inside the volume's image folder on every target.
    pub fn backing_name(&self) -> Option<String> {
        self.parent.as_ref().map(image_name)
    }

    /// Records in the manifest why this full image was taken although the volume has backups.
    pub fn set_full_reason(&mut self, reason: impl Into<String>) {
        self.full_reason = Some(reason.into());
    }

    /// The sink the QCOW2 writer streams the image into (one per backup).
    pub fn image_sink(&mut self) -> Result<ImageUpload> {
        if self.image_started {
            return Err(Error::Upload {
                path: self.image_name(),
                reason: "the image sink was already taken".into(),
            });
        }
        self.image_started = true;
        ImageUpload::new(
            &self.target,
            &self.volume,
            &self.image_name(),
            &self.writer,
            self.image.clone(),
            Some(self.virtual_size),
        )
    }

    /// Stores a side file (a digest manifest, say) with the backup.
    pub fn put_file(&mut self, name: &FileName, bytes: Bytes) -> Result<()> {
        let path = self.target.inner.layout.file(&self.volume, &self.id, name);
        let side = SideFile {
            name: name.clone(),
            size: bytes.len() as u64,
            checksums: crc32(&bytes),
            object: None,
        };
        self.target
            .block("put side file", move |inner| async move {
                inner.put(&path, bytes).await
            })?;
        self.files.retain(|f| &f.name != name);
        self.files.push(side);
        Ok(())
    }

    /// Stores a side file read from `body` as it is uploaded, a part at a time (a digest
    /// manifest of a large volume, say), so it is never held whole.
    pub fn put_file_streamed(&mut self, name: &FileName, body: SideBody) -> Result<()> {
        let path = self.target.inner.layout.file(&self.volume, &self.id, name);
        let (size, checksums) = self.target.put_streamed(&path, body)?;
        self.files.retain(|f| &f.name != name);
        self.files.push(SideFile {
            name: name.clone(),
            size,
            checksums,
            object: None,
        });
        Ok(())
    }

    /// Commits the backup: creates its manifest, after checking that the image is complete and
    /// the reservations are still this writer's.
    pub fn commit(mut self) -> Result<BackupManifest> {
        let image = self
            .image
            .lock()
            .map_err(|_| Error::Upload {
                path: self.image_name(),
                reason: "the image sink panicked".into(),
            })?
            .clone()
            .ok_or_else(|| Error::Upload {
                path: self.image_name(),
                reason: "commit before the image sink finished".into(),
            })?;
        let manifest = BackupManifest {
            format_version: FORMAT_VERSION,
            volume: self.volume.clone(),
            id: self.id.clone(),
            parent: self.parent.clone(),
            created: self.created,
            virtual_size: self.virtual_size,
            cluster_size: self.cluster_size,
            image,
            files: self.files.clone(),
            full_reason: self.full_reason.clone(),
        };
        crate::failpoint::hit("before-manifest");
        let (volume, id, parent, writer, doc) = (
            self.volume.clone(),
            self.id.clone(),
            self.parent.clone(),
            self.writer.clone(),
            manifest.clone(),
        );
        // Shared with the commit, so that a failed commit's clean-up (on drop) still releases it.
        let lease = self.lease.clone();
        let committed = self.target.block("commit backup", move |inner| async move {
            if let Some(lease) = &lease {
                lease.confirm(&inner).await?;
            }
            let claim_path = inner.layout.claim(&volume, &id);
            let superseded = |by: String| Error::Superseded {
                volume: volume.to_string(),
                id: id.to_string(),
                by,
            };
            let claim = match inner.get_bytes(&claim_path).await {
                Err(Error::NotFound { .. }) => {
                    return Err(superseded("gc, which removed its claim".into()));
                }
                other => other?,
            };
            let claim: Reservation = from_json("claim", claim_path.as_ref(), &claim)?;
            if claim.writer != writer {
                return Err(superseded("another writer of the same id".into()));
            }
            if let Some(parent) = &parent {
                let slot = inner.layout.child_slot(&volume, parent);
                let holder = match inner.get_bytes(&slot).await {
                    Err(Error::NotFound { .. }) => None,
                    other => Some(from_json::<Reservation>(
                        "child slot",
                        slot.as_ref(),
                        &other?,
                    )?),
                };
                match holder {
                    Some(holder) if holder.writer == writer => {}
                    Some(holder) => {
                        return Err(superseded(format!("backup {}", holder.backup)));
                    }
                    None => return Err(superseded("gc, which removed its child slot".into())),
                }
            }
            let path = inner.layout.manifest(&volume, &id);
            let bytes: Bytes = to_json(&doc).into();
            match inner.put_create(&path, bytes.clone()).await {
                Ok(Created::New) => {}
                Ok(Created::Exists(_)) => {
                    return Err(Error::BackupExists {
                        volume: volume.to_string(),
                        id: id.to_string(),
                    });
                }
                // Every answer was lost, but a put may still have been stored: the store
                // decides, read back once more.
                Err(err) => match inner.get_bytes(&path).await {
                    Ok(stored) if stored == bytes => {}
                    Err(Error::NotFound { .. }) => return Err(err),
                    _ => return Err(Error::CommitUnknown(Box::new(err))),
                },
            }
            crate::failpoint::hit("after-manifest");
            if let Some(lease) = &lease {
                // Committed: a leftover record is only removed later by gc.
                let _ = lease.release(&inner).await;
            }
            Ok(())
        });
        if let Err(Error::CommitUnknown(_)) = committed {
            // The manifest may exist: removing the image could leave it naming nothing. `gc`
            // removes the rest once it sees no manifest (and no live writer).
            self.done = true;
        }
        committed?;
        self.done = true;
        Ok(manifest)
    }

    /// Gives the backup up: removes the image and side files and releases the reservations.
    /// Dropping an uncommitted upload does the same, ignoring errors.
    pub fn abandon(mut self) -> Result<()> {
        self.done = true;
        self.clean_up()
    }

    fn clean_up(&mut self) -> Result<()> {
        let (volume, id, parent, writer, lease) = (
            self.volume.clone(),
            self.id.clone(),
            self.parent.clone(),
            self.writer.clone(),
            self.lease.take(),
        );
        self.target
            .block("abandon backup", move |inner| async move {
                let image = inner.layout.image(&volume, &image_name(&id));
                inner.delete(&image).await?;
                for file in inner.list(&inner.layout.files_dir(&volume, &id)).await? {
                    inner.delete(&file.location).await?;
                }
                if let Some(parent) = parent {
                    let slot = inner.layout.child_slot(&volume, &parent);
                    if let Ok(bytes) = inner.get_bytes(&slot).await {
                        let holder: Reservation = from_json("child slot", slot.as_ref(), &bytes)?;
                        if holder.writer == writer {
                            inner.delete(&slot).await?;
                        }
                    }
                }
                inner.delete(&inner.layout.claim(&volume, &id)).await?;
                match lease {
                    Some(lease) => lease.release(&inner).await,
                    None => Ok(()),
                }
            })
    }
}

impl Drop for BackupUpload {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: what is left behind is removed by `gc` after the grace period.
            let _ = self.clean_up();
        }
    }
}
