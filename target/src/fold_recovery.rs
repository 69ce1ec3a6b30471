//! The records a fold keeps, and how a stopped fold is finished or undone.
//!
//! `folds/<parent>.json` ([`FoldIntent`]) exists from before the first object of a fold is
//! written until after its last step. Whether the fold committed is read from the child's
//! manifest, never guessed from image bytes:
//!
//! - **Roll forward** when the child's manifest names the intent's new image: re-point the
//!   folder's `<child>.qcow2`, write `retired/<token>.json`, delete the parent's manifest, hand
//!   the grandparent's child slot to the child, delete the parent's reservations, then the
//!   intent. Every step is idempotent, so an interrupted roll forward is simply run again.
//! - **Roll back** otherwise: delete the new image and side files, then the intent. The child's
//!   manifest never named them, so no reader can need them.
//!
//! The superseded objects (the parent's, and the child's that its new manifest no longer
//! names) are not deleted by the fold: a reader that opened the chain before the commit may
//! still be reading them. `retired/<token>.json` lists them, and [`Target::gc`] deletes them
//! once the record is older than its grace period ([`collect_retired`]), never one that a
//! committed manifest, a fold in progress or (on a folder) a canonical backing name still needs
//! ([`Needed`]).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fold::named_objects;
use crate::layout::{fold_image_name, image_name};
use crate::liveness::Liveness;
use crate::manifest::{BackupManifest, Reservation, from_json, to_json};
use crate::name::{BackupId, VolumeName};
use crate::target::{Inner, Target};

/// A fold in progress (`volumes/<volume>/folds/<parent>.json`), created before anything else
/// of the fold is written and removed after its last step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FoldIntent {
    /// The backup folded away.
    pub parent: BackupId,
    /// Its child, which receives the merged image.
    pub child: BackupId,
    /// The parent's parent, which the child stands on after the fold.
    pub grandparent: Option<BackupId>,
    /// Random token of the folding writer; it also names the new objects.
    pub writer: String,
    /// The merged image's object in the image folder (`<child>.<token>.qcow2`).
    pub image: String,
    /// The folder of the child's new side files, relative to the volume folder.
    pub files: String,
    /// Objects the fold may supersede, relative to the volume folder: the parent's, and the
    /// child's as named before the fold.
    pub superseded: Vec<String>,
    /// When the fold began.
    pub created: DateTime<Utc>,
}

/// Objects a committed fold superseded (`volumes/<volume>/retired/<token>.json`), kept for
/// readers that opened them before the fold until `gc`'s grace period has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Retired {
    /// The backup folded away.
    pub parent: BackupId,
    /// The backup that received the merged image.
    pub child: BackupId,
    /// The objects, relative to the volume folder.
    pub objects: Vec<String>,
    /// When the fold committed.
    pub retired: DateTime<Utc>,
}

impl FoldIntent {
    /// The intent record at `path`, refused as corrupt unless it has the form a fold writes:
    /// recovery deletes what it names, so a record written by hand or damaged must not name
    /// anything else (a `files` of `backups` would delete every manifest).
    pub(crate) fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        let intent: FoldIntent = from_json("fold intent", path, bytes)?;
        let corrupt = |reason: String| Error::Corrupt {
            what: "fold intent",
            path: path.to_string(),
            reason,
        };
        if !plain_token(&intent.writer) {
            return Err(corrupt(format!(
                "writer {:?} is not a token",
                intent.writer
            )));
        }
        if intent.child == intent.parent {
            return Err(corrupt(format!("folds {} into itself", intent.parent)));
        }
        if intent.image != fold_image_name(&intent.child, &intent.writer) {
            return Err(corrupt(format!(
                "image {:?} is not the fold's",
                intent.image
            )));
        }
        if intent.files != format!("files/{}/{}", intent.child, intent.writer) {
            return Err(corrupt(format!(
                "files {:?} are not the fold's",
                intent.files
            )));
        }
        if let Some(object) = intent
            .superseded
            .iter()
            .find(|object| !of_backups(object, &intent.parent, &intent.child))
        {
            return Err(corrupt(format!(
                "supersedes {object:?}, which is neither backup's"
            )));
        }
        Ok(intent)
    }
}

