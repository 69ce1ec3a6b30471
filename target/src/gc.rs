//! Garbage collection of what interrupted or abandoned backups and folds left behind.
//!
//! An object is garbage when it belongs to a backup id that is not committed and whose writer
//! is dead (its claim is missing, or the writer's lock is free or its lease lapsed: see
//! [`crate::liveness`]), and the object itself is older than the grace period. A live writer's
//! objects are never removed, however long it runs. Records of dead writers and finished
//! takeovers go too, once older than the grace period. Data objects go first, claims after
//! them and writer records last, so an interrupted `gc` is simply run again.
//! Application metadata archives without a manifest are garbage after the grace period too, as
//! are damage marks (`crate::damage`) of backups no longer committed.
//! Folds: an intent older than the grace period is finished or rolled back first
//! ([`Target::recover_folds`]); objects a committed fold superseded are removed once their
//! retired record is older than the grace period; nothing a committed manifest, a fold in
//! progress or (on a folder) a committed backup's `<id>.qcow2` needs is ever removed.
//! Incomplete multipart uploads are aborted by the sink that started them; those of a crashed
//! process cannot be listed through object_store, so object stores should also carry a
//! lifecycle rule that aborts incomplete multipart uploads after a day.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::ObjectMeta;
use object_store::path::Path;

use crate::error::Result;
use crate::fold_recovery::{Needed, collect_retired};
use crate::layout::{IMAGE_EXTENSION, id_from_key};
use crate::liveness::Liveness;
use crate::manifest::{Reservation, from_json};
use crate::name::{BackupId, VolumeName};
use crate::target::{Inner, Target};

/// What [`Target::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Keys of the objects removed (dead readers' records among them).
    pub removed: Vec<String>,
}

