//! Retention that never rewrites in place: a reader that opened a chain before a fold reads the
//! same bytes while the fold runs and after it commits (until gc), a fold stopped at any
//! request leaves every point restorable and is finished or rolled back by the next recovery,
//! and gc removes what a fold superseded only after its grace period.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::faulty::{FaultyStore, Plan};
use common::qemu::{
    Point, hydrate_image, make_chain, merged_image, open_point, qemu_chain_len, qemu_compare,
    restore, store_chain, stream_into,
};
use common::{Fixture, Kind, TestResult, fixture};
use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use strata_target::{
    BackupId, BackupManifest, Error, RetryPolicy, Target, TargetOptions, VolumeName,
};

fn bid(name: &str) -> BackupId {
    BackupId::new(name).unwrap_or_else(|e| panic!("{e}"))
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

mod local {
    #[test]
    fn readers_keep_their_bytes_through_a_fold() -> super::TestResult {
        super::readers_keep_their_bytes_through_a_fold(super::fixture(super::Kind::Local))
    }
}

mod memory {
    #[test]
    fn readers_keep_their_bytes_through_a_fold() -> super::TestResult {
        super::readers_keep_their_bytes_through_a_fold(super::fixture(super::Kind::Memory))
    }
}

mod s3 {
    #[test]
    fn readers_keep_their_bytes_through_a_fold() -> super::TestResult {
        if !super::common::moto::available() {
            return Ok(());
        }
        super::readers_keep_their_bytes_through_a_fold(super::fixture(super::Kind::S3))
    }
}

/// Checks every opened reader against its point's bytes.
fn check_readers(
    opened: &[(String, strata_qcow2::Image, Vec<u8>)],
    when: &str,
) -> Result<(), common::BoxError> {
    for (id, image, raw) in opened {
        let read = hydrate_image(image).map_err(|e| format!("{id} {when}: {e}"))?;
        if read != *raw {
            return Err(format!("point {id} read other bytes {when}").into());
        }
    }
    Ok(())
}

/// The chain p0 <- p1 <- p2. Readers open every point; p0 is folded into p1 while a thread
/// restores through those readers in a loop and the fold's own merge step checks them too.
/// They read the same bytes before, during and after the commit, and after a gc within the
/// grace period; fresh readers see the folded chain; on a folder, qemu-img follows the chain.
fn readers_keep_their_bytes_through_a_fold(f: Fixture) -> TestResult {
    let dir = tempfile::tempdir()?;
    let v = VolumeName::new("fold")?;
    let ids = ids(3);
    let points = make_chain(dir.path(), &ids)?;
    let manifests = store_chain(&f.target, &v, &ids, &points)?;
    let merged = merged_image(dir.path(), &ids, 0)?;

    let opened: Vec<(String, strata_qcow2::Image, Vec<u8>)> = manifests
        .iter()
        .zip(&points)
        .map(|(m, p)| {
            Ok((
                m.id.to_string(),
                open_point(&f.target, &v, m)?,
                p.raw.clone(),
            ))
        })
        .collect::<Result<_, common::BoxError>>()?;
    let opened = Arc::new(opened);
    check_readers(&opened, "before the fold")?;

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let background = {
        let (opened, stop, rounds) = (opened.clone(), stop.clone(), rounds.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                check_readers(&opened, "in the background").map_err(|e| e.to_string())?;
                rounds.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };

    let (p0, p1, p2) = (&manifests[0], &manifests[1], &manifests[2]);
    let folded = f.target.fold_into_child(&v, &p0.id, |mut sink, backing| {
        assert_eq!(backing, None);
        let during = check_readers(&opened, "while the fold runs");
        stream_into(&mut sink, &merged).map_err(|e| Error::Upload {
            path: "merged".into(),
            reason: e.to_string(),
        })?;
        let written = check_readers(&opened, "after the merged image was written");
        during.and(written).map_err(|e| Error::Upload {
            path: "reader".into(),
            reason: e.to_string(),
        })?;
        Ok(vec![(
            "checksums".parse()?,
            bytes::Bytes::from_static(b"new").into(),
        )])
    })?;
    check_readers(&opened, "after the commit")?;

    // The child's manifest names new objects; nothing it named before was rewritten.
    assert_eq!(folded.parent, None);
    assert_ne!(folded.image.object, p1.image.object);
    assert!(
        folded.image.object.starts_with("p1.fold-"),
        "{}",
        folded.image.object
    );
    assert_eq!(folded.image.size, merged.len() as u64);
    let checksums = folded
        .files
        .iter()
        .find(|file| file.name.as_str() == "checksums")
        .ok_or("no checksums")?;
    assert!(checksums.object.is_some(), "{checksums:?}");
    assert_eq!(
        &f.target.read_file(&v, &p1.id, &"checksums".parse()?)?[..],
        b"new"
    );
    assert_eq!(
        &f.target.read_file(&v, &p1.id, &"digests".parse()?)?[..],
        b"p1"
    );
    let listed: Vec<_> = f.target.backups(&v)?.into_iter().map(|m| m.id).collect();
    assert_eq!(listed, vec![p1.id.clone(), p2.id.clone()]);
    assert!(matches!(
        f.target.backup(&v, &p0.id),
        Err(Error::NotFound { .. })
    ));
    for (id, point) in [(&p1.id, &points[1]), (&p2.id, &points[2])] {
        assert!(
            restore(&f.target, &v, id)? == point.raw,
            "fresh restore of {id}"
        );
    }
    f.target.verify_image(&v, &p1.id)?;

    // Within the grace period gc leaves the superseded objects to the readers.
    assert!(f.target.gc(Duration::from_secs(3600))?.removed.is_empty());
    check_readers(&opened, "after a gc within the grace period")?;
    stop.store(true, Ordering::SeqCst);
    background.join().map_err(|_| "reader thread panicked")??;
    assert!(rounds.load(Ordering::SeqCst) > 0);

    if let Some(folder) = f.target.local_image_dir(&v) {
        // qemu-img follows p2 -> p1.qcow2, which is now the merged image standing alone.
        assert_eq!(qemu_chain_len(&folder, &p2.id)?, 2);
        assert_eq!(qemu_chain_len(&folder, &p1.id)?, 1);
        qemu_compare(&folder, &p2.id, &points[2].raw)?;
        qemu_compare(&folder, &p1.id, &points[1].raw)?;
    }

    // After the grace period gc removes what the fold superseded, and nothing still needed.
    let removed: BTreeSet<String> = f.target.gc(Duration::ZERO)?.removed.into_iter().collect();
    let prefix = removed
        .iter()
        .find_map(|k| k.split_once("volumes/fold/").map(|(p, _)| p.to_string()))
        .ok_or("nothing removed")?;
    let mut expected: BTreeSet<String> = [
        "images/p0.qcow2",
        "files/p0/digests",
        "files/p0/checksums",
        "files/p1/checksums",
    ]
    .iter()
    .map(|k| format!("{prefix}volumes/fold/{k}"))
    .collect();
    if f.kind != Kind::Local {
        // On a folder p1.qcow2 is the merged image's second name; elsewhere the old object.
        expected.insert(format!("{prefix}volumes/fold/images/p1.qcow2"));
    }
    let retired: Vec<_> = removed.iter().filter(|k| k.contains("/retired/")).collect();
    assert_eq!(retired.len(), 1, "{removed:?}");
    let removed: BTreeSet<String> = removed
        .iter()
        .filter(|k| !k.contains("/retired/"))
        .cloned()
        .collect();
    assert_eq!(removed, expected);
    assert!(f.target.gc(Duration::ZERO)?.removed.is_empty());
    for (id, point) in [(&p1.id, &points[1]), (&p2.id, &points[2])] {
        assert!(
            restore(&f.target, &v, id)? == point.raw,
            "restore of {id} after gc"
        );
    }
    if let Some(folder) = f.target.local_image_dir(&v) {
        assert_eq!(qemu_chain_len(&folder, &p2.id)?, 2);
        qemu_compare(&folder, &p2.id, &points[2].raw)?;
        // Readers on a folder hold their files open: even gc does not take them away.
        check_readers(&opened, "after gc, on a folder")?;
    }
    Ok(())
}

fn faulty_options() -> TargetOptions {
    let mut options = TargetOptions::default();
    // Big parts and reads keep the request count of a fold (one run per request) small.
    options.min_part_size = 64 << 10;
    options.part_size = 8 << 20;
    options.read_block_size = 1 << 20;
    options.max_request = 4 << 20;
    options.max_readahead = 4 << 20;
    options.retry = RetryPolicy {
        attempts: 1,
        first_backoff: Duration::from_millis(1),
    };
    // A killed fold's lease lapses quickly, so recovery waits little for it.
    options.lease = Duration::from_millis(300);
    options
}

/// A chain p0 <- p1 <- p2 <- p3 on a fresh fault-injecting store.
fn faulty_chain(
    ids: &[String],
    points: &[Point],
) -> Result<(Arc<FaultyStore>, Target, Vec<BackupManifest>), common::BoxError> {
    let store = Arc::new(FaultyStore::default());
    let target = Target::from_store(store.clone(), "repo", faulty_options())?;
    let manifests = store_chain(&target, &VolumeName::new("fold")?, ids, points)?;
    Ok((store, target, manifests))
}

/// Folds p1 into p2 (p0 stays below), streaming `merged`.
fn fold_p1(target: &Target, merged: &[u8]) -> strata_target::Result<BackupManifest> {
    let v = VolumeName::new("fold")?;
    target.fold_into_child(&v, &"p1".parse()?, |mut sink, backing| {
        assert_eq!(backing.as_deref(), Some("p0.qcow2"));
        stream_into(&mut sink, merged).map_err(|e| Error::Upload {
            path: "merged".into(),
            reason: e.to_string(),
        })?;
        Ok(vec![(
            "checksums".parse()?,
            bytes::Bytes::from_static(b"merged").into(),
        )])
    })
}

/// Every committed point restores to its bytes; returns the committed ids.
fn check_points(
    target: &Target,
    points: &[Point],
    when: &str,
) -> Result<Vec<String>, common::BoxError> {
    let v = VolumeName::new("fold")?;
    let mut committed = Vec::new();
    for manifest in target.backups(&v)? {
        let index: usize = manifest.id.as_str().trim_start_matches('p').parse()?;
        let raw = restore(target, &v, &manifest.id)
            .map_err(|e| format!("{} {when}: {e}", manifest.id))?;
        assert!(raw == points[index].raw, "point {} {when}", manifest.id);
        target.verify_image(&v, &manifest.id)?;
        committed.push(manifest.id.to_string());
    }
    Ok(committed)
}

/// Keys in the store beyond what the committed backups need.
async fn stray_keys(store: &FaultyStore, target: &Target) -> Result<Vec<String>, common::BoxError> {
    let v = VolumeName::new("fold")?;
    let mut wanted = BTreeSet::from(["repo/strata-repository.json".to_string()]);
    for m in target.backups(&v)? {
        wanted.insert(format!("repo/volumes/fold/backups/{}.json", m.id));
        wanted.insert(format!("repo/volumes/fold/claims/{}.json", m.id));
        if let Some(parent) = &m.parent {
            wanted.insert(format!("repo/volumes/fold/children/{parent}.json"));
        }
        wanted.insert(format!("repo/volumes/fold/images/{}", m.image.object));
        for file in &m.files {
            let object = file.object.clone().unwrap_or_else(|| file.name.to_string());
            wanted.insert(format!("repo/volumes/fold/files/{}/{object}", m.id));
        }
    }
    let all: Vec<_> = store.list(Some(&Key::from("repo"))).try_collect().await?;
    Ok(all
        .into_iter()
        .map(|meta| meta.location.to_string())
        .filter(|k| !wanted.contains(k))
        .collect())
}

/// A fold killed at every request in turn (that request and every later one fail, as when the
/// process dies there, so not even its own cleanup runs): every committed point still restores
/// byte for byte, the next recovery finishes the fold (when the child's manifest was switched)
/// or rolls it back, a fold after a roll back succeeds, and gc then leaves nothing behind.
#[test]
fn a_fold_killed_at_any_request_leaves_every_point_restorable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ids = ids(4);
    let points = make_chain(dir.path(), &ids)?;
    let merged = merged_image(dir.path(), &ids, 1)?;
    let v = VolumeName::new("fold")?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;

    let (store, target, _) = faulty_chain(&ids, &points)?;
    let before = store.requests();
    fold_p1(&target, &merged)?;
    // The last request, the release of the fold's writer record, is best effort: a fold that
    // fails there has committed and says so.
    let requests = store.requests() - before - 1;
    assert!(
        requests > 10,
        "fold too short to be interesting: {requests}"
    );
    eprintln!("a fold of p1 into p2 takes {requests} requests");
    assert_eq!(
        check_points(&target, &points, "after a clean fold")?,
        ["p0", "p2", "p3"]
    );
    assert!(
        runtime
            .block_on(stray_keys(&store, &target))?
            .iter()
            .all(|k| k.contains("/retired/")
                || k.ends_with("images/p1.qcow2")
                || k.ends_with("images/p2.qcow2")
                || k.contains("files/p1/")
                || k.ends_with("files/p2/checksums"))
    );

    let (mut forward, mut back) = (0, 0);
    for n in 1..=requests {
        let (store, target, _) = faulty_chain(&ids, &points)?;
        store.fail_next(n, 1 << 40);
        let outcome = fold_p1(&target, &merged);
        store.set_plan(Plan::default());
        assert!(
            outcome.is_err(),
            "request {n}: the fold survived its own death"
        );
        let when = format!("after a kill at request {n}");
        let committed = check_points(&target, &points, &when)?;
        assert!(
            committed.starts_with(&["p0".to_string()]),
            "{when}: {committed:?}"
        );
        assert!(
            committed.ends_with(&["p2".to_string(), "p3".to_string()]),
            "{when}: {committed:?}"
        );

        // The next prune starts with recovery.
        let finished = target.recover_folds(&v, Duration::ZERO)?;
        let committed: Vec<_> = target.backups(&v)?.into_iter().map(|m| m.id).collect();
        if finished.is_empty() {
            back += 1;
            assert_eq!(committed, ["p0", "p1", "p2", "p3"].map(bid), "{when}");
            fold_p1(&target, &merged)?;
        } else {
            forward += 1;
            assert_eq!(finished, vec![bid("p1")], "{when}");
        }
        assert_eq!(
            check_points(&target, &points, &format!("folded {when}"))?,
            ["p0", "p2", "p3"]
        );
        assert_eq!(target.backup(&v, &bid("p2"))?.parent, Some(bid("p0")));
        // p0's one child is p2 now: another overlay on p0 is refused.
        assert!(matches!(
            target.begin_backup(&v, common::spec(Some(&target.backup(&v, &bid("p0"))?))),
            Err(Error::ParentNotHead { .. })
        ));
        target.gc(Duration::ZERO)?;
        let p3 = restore(&target, &v, &bid("p3"))?;
        assert!(p3 == points[3].raw, "p3 after gc {when}");
        // The killed fold's writer record is removed by a gc once its lease has lapsed twice
        // (tests/cli_faults.rs checks that); everything else must be gone now.
        let stray: Vec<String> = runtime
            .block_on(stray_keys(&store, &target))?
            .into_iter()
            .filter(|k| !k.contains("/writers/fold-"))
            .collect();
        assert!(stray.is_empty(), "{when}: left behind {stray:?}");
    }
    assert!(forward > 0 && back > 0, "forward {forward}, back {back}");
    Ok(())
}

/// The switch is a conditional put where the store has one (memory here): a child manifest
/// changed after the fold read it makes the fold fail and roll back, never overwrite it.
#[test]
fn a_child_manifest_changed_during_the_fold_is_not_overwritten() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ids = ids(4);
    let points = make_chain(dir.path(), &ids)?;
    let merged = merged_image(dir.path(), &ids, 1)?;
    let (store, target, manifests) = faulty_chain(&ids, &points)?;
    let v = VolumeName::new("fold")?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let key = Key::from("repo/volumes/fold/backups/p2.json");
    let outcome = target.fold_into_child(&v, &"p1".parse()?, |mut sink, _| {
        // Someone rewrites the child's manifest (same bytes, a new version) meanwhile.
        let bytes = serde_json::to_vec_pretty(&manifests[2]).unwrap_or_default();
        runtime
            .block_on(store.put(&key, bytes.into()))
            .map_err(|e| Error::Upload {
                path: key.to_string(),
                reason: e.to_string(),
            })?;
        stream_into(&mut sink, &merged).map_err(|e| Error::Upload {
            path: "merged".into(),
            reason: e.to_string(),
        })?;
        Ok(Vec::new())
    });
    assert!(
        matches!(
            outcome,
            Err(Error::Store {
                operation: "switch the manifest",
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!(target.backup(&v, &bid("p2"))?, manifests[2]);
    assert_eq!(
        check_points(&target, &points, "after the lost switch")?,
        ["p0", "p1", "p2", "p3"]
    );
    assert!(runtime.block_on(stray_keys(&store, &target))?.is_empty());
    fold_p1(&target, &merged)?;
    assert_eq!(
        check_points(&target, &points, "after the fold")?,
        ["p0", "p2", "p3"]
    );
    Ok(())
}

/// Folds p0 into p1 of a 3-deep chain and, while its intent stands, tries a fold of
/// `second`: it is refused, naming p0's fold. The first fold commits; the refused one left
/// no intent behind, and p2 reads as it did.
fn a_second_fold_while_p0_folds(second: &str) -> TestResult {
    let dir = tempfile::tempdir()?;
    let ids = ids(3);
    let points = make_chain(dir.path(), &ids)?;
    let merged = merged_image(dir.path(), &ids, 0)?;
    let f = fixture(Kind::Local);
    let v = VolumeName::new("fold")?;
    store_chain(&f.target, &v, &ids, &points)?;
    let other = f.reopen();
    let second: BackupId = second.parse()?;
    let folded = f
        .target
        .fold_into_child(&v, &"p0".parse()?, |mut sink, _| {
            let refused = other.fold_into_child(&v, &second, |_, _| Ok(Vec::new()));
            assert!(
                matches!(refused, Err(Error::FoldInProgress { ref parent, .. }) if parent == "p0"),
                "{refused:?}"
            );
            stream_into(&mut sink, &merged).map_err(|e| Error::Upload {
                path: "merged".into(),
                reason: e.to_string(),
            })?;
            Ok(Vec::new())
        })?;
    assert_eq!(folded.parent, None);
    assert!(
        other
            .recover_folds(&v, std::time::Duration::ZERO)?
            .is_empty()
    );
    assert!(restore(&f.target, &v, &bid("p2"))? == points[2].raw);
    Ok(())
}

/// A second fold of the same parent is refused while the first one's intent stands.
#[test]
fn a_second_fold_of_the_same_parent_is_refused() -> TestResult {
    a_second_fold_while_p0_folds("p0")
}

/// A fold of another parent of the same volume is refused while the first one's intent
/// stands: folding p1 into p2 while p0 is folded into p1 would merge p1 as it was before the
/// first fold, over the backing file the first one removes.
#[test]
fn a_fold_of_a_neighbouring_parent_waits_for_the_first() -> TestResult {
    a_second_fold_while_p0_folds("p1")
}