impl Retired {
    /// The retired record at `path`, refused as corrupt unless every object it names is an
    /// image or a side file of the fold's two backups (gc deletes them).
    pub(crate) fn parse(path: &str, bytes: &[u8]) -> Result<Self> {
        let retired: Retired = from_json("retired record", path, bytes)?;
        if let Some(object) = retired
            .objects
            .iter()
            .find(|object| !of_backups(object, &retired.parent, &retired.child))
        {
            return Err(Error::Corrupt {
                what: "retired record",
                path: path.to_string(),
                reason: format!("names {object:?}, which is neither backup's"),
            });
        }
        Ok(retired)
    }
}

/// Whether `token` is a writer token as writers make them.
fn plain_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `object` (relative to the volume folder) is an image or a side file of `parent` or
/// `child`: the only objects a fold supersedes.
fn of_backups(object: &str, parent: &BackupId, child: &BackupId) -> bool {
    let plain = |name: &str| !name.is_empty() && name != "." && name != "..";
    match object.split('/').collect::<Vec<_>>().as_slice() {
        // `<id>.qcow2`, or a fold's `<id>.<token>.qcow2`, of either backup.
        ["images", name] => [parent, child].iter().any(|id| {
            name.strip_prefix(id.as_str())
                .and_then(|rest| rest.strip_suffix(crate::layout::IMAGE_EXTENSION))
                .is_some_and(|token| {
                    token.is_empty() || token.strip_prefix('.').is_some_and(plain_token)
                })
        }),
        ["files", id, rest @ ..] => {
            (*id == parent.as_str() || *id == child.as_str())
                && !rest.is_empty()
                && rest.iter().all(|name| plain(name))
        }
        _ => false,
    }
}

/// What recovery did with a stopped fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovered {
    Forward,
    Back,
}

impl Target {
    /// Finishes or rolls back every fold of `volume` whose intent record is older than
    /// `min_age` (see "Guarantees" in the crate docs): forward when the child's manifest
    /// already names the fold's new image, back otherwise. Returns the parents whose folds
    /// were finished, which are no longer committed.
    ///
    /// `prune` calls this with `min_age` zero before folding anything (one prune runs per
    /// volume at a time); [`gc`](Self::gc) with its grace period.
    pub fn recover_folds(&self, volume: &VolumeName, min_age: Duration) -> Result<Vec<BackupId>> {
        let age = chrono::Duration::from_std(min_age).unwrap_or(chrono::Duration::MAX);
        let volume = volume.clone();
        self.block("recover folds", move |inner| async move {
            let cutoff = Utc::now() - age;
            // The store's time, read when a fold's writer is first judged.
            let mut clock = None;
            let mut finished = Vec::new();
            for meta in inner
                .list(&inner.layout.volume_dir(&volume, "folds"))
                .await?
            {
                if meta.last_modified > cutoff {
                    continue;
                }
                let bytes = match inner.get_bytes(&meta.location).await {
                    Err(Error::NotFound { .. }) => continue,
                    other => other?,
                };
                let intent = FoldIntent::parse(meta.location.as_ref(), &bytes)?;
                if inner.layout.fold_intent(&volume, &intent.parent) != meta.location {
                    return Err(Error::Corrupt {
                        what: "fold intent",
                        path: meta.location.to_string(),
                        reason: format!("names parent {}", intent.parent),
                    });
                }
                // A fold whose writer is alive is in progress, not stopped: leave it alone. On
                // an object store, wait for a recent lease to lapse (or be renewed).
                let now = inner.store_now_once(&volume, &mut clock).await?;
                match inner.liveness(&volume, &intent.writer, now).await? {
                    Liveness::Alive => continue,
                    Liveness::Dead => {}
                    Liveness::Watch { seen, lease } => {
                        inner.options.notices.tell(&format!(
                            "a fold of {} into {} of volume {volume} may have been stopped; \
                             waiting up to {}s for its lease to lapse",
                            intent.parent,
                            intent.child,
                            lease.as_secs_f64().ceil()
                        ));
                        if !inner
                            .lease_lapses(&volume, &intent.writer, &seen, lease)
                            .await?
                        {
                            continue;
                        }
                    }
                }
                if recover(&inner, &volume, &intent).await? == Recovered::Forward {
                    finished.push(intent.parent);
                }
            }
            Ok(finished)
        })
    }

    /// Recovers one fold of this process (after a failure of its own).
    pub(crate) fn recover_fold(&self, volume: &VolumeName, intent: &FoldIntent) -> Result<()> {
        let (volume, intent) = (volume.clone(), intent.clone());
        self.block("recover fold", move |inner| async move {
            recover(&inner, &volume, &intent).await.map(|_| ())
        })
    }
}

