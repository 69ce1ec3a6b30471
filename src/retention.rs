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

use strata_target::{AppBackupId, AppName, BackupId, Target, VolumeName};

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
    if keep_last == 0 {
        return Err(Error::NotFound(
            "keep-last must keep at least one application backup".into(),
        ));
    }
    let backups = target.app_backups(app)?;
    let split = backups.len().saturating_sub(keep_last);
    let (expired, kept) = backups.split_at(split);
    for old in expired {
        target.delete_app_backup(app, &old.id)?;
    }
    let named: HashSet<(VolumeName, BackupId)> = target
        .all_app_backups()?
        .into_iter()
        .flat_map(|m| m.volumes)
        .map(|r| (r.volume, r.backup))
        .collect();
    let volumes: BTreeSet<&VolumeName> = backups
        .iter()
        .flat_map(|m| m.volumes.iter().map(|r| &r.volume))
        .collect();
    let mut removed = Vec::new();
    for volume in volumes {
        target.recover_folds(volume, std::time::Duration::ZERO)?;
        let ours: HashSet<&BackupId> = backups
            .iter()
            .flat_map(|m| m.volumes.iter())
            .filter(|r| &r.volume == volume)
            .map(|r| &r.backup)
            .collect();
        let listed = target.backups(volume)?;
        let Some(boundary) = listed.iter().rposition(|m| ours.contains(&m.id)) else {
            continue;
        };
        let unreferenced: Vec<BackupId> = listed[..=boundary]
            .iter()
            .filter(|m| !named.contains(&(volume.clone(), m.id.clone())))
            .map(|m| m.id.clone())
            .collect();
        for id in unreferenced {
            remove_volume_backup(target, volume, &id)?;
            removed.push((volume.clone(), id));
        }
    }
    Ok(Expiry {
        expired: expired.iter().map(|m| m.id.clone()).collect(),
        kept: kept.iter().map(|m| m.id.clone()).collect(),
        removed,
    })
}

/// Removes volume backup `id`: folded into its child when it has one, deleted otherwise.
fn remove_volume_backup(target: &Target, volume: &VolumeName, id: &BackupId) -> Result<()> {
    let listed = target.backups(volume)?;
    match listed.iter().find(|m| m.parent.as_ref() == Some(id)) {
        Some(child) => fold_verified(target, volume, id, child),
        None => Ok(target.delete_backup(volume, id).map(drop)?),
    }
}
