//! The volume flows on an object-store target (memory://, which takes the multipart path):
//! backups, restores of every point, retention folding, verify.

use std::os::unix::fs::FileExt;

use strata::target::{Target, VolumeName};

fn restore(target: &Target, volume: &VolumeName, id: &strata::target::BackupId) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp");
    strata::restore_volume(target, volume, Some(id), out.path(), &mut |_| {}).expect("restore");
    std::fs::read(out.path()).expect("read")
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
        file.as_file()
            .write_all_at(&vec![byte; len as usize], offset)
            .expect("write");
        let manifest = strata::backup_volume(
            &target,
            &volume,
            file.as_file(),
            &Default::default(),
            &mut |_| {},
        )
        .expect("backup");
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
