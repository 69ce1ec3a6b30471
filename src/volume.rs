//! The volume flows: back up a volume into a target, restore any backup point, list, verify.
//!
//! A backup of a volume with none yet is a full base image; later ones are overlays on the
//! latest backup holding only the clusters whose digest changed (or, with changed ranges from
//! changed-block tracking, only those clusters). Digests are BLAKE3 unless the chain's full
//! backup chose XXH3-128 ([`BackupOptions::digests`]). Each backup stores two side files
//! next to its image: `digests` (for the next incremental) and `checksums` (CRC-32 of every
//! stored cluster, for [`verify`]). Both are streamed, never held whole: uploaded a part at a
//! time, downloaded into unnamed temporary files (in `TMPDIR`) and read back through a small
//! cache, so backup, restore, verify and prune stay under a fixed peak memory for any volume
//! size (see "Memory" in [`strata_chain`]).
//!
//! Backups compress their data clusters with zstd by default ([`BackupOptions::compression`]),
//! on the scan's reader threads; a cluster that does not shrink is stored raw, and compressed
//! clusters are packed byte-adjacent as `qemu-img convert -c` packs them.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use strata_chain::{
    ByteRange, ChangeSource, ClusterChecksums, Damage, DigestAlgorithm, DigestManifest, Progress,
};
use strata_qcow2::{
    CompressionType, HydrateOptions, Image, VolumeRead, WriterOptions, hydrate_with,
};
use strata_target::{
    BackupId, BackupManifest, BackupSpec, FileName, PartStorage, SideBody, Target,
    UnreadableManifest, VolumeName,
};

use crate::planned_restore::{DestKind, restore_planned};
use crate::verified::{open_verified, open_verified_in};

/// Side file holding the digest manifest of a backup.
pub const DIGESTS_FILE: &str = "digests";
/// Side file holding the cluster checksums of a backup.
pub const CHECKSUMS_FILE: &str = "checksums";

