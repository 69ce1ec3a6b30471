//! Retention per application backup, with reference counting of the volume backups.
//!
//! An application backup names one volume backup per volume (the operator takes a new volume
//! backup of every volume on every run, unchanged or not, so two application backups of one
//! application never share a volume backup; other writers, or several applications backing
//! up one volume, may). Keeping the newest N volume backups of each volume, as [`prune`]
//! does, would fold away volume backups that older, still listed application backups name;
//! [`expire_app_backups`] instead expires whole application backups and then removes only the
//! volume backups nothing left names.
//!
//! [`prune`]: crate::prune

use std::collections::{BTreeSet, HashSet};

use strata_target::{
    AppBackupId, AppName, BackupId, BackupManifest, Target, VolumeBackupRef, VolumeName,
};

use crate::volume::{Error, Result, fold_verified};

/// What [`expire_app_backups`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// The application backups expired, oldest first (their manifests and archives deleted).
    pub expired: Vec<AppBackupId>,
    /// The application backups that remain, oldest first.
    pub kept: Vec<AppBackupId>,
    /// The volume backups removed (folded into their children, or deleted when nothing was
    /// built on them), oldest first per volume.
    pub removed: Vec<(VolumeName, BackupId)>,
}

/// Retention of application `app`: keeps its newest `keep_last` application backups, expires
/// the older ones, then removes each volume backup of the application's volumes that no
/// remaining application backup (of any application) names.
///
/// Order, so that a crash at any point leaves every remaining application backup restorable
/// and the next run finishes the job:
///
/// 1. The expired application backups' manifests are deleted, oldest first
///    ([`Target::delete_app_backup`]). No volume backup has been touched yet, so whatever
///    subset is gone, every listed application backup still restores.
/// 2. For each volume the application's backups (remaining or just expired) name, a fold an
///    earlier run left is finished or rolled back ([`Target::recover_folds`]), then each
///    unreferenced volume backup at or before the newest one these application backups name
///    is removed, oldest first. Volume backups newer than that are left alone: they belong to
///    a run whose application backup is not committed yet. A referenced volume backup is
///    never removed, even when that leaves more than `keep_last` backups of the volume.
///
/// Removing an unreferenced backup `P` that has a child `C` folds `P` into `C`: the merged
/// image is written from the extents that `C` or `P` decide (`strata_chain::merge` walks
/// depths 0 and 1), each read through the whole chain at `C`'s point, and zeroes included
/// as zero clusters; extents deeper in the chain stay unallocated and still fall through to
/// `P`'s backing file, which becomes `C`'s. So `C`'s point reads the same bytes before and
/// after, and a kept backup built on `C` (whose own clusters are untouched) reads the same
/// too. `P` without a child is deleted ([`Target::delete_backup`]).
///
/// A volume backup that only the expired backups named, of a volume the application no
/// longer has, is removed in the same run; if that run crashes after step 1, the next run no
/// longer knows the volume and leaves those backups (space, never a broken restore).
/// Run one expiry per application at a time (the operator's per-PVC locks do).
pub fn expire_app_backups(target: &Target, app: &AppName, keep_last: usize) -> Result<Expiry> {
    expire_app_backups_keeping(target, app, keep_last, &[])
}

/// [`expire_app_backups`], keeping besides the newest `keep_last` the application backups of
/// `pinned` (those a restore under way reads: the operator's Restores read a Backup's archive
/// again when they apply its objects, after the volumes are filled). A pinned backup is
/// listed as kept and its volume backups stay named; the next retention without the pin
/// expires it.
pub fn expire_app_backups_keeping(
    target: &Target,
    app: &AppName,
    keep_last: usize,
    pinned: &[AppBackupId],
) -> Result<Expiry> {
    if keep_last == 0 {
        return Err(Error::NotFound(
            "keep-last must keep at least one application backup".into(),
        ));
    }
    let backups = target.app_backups(app)?;
    let split = backups.len().saturating_sub(keep_last);
    let (expired, kept): (Vec<_>, Vec<_>) = backups
        .iter()
        .enumerate()
        .partition(|(at, m)| *at < split && !pinned.contains(&m.id));
    let (expired, kept): (Vec<_>, Vec<_>) = (
        expired.into_iter().map(|(_, m)| m).collect(),
        kept.into_iter().map(|(_, m)| m).collect(),
    );
    for old in &expired {
        target.delete_app_backup(app, &old.id)?;
    }
    let named = named_volume_backups(target)?;
    let volumes: BTreeSet<&VolumeName> = backups
        .iter()
        .flat_map(|m| m.volumes.iter().map(|r| &r.volume))
        .collect();
    let mut removed = Vec::new();
    for volume in volumes {
        let ours: HashSet<&BackupId> = backups
            .iter()
            .flat_map(|m| m.volumes.iter())
            .filter(|r| &r.volume == volume)
            .map(|r| &r.backup)
            .collect();
        // At or before the newest volume backup these application backups name.
        let gone = remove_unnamed(target, volume, &named, |listed| {
            let end = listed.iter().rposition(|m| ours.contains(&m.id));
            listed[..end.map_or(0, |b| b + 1)]
                .iter()
                .map(|m| m.id.clone())
                .collect()
        })?;
        removed.extend(gone.into_iter().map(|id| (volume.clone(), id)));
    }
    Ok(Expiry {
        expired: expired.iter().map(|m| m.id.clone()).collect(),
        kept: kept.iter().map(|m| m.id.clone()).collect(),
        removed,
    })
}

