//! The volume flows: back up a volume into a target, restore any backup point, list, verify.
//!
//! A backup of a volume with none yet is a full base image; later ones are overlays on the
//! latest backup holding only the clusters whose digest changed (or, with changed ranges from
//! changed-block tracking, only those clusters). Digests are BLAKE3 unless the chain's full
//! backup chose XXH3-128 ([`BackupOptions::digests`]). Each backup stores two side files
//! next to its image: `digests` (for the next incremental) and `checksums` (CRC-32 of every
//! stored cluster, for [`verify`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use strata_chain::{
    ByteRange, ChangeSource, ClusterChecksums, Damage, DigestAlgorithm, DigestManifest, Progress,
};
use strata_qcow2::{Image, VolumeRead, WriterOptions, hydrate_with_progress};
use strata_target::{BackupId, BackupManifest, BackupSpec, FileName, Target, VolumeName};

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
    /// Reading the chain failed.
    #[error("image")]
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
}

/// Result of the volume flows.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to take a backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Take a full base image even when the volume has backups.
    pub full: bool,
    /// Changed ranges from changed-block tracking; `None` compares digests.
    pub changed_ranges: Option<Vec<ByteRange>>,
    /// Cluster size of a new chain (64 KiB when `None`); incrementals keep their chain's.
    pub cluster_size: Option<u64>,
    /// Digests of a new chain (BLAKE3 by default); incrementals keep their chain's, so a
    /// change takes effect at the next full backup.
    pub digests: DigestAlgorithm,
}

/// Opens the volume at `path` (a file or block device) for a backup.
pub fn open_volume(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| io_error(path, "opening the volume", e))
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
    let latest = if options.full {
        None
    } else {
        target.latest(volume)?
    };
    let size = source.size().map_err(|e| Error::Volume {
        action: "reading the volume size",
        source: e,
    })?;
    let cluster_size = latest
        .as_ref()
        .map(|m| m.cluster_size)
        .or(options.cluster_size)
        .unwrap_or(strata_qcow2::DEFAULT_CLUSTER_SIZE);
    let previous_digests = match &latest {
        Some(parent) => Some(DigestManifest::decode(&target.read_file(
            volume,
            &parent.id,
            &side_file(DIGESTS_FILE),
        )?)?),
        None => None,
    };
    let mut upload = target.begin_backup(
        volume,
        BackupSpec {
            id: None,
            parent: latest.as_ref().map(|m| m.id.clone()),
            virtual_size: size,
            cluster_size,
        },
    )?;
    let mut writer_options = WriterOptions::default();
    writer_options.cluster_size = cluster_size;
    writer_options.backing_file = upload.backing_name();
    let change = match (&options.changed_ranges, &previous_digests) {
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
    upload.put_file(&side_file(DIGESTS_FILE), outcome.digests.encode().into())?;
    upload.put_file(
        &side_file(CHECKSUMS_FILE),
        outcome.checksums.encode().into(),
    )?;
    Ok(upload.commit()?)
}

/// Opens the chain of backup `id` (the latest when `None`) straight from the target.
pub fn open_backup(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
) -> Result<(BackupManifest, Image)> {
    let manifest = match id {
        Some(id) => target.backup(volume, id)?,
        None => target
            .latest(volume)?
            .ok_or_else(|| Error::NotFound(format!("volume {volume} has no backups")))?,
    };
    let image = Image::open_with(
        &target.storage(volume),
        &manifest.image.object,
        &strata_qcow2::OpenOptions::default(),
    )?;
    Ok((manifest, image))
}