/// An error of a volume flow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The target refused or failed.
    #[error("target")]
    Target(#[from] strata_target::Error),
    /// Backing up, merging or verifying failed.
    #[error("chain")]
    Chain(#[from] strata_chain::Error),
    /// Reading the chain, or writing the destination, failed. The message is the image
    /// layer's own, which names the image or destination.
    #[error(transparent)]
    Image(#[from] strata_qcow2::Error),
    /// The volume or destination could not be opened.
    #[error("{path}: {action}")]
    Io {
        /// The path.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The source volume failed.
    #[error("the volume: {action}")]
    Volume {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A backup does not read as its manifests and checksums say: a cluster fails its
    /// checksum, or an image differs from its manifest (the problem says what differs).
    #[error("backup {volume}/{id}: {problem}")]
    Damaged {
        /// The volume.
        volume: VolumeName,
        /// The damaged backup (the point asked for, or one of its parents).
        id: BackupId,
        /// What differs, with the guest offset where a cluster is concerned.
        problem: String,
    },
    /// A restore stopped part-way; `state` says what was left of the destination.
    #[error("restoring into {dest} failed ({state})")]
    Incomplete {
        /// The destination.
        dest: String,
        /// What the destination holds now.
        state: &'static str,
        /// Why it stopped.
        #[source]
        source: Box<Error>,
    },
}

/// Result of the volume flows.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The longest chain (base included) [`backup_volume`] builds by default before it takes a
/// full backup instead: half of [`strata_target::MAX_CHAIN_DEPTH`], the limit every reader
/// opens, so restores stay fast and no build's reader is ever at its edge.
pub const DEFAULT_MAX_CHAIN_LENGTH: usize = 64;

/// The zstd level backups use by default. On 64 KiB clusters of text, level 1 compresses 10 to
/// 25% faster than QEMU's level 3 for about 5% more compressed bytes; a mixed volume's image
/// is then 1.005 times `qemu-img convert -c`'s (README, "Compression").
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Take a full base image even when the volume has backups.
    pub full: bool,
    /// Changed ranges from changed-block tracking; `None` compares digests.
    pub changed_ranges: Option<Vec<ByteRange>>,
    /// The backup [`Self::changed_ranges`] describe the change since: they are used only when
    /// the new backup's parent is that backup, decided once its child slot is taken (another
    /// backup committed between the caller's look and this one would otherwise have the
    /// ranges laid over the wrong parent); else digests are compared, and a notice says why.
    /// `None`: the caller vouches for the ranges.
    pub changed_since: Option<BackupId>,
    /// Cluster size of a new chain (64 KiB when `None`); incrementals keep their chain's.
    pub cluster_size: Option<u64>,
    /// Digests of a new chain (BLAKE3 by default); incrementals keep their chain's, so a
    /// change takes effect at the next full backup.
    pub digests: DigestAlgorithm,
    /// The longest chain (base included) an incremental may make; a backup that would make it
    /// longer is taken as a full image (its manifest says why). At most
    /// [`strata_target::MAX_CHAIN_DEPTH`]; [`DEFAULT_MAX_CHAIN_LENGTH`] by default.
    pub max_chain_length: usize,
    /// Compress stored clusters with this method (zstd by default; `None` stores them raw).
    /// Each image names its own method, so a chain may mix them.
    pub compression: Option<CompressionType>,
    /// Level of [`Self::compression`] ([`DEFAULT_COMPRESSION_LEVEL`] by default; `None`: the
    /// level QEMU uses, zlib's 6 or zstd's 3).
    pub compression_level: Option<i32>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            full: false,
            changed_ranges: None,
            changed_since: None,
            cluster_size: None,
            digests: DigestAlgorithm::default(),
            max_chain_length: DEFAULT_MAX_CHAIN_LENGTH,
            compression: Some(CompressionType::Zstd),
            compression_level: Some(DEFAULT_COMPRESSION_LEVEL),
        }
    }
}

/// Opens the volume at `path` (a file or block device) for a backup.
pub fn open_volume(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| io_error(path, "opening the volume", e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_error(path, "opening the volume", e))?;
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    // A character device (`/dev/null`, an NVMe `/dev/ng*`) has no size to read: backed up, it
    // would be an empty volume, committed as the latest point of its chain.
    let not_a_volume = if kind.is_dir() {
        Some("it is a directory, not a file or block device")
    } else if !kind.is_file() && !kind.is_block_device() {
        Some("it is neither a regular file nor a block device")
    } else {
        None
    };
    if let Some(reason) = not_a_volume {
        return Err(io_error(
            path,
            "opening the volume",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
        ));
    }
    Ok(file)
}

/// Backs up `source` (a file or block device from [`open_volume`], an NBD export, any
/// [`VolumeRead`]) into `target`.
///
/// Returns the committed manifest. `progress` is called as the volume is scanned.
pub fn backup_volume(
    target: &Target,
    volume: &VolumeName,
    source: &dyn VolumeRead,
    options: &BackupOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupManifest> {
    let mut full_reason = None;
    // An incremental extends the latest backup's chain only when every manifest of it is
    // committed and every image is stored at its manifest's size: one deleted by an expiry
    // rule or by hand would make the new point, and every later one, unrestorable. A broken
    // chain (and one as long as chains may be) starts again with a full backup that says why;
    // a target that cannot be read fails the backup.
    let mut latest = None;
    if !options.full {
        // A manifest that does not read is no concern here unless it is of the latest chain
        // (the walk below finds it) or holds the latest backup's child slot (its
        // `begin_backup` refuses to fork it; then a full backup below): `verify` reports it.
        let (mut all, _unreadable) = target.backups_readable(volume)?;
        if let Some(top) = all.pop() {
            let mut listed = all.into_iter().map(|m| (m.id.clone(), m)).collect();
            let limit = options
                .max_chain_length
                .clamp(1, strata_target::MAX_CHAIN_DEPTH);
            match crate::verified::stored_chain(target, top.clone(), &mut listed) {
                Ok(chain) if chain.len() >= limit => {
                    full_reason = Some(format!(
                        "the chain ending in {} has {} images, the limit is {limit}",
                        top.id,
                        chain.len()
                    ));
                }
                Ok(_) => latest = Some(top),
                Err(e) if crate::verified::is_damage(&e) => {
                    full_reason = Some(format!(
                        "the chain of the latest backup {} is broken ({e})",
                        top.id
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
    let size = source.size().map_err(|e| Error::Volume {
        action: "reading the volume size",
        source: e,
    })?;
    // A QCOW2 virtual size is whole 512-byte sectors (qcow2.rst, "Header": qemu rounds it up),
    // so an image of another size would not be the volume's, and would never restore.
    if size % 512 != 0 {
        return Err(Error::Volume {
            action: "checking the volume size",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{size} bytes is not a whole number of 512-byte sectors"),
            ),
        });
    }
    let cluster_size = latest
        .as_ref()
        .map(|m| m.cluster_size)
        .or(options.cluster_size)
        .unwrap_or(strata_qcow2::DEFAULT_CLUSTER_SIZE);
    // The latest backup's digests are what an overlay is computed against. When they are gone
    // or damaged (its image may still restore), every later incremental would fail the same
    // way: the backup is a full one instead, saying why, and the chain starts again from it.
    // A target that cannot be read fails the backup as before.
    let parent_id = latest.as_ref().map(|m| m.id.clone());
    let previous_digests = match &parent_id {
        Some(parent) => match target.download_file(volume, parent, &side_file(DIGESTS_FILE)) {
            Ok(file) => match DigestManifest::open(file) {
                // Digests of another geometry than the backup's (a side file from another
                // backup, put back by hand) would fail every later incremental the same way.
                Ok(digests)
                    if latest.as_ref().is_some_and(|m| {
                        (m.cluster_size, m.virtual_size)
                            != (digests.cluster_size, digests.virtual_size)
                    }) =>
                {
                    let (cluster, size) = latest
                        .as_ref()
                        .map(|m| (m.cluster_size, m.virtual_size))
                        .unwrap_or_default();
                    full_reason = Some(format!(
                        "the digests of the latest backup {parent} cover {} byte clusters of \
                         {} bytes, the backup {cluster} byte clusters of {size} bytes",
                        digests.cluster_size, digests.virtual_size
                    ));
                    latest = None;
                    None
                }
                Ok(digests) => Some(digests),
                Err(e @ strata_chain::Error::Io { .. }) => return Err(e.into()),
                Err(e) => {
                    full_reason = Some(format!(
                        "the digests of the latest backup {parent} do not read ({e})"
                    ));
                    latest = None;
                    None
                }
            },
            Err(e) if crate::verified::target_damage(&e) => {
                full_reason = Some(format!(
                    "the digests of the latest backup {parent} do not read ({e})"
                ));
                latest = None;
                None
            }
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let spec = |parent: Option<BackupId>| BackupSpec {
        id: None,
        parent,
        virtual_size: size,
        cluster_size,
    };
    let mut previous_digests = previous_digests;
    let mut upload = match target.begin_backup(volume, spec(latest.as_ref().map(|m| m.id.clone())))
    {
        Ok(upload) => upload,
        // The latest backup's child slot is held by a backup whose manifest does not read
        // (the real latest, damaged), or the latest was deleted meanwhile: a new chain.
        Err(e) if crate::verified::target_damage(&e) && latest.is_some() => {
            let parent = latest.take().map(|m| m.id.to_string()).unwrap_or_default();
            full_reason = Some(format!(
                "the latest backup {parent} cannot be extended ({})",
                chain_text(&e)
            ));
            previous_digests = None;
            target.begin_backup(volume, spec(None))?
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(reason) = full_reason {
        upload.set_full_reason(reason);
    }
    let mut writer_options = WriterOptions::default();
    writer_options.cluster_size = cluster_size;
    writer_options.backing_file = upload.backing_name();
    writer_options.compression = options.compression;
    writer_options.compression_level = options.compression_level;
    // The parent is fixed now (its child slot is this backup's).
    let parent = latest.as_ref().map(|m| &m.id);
    let ranges = match (&options.changed_ranges, &options.changed_since) {
        (Some(_), Some(since)) if parent != Some(since) => {
            target.notice(&format!(
                "the changed ranges are since {since}, this backup's parent is {}; comparing \
                 digests",
                parent.map_or_else(|| "none".to_owned(), ToString::to_string)
            ));
            &None
        }
        (ranges, _) => ranges,
    };
    let change = match (ranges, &previous_digests) {
        (Some(ranges), previous) => ChangeSource::ChangedRanges {
            ranges,
            previous: previous.as_ref(),
        },
        (None, Some(previous)) => ChangeSource::Digests { previous },
        (None, None) => ChangeSource::Full,
    };
    let sink = upload.image_sink()?;
    let (_, outcome) = strata_chain::backup(
        source,
        sink,
        &writer_options,
        change,
        options.digests,
        progress,
    )?;
    upload.put_file_streamed(
        &side_file(DIGESTS_FILE),
        SideBody::from_reader(outcome.digests.into_reader()),
    )?;
    upload.put_file_streamed(
        &side_file(CHECKSUMS_FILE),
        SideBody::from_reader(outcome.checksums.into_reader()),
    )?;
    Ok(upload.commit()?)
}

/// Opens the chain of backup `id` (the latest when `None`) straight from the target, for
/// verified reads: every reader of the returned image (hydration, an NBD export, a merge)
/// gets only stored clusters whose CRC-32 matches the `checksums` side file of the backup
/// that stored them, and zeros only where no checksum list says data is stored; anything
/// else fails the read with `strata_qcow2::Error::ClusterCheck`, naming `backup VOLUME/ID`
/// and the guest offset.
///
/// Before anything is read the chain the images name is checked against the chain the
/// manifests name (parents, backing names, virtual, object and cluster sizes, depth):
/// [`Error::Damaged`] says what differs.
pub fn open_backup(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
) -> Result<(BackupManifest, Image)> {
    let chain = open_verified(target, volume, id)?;
    Ok((chain.manifest, chain.image))
}

/// The ids of `manifests`.
fn chain_ids(manifests: &[BackupManifest]) -> Vec<BackupId> {
    manifests.iter().map(|m| m.id.clone()).collect()
}

/// [`open_backup`] for a reader that keeps the chain open (an NBD export): recorded as a
/// reader of the volume first, so that what a fold supersedes while it reads stays, and
/// `delete_backup` refuses the chain's backups, until the returned lease is dropped
/// (`strata_target::ReadLease`; `None` where the target cannot record it, as
/// [`Target::try_begin_read`] says).
pub fn open_backup_leased(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
) -> Result<(BackupManifest, Image, Option<strata_target::ReadLease>)> {
    let lease = target.try_begin_read(volume);
    let chain = open_verified(target, volume, id)?;
    if let Some(lease) = &lease {
        // Unsaid, the record counts as reading every backup of the volume: still safe.
        let _ = lease.reading(&chain_ids(&chain.manifests));
    }
    Ok((chain.manifest, chain.image, lease))
}

/// Restores backup `id` (the latest when `None`) of `volume` into `dest`: a regular file
/// (written sparse as `DEST.partial`, renamed to `dest` once complete) or a block device
/// (written in place, as is a file that is a mount point, which no rename can replace). Every
/// cluster is verified as it is read ([`open_backup`]); on any
/// failure a file destination is left as it was (the partial file is removed) and a block
/// device's error ([`Error::Incomplete`]) says its content is incomplete. `progress` is called
/// as the chain is walked.
///
/// From object storage, the chain's data is fetched by a plan: parallel range GETs of large
/// parts, each written as it arrives (`TargetOptions::fetch_part_size`, `fetch_concurrency`
/// and `fetch_gap` tune it; memory: `TargetOptions::fetch_memory_bound`), onto a file or a
/// block device; a device's zero ranges are zeroed (`fallocate`) unless `target_is_zero`.
pub fn restore_volume(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    dest: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(BackupManifest, strata_qcow2::HydrateStats)> {
    restore_volume_with(
        target,
        volume,
        id,
        dest,
        &HydrateOptions::default(),
        progress,
    )
}

/// [`restore_volume`] with explicit [`HydrateOptions`]: `target_is_zero` for a block device
/// known to read zeros (a freshly provisioned thin volume), so its zero ranges are not zeroed
/// again.
pub fn restore_volume_with(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    dest: &Path,
    options: &HydrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(BackupManifest, strata_qcow2::HydrateStats)> {
    let (resolved, existing) = restore_destination(target, dest)?;
    let dest = resolved.as_path();
    let device = existing
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    // From object storage, by a fetch plan (parallel GETs of large parts), onto files and
    // devices alike; a device not known to read zeros has its zero ranges zeroed as the plan
    // walks them. (Hydrated in guest order through the readers' read-ahead instead, as
    // before, a 320 MiB chain from s3s-fs onto a loop device took 1.60-1.87 s against
    // 1.34-1.37 s by the plan: docs/target.md.)
    let planned = (!target.is_folder()).then(|| PartStorage::new(target.storage(volume)));
    // Recorded as a reader before the chain is opened, so that what a fold supersedes while
    // it reads stays until it is done (`strata_target::ReadLease`).
    let lease = target.try_begin_read(volume);
    let chain = match &planned {
        Some(storage) => open_verified_in(target, volume, id, storage),
        None => open_verified(target, volume, id),
    }
    .inspect_err(|e| crate::verified::mark_found(target, e))?;
    if let Some(lease) = &lease {
        // Unsaid, the record counts as reading every backup of the volume: still safe.
        let _ = lease.reading(&chain_ids(&chain.manifests));
    }
    // A file that is a mount point (bind-mounted into a container) cannot be replaced by a
    // rename: it is written in place, as a device is.
    let mounted = !device && existing.is_some() && is_mount_point(dest);
    let partial = partial_path(dest);
    let written = if device || mounted {
        dest
    } else {
        partial.as_path()
    };
    let out = open_destination(written)?;
    if let Some(old) = existing.as_ref().filter(|_| !device && !mounted)
        && let Err(e) = keep_owner_and_mode(&out, written, old)
    {
        // Nothing was restored: the partial file goes, the destination stays as it was.
        let _ = std::fs::remove_file(written);
        return Err(e);
    }
    let total_bytes = chain.image.virtual_size();
    if device {
        // Checked before anything is written, so a device too small is left as it was.
        let len = strata_qcow2::ReadAt::len(&out)
            .map_err(|e| io_error(dest, "reading the device size", e))?;
        if len < total_bytes {
            return Err(io_error(
                dest,
                "checking the device size",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the device holds {len} bytes, the volume {total_bytes}; nothing was \
                         written"
                    ),
                ),
            ));
        }
    }
    let written_name = written.to_string_lossy();
    let mut reached = |reached| {
        progress(&Progress {
            total_bytes,
            scanned_bytes: reached,
            ..Progress::default()
        });
    };
    let hydrated = match &planned {
        Some(storage) => restore_planned(
            storage,
            &chain.image,
            target.options(),
            (
                &out,
                &written_name,
                match device {
                    true => DestKind::Device {
                        zero_ranges: !options.target_is_zero,
                    },
                    false => DestKind::File,
                },
            ),
            &mut reached,
        ),
        None => {
            // Flushed as it is written, so the flush before the rename waits for the tail.
            let mut options = *options;
            options.flush = true;
            hydrate_with(&chain.image, &out, &written_name, &options, &mut reached)
                .map_err(Error::from)
        }
    }
    .map_err(|e| chain.name_damage(e))
    .inspect_err(|e| crate::verified::mark_found(target, e))
    .and_then(|stats| {
        if !device {
            out.sync_all()
                .map_err(|e| io_error(written, "flushing the restored file", e))?;
        }
        if !device && !mounted {
            std::fs::rename(written, dest)
                .map_err(|e| io_error(dest, "renaming the restored file into place", e))?;
            // The rename is durable only once the folder is: a power loss must not bring the
            // old file back after the restore said it was done.
            let folder = match dest.parent() {
                Some(folder) if !folder.as_os_str().is_empty() => folder,
                _ => Path::new("."),
            };
            File::open(folder)
                .and_then(|folder| folder.sync_all())
                .map_err(|e| io_error(folder, "syncing the folder of the restored file", e))?;
        }
        Ok(stats)
    });
    match hydrated {
        Ok(stats) => Ok((chain.manifest, stats)),
        Err(e) => {
            let state = if device {
                "the device content is incomplete"
            } else if mounted {
                "the file is a mount point, written in place: its content is incomplete"
            } else if std::fs::remove_file(written).is_ok() {
                "nothing written there, the partial file was removed"
            } else {
                "nothing written there; remove the partial file"
            };
            Err(Error::Incomplete {
                dest: dest.display().to_string(),
                state,
                source: Box::new(e),
            })
        }
    }
}

/// Where a restore into `dest` writes, and what is there now, checked before anything is
/// read or written:
/// - a symbolic link is followed ([`follow_links`]): the file it names is replaced (or
///   created) and the link kept;
/// - what exists there must be a regular file or a block device: anything else (`/dev/null`,
///   a FIFO, a folder) would be replaced by the restored file;
/// - on a folder target, the file may not be inside the repository, where the rename could
///   replace the image of the very backup being restored.
fn restore_destination(
    target: &Target,
    dest: &Path,
) -> Result<(std::path::PathBuf, Option<std::fs::Metadata>)> {
    let refuse = |problem: String| {
        io_error(
            dest,
            "checking the destination",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, problem),
        )
    };
    let path = follow_links(dest).map_err(|e| io_error(dest, "following the symbolic link", e))?;
    let existing = match std::fs::metadata(&path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(dest, "reading the destination's metadata", e)),
    };
    if let Some(kind) = existing.as_ref().map(std::fs::Metadata::file_type)
        && !kind.is_file()
        && !kind.is_block_device()
    {
        return Err(refuse(
            "it is neither a regular file nor a block device".into(),
        ));
    }
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    if let (Some(root), Ok(folder)) = (
        target
            .local_root()
            .and_then(|r| std::fs::canonicalize(r).ok()),
        std::fs::canonicalize(folder),
    ) && folder.starts_with(&root)
    {
        return Err(refuse(format!(
            "it is inside the target's repository {}; restore elsewhere",
            root.display()
        )));
    }
    Ok((path, existing))
}

/// Whether `path` is a mount point (a file bind-mounted over another, as a container runtime
/// mounts one): its mount differs from its folder's (`statx` `STATX_MNT_ID`, Linux 5.8; where
/// that is not reported, its device). A rename cannot replace it (`EBUSY`).
pub fn is_mount_point(path: &Path) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    let mount = |p: &Path| {
        statx(
            CWD,
            p,
            AtFlags::empty(),
            StatxFlags::MNT_ID | StatxFlags::BASIC_STATS,
        )
        .ok()
    };
    match (mount(path), mount(folder)) {
        (Some(file), Some(folder))
            if StatxFlags::from_bits_retain(file.stx_mask & folder.stx_mask)
                .contains(StatxFlags::MNT_ID) =>
        {
            file.stx_mnt_id != folder.stx_mnt_id
        }
        (Some(file), Some(folder)) => {
            (file.stx_dev_major, file.stx_dev_minor) != (folder.stx_dev_major, folder.stx_dev_minor)
        }
        _ => false,
    }
}

/// `path` with its symbolic links followed, to where a file would be written: a link to a file
/// not created yet resolves to that file's path (as `cp` writes through it). At most 40 links
/// (the kernel's limit), else `ELOOP`.
pub fn follow_links(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&path)?;
                // A relative target is relative to the link's folder; an absolute one replaces it.
                path = match path.parent() {
                    Some(folder) => folder.join(target),
                    None => target,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(rustix::io::Errno::LOOP.into())
}

/// Gives the partial file `out` the permissions and (where this process may) the owner of the
/// file it replaces: a restore over a 0600 file must not leave a world-readable one.
fn keep_owner_and_mode(out: &File, written: &Path, old: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    rustix::fs::fchmod(out, rustix::fs::Mode::from_raw_mode(old.mode() & 0o7777))
        .map_err(|e| io_error(written, "setting the restored file's permissions", e.into()))?;
    let owner = (
        rustix::fs::Uid::from_raw(old.uid()),
        rustix::fs::Gid::from_raw(old.gid()),
    );
    match rustix::fs::fchown(out, Some(owner.0), Some(owner.1)) {
        // Only a privileged process may give a file away; the mode is kept regardless.
        Ok(()) | Err(rustix::io::Errno::PERM) => Ok(()),
        Err(e) => Err(io_error(
            written,
            "setting the restored file's owner",
            e.into(),
        )),
    }
}

/// Where a file restore writes before renaming: `DEST.partial` beside `dest`.
fn partial_path(dest: &Path) -> std::path::PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    name.into()
}

/// Opens a block device in place, or creates/truncates a regular file, holding an exclusive
/// `flock` on it while the returned file is open.
///
/// Two restores into one destination (a retried datamover while the first still runs) would
/// otherwise share its partial file: the second's truncation would cut the first's writes,
/// and the first would rename a file with holes into place and report success. The second
/// now fails at once ("another restore is writing it"); a killed restore's lock goes with its
/// process. Where the file system offers no locks (NFS mounted `nolock`), the file is opened
/// as before.
pub fn open_destination(path: &Path) -> Result<File> {
    let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if device {
        return OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, "opening the destination", e));
    }
    // A few tries: each is lost only to a restore that renamed the file away meanwhile.
    for _ in 0..8 {
        // Not truncated before the lock is ours: that would cut another restore's writes.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_error(path, "opening the destination", e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) | Err(rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io_error(
                    path,
                    "another restore is writing it",
                    rustix::io::Errno::WOULDBLOCK.into(),
                ));
            }
            Err(e) => return Err(io_error(path, "locking the destination", e.into())),
        }
        // The restore that held the lock may have renamed the file into place meanwhile: then
        // the name is a new file, and this one is not to be touched.
        let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
            use std::os::unix::fs::MetadataExt;
            a.dev() == b.dev() && a.ino() == b.ino()
        };
        let held = file
            .metadata()
            .map_err(|e| io_error(path, "reading the destination's metadata", e))?;
        if std::fs::metadata(path).is_ok_and(|named| same(&held, &named)) {
            file.set_len(0)
                .map_err(|e| io_error(path, "truncating the destination", e))?;
            return Ok(file);
        }
    }
    Err(io_error(
        path,
        "other restores keep replacing it",
        std::io::ErrorKind::ResourceBusy.into(),
    ))
}