/// Deletes application backup `id` of `app` (the operator's `deletionPolicy: Delete`), then
/// removes each volume backup of `volumes` that no remaining application backup names, with
/// the reference counting of [`expire_app_backups`]: another application backup's volume
/// backups, and the chain they rest on, read the same bytes afterwards.
///
/// `volumes` are the volume backups the application backup names, as its caller recorded them
/// (the operator: the Backup's status): its manifest is deleted first, so a deletion stopped
/// after that step is finished by running it again with the same `volumes`, and deleting an
/// absent application backup succeeds. Only the given volume backups are candidates; other
/// unnamed ones (an uncommitted run's, the CLI's) are left to retention and gc. Run it under
/// the same exclusion as [`expire_app_backups`] (the operator holds the volumes' locks).
pub fn delete_app_backup(
    target: &Target,
    app: &AppName,
    id: &AppBackupId,
    volumes: &[VolumeBackupRef],
) -> Result<Vec<(VolumeName, BackupId)>> {
    target.delete_app_backup(app, id)?;
    let named = named_volume_backups(target)?;
    let by_volume: BTreeSet<&VolumeName> = volumes.iter().map(|r| &r.volume).collect();
    let mut removed = Vec::new();
    for volume in by_volume {
        let mine: HashSet<&BackupId> = volumes
            .iter()
            .filter(|r| &r.volume == volume)
            .map(|r| &r.backup)
            .collect();
        let gone = remove_unnamed(target, volume, &named, |listed| {
            listed
                .iter()
                .filter(|m| mine.contains(&m.id))
                .map(|m| m.id.clone())
                .collect()
        })?;
        removed.extend(gone.into_iter().map(|id| (volume.clone(), id)));
    }
    Ok(removed)
}

/// Every (volume, volume backup) some application backup in `target` names.
fn named_volume_backups(target: &Target) -> Result<HashSet<(VolumeName, BackupId)>> {
    Ok(target
        .all_app_backups()?
        .into_iter()
        .flat_map(|m| m.volumes)
        .map(|r| (r.volume, r.backup))
        .collect())
}

/// Finishes or rolls back a fold an earlier run left on `volume`, then removes each of the
/// backups `pick` chooses from its listing (oldest first) that `named` does not name; their ids.
fn remove_unnamed(
    target: &Target,
    volume: &VolumeName,
    named: &HashSet<(VolumeName, BackupId)>,
    pick: impl FnOnce(&[BackupManifest]) -> Vec<BackupId>,
) -> Result<Vec<BackupId>> {
    target.recover_folds(volume, std::time::Duration::ZERO)?;
    let unreferenced: Vec<BackupId> = pick(&target.backups(volume)?)
        .into_iter()
        .filter(|id| !named.contains(&(volume.clone(), id.clone())))
        .collect();
    let mut removed = Vec::with_capacity(unreferenced.len());
    for id in unreferenced {
        match remove_volume_backup(target, volume, &id) {
            Ok(()) => removed.push(id),
            // As `prune` does: the damage is marked (the next backup starts a new chain), this
            // backup stays, and the others are still removed.
            Err(Error::Damaged {
                id: damaged,
                problem,
                ..
            }) => target.notice(&format!(
                "backup {volume}/{damaged} is damaged ({problem}): {id} was not folded into \
                 it; delete it, or restore from a later point"
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Removes volume backup `id`: folded into its child when it has one, deleted otherwise.
fn remove_volume_backup(target: &Target, volume: &VolumeName, id: &BackupId) -> Result<()> {
    let listed = target.backups(volume)?;
    match listed.iter().find(|m| m.parent.as_ref() == Some(id)) {
        Some(child) => fold_verified(target, volume, id, child),
        None => Ok(target.delete_backup(volume, id).map(drop)?),
    }
}
