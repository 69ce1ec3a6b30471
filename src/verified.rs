//! Verified backup points: the chain the images name checked against the chain the manifests
//! name, then opened so that every stored cluster read from it is checked against its backup's
//! `checksums` side file.
//!
//! Restore, `strata serve` and retention's fold all open backups through [`open_verified`]:
//! a backup that does not read as it was written fails with [`Error::Damaged`] naming the
//! backup, and for clusters the guest offset, instead of handing out its bytes.

use std::collections::HashMap;
use std::sync::Arc;

use strata_chain::{ChainChecksums, ClusterChecksums};
use strata_qcow2::{Image, OpenOptions};
use strata_target::{BackupId, BackupManifest, PartStorage, Preopen, Target, VolumeName};

use crate::volume::{CHECKSUMS_FILE, Error, Result, chain_text, side_file};

/// A backup point opened for verified reads.
pub(crate) struct VerifiedChain {
    /// The backup point's manifest.
    pub manifest: BackupManifest,
    /// The manifests from the backup point down to its base (top first, as the image's
    /// layers are).
    pub manifests: Vec<BackupManifest>,
    /// The chain, opened with every layer's checksum list as its cluster check.
    pub image: Image,
}

impl VerifiedChain {
    /// `error` with a failed cluster check or a corrupt structure named by its backup
    /// (`Error::Damaged`); other errors as they are.
    pub fn name_damage(&self, error: Error) -> Error {
        let depth = match &error {
            Error::Image(strata_qcow2::Error::ClusterCheck { depth, .. }) => Some(*depth),
            Error::Image(strata_qcow2::Error::Corrupt { image, .. }) => self
                .image
                .chain()
                .iter()
                .position(|layer| layer.name == *image),
            _ => None,
        };
        let Some(manifest) = depth.and_then(|d| self.manifests.get(d)) else {
            return error;
        };
        match error {
            Error::Image(strata_qcow2::Error::ClusterCheck {
                guest_offset,
                problem,
                ..
            }) => damaged(
                manifest,
                format!("cluster at guest offset {guest_offset:#x} {problem}"),
            ),
            Error::Image(strata_qcow2::Error::Corrupt { what, offset, .. }) => damaged(
                manifest,
                format!("its image is corrupt: {what} (at file offset {offset:#x})"),
            ),
            other => other,
        }
    }
}

/// Opens backup `id` of `volume` (the latest when `None`) for verified reads.
///
/// Before any data is read: the manifests are walked from the backup through `parent` (a
/// missing parent, a backup naming itself or a loop is damage), each layer's `checksums`
/// side file is downloaded into a temporary file (its size and CRC checked against its
/// manifest; read back through a small page cache, never held whole), the chain is opened from
/// the backup's image object through the volume's storage no deeper than the manifests go
/// (every image's HEAD, header and tables requested at once, while the side files download:
/// a few round trips to object storage whatever the chain's depth),
/// and each layer is compared with its manifest: backing name (`image_name(parent)`), virtual
/// size, object size, cluster size (also the checksum list's), and the chain's depth.
pub(crate) fn open_verified(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
) -> Result<VerifiedChain> {
    open_verified_with(target, volume, id, None)
}

/// [`open_verified`], opening the images through `storage`, a [`PartStorage`] for a planned
/// restore, which opens all of the chain's images at once ([`PartStorage::preopen`]).
pub(crate) fn open_verified_in(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    storage: &PartStorage,
) -> Result<VerifiedChain> {
    open_verified_with(target, volume, id, Some(storage))
}

/// Side files downloaded at once while a chain is opened.
const PARALLEL_DOWNLOADS: usize = 16;

/// How many times a chain is opened anew on a folder whose manifests changed while it opened.
const FOLDER_REOPENS: usize = 4;

/// [`open_once`], opened anew on a folder when a manifest of the chain changed meanwhile.
///
/// On a folder a fold ends by renaming the merged image over `<child>.qcow2` (qemu-img follows
/// backing names by file name), so a reader that read the manifests before a fold and opened
/// the files after it would meet the merged image under the old manifests and take a healthy
/// backup for a damaged one. Once the files are open (what they hold no longer changes for
/// this reader), every manifest the chain was checked against is read again; when one differs
/// or is gone, the chain is opened anew. Object stores need none of it: a fold writes new
/// objects and never renames one over another.
fn open_verified_with(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    parts: Option<&PartStorage>,
) -> Result<VerifiedChain> {
    let mut tries = 0;
    loop {
        tries += 1;
        let (read, opened) = open_once(target, volume, id, parts);
        if !target.is_folder() || tries >= FOLDER_REOPENS {
            return opened;
        }
        match &opened {
            Err(e) if !is_damage(e) => return opened,
            // Damage found walking the manifests (a parent gone): a fold may have removed it
            // meanwhile; the walk is cheap on a folder, so it is walked again.
            Err(_) if read.is_empty() => continue,
            _ if unchanged(target, &read)? => return opened,
            _ => continue,
        }
    }
}