async fn recover(inner: &Inner, volume: &VolumeName, intent: &FoldIntent) -> Result<Recovered> {
    let switched = match inner.manifest(volume, &intent.child).await {
        Ok(child) => child.image.object == intent.image,
        Err(Error::NotFound { .. }) => false,
        Err(err) => return Err(err),
    };
    if switched {
        roll_forward(inner, volume, intent).await?;
        Ok(Recovered::Forward)
    } else {
        roll_back(inner, volume, intent).await?;
        Ok(Recovered::Back)
    }
}

/// Ends a fold whose child's manifest already names the merged image (see the module docs).
pub(crate) async fn roll_forward(
    inner: &Inner,
    volume: &VolumeName,
    intent: &FoldIntent,
) -> Result<()> {
    let child = inner.manifest(volume, &intent.child).await?;
    let canonical = format!("images/{}", image_name(&child.id));
    if let Some(root) = &inner.local_root {
        repoint_canonical(inner, root, volume, intent)?;
    }
    let named: HashSet<String> = named_objects(&child).into_iter().collect();
    let mut objects: Vec<String> = Vec::new();
    for object in &intent.superseded {
        let kept = named.contains(object) || (inner.local_root.is_some() && *object == canonical);
        if !kept && !objects.contains(object) {
            objects.push(object.clone());
        }
    }
    let retired = Retired {
        parent: intent.parent.clone(),
        child: intent.child.clone(),
        objects,
        retired: Utc::now(),
    };
    inner
        .put(
            &inner.layout.retired(volume, &intent.writer),
            to_json(&retired).into(),
        )
        .await?;
    inner
        .delete(&inner.layout.manifest(volume, &intent.parent))
        .await?;
    if let Some(grandparent) = &intent.grandparent {
        // The grandparent's one child is now the folded backup.
        let holder = Reservation {
            backup: intent.child.clone(),
            parent: Some(grandparent.clone()),
            writer: intent.writer.clone(),
            created: Utc::now(),
        };
        inner
            .put(
                &inner.layout.child_slot(volume, grandparent),
                to_json(&holder).into(),
            )
            .await?;
    }
    inner
        .delete(&inner.layout.child_slot(volume, &intent.parent))
        .await?;
    inner
        .delete(&inner.layout.claim(volume, &intent.parent))
        .await?;
    delete_intent(inner, volume, intent).await
}

/// Undoes a fold that never committed: its new objects, then its intent.
async fn roll_back(inner: &Inner, volume: &VolumeName, intent: &FoldIntent) -> Result<()> {
    let image = single_segment(&intent.image)?;
    inner.delete(&inner.layout.image(volume, image)).await?;
    if inner.local_root.is_some() {
        // The staging file of a filesystem upload that was cut short.
        let staging = format!("{image}.{}.partial", intent.writer);
        inner.delete(&inner.layout.image(volume, &staging)).await?;
    }
    let files = inner.layout.in_volume(volume, &intent.files)?;
    for file in inner.list(&files).await? {
        inner.delete(&file.location).await?;
    }
    delete_intent(inner, volume, intent).await
}

/// Removes the intent record of `intent`'s fold, unless the record there is another fold's: two
/// recoveries of one stopped fold may run at once (a prune's and a gc's), and once the first
/// has removed the record a new fold of the same parent may have made its own, which the
/// second must leave alone. The stores have no conditional delete, so what is left is the
/// moment between this read and the delete: a new fold's record made exactly then goes, and
/// that fold then fails its commit (`check_intent_is_ours`) and rolls itself back; no
/// committed backup is touched.
async fn delete_intent(inner: &Inner, volume: &VolumeName, intent: &FoldIntent) -> Result<()> {
    let path = inner.layout.fold_intent(volume, &intent.parent);
    let bytes = match inner.get_bytes(&path).await {
        Err(Error::NotFound { .. }) => return Ok(()),
        other => other?,
    };
    // A record that does not parse is no other fold's: it goes.
    match FoldIntent::parse(path.as_ref(), &bytes) {
        Ok(found) if found.writer != intent.writer => Ok(()),
        _ => inner.delete(&path).await,
    }
}