/// The committed backups of `volume`, or of every volume, oldest first. Fails when a manifest
/// does not read; [`list_readable`] lists the others.
pub fn list(target: &Target, volume: Option<&VolumeName>) -> Result<Vec<BackupManifest>> {
    let (all, mut unreadable) = list_readable(target, volume)?;
    match unreadable.is_empty() {
        true => Ok(all),
        false => Err(unreadable.swap_remove(0).error.into()),
    }
}

/// [`list`]'s backups that read, and the manifests that do not
/// ([`Target::backups_readable`]): one damaged manifest hides no other backup.
pub fn list_readable(
    target: &Target,
    volume: Option<&VolumeName>,
) -> Result<(Vec<BackupManifest>, Vec<UnreadableManifest>)> {
    let volumes = match volume {
        Some(v) => vec![v.clone()],
        None => target.volumes()?,
    };
    let (mut all, mut unreadable) = (Vec::new(), Vec::new());
    for v in &volumes {
        let (read, damaged) = target.backups_readable(v)?;
        all.extend(read);
        unreadable.extend(damaged);
    }
    Ok((all, unreadable))
}

/// What verify found in one backup.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The volume.
    pub volume: VolumeName,
    /// The backup.
    pub id: BackupId,
    /// Every problem found; empty when the backup is intact.
    pub damage: Vec<Damage>,
}