impl Target {
    /// Removes the leftovers of backups that were never committed and whose writers are dead
    /// (see the module docs), once older than `grace`: partial images, side files, claims and
    /// child slots, the dead writers' records, and finished takeovers; and the objects folds
    /// superseded more than `grace` ago, unless a reader of the volume is alive
    /// ([`crate::ReadLease`]: a reader that opened a chain before a fold keeps it until it is
    /// done; an unrecorded one must be done within `grace`). Objects of live writers and of
    /// committed backups are
    /// never touched. Incomplete multipart uploads of a killed writer cannot be listed through
    /// object_store: give buckets a lifecycle rule that aborts them (after a day, say).
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        let mut report = GcReport::default();
        // A volume that fails (an unreadable record, say) does not keep the others from being
        // collected; the first failure is returned once all were tried.
        let mut failed = None;
        for volume in self.volumes()? {
            match self.gc_volume(&volume, grace) {
                Ok(done) => report.removed.extend(done.removed),
                Err(err) => failed = failed.or(Some(err)),
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let removed = self.block("gc", move |inner| async move {
            collect_archives(&inner, Utc::now() - grace).await
        })?;
        report.removed.extend(removed);
        Ok(report)
    }

    /// [`gc`](Self::gc) of one volume's leftovers only (what the controller runs after it
    /// commits a backup of the volume).
    pub fn gc_volume(&self, volume: &VolumeName, grace: Duration) -> Result<GcReport> {
        // Folds stopped for longer than the grace period are finished or rolled back first.
        self.recover_folds(volume, grace)?;
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let volume = volume.clone();
        let removed = self.block("gc", move |inner| async move {
            let cutoff = Utc::now() - grace;
            // While a reader of the volume is alive (it may read a chain opened before a
            // fold), everything a fold superseded stays, however long ago: `crate::ReadLease`.
            let mut removed = Vec::new();
            let read = !inner
                .live_readers_removing(&volume, &mut removed)
                .await?
                .is_empty();
            let retired_cutoff = if read {
                DateTime::<Utc>::MIN_UTC
            } else {
                cutoff
            };
            let needed = Needed::of_volume(&inner, &volume, retired_cutoff).await?;
            removed.extend(collect_volume(&inner, &volume, cutoff, &needed).await?);
            if !read {
                removed.extend(collect_retired(&inner, &volume, cutoff, &needed).await?);
            }
            Ok(removed)
        })?;
        Ok(GcReport { removed })
    }
}

/// The backup id an object of the volume belongs to, by folder.
fn owner(dir: &str, key: &Path, rest: &[String]) -> Option<String> {
    match dir {
        "images" => {
            let name = key.filename()?;
            let (id, _) = name.split_once(IMAGE_EXTENSION)?;
            Some(id.to_string())
        }
        "files" => rest.first().cloned(),
        "claims" | "backups" | "damaged" => id_from_key(key, ".json"),
        _ => None,
    }
}

async fn collect_volume(
    inner: &Inner,
    volume: &VolumeName,
    cutoff: DateTime<Utc>,
    needed: &Needed,
) -> Result<Vec<String>> {
    let volume_prefix = inner.layout.volume(volume);
    // The store's time, read when a writer is first judged.
    let mut clock = None;
    let objects = inner.list(&volume_prefix).await?;
    let depth = volume_prefix.parts().count();
    let mut by_dir: HashMap<String, Vec<(ObjectMeta, Vec<String>)>> = HashMap::new();
    for meta in objects {
        let parts: Vec<String> = meta
            .location
            .parts()
            .skip(depth)
            .map(|p| p.as_ref().to_string())
            .collect();
        let Some((dir, rest)) = parts.split_first() else {
            continue;
        };
        let rest = rest.to_vec();
        by_dir.entry(dir.clone()).or_default().push((meta, rest));
    }
    let committed: HashSet<String> = by_dir
        .get("backups")
        .into_iter()
        .flatten()
        .filter_map(|(meta, rest)| owner("backups", &meta.location, rest))
        .collect();
    let mut live_claims: HashSet<String> = HashSet::new();
    for (meta, rest) in by_dir.get("claims").into_iter().flatten() {
        let Some(id) = owner("claims", &meta.location, rest) else {
            continue;
        };
        if committed.contains(&id) || meta.last_modified > cutoff {
            live_claims.insert(id);
            continue;
        }
        let bytes = match inner.get_bytes(&meta.location).await {
            Ok(bytes) => bytes,
            // Released meanwhile by its writer.
            Err(crate::Error::NotFound { .. }) => continue,
            Err(err) => return Err(err),
        };
        let claim: Reservation = from_json("claim", meta.location.as_ref(), &bytes)?;
        let now = inner.store_now_once(volume, &mut clock).await?;
        if !matches!(
            inner.liveness(volume, &claim.writer, now).await?,
            Liveness::Dead
        ) {
            live_claims.insert(id);
        }
    }
    let live = |id: &str| committed.contains(id) || live_claims.contains(id);
    // A writer may have committed since the listing: it creates its manifest before it
    // releases its record, so one judged dead above that committed shows its manifest now.
    let mut committed_since: HashMap<String, bool> = HashMap::new();
    let mut removed = Vec::new();
    for dir in ["images", "files", "damaged", "children", "claims"] {
        for (meta, rest) in by_dir.get(dir).into_iter().flatten() {
            if meta.last_modified > cutoff || needed.contains(&meta.location) {
                continue;
            }
            let id = if dir == "children" {
                // A child slot belongs to the backup it names.
                let bytes = match inner.get_bytes(&meta.location).await {
                    Ok(bytes) => bytes,
                    Err(crate::Error::NotFound { .. }) => continue,
                    Err(err) => return Err(err),
                };
                from_json::<Reservation>("child slot", meta.location.as_ref(), &bytes)?
                    .backup
                    .to_string()
            } else {
                match owner(dir, &meta.location, rest) {
                    Some(id) => id,
                    None => continue,
                }
            };
            if live(&id) {
                continue;
            }
            let since = match committed_since.get(&id) {
                Some(&since) => since,
                None => {
                    let since = match BackupId::new(&id) {
                        Ok(backup) => match inner.manifest(volume, &backup).await {
                            Ok(_) | Err(crate::Error::Corrupt { .. }) => true,
                            Err(crate::Error::NotFound { .. }) => false,
                            Err(err) => return Err(err),
                        },
                        Err(_) => false,
                    };
                    committed_since.insert(id.clone(), since);
                    since
                }
            };
            if !since {
                inner.delete(&meta.location).await?;
                removed.push(meta.location.to_string());
            }
        }
    }
    if let Some(root) = &inner.local_root {
        let folder = crate::url::local_path(root, &volume_prefix);
        for (file, parts, modified) in staged_files(&folder) {
            // A side file's upload is staged for as long as it runs: spare a live writer's.
            let owner_live = match parts.split_first() {
                Some((dir, rest)) if dir == "files" => rest
                    .first()
                    .is_some_and(|id| live_claims.contains(id) && !committed.contains(id)),
                _ => false,
            };
            if modified <= cutoff && !owner_live {
                match std::fs::remove_file(&file) {
                    Ok(()) => removed.push(file.display().to_string()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(crate::Error::io("remove", file.display(), err)),
                }
            }
        }
    }
    // Takeovers that are done, and clock probes a killed process left.
    for (meta, _) in ["takeovers", "clock"]
        .into_iter()
        .flat_map(|dir| by_dir.get(dir).into_iter().flatten())
    {
        if meta.last_modified <= cutoff {
            inner.delete(&meta.location).await?;
            removed.push(meta.location.to_string());
        }
    }
    for (meta, _) in by_dir.get("writers").into_iter().flatten() {
        let Some(token) = id_from_key(&meta.location, ".json") else {
            continue;
        };
        if meta.last_modified > cutoff {
            continue;
        }
        let now = inner.store_now_once(volume, &mut clock).await?;
        if matches!(inner.liveness(volume, &token, now).await?, Liveness::Dead) {
            inner.delete(&meta.location).await?;
            removed.push(meta.location.to_string());
        }
    }
    Ok(removed)
}

/// On a folder target, the files under `folder` that object_store stages a put or a multipart
/// upload in (`<name>#<n>`): its listing never shows them, so a killed writer's would stay.
/// Each with its path, the parts of its name below `folder` (the `#<n>` left in the last) and
/// when it last changed.
fn staged_files(folder: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<String>, DateTime<Utc>)> {
    let mut found = Vec::new();
    // Volume folders are at most four deep (`files/<id>/<name>`, a fold's
    // `files/<id>/<token>/<name>`, `takeovers/<parent>/...`).
    let mut pending = vec![(folder.to_path_buf(), Vec::new())];
    while let Some((dir, parts)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts: Vec<String> = parts.clone();
            parts.push(name.clone());
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                if parts.len() < 4 {
                    pending.push((entry.path(), parts));
                }
                continue;
            }
            let staged = name
                .rsplit_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if let (true, Ok(modified)) = (staged, meta.modified()) {
                found.push((entry.path(), parts, DateTime::<Utc>::from(modified)));
            }
        }
    }
    found
}

/// Metadata archives whose application manifest was never created.
async fn collect_archives(inner: &Inner, cutoff: DateTime<Utc>) -> Result<Vec<String>> {
    let objects = inner.list(&inner.layout.all_applications()).await?;
    let manifests: HashSet<String> = objects
        .iter()
        .filter_map(|meta| {
            meta.location
                .as_ref()
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    let mut removed = Vec::new();
    for meta in &objects {
        let Some(stem) = meta.location.as_ref().strip_suffix(".archive") else {
            continue;
        };
        if meta.last_modified <= cutoff && !manifests.contains(stem) {
            inner.delete(&meta.location).await?;
            removed.push(meta.location.to_string());
        }
    }
    Ok(removed)
}
