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
    let removed = strata::prune(&target, &volume, 2).expect("prune");
    assert_eq!(removed, vec![points[0].0.clone(), points[1].0.clone()]);
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

/// A fold that stopped after the child's image was replaced (a crash before its manifest was
/// switched) is finished by the next prune before anything else is folded: folding the oldest
/// point first would delete the image the child now stands on.
#[test]
fn prune_finishes_a_fold_interrupted_after_the_image_was_replaced() {
    let dir = tempfile::tempdir().expect("folder");
    let target = Target::open(dir.path().to_str().expect("utf-8")).expect("folder target");
    let volume = VolumeName::new("web").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(8 << 20).expect("size");
    let mut points = Vec::new();
    for (offset, byte) in [(0u64, 1u8), (1 << 20, 2), (3 << 20, 3)] {
        let manifest = write_and_back_up(&target, &volume, file.as_file(), offset, 1 << 20, byte);
        points.push((manifest, std::fs::read(file.path()).expect("read")));
    }
    // The first half of a fold of point 1 into point 2: point 2's image replaced by the merge
    // of both over point 0; manifests, side files and point 1 left as they were.
    let (base, child) = (&points[0].0, &points[2].0);
    let images = target.local_image_dir(&volume).expect("folder target");
    let merged = {
        let chain = strata::qcow2::Image::open(images.join(&child.image.object)).expect("open");
        let mut options = strata::qcow2::WriterOptions::default();
        options.cluster_size = child.cluster_size;
        options.backing_file = Some(strata::target::image_name(&base.id));
        let sink = strata::qcow2::MemorySink::default();
        let (sink, _, _) = strata::chain::merge(&chain, sink, &options).expect("merge");
        sink.into_image().expect("finished")
    };
    std::fs::write(images.join(&child.image.object), &merged).expect("replace");

    let removed = strata::prune(&target, &volume, 2).expect("prune");
    assert_eq!(removed, vec![points[1].0.id.clone()]);
    let kept = strata::list(&target, Some(&volume)).expect("list");
    let ids: Vec<_> = kept.iter().map(|m| (&m.id, m.parent.as_ref())).collect();
    assert_eq!(ids, vec![(&base.id, None), (&child.id, Some(&base.id))]);
    assert_eq!(
        kept[1].image.size,
        merged.len() as u64,
        "image not merged again"
    );
    for (manifest, expected) in [&points[0], &points[2]] {
        assert!(
            restore(&target, &volume, &manifest.id) == *expected,
            "point {} after prune",
            manifest.id
        );
    }
    let reports = strata::verify(&target, Some(&volume), None).expect("verify");
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.damage.is_empty()), "{reports:?}");
}