/// Verifies backups without restoring them: the image object against its manifest checksum,
/// the chain against its manifests (as [`open_backup`] checks it), the image's structure,
/// and every stored cluster against its CRC-32.
///
/// The work grows with the backups, not with their square: a backup's chain is checked once,
/// from the newest backup whose chain holds it (a chain checks every layer's manifest against
/// its image, so each older backup of it is checked too), and each backup's own clusters are
/// read from its image alone, not through the chain under it. Only when a chain fails are
/// its older backups checked one by one, so a failure is reported at every backup whose chain
/// it breaks, as when each was checked alone. A backup with damage (its clusters, image or
/// manifest) is named at every backup verified here whose chain holds it ("chain: backup ...
/// under it is damaged"): those do not restore either.
///
/// A backup found damaged whose manifest changed meanwhile (a prune folded it, or folded its
/// parent into it) is verified again as it is now, or left out when it is gone: what a fold
/// changed while it was read is no damage. Each backup found damaged is marked so
/// ([`Target::mark_damaged`]), and the next backup of the volume starts a new chain instead of
/// building on it; one found whole loses an earlier mark.
pub fn verify(
    target: &Target,
    volume: Option<&VolumeName>,
    id: Option<&BackupId>,
) -> Result<Vec<VerifyReport>> {
    verify_with(target, volume, id, true)
}

