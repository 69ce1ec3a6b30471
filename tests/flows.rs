//! The volume flows on an object-store target (memory://, which takes the multipart path):
//! backups, restores of every point, retention folding, verify.

use std::os::unix::fs::FileExt;

use strata::target::{Target, VolumeName};

fn restore(target: &Target, volume: &VolumeName, id: &strata::target::BackupId) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp");
    strata::restore_volume(target, volume, Some(id), out.path(), &mut |_| {}).expect("restore");
    std::fs::read(out.path()).expect("read")
}

/// Writes `len` bytes of `byte` at `offset` of the volume, then backs it up.
fn write_and_back_up(
    target: &Target,
    volume: &VolumeName,
    file: &std::fs::File,
    offset: u64,
    len: u64,
    byte: u8,
) -> strata::target::BackupManifest {
    file.write_all_at(&vec![byte; len as usize], offset)
        .expect("write");
    strata::backup_volume(target, volume, file, &Default::default(), &mut |_| {}).expect("backup")
}

#[test]
fn backups_prune_and_restore_on_an_object_store() {
    let target = Target::open("memory://").expect("memory target");
    let volume = VolumeName::new("db").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(12 << 20).expect("size");
    let mut points = Vec::new();
    for (i, (offset, len, byte)) in [
        (0u64, 5u64 << 20, 1u8),
        (2 << 20, 64 << 10, 2),
        (10 << 20, 1 << 20, 3),
        (0, 1 << 20, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let manifest = write_and_back_up(&target, &volume, file.as_file(), offset, len, byte);
        assert_eq!(manifest.parent.is_some(), i > 0);
        points.push((manifest.id, std::fs::read(file.path()).expect("read")));
    }
    for (id, expected) in &points {
        assert!(restore(&target, &volume, id) == *expected, "point {id}");
    }
    let pruned = strata::prune(&target, &volume, 2).expect("prune");
    assert_eq!(
        pruned.removed,
        vec![points[0].0.clone(), points[1].0.clone()]
    );
    assert_eq!(pruned.being_read, []);
    let kept = strata::list(&target, Some(&volume)).expect("list");
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].id, points[2].0);
    assert_eq!(kept[0].parent, None);
    for (id, expected) in &points[2..] {
        assert!(
            restore(&target, &volume, id) == *expected,
            "point {id} after prune"
        );
    }
    let reports = strata::verify(&target, Some(&volume), None).expect("verify");
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.damage.is_empty()), "{reports:?}");
    // A further incremental goes on the latest kept point.
    file.as_file().write_all_at(&[9; 4096], 0).expect("write");
    let next = strata::backup_volume(
        &target,
        &volume,
        file.as_file(),
        &Default::default(),
        &mut |_| {},
    )
    .expect("backup after prune");
    assert_eq!(next.parent.as_ref(), Some(&points[3].0));
    assert!(restore(&target, &volume, &next.id) == std::fs::read(file.path()).expect("read"));
}

/// A restore that opened its chains before a prune reads every point byte for byte while the
/// prune folds (on a folder target, where the merged images get new files and the canonical
/// names are re-pointed) and after it; fresh restores of the kept points agree, and a gc within
/// the grace period removes nothing.
#[test]
fn restores_opened_before_a_prune_read_every_point_unchanged() {
    let dir = tempfile::tempdir().expect("folder");
    let target = Target::open(dir.path().to_str().expect("utf-8")).expect("folder target");
    let volume = VolumeName::new("web").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(8 << 20).expect("size");
    let mut points = Vec::new();
    for (offset, byte) in [(0u64, 1u8), (1 << 20, 2), (3 << 20, 3), (6 << 20, 4)] {
        let manifest = write_and_back_up(&target, &volume, file.as_file(), offset, 1 << 20, byte);
        points.push((manifest.id, std::fs::read(file.path()).expect("read")));
    }
    let opened: Vec<_> = points
        .iter()
        .map(|(id, expected)| {
            let (_, image) = strata::open_backup(&target, &volume, Some(id)).expect("open");
            (id.clone(), image, expected.clone())
        })
        .collect();
    let read_all = |when: &str| {
        for (id, image, expected) in &opened {
            let out = tempfile::NamedTempFile::new().expect("temp");
            strata::qcow2::hydrate(image, out.as_file(), "out").expect("hydrate");
            assert!(
                std::fs::read(out.path()).expect("read") == *expected,
                "point {id} {when}"
            );
        }
    };
    let removed = std::thread::scope(|scope| {
        let prune = scope.spawn(|| strata::prune(&target, &volume, 2));
        while !prune.is_finished() {
            read_all("while the prune runs");
        }
        prune.join().expect("prune thread")
    })
    .expect("prune");
    assert_eq!(
        removed.removed,
        vec![points[0].0.clone(), points[1].0.clone()]
    );
    read_all("after the prune");
    for (id, expected) in &points[2..] {
        assert!(
            restore(&target, &volume, id) == *expected,
            "fresh restore of {id}"
        );
    }
    assert!(
        target
            .gc(std::time::Duration::from_secs(3600))
            .expect("gc")
            .removed
            .is_empty()
    );
    read_all("after a gc within the grace period");
    let reports = strata::verify(&target, Some(&volume), None).expect("verify");
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.damage.is_empty()), "{reports:?}");
}