/// On a folder, makes `<child>.qcow2` the merged image, atomically: qemu-img follows the
/// overlays' backing names by file name. A hard link to a temporary name is renamed over the
/// old name; readers that have the old file open keep reading it.
fn repoint_canonical(
    inner: &Inner,
    root: &std::path::Path,
    volume: &VolumeName,
    intent: &FoldIntent,
) -> Result<()> {
    let dir = crate::url::local_path(root, &inner.layout.volume_dir(volume, "images"));
    let merged = dir.join(single_segment(&intent.image)?);
    let canonical = dir.join(image_name(&intent.child));
    let temporary = dir.join(format!(
        "{}.{}.partial",
        image_name(&intent.child),
        single_segment(&intent.writer)?
    ));
    match std::fs::remove_file(&temporary) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove", temporary.display(), err));
        }
        _ => {}
    }
    std::fs::hard_link(&merged, &temporary)
        .map_err(|err| Error::io("link", temporary.display(), err))?;
    std::fs::rename(&temporary, &canonical)
        .map_err(|err| Error::io("publish", canonical.display(), err))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| Error::io("sync", dir.display(), err))
}

/// A name read from a fold record that must be one path segment.
fn single_segment(name: &str) -> Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::InvalidName {
            kind: "object",
            name: name.to_string(),
            reason: "must be one path segment",
        });
    }
    Ok(name)
}

/// The objects of a volume that `gc` must keep whatever their age: those a committed manifest
/// names, on a folder every committed backup's `<id>.qcow2` (the name qemu-img follows), the
/// new objects of folds in progress, and what a retired record younger than the cutoff lists.
#[derive(Debug, Default)]
pub(crate) struct Needed {
    keys: HashSet<String>,
    prefixes: Vec<String>,
}