fn verify_with(
    target: &Target,
    volume: Option<&VolumeName>,
    id: Option<&BackupId>,
    recheck: bool,
) -> Result<Vec<VerifyReport>> {
    let (listed, unreadable) = list_readable(target, volume)?;
    let manifests: Vec<BackupManifest> = listed
        .into_iter()
        .filter(|manifest| id.is_none_or(|id| *id == manifest.id))
        .collect();
    // A manifest that does not read is that backup's damage; the others are verified still.
    let mut reports: Vec<VerifyReport> = unreadable
        .into_iter()
        .filter(|m| id.is_none_or(|id| *id == m.id))
        .map(|UnreadableManifest { volume, id, error }| VerifyReport {
            volume,
            id,
            damage: vec![Damage {
                guest_offset: None,
                problem: format!("manifest: {}", chain_text(&error)),
            }],
        })
        .collect();
    // Newest first: each backup's chain unless a newer chain held it. Each backup of a chain
    // checked is kept with the backups under it.
    type Key = (VolumeName, BackupId);
    let mut below: HashMap<Key, Vec<Key>> = HashMap::new();
    let mut chain_damage = HashMap::new();
    for manifest in manifests.iter().rev() {
        let key = (manifest.volume.clone(), manifest.id.clone());
        if below.contains_key(&key) {
            continue;
        }
        // The chain restore would read: manifests against images (no data is read here).
        match open_verified(target, &manifest.volume, Some(&manifest.id)) {
            Ok(chain) => {
                let keys: Vec<Key> = chain
                    .manifests
                    .iter()
                    .map(|layer| (layer.volume.clone(), layer.id.clone()))
                    .collect();
                for (i, key) in keys.iter().enumerate() {
                    below
                        .entry(key.clone())
                        .or_insert_with(|| keys[i + 1..].to_vec());
                }
            }
            Err(e) if !crate::verified::is_damage(&e) => return Err(e),
            Err(e) => {
                chain_damage.insert(key, format!("chain: {}", chain_text(&e)));
            }
        }
    }
    let verified: HashMap<Key, BackupManifest> = manifests
        .iter()
        .map(|m| ((m.volume.clone(), m.id.clone()), m.clone()))
        .collect();
    for manifest in manifests {
        let mut damage = Vec::new();
        let problem = |what: String| Damage {
            guest_offset: None,
            problem: what,
        };
        // The listed manifest is the one checked against (the listing checked its name).
        if let Err(e) = target.verify_image_of(&manifest) {
            let e = Error::from(e);
            if !crate::verified::is_damage(&e) {
                return Err(e);
            }
            damage.push(problem(format!("image object: {}", chain_text(&e))));
        }
        let key = (manifest.volume.clone(), manifest.id.clone());
        if let Some(chain) = chain_damage.remove(&key) {
            damage.push(problem(chain));
        }
        let checksums = target
            .download_file_of(&manifest, &side_file(CHECKSUMS_FILE))
            .map_err(Error::from)
            .and_then(|file| Ok(ClusterChecksums::open(file)?));
        // Unverified: verify reports every damaged cluster instead of stopping at the first.
        // The image alone: every cluster it lists is its own (its chain is checked above).
        let image = Image::open_with(
            &target.storage(&manifest.volume),
            &manifest.image.object,
            &strata_qcow2::OpenOptions {
                follow_backing: false,
                ..strata_qcow2::OpenOptions::default()
            },
        )
        .map_err(Error::from);
        match (image, checksums) {
            (Ok(image), Ok(checksums)) => damage.extend(strata_chain::verify(&image, &checksums)),
            (Err(e), _) | (_, Err(e)) if !crate::verified::is_damage(&e) => return Err(e),
            (Err(e), _) | (_, Err(e)) => damage.push(problem(chain_text(&e))),
        }
        reports.push(VerifyReport {
            volume: manifest.volume.clone(),
            id: manifest.id.clone(),
            damage,
        });
    }
    if recheck {
        reports = recheck_changed(target, reports, &verified)?;
    }
    record_verdicts(target, &reports)?;
    // A backup whose own clusters are intact does not restore when one under it is damaged:
    // said at it too, so that no point that would fail to restore reads "ok".
    let damaged: HashSet<Key> = reports
        .iter()
        .filter(|r| !r.damage.is_empty())
        .map(|r| (r.volume.clone(), r.id.clone()))
        .collect();
    for report in &mut reports {
        let key = (report.volume.clone(), report.id.clone());
        if let Some((volume, id)) = below
            .get(&key)
            .and_then(|under| under.iter().find(|k| damaged.contains(*k)))
        {
            report.damage.push(Damage {
                guest_offset: None,
                problem: format!("chain: backup {volume}/{id} under it is damaged"),
            });
        }
    }
    Ok(reports)
}