/// Whether every manifest of `read` is still stored as it was read.
fn unchanged(target: &Target, read: &[BackupManifest]) -> Result<bool> {
    for manifest in read {
        match target.backup(&manifest.volume, &manifest.id) {
            Ok(now) if now == *manifest => {}
            Ok(_) => return Ok(false),
            Err(strata_target::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Opens the chain once; with the manifests it was checked against (none when it failed
/// before they were all read).
fn open_once(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    parts: Option<&PartStorage>,
) -> (Vec<BackupManifest>, Result<VerifiedChain>) {
    let mut read = Vec::new();
    let opened = open_once_into(target, volume, id, parts, &mut read);
    (read, opened)
}

fn open_once_into(
    target: &Target,
    volume: &VolumeName,
    id: Option<&BackupId>,
    parts: Option<&PartStorage>,
    read: &mut Vec<BackupManifest>,
) -> Result<VerifiedChain> {
    // The latest backup comes from the listing of them all, which holds the chain's other
    // manifests too; a given backup's chain is read in parallel batches
    // (`Target::chain_candidates`). The walk to the base then reads none again.
    let mut listed = HashMap::new();
    let top = match id {
        Some(id) => {
            let top = target.backup(volume, id)?;
            // Only a speed-up: a store that refuses LIST (GET-only credentials) still restores
            // by reading each parent in turn.
            listed = target.chain_candidates(volume, &top).unwrap_or_default();
            top
        }
        None => {
            // A manifest that does not read may be the latest backup's (named as created in the
            // same second or later): then the latest cannot be told, and a backup asked for by
            // id still restores. Older ones matter only if the chain names them.
            let (mut all, unreadable) = target.backups_readable(volume)?;
            let top = all
                .pop()
                .ok_or_else(|| Error::NotFound(format!("volume {volume} has no backups")))?;
            if let Some(damaged) = unreadable.iter().find(|u| stamp(&u.id) >= stamp(&top.id)) {
                return Err(Error::Damaged {
                    volume: volume.clone(),
                    id: damaged.id.clone(),
                    problem: format!(
                        "its manifest does not read ({}), so the latest backup cannot be told \
                         from {}: ask for a backup by its id",
                        chain_text(&damaged.error),
                        top.id
                    ),
                });
            }
            listed.extend(all.into_iter().map(|m| (m.id.clone(), m)));
            top
        }
    };
    let manifests = manifest_chain(target, top.clone(), &mut listed)?;
    read.clone_from(&manifests);
    strata_target::failpoint("chain-manifests-read");
    // The images are opened ahead (`VolumeStorage::open_chain`, `PartStorage::preopen`) while
    // every layer's checksum list is downloaded, several at once: each is one streaming GET,
    // and none waits for another. Opening ahead is only a head start: when it fails (a missing
    // image, say), nothing is kept and the reader's own open below meets the failure and
    // reports it as it always has.
    let layers = preopen_layers(&manifests);
    let (lists, chain) = std::thread::scope(|scope| {
        let opening = scope.spawn(|| match parts {
            Some(parts) => {
                let _ = parts.preopen(&layers);
                None
            }
            None => Some(target.storage(volume).open_chain(&layers)),
        });
        let lists = download_checksums(target, &manifests);
        (lists, opening.join().ok().flatten())
    });
    let lists = lists?;
    let plain;
    let storage: &dyn strata_qcow2::Storage = match (parts, &chain) {
        (Some(parts), _) => parts,
        (None, Some(chain)) => chain,
        (None, None) => {
            plain = target.storage(volume);
            &plain
        }
    };
    let check = Arc::new(ChainChecksums::new(lists));
    let options = OpenOptions {
        max_depth: manifests.len(),
        cluster_check: Some(Arc::clone(&check) as Arc<dyn strata_qcow2::ClusterCheck>),
        ..OpenOptions::default()
    };
    let image = Image::open_with(storage, &top.image.object, &options).map_err(|e| match e {
        strata_qcow2::Error::ChainTooDeep { image, .. } => {
            let base = manifests.last().unwrap_or(&top);
            damaged(
                base,
                format!("its image names backing file {image:?}, its manifest names no parent"),
            )
        }
        e if image_damage(&e) => damaged(
            &top,
            format!("its image chain does not open: {}", chain_text(&e)),
        ),
        e => Error::Image(e),
    })?;
    check_layers(&manifests, &image, &check)?;
    Ok(VerifiedChain {
        manifest: top,
        manifests,
        image,
    })
}

/// The creation time an id starts with (to the second).
fn stamp(id: &BackupId) -> &str {
    id.as_str().split('-').next().unwrap_or_default()
}

/// Downloads the checksum list of every backup of `manifests`, [`PARALLEL_DOWNLOADS`] at once,
/// in their order.
fn download_checksums(
    target: &Target,
    manifests: &[BackupManifest],
) -> Result<Vec<(String, ClusterChecksums)>> {
    let mut lists = Vec::with_capacity(manifests.len());
    for batch in manifests.chunks(PARALLEL_DOWNLOADS) {
        let downloaded: Vec<Result<ClusterChecksums>> = std::thread::scope(|scope| {
            let downloads: Vec<_> = batch
                .iter()
                .map(|manifest| {
                    scope.spawn(move || {
                        target
                            .download_file_of(manifest, &side_file(CHECKSUMS_FILE))
                            .map_err(Error::from)
                            .and_then(|file| Ok(ClusterChecksums::open(file)?))
                    })
                })
                .collect();
            downloads
                .into_iter()
                .map(|download| {
                    download.join().unwrap_or_else(|_| {
                        Err(Error::NotFound("a checksum list download panicked".into()))
                    })
                })
                .collect()
        });
        for (manifest, list) in batch.iter().zip(downloaded) {
            let list = list.map_err(|e| match is_damage(&e) {
                true => damaged(manifest, format!("its checksum list: {}", chain_text(&e))),
                false => e,
            })?;
            lists.push((format!("backup {}/{}", manifest.volume, manifest.id), list));
        }
    }
    Ok(lists)
}

/// The images of the chain `manifests` name, as the QCOW2 reader will open them: by the top
/// image's object, then by each backing name a child's header must carry (which
/// `check_layers` holds it to), each standing for the object its manifest names.
fn preopen_layers(manifests: &[BackupManifest]) -> Vec<Preopen> {
    manifests
        .iter()
        .enumerate()
        .map(|(depth, m)| Preopen {
            name: match depth {
                0 => m.image.object.clone(),
                _ => strata_target::image_name(&m.id),
            },
            object: m.image.object.clone(),
            cluster_size: m.cluster_size,
        })
        .collect()
}

/// The manifests from `top` through `parent` to the base, top first.
/// Parents found in `listed` (manifests the caller already read) are taken from there.
fn manifest_chain(
    target: &Target,
    top: BackupManifest,
    listed: &mut HashMap<BackupId, BackupManifest>,
) -> Result<Vec<BackupManifest>> {
    let mut chain = vec![top];
    while let Some(last) = chain.last() {
        let Some(parent) = last.parent.clone() else {
            break;
        };
        if parent == last.id {
            return Err(damaged(last, "its manifest names itself as parent".into()));
        }
        if chain.iter().any(|m| m.id == parent) {
            return Err(damaged(
                last,
                format!("its parent {parent} is already in the chain (the parents loop)"),
            ));
        }
        if chain.len() >= strata_target::MAX_CHAIN_DEPTH {
            return Err(damaged(
                last,
                format!(
                    "the chain is longer than {} backups",
                    strata_target::MAX_CHAIN_DEPTH
                ),
            ));
        }
        if let Some(manifest) = listed.remove(&parent) {
            chain.push(manifest);
            continue;
        }
        match target.backup(&last.volume, &parent) {
            Ok(manifest) => chain.push(manifest),
            Err(strata_target::Error::NotFound { .. }) => {
                return Err(damaged(
                    last,
                    format!("its parent {parent} has no manifest"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(chain)
}

/// The manifests of the chain that ends in `top` (top first), once every one is committed
/// (as [`open_verified`] walks them, `listed` sparing reads) and every image is stored at its
/// manifest's size ([`Target::check_images`]), and no backup of it carries a damage mark (a
/// verify or a restore that read its data found it damaged: [`Target::mark_damaged`]): what a
/// backup checks before it extends the chain. Contents are not read; [`Error::Damaged`] names
/// the first backup found wanting.
pub(crate) fn stored_chain(
    target: &Target,
    top: BackupManifest,
    listed: &mut HashMap<BackupId, BackupManifest>,
) -> Result<Vec<BackupManifest>> {
    let volume = top.volume.clone();
    let manifests = manifest_chain(target, top, listed)?;
    match target.check_images(&manifests) {
        Ok(()) => {
            // What a check that read the data found (`Target::mark_damaged`): the newest
            // marked backup of the chain is named.
            let marks = target.damage_marks(&volume)?;
            let marked = manifests
                .iter()
                .find_map(|m| Some((m, marks.iter().find(|mark| mark.backup == m.id)?)));
            match marked {
                Some((manifest, mark)) => Err(damaged(
                    manifest,
                    format!(
                        "a check on {} found its data damaged: {}",
                        mark.found.format("%Y-%m-%d %H:%M UTC"),
                        mark.problem
                    ),
                )),
                None => Ok(manifests),
            }
        }
        Err(e) if target_damage(&e) => {
            // Which backup it is: asked again one by one, only when one is wanting.
            let broken = manifests
                .iter()
                .find(|m| target.check_images(std::slice::from_ref(m)).is_err())
                .unwrap_or(&manifests[0]);
            Err(damaged(broken, e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Compares every layer of `image` with its manifest and checksum list.
fn check_layers(manifests: &[BackupManifest], image: &Image, check: &ChainChecksums) -> Result<()> {
    let layers = image.chain();
    for (depth, (manifest, layer)) in manifests.iter().zip(&layers).enumerate() {
        let differs = |what: String| Err(damaged(manifest, what));
        let Some(qcow2) = &layer.qcow2 else {
            return differs("its image is not a QCOW2 image".into());
        };
        let expected = manifest.parent.as_ref().map(strata_target::image_name);
        if qcow2.backing_file != expected {
            return differs(match (&qcow2.backing_file, &expected) {
                (Some(found), Some(parent)) => {
                    format!(
                        "its image names backing file {found:?}, its manifest's parent is {parent:?}"
                    )
                }
                (None, Some(parent)) => {
                    format!("its image names no backing file, its manifest's parent is {parent:?}")
                }
                (found, None) => {
                    format!("its image names backing file {found:?}, its manifest names no parent")
                }
            });
        }
        if layer.virtual_size != manifest.virtual_size {
            return differs(format!(
                "its image's virtual size is {} bytes, its manifest says {}",
                layer.virtual_size, manifest.virtual_size
            ));
        }
        if layer.file_length != manifest.image.size {
            return differs(format!(
                "its image object is {} bytes, its manifest says {}",
                layer.file_length, manifest.image.size
            ));
        }
        if qcow2.cluster_size != manifest.cluster_size {
            return differs(format!(
                "its image's cluster size is {} bytes, its manifest says {}",
                qcow2.cluster_size, manifest.cluster_size
            ));
        }
        let listed = check.list(depth).map_or(0, |list| list.cluster_size);
        if listed != qcow2.cluster_size {
            return differs(format!(
                "its checksum list covers {listed} byte clusters, its image has {}",
                qcow2.cluster_size
            ));
        }
    }
    if let Some(base) = manifests.last().filter(|_| layers.len() != manifests.len()) {
        return Err(damaged(
            base,
            format!(
                "the image chain has {} images, the manifests name {} backups",
                layers.len(),
                manifests.len()
            ),
        ));
    }
    Ok(())
}

/// Whether `e` says the backup itself is missing or wrong (an object gone, a size or CRC that
/// differs from its manifest, content that does not parse), rather than that it could not be
/// read from here (the store unreachable or refusing, `TMPDIR` full): only the first makes a
/// backup damaged; the second is the run's own failure, reported as it is.
pub(crate) fn is_damage(e: &Error) -> bool {
    match e {
        Error::Target(t) => target_damage(t),
        Error::Chain(strata_chain::Error::Io { source, .. }) => io_damage(source),
        Error::Chain(strata_chain::Error::Image(q)) | Error::Image(q) => image_damage(q),
        Error::Io { source, .. } => io_damage(source),
        Error::Volume { .. } => false,
        _ => true,
    }
}

/// [`is_damage`] of a target error: a missing object, or one that differs from its manifest.
pub(crate) fn target_damage(e: &strata_target::Error) -> bool {
    matches!(
        e,
        strata_target::Error::NotFound { .. } | strata_target::Error::Corrupt { .. }
    )
}

fn image_damage(e: &strata_qcow2::Error) -> bool {
    match e {
        strata_qcow2::Error::Io { source, .. } => io_damage(source),
        _ => true,
    }
}

/// An I/O error from reading a backup's objects: missing, cut short or inconsistent data is
/// damage (the target's reader reports those kinds), anything else is the environment's.
fn io_damage(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if let Some(t) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<strata_target::Error>())
    {
        return target_damage(t);
    }
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::UnexpectedEof | ErrorKind::InvalidData
    )
}

/// Marks the backup `error` names as damaged ([`Error::Damaged`], what a restore found reading
/// it), so that the next backup of the volume starts a new chain instead of building on it
/// ([`Target::mark_damaged`]). A target that cannot store the mark says so in its notices.
pub(crate) fn mark_found(target: &Target, error: &Error) {
    if let Error::Damaged {
        volume,
        id,
        problem,
    } = error
        && let Err(e) = target.mark_damaged(volume, id, problem)
    {
        target.notice(&format!(
            "backup {volume}/{id} is damaged and could not be marked so ({e}); a backup may \
             still be built on it"
        ));
    }
}

fn damaged(manifest: &BackupManifest, problem: String) -> Error {
    Error::Damaged {
        volume: manifest.volume.clone(),
        id: manifest.id.clone(),
        problem,
    }
}