/// Restores backup `id` (the latest when `None`) of `volume` into `dest`: a regular file
/// (created or truncated, written sparse) or a block device (written in place). `progress`
/// is called as the chain is walked.
pub fn restore_volume(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    dest: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(BackupManifest, strata_qcow2::HydrateStats)> {
    let (manifest, image) = open_backup(target, volume, id)?;
    let out = open_destination(dest)?;
    let total_bytes = image.virtual_size();
    let stats = hydrate_with_progress(&image, &out, &dest.to_string_lossy(), &mut |reached| {
        progress(&Progress {
            total_bytes,
            scanned_bytes: reached,
            ..Progress::default()
        });
    })?;
    Ok((manifest, stats))
}

/// Opens a block device in place, or creates/truncates a regular file.
pub fn open_destination(path: &Path) -> Result<File> {
    let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let mut options = OpenOptions::new();
    options.write(true);
    if !device {
        options.create(true).truncate(true);
    }
    options
        .open(path)
        .map_err(|e| io_error(path, "opening the destination", e))
}

/// The committed backups of `volume`, or of every volume, oldest first.
pub fn list(target: &Target, volume: Option<&VolumeName>) -> Result<Vec<BackupManifest>> {
    let volumes = match volume {
        Some(v) => vec![v.clone()],
        None => target.volumes()?,
    };
    let mut all = Vec::new();
    for v in &volumes {
        all.extend(target.backups(v)?);
    }
    Ok(all)
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
/// the image's structure, and every stored cluster against its CRC-32.
pub fn verify(
    target: &Target,
    volume: Option<&VolumeName>,
    id: Option<&BackupId>,
) -> Result<Vec<VerifyReport>> {
    let mut reports = Vec::new();
    for manifest in list(target, volume)? {
        if id.is_some_and(|id| *id != manifest.id) {
            continue;
        }
        let mut damage = Vec::new();
        let problem = |what: String| Damage {
            guest_offset: 0,
            problem: what,
        };
        if let Err(e) = target.verify_image(&manifest.volume, &manifest.id) {
            damage.push(problem(format!("image object: {}", chain_text(&e))));
        }
        let checksums = target
            .read_file(&manifest.volume, &manifest.id, &side_file(CHECKSUMS_FILE))
            .map_err(Error::from)
            .and_then(|bytes| Ok(ClusterChecksums::decode(&bytes)?));
        match (
            open_backup(target, &manifest.volume, Some(&manifest.id)),
            checksums,
        ) {
            (Ok((_, image)), Ok(checksums)) => {
                damage.extend(strata_chain::verify(&image, &checksums))
            }
            (Err(e), _) | (_, Err(e)) => damage.push(problem(chain_text(&e))),
        }
        reports.push(VerifyReport {
            volume: manifest.volume.clone(),
            id: manifest.id.clone(),
            damage,
        });
    }
    Ok(reports)
}

fn side_file(name: &str) -> FileName {
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

/// An error and its causes on one line.
pub fn chain_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Retention: keeps the newest `keep_last` backups of `volume`, folding each older backup into
/// its child (so every kept point stays restorable) and returns the ids removed.
///
/// A fold never rewrites an object in place (see "Guarantees" in `strata_target`): readers that
/// opened a chain before the fold keep reading it until `gc` removes the superseded objects. A
/// fold that stopped (a crash, a failed request) is first finished or rolled back, from the
/// intent record the target keeps; run one prune per volume at a time.
pub fn prune(target: &Target, volume: &VolumeName, keep_last: usize) -> Result<Vec<BackupId>> {
    if keep_last == 0 {
        return Err(Error::NotFound(
            "keep-last must keep at least one backup".into(),
        ));
    }
    let mut removed = target.recover_folds(volume, std::time::Duration::ZERO)?;
    loop {
        let backups = target.backups(volume)?;
        if backups.len() <= keep_last {
            return Ok(removed);
        }
        let oldest = &backups[0];
        let Some(child) = backups
            .iter()
            .find(|m| m.parent.as_ref() == Some(&oldest.id))
        else {
            // A chain of its own with nothing built on it: simply dropped.
            target.delete_backup(volume, &oldest.id)?;
            removed.push(oldest.id.clone());
            continue;
        };
        let chain = Image::open_with(
            &target.storage(volume),
            &child.image.object,
            &strata_qcow2::OpenOptions::default(),
        )?;
        let cluster_size = child.cluster_size;
        target.fold_into_child(volume, &oldest.id, |sink, backing| {
            let mut options = WriterOptions::default();
            options.cluster_size = cluster_size;
            options.backing_file = backing;
            let (_, _, checksums) = strata_chain::merge(&chain, sink, &options).map_err(|e| {
                strata_target::Error::Upload {
                    path: child.image.object.clone(),
                    reason: chain_text(&e),
                }
            })?;
            Ok(vec![(side_file(CHECKSUMS_FILE), checksums.encode().into())])
        })?;
        removed.push(oldest.id.clone());
    }
}