impl Needed {
    /// Reads the records in the order that keeps a concurrent fold's objects covered: intents
    /// first (a fold whose intent is gone has switched its manifest, read next), then
    /// manifests, then retired records (written before the parent's manifest is deleted).
    pub(crate) async fn of_volume(
        inner: &Inner,
        volume: &VolumeName,
        cutoff: DateTime<Utc>,
    ) -> Result<Self> {
        let mut needed = Needed::default();
        let layout = &inner.layout;
        for meta in inner.list(&layout.volume_dir(volume, "folds")).await? {
            let intent: FoldIntent = match inner.get_bytes(&meta.location).await {
                Ok(bytes) => FoldIntent::parse(meta.location.as_ref(), &bytes)?,
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            let image = format!("images/{}", single_segment(&intent.image)?);
            needed.add(layout.in_volume(volume, &image)?);
            let mut files = layout.in_volume(volume, &intent.files)?.to_string();
            files.push('/');
            needed.prefixes.push(files);
        }
        for meta in inner.list(&layout.volume_dir(volume, "backups")).await? {
            let manifest: BackupManifest = match inner.get_bytes(&meta.location).await {
                Ok(bytes) => from_json("backup manifest", meta.location.as_ref(), &bytes)?,
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            for object in named_objects(&manifest) {
                needed.add(layout.in_volume(volume, &object)?);
            }
            if inner.local_root.is_some() {
                needed.add(layout.image(volume, &image_name(&manifest.id)));
            }
        }
        for meta in inner.list(&layout.volume_dir(volume, "retired")).await? {
            if meta.last_modified <= cutoff {
                continue;
            }
            let retired: Retired = match inner.get_bytes(&meta.location).await {
                Ok(bytes) => Retired::parse(meta.location.as_ref(), &bytes)?,
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            for object in &retired.objects {
                needed.add(layout.in_volume(volume, object)?);
            }
        }
        Ok(needed)
    }

    fn add(&mut self, key: Path) {
        self.keys.insert(key.to_string());
    }

    /// Whether the object at `key` must stay.
    pub(crate) fn contains(&self, key: &Path) -> bool {
        let key = key.as_ref();
        self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Deletes the objects of retired records older than `cutoff` (except those still `needed`),
/// then the records. Returns the keys removed.
pub(crate) async fn collect_retired(
    inner: &Inner,
    volume: &VolumeName,
    cutoff: DateTime<Utc>,
    needed: &Needed,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for meta in inner
        .list(&inner.layout.volume_dir(volume, "retired"))
        .await?
    {
        if meta.last_modified > cutoff {
            continue;
        }
        let retired: Retired = match inner.get_bytes(&meta.location).await {
            Ok(bytes) => Retired::parse(meta.location.as_ref(), &bytes)?,
            Err(Error::NotFound { .. }) => continue,
            Err(err) => return Err(err),
        };
        for object in &retired.objects {
            let key = inner.layout.in_volume(volume, object)?;
            if needed.contains(&key) {
                continue;
            }
            // Objects of the folded parent may already be gone, collected as leftovers of
            // an uncommitted backup once the record stopped protecting them.
            match inner.store.head(&key).await {
                Ok(_) => {
                    inner.delete(&key).await?;
                    removed.push(key.to_string());
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(Error::store("head", &key, err)),
            }
        }
        inner.delete(&meta.location).await?;
        removed.push(meta.location.to_string());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> FoldIntent {
        let parent = BackupId::new("20261203T000000Z-00000001").unwrap();
        let child = BackupId::new("20261203T000001Z-00000002").unwrap();
        let writer = "fold-0123456789abcdef".to_string();
        FoldIntent {
            image: fold_image_name(&child, &writer),
            files: format!("files/{child}/{writer}"),
            superseded: vec![
                format!("images/{parent}.qcow2"),
                format!("images/{parent}.fold-00.qcow2"),
                format!("files/{parent}/digests"),
                format!("files/{child}/fold-00/checksums"),
            ],
            parent,
            child,
            grandparent: None,
            writer,
            created: Utc::now(),
        }
    }

    /// Stores `intent` as its parent's intent record on `volume`.
    fn put_intent(target: &crate::Target, volume: &VolumeName, intent: &FoldIntent) {
        let (volume, intent) = (volume.clone(), intent.clone());
        target
            .block("test", move |inner| async move {
                let path = inner.layout.fold_intent(&volume, &intent.parent);
                inner.put(&path, to_json(&intent).into()).await
            })
            .unwrap();
    }

    /// The intent record of `parent` on `volume`.
    fn read_intent(
        target: &crate::Target,
        volume: &VolumeName,
        parent: &BackupId,
    ) -> Result<bytes::Bytes> {
        let (volume, parent) = (volume.clone(), parent.clone());
        target.block("test", move |inner| async move {
            inner
                .get_bytes(&inner.layout.fold_intent(&volume, &parent))
                .await
        })
    }

    #[test]
    fn rolling_back_a_stopped_fold_leaves_a_later_folds_intent_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = crate::Target::open(dir.path().to_str().unwrap()).unwrap();
        let volume = VolumeName::new("data").unwrap();
        let stopped = intent();
        let mut later = intent();
        later.writer = "fold-fedcba9876543210".into();
        later.image = fold_image_name(&later.child, &later.writer);
        later.files = format!("files/{}/{}", later.child, later.writer);
        put_intent(&target, &volume, &later);
        // The child has no manifest naming the merged image: the stopped fold is rolled back.
        target.recover_fold(&volume, &stopped).unwrap();
        let kept = read_intent(&target, &volume, &later.parent).unwrap();
        assert_eq!(FoldIntent::parse("folds/x.json", &kept).unwrap(), later);
        // Its own record, once there, goes.
        put_intent(&target, &volume, &stopped);
        target.recover_fold(&volume, &stopped).unwrap();
        let gone = read_intent(&target, &volume, &stopped.parent).unwrap_err();
        assert!(matches!(gone, Error::NotFound { .. }), "{gone:?}");
    }

    fn parsed(intent: &FoldIntent) -> Result<FoldIntent> {
        FoldIntent::parse("folds/x.json", &to_json(intent))
    }

    #[test]
    fn an_intent_naming_anything_but_the_folds_objects_is_corrupt() {
        let good = intent();
        assert_eq!(parsed(&good).unwrap(), good);
        type Edit = fn(&mut FoldIntent);
        let edits: [(&str, Edit); 8] = [
            ("files", |i| i.files = "backups".into()),
            ("image", |i| i.image = "../backups/x.json".into()),
            ("writer", |i| i.writer = "a/b".into()),
            ("itself", |i| i.child = i.parent.clone()),
            ("manifests", |i| i.superseded.push("backups/x.json".into())),
            ("other backup", |i| {
                i.superseded.push("files/other/digests".into())
            }),
            ("dot dot", |i| {
                i.superseded.push("files/x/../../backups".into())
            }),
            ("another image", |i| {
                i.superseded.push("images/other.qcow2".into())
            }),
        ];
        for (what, edit) in edits {
            let mut bad = good.clone();
            edit(&mut bad);
            assert!(
                matches!(parsed(&bad), Err(Error::Corrupt { .. })),
                "{what}: {bad:?} was accepted"
            );
        }
        let retired = Retired {
            parent: good.parent.clone(),
            child: good.child.clone(),
            objects: vec!["claims/x.json".into()],
            retired: Utc::now(),
        };
        assert!(matches!(
            Retired::parse("retired/x.json", &to_json(&retired)),
            Err(Error::Corrupt { .. })
        ));
    }
}