/// `reports` with each damaged backup whose manifest is no longer the one `verified` holds
/// verified again as it is now, or left out when its manifest is gone.
fn recheck_changed(
    target: &Target,
    reports: Vec<VerifyReport>,
    verified: &HashMap<(VolumeName, BackupId), BackupManifest>,
) -> Result<Vec<VerifyReport>> {
    let mut checked = Vec::with_capacity(reports.len());
    for report in reports {
        let key = (report.volume.clone(), report.id.clone());
        let Some(was) = verified.get(&key).filter(|_| !report.damage.is_empty()) else {
            checked.push(report);
            continue;
        };
        match target.backup(&report.volume, &report.id) {
            Ok(now) if now == *was => checked.push(report),
            Ok(_) => checked.extend(
                verify_with(target, Some(&report.volume), Some(&report.id), false)?
                    .into_iter()
                    .filter(|again| again.id == report.id),
            ),
            Err(strata_target::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(checked)
}

/// Marks each backup `reports` found damaged (its own data, image or manifest), so that no
/// backup is built on it ([`Target::mark_damaged`]), and removes the marks of those found
/// whole. A target that cannot store a mark (read-only credentials) says so in its notices;
/// the verify goes on.
fn record_verdicts(target: &Target, reports: &[VerifyReport]) -> Result<()> {
    let mut marked: HashMap<VolumeName, HashSet<BackupId>> = HashMap::new();
    for report in reports {
        if !marked.contains_key(&report.volume) {
            let marks = target.damage_marks(&report.volume)?;
            marked.insert(
                report.volume.clone(),
                marks.into_iter().map(|mark| mark.backup).collect(),
            );
        }
        let was_marked = marked
            .get(&report.volume)
            .is_some_and(|ids| ids.contains(&report.id));
        let recorded = if !report.damage.is_empty() {
            // Every finding, as far as a mark keeps them (1 KiB).
            let problem = report
                .damage
                .iter()
                .map(|damage| match damage.guest_offset {
                    Some(offset) => format!("{} at guest offset {offset:#x}", damage.problem),
                    None => damage.problem.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ");
            target.mark_damaged(&report.volume, &report.id, &problem)
        } else if was_marked {
            target.clear_damaged(&report.volume, &report.id)
        } else {
            Ok(())
        };
        if let Err(e) = recorded {
            target.notice(&format!(
                "backup {}/{}: the verdict could not be recorded ({e}); a backup may still be built on it",
                report.volume, report.id
            ));
        }
    }
    Ok(())
}

pub(crate) fn side_file(name: &str) -> FileName {
    // The names are constants known to be valid file names.
    FileName::new(name).unwrap_or_else(|_| unreachable!("invalid side file name {name}"))
}

fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        action,
        source,
    }
}

/// An error and its causes on one line, each said once: a cause whose message the text
/// already holds (many errors print their source in their own message) is left out.
pub fn chain_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// What [`prune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pruned {
    /// The backups removed (folded into their child, or deleted when nothing was built on
    /// them), oldest first.
    pub removed: Vec<BackupId>,
    /// Backups due for removal that were kept because a live reader (a restore, an export)
    /// reads them and nothing was built on them; a later prune removes them.
    pub being_read: Vec<BackupId>,
    /// Backups due for removal that were kept because their fold found damage in the chain,
    /// each with what the fold said (the damaged backup is marked, [`Target::mark_damaged`]:
    /// the next backup starts a new chain); the other older ones are still removed.
    pub damaged: Vec<(BackupId, String)>,
}

/// Retention: keeps the newest `keep_last` backups of `volume`, folding each older backup into
/// its child (so every kept point stays restorable), and says what it removed.
///
/// A fold never rewrites an object in place (see "Guarantees" in `strata_target`): readers that
/// opened a chain before the fold keep reading it until `gc` removes the superseded objects. A
/// fold that stopped (a crash, a failed request) is first finished or rolled back, from the
/// intent record the target keeps; run one prune per volume at a time. An older backup with
/// nothing built on it that a live reader reads cannot be deleted under it
/// ([`strata_target::Error::BeingRead`]): it is kept ([`Pruned::being_read`]) and the other
/// older ones are still removed, so no more than `keep_last` backups besides those remain.
pub fn prune(target: &Target, volume: &VolumeName, keep_last: usize) -> Result<Pruned> {
    if keep_last == 0 {
        return Err(Error::NotFound(
            "keep-last must keep at least one backup".into(),
        ));
    }
    let mut pruned = Pruned {
        removed: target.recover_folds(volume, std::time::Duration::ZERO)?,
        being_read: Vec::new(),
        damaged: Vec::new(),
    };
    loop {
        let backups = target.backups(volume)?;
        let excess = backups.len().saturating_sub(keep_last);
        let Some(oldest) = backups[..excess].iter().find(|m| {
            !pruned.being_read.contains(&m.id) && !pruned.damaged.iter().any(|(id, _)| *id == m.id)
        }) else {
            return Ok(pruned);
        };
        let Some(child) = backups
            .iter()
            .find(|m| m.parent.as_ref() == Some(&oldest.id))
        else {
            // A chain of its own with nothing built on it: simply dropped.
            match target.delete_backup(volume, &oldest.id) {
                Ok(_) => pruned.removed.push(oldest.id.clone()),
                Err(strata_target::Error::BeingRead { .. }) => {
                    pruned.being_read.push(oldest.id.clone());
                }
                Err(e) => return Err(e.into()),
            }
            continue;
        };
        match fold_verified(target, volume, &oldest.id, child) {
            Ok(()) => pruned.removed.push(oldest.id.clone()),
            // Damage stops this fold only (it is marked: the next backup starts a new chain);
            // the other older backups are still removed, so one damaged backup does not stop
            // retention for good.
            Err(damage @ Error::Damaged { .. }) => {
                let said = format!(
                    "folding into {} failed: {damage}",
                    strata_target::image_name(&child.id)
                );
                pruned.damaged.push((oldest.id.clone(), said));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Folds backup `parent` of `volume` into `child`, its one child: the merged image stands for
/// `child`'s point over `parent`'s backing file, compressed as a default backup is (so
/// retention never inflates what compressed backups stored), with fresh checksums. The chain
/// is verified as it is read: a damaged cluster stops the fold instead of being copied into
/// the child.
pub(crate) fn fold_verified(
    target: &Target,
    volume: &VolumeName,
    parent: &BackupId,
    child: &BackupManifest,
) -> Result<()> {
    let opened = crate::verified::open_verified(target, volume, Some(&child.id))
        .inspect_err(|e| crate::verified::mark_found(target, e))?;
    let cluster_size = child.cluster_size;
    let mut found = None;
    let folded = target.fold_into_child(volume, parent, |sink, backing| {
        let changed = || strata_target::Error::Fold {
            image: child.image.object.clone(),
            reason: "the chain changed after it was opened (another prune folded it \
                     meanwhile); prune again"
                .into(),
        };
        // What is folded is the chain as opened: a fold of the parent by another prune that
        // committed in between (before this fold's intent, which makes any later one wait)
        // changed the parent's manifest, and merging the old parent over its new backing
        // file would lose the clusters the other fold moved into it.
        for manifest in opened.manifests.iter().take(2) {
            match target.backup(volume, &manifest.id) {
                Ok(now) if now == *manifest => {}
                Ok(_) | Err(strata_target::Error::NotFound { .. }) => return Err(changed()),
                Err(e) => return Err(e),
            }
        }
        let defaults = BackupOptions::default();
        let mut options = WriterOptions::default();
        options.cluster_size = cluster_size;
        options.backing_file = backing;
        options.compression = defaults.compression;
        options.compression_level = defaults.compression_level;
        let (_, _, checksums) =
            strata_chain::merge(&opened.image, sink, &options).map_err(|e| {
                let reason = chain_text(&e);
                // A damaged cluster is named and marked, as a restore marks it.
                let named = opened.name_damage(match e {
                    strata_chain::Error::Image(image) => Error::Image(image),
                    other => Error::Chain(other),
                });
                if matches!(named, Error::Damaged { .. }) {
                    crate::verified::mark_found(target, &named);
                    found = Some(named);
                }
                strata_target::Error::Fold {
                    image: child.image.object.clone(),
                    reason,
                }
            })?;
        Ok(vec![(
            side_file(CHECKSUMS_FILE),
            SideBody::from_reader(checksums.into_reader()),
        )])
    });
    match (folded, found) {
        (Ok(_), _) => Ok(()),
        (Err(_), Some(damage)) => Err(damage),
        (Err(e), None) => Err(e.into()),
    }
}
