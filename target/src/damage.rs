//! Damage marks: what a check that read a backup's stored data found wrong with it, kept
//! beside the backup (`volumes/<volume>/damaged/<id>.json`) so that no later backup is built
//! on it.
//!
//! A chain whose stored data is damaged (a flipped byte in a base, a cluster overwritten on the
//! store) restores no point that reads through the damaged clusters, and an incremental built
//! on it commits one more such point. Checking every cluster before each incremental would read
//! the whole chain every time; instead `strata::verify` (and a restore that finds a cluster that
//! fails its checksum) marks the backup, and the next backup of the volume sees the mark on its
//! chain and starts a new one. A verify that finds the backup whole again removes the mark.
//!
//! A mark is untrusted input as every stored record is: one that does not parse still counts as
//! a mark on the backup its name names (a mark can only make the next backup a full one), and
//! one larger than a record may be is refused unread.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::id_from_key;
use crate::manifest::{from_json, to_json};
use crate::name::{BackupId, VolumeName};
use crate::target::Target;

/// The longest problem text a mark keeps (the first of a verify's findings, cut there).
const MAX_PROBLEM: usize = 1024;

/// What a check found wrong with a backup's stored data ([`Target::mark_damaged`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageMark {
    /// The damaged backup.
    pub backup: BackupId,
    /// When the damage was found.
    pub found: DateTime<Utc>,
    /// What was found, on one line.
    pub problem: String,
}

impl Target {
    /// Records that backup `id` of `volume` has damaged stored data (`problem`, one line, cut
    /// at 1 KiB), replacing an earlier mark. Backups refuse to extend a chain that holds a
    /// marked backup.
    pub fn mark_damaged(&self, volume: &VolumeName, id: &BackupId, problem: &str) -> Result<()> {
        let mut problem: String = problem.replace(['\n', '\r'], " ");
        if problem.len() > MAX_PROBLEM {
            let mut end = MAX_PROBLEM;
            while !problem.is_char_boundary(end) {
                end -= 1;
            }
            problem.truncate(end);
        }
        let mark = DamageMark {
            backup: id.clone(),
            found: Utc::now(),
            problem,
        };
        let path = self.inner.layout.damage_mark(volume, id);
        self.block("mark a damaged backup", move |inner| async move {
            inner.put(&path, to_json(&mark).into()).await
        })
    }

    /// Removes the damage mark of backup `id` of `volume`, if any.
    pub fn clear_damaged(&self, volume: &VolumeName, id: &BackupId) -> Result<()> {
        let path = self.inner.layout.damage_mark(volume, id);
        self.block("clear a damage mark", move |inner| async move {
            inner.delete(&path).await
        })
    }

    /// The damage marks of `volume`'s backups. A mark that does not parse counts as a mark on
    /// the backup its object's name names, with a problem saying so; an object whose name
    /// names no backup is left out.
    pub fn damage_marks(&self, volume: &VolumeName) -> Result<Vec<DamageMark>> {
        let volume = volume.clone();
        self.block("list damage marks", move |inner| async move {
            let mut marks = Vec::new();
            for meta in inner
                .list(&inner.layout.volume_dir(&volume, "damaged"))
                .await?
            {
                let Some(id) =
                    id_from_key(&meta.location, ".json").and_then(|name| BackupId::new(&name).ok())
                else {
                    continue;
                };
                let bytes = match inner.get_bytes(&meta.location).await {
                    Ok(bytes) => Ok(bytes),
                    // Removed since the listing: no longer a mark.
                    Err(Error::NotFound { .. }) => continue,
                    Err(e @ Error::Corrupt { .. }) => Err(e),
                    Err(e) => return Err(e),
                };
                let mark = bytes.and_then(|bytes| {
                    from_json::<DamageMark>("damage mark", meta.location.as_ref(), &bytes)
                });
                marks.push(match mark {
                    Ok(mark) if mark.backup == id => mark,
                    Ok(mark) => DamageMark {
                        problem: format!(
                            "a damage mark naming backup {} ({})",
                            mark.backup, mark.problem
                        ),
                        backup: id,
                        found: mark.found,
                    },
                    Err(e) => DamageMark {
                        backup: id,
                        found: meta.last_modified,
                        problem: format!("a damage mark that does not read ({e})"),
                    },
                });
            }
            Ok(marks)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_cleared_and_read_when_damaged() {
        let target = Target::open("memory://").unwrap();
        let volume = VolumeName::new("vol").unwrap();
        let id = BackupId::new("20261203T000000Z-00000001").unwrap();
        assert_eq!(target.damage_marks(&volume).unwrap(), []);
        let long = format!("cluster at 0x0\nfails {}", "é".repeat(MAX_PROBLEM));
        target.mark_damaged(&volume, &id, &long).unwrap();
        let marks = target.damage_marks(&volume).unwrap();
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].backup, id);
        assert!(marks[0].problem.starts_with("cluster at 0x0 fails é"));
        assert!(marks[0].problem.len() <= MAX_PROBLEM);
        target.clear_damaged(&volume, &id).unwrap();
        assert_eq!(target.damage_marks(&volume).unwrap(), []);
        // Garbage in a mark's place still marks the backup its name names.
        let path = target.inner.layout.damage_mark(&volume, &id);
        target
            .block("put garbage", move |inner| async move {
                inner.put(&path, "not json".into()).await
            })
            .unwrap();
        let marks = target.damage_marks(&volume).unwrap();
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].backup, id);
        assert!(
            marks[0].problem.contains("does not read"),
            "{}",
            marks[0].problem
        );
        // The mark of a backup that is not committed is garbage.
        let removed = target.gc(std::time::Duration::ZERO).unwrap().removed;
        assert!(
            removed
                .iter()
                .any(|key| key.ends_with("/damaged/20261203T000000Z-00000001.json")),
            "{removed:?}"
        );
        assert_eq!(target.damage_marks(&volume).unwrap(), []);
    }
}