/// Retention keeps a backup a live reader reads when it would have to delete it (a chain of
/// its own with nothing built on it), and still removes the other backups past `keep_last`:
/// with backups A (a chain of its own), B (a new chain) and B1 on B, and a reader of A,
/// `prune` keeping one folds B into B1 and keeps A, saying so; once the reader is done, the
/// next prune deletes A. Every kept point restores.
#[test]
fn prune_keeps_a_backup_being_read_and_removes_the_others() {
    let target = Target::open("memory://").expect("memory target");
    let volume = VolumeName::new("db").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(4 << 20).expect("size");
    let a = write_and_back_up(&target, &volume, file.as_file(), 0, 1 << 20, 1);
    let a_bytes = std::fs::read(file.path()).expect("read");
    file.as_file()
        .write_all_at(&[2; 1 << 20], 1 << 20)
        .expect("write");
    let full = strata::BackupOptions {
        full: true,
        ..Default::default()
    };
    let b = strata::backup_volume(&target, &volume, file.as_file(), &full, &mut |_| {})
        .expect("full backup");
    assert_eq!(b.parent, None);
    let b1 = write_and_back_up(&target, &volume, file.as_file(), 3 << 20, 4096, 3);
    assert_eq!(b1.parent.as_ref(), Some(&b.id));
    let b1_bytes = std::fs::read(file.path()).expect("read");
    let (_, image, lease) =
        strata::open_backup_leased(&target, &volume, Some(&a.id)).expect("open A");
    assert!(lease.is_some(), "no reader recorded");
    let pruned = strata::prune(&target, &volume, 1).expect("prune");
    assert_eq!(pruned.removed, std::slice::from_ref(&b.id));
    assert_eq!(pruned.being_read, std::slice::from_ref(&a.id));
    let ids: Vec<_> = strata::list(&target, Some(&volume))
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [a.id.clone(), b1.id.clone()]);
    let mut read = vec![0; a_bytes.len()];
    image.read_at(&mut read, 0).expect("read A");
    assert!(read == a_bytes, "A reads other bytes");
    drop(lease);
    let pruned = strata::prune(&target, &volume, 1).expect("prune");
    assert_eq!(pruned.removed, std::slice::from_ref(&a.id));
    assert_eq!(pruned.being_read, []);
    assert!(restore(&target, &volume, &b1.id) == b1_bytes);
}

/// Changed ranges are used only over the backup they are since: decided once the new backup's
/// parent is fixed (another backup may commit between the caller's look and the backup), and
/// digests are compared otherwise.
#[test]
fn changed_ranges_since_another_backup_than_the_parent_are_not_used() {
    let target = Target::open("memory://").expect("memory target");
    let volume = VolumeName::new("db").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(4 << 20).expect("size");
    let base = write_and_back_up(&target, &volume, file.as_file(), 0, 4096, 1);
    let second = write_and_back_up(&target, &volume, file.as_file(), 1 << 20, 4096, 2);
    // Ranges saying nothing changed, over each backup in turn.
    let over = |since: &strata::target::BackupId, byte: u8| {
        file.as_file()
            .write_all_at(&[byte; 4096], 2 << 20)
            .expect("write");
        let options = strata::BackupOptions {
            changed_ranges: Some(Vec::new()),
            changed_since: Some(since.clone()),
            ..Default::default()
        };
        strata::backup_volume(&target, &volume, file.as_file(), &options, &mut |_| {})
            .expect("backup")
    };
    // Since the base, not the parent: digests find the change.
    let third = over(&base.id, 3);
    assert_eq!(third.parent.as_ref(), Some(&second.id));
    assert!(restore(&target, &volume, &third.id) == std::fs::read(file.path()).expect("read"));
    // Since the parent: the ranges are trusted, so the unlisted change is not seen.
    let fourth = over(&third.id, 4);
    assert_eq!(restore(&target, &volume, &fourth.id)[2 << 20], 3);
}
