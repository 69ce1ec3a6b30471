//! Volumes whose size changes between backups, through the library's volume flows: a shrink
//! then a grow restores (checked) before and after a fold of the middle backup; growth from a
//! size that is not whole clusters, by changed ranges, restores; and a file that is not whole
//! 512-byte sectors is refused before anything is stored.

use std::os::unix::fs::FileExt;

use strata::target::{AppBackupId, AppName, Target, VolumeBackupRef, VolumeName};

const MIB: u64 = 1 << 20;

#[test]
fn a_shrink_then_a_grow_restores_before_and_after_folding_the_middle_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Target::open(dir.path().join("t").to_str().expect("utf-8")).expect("target");
    let volume = VolumeName::new("v").expect("name");
    let raw = dir.path().join("vol.raw");
    let file = std::fs::File::create(&raw).expect("volume");
    file.set_len(2 * MIB).expect("size");
    file.write_all_at(&[b'A'; 65536], 0).expect("write");
    file.write_all_at(&[b'G'; 65536], 1536 << 10)
        .expect("write");
    let backup = || {
        let source = strata::open_volume(&raw).expect("open");
        strata::backup_volume(&target, &volume, &source, &Default::default(), &mut |_| {})
            .expect("backup")
            .id
    };
    backup();
    file.set_len(MIB).expect("shrink");
    let middle = backup();
    file.set_len(2 * MIB).expect("grow");
    let top = backup();
    let expected = std::fs::read(&raw).expect("volume");
    let restore = |name: &str| {
        let dest = dir.path().join(name);
        strata::restore_volume(&target, &volume, Some(&top), &dest, &mut |_| {})
            .map_err(|e| strata::chain_text(&e))
            .expect("restore");
        std::fs::read(&dest).expect("restored")
    };
    assert!(restore("before.raw") == expected, "before the fold");

    // An application backup naming the middle backup expires: it is folded into the top.
    let app = AppName::new("shop").expect("name");
    let id = AppBackupId::new("a1").expect("id");
    let refs = vec![VolumeBackupRef {
        volume: volume.clone(),
        backup: middle.clone(),
    }];
    target
        .put_app_backup(&app, &id, refs.clone(), b"x".to_vec().into())
        .expect("app backup");
    strata::delete_app_backup(&target, &app, &id, &refs).expect("fold");
    let chain: Vec<_> = target
        .chain(&volume, &top)
        .expect("chain")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(!chain.contains(&middle), "the middle backup was not folded");
    let after = restore("after.raw");
    assert_eq!(
        after.iter().zip(&expected).position(|(a, b)| a != b),
        None,
        "after the fold"
    );
}

#[test]
fn growth_from_a_size_that_is_not_whole_clusters_restores_by_changed_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Target::open(dir.path().join("t").to_str().expect("utf-8")).expect("target");
    let volume = VolumeName::new("g").expect("name");
    let raw = dir.path().join("g.raw");
    std::fs::write(&raw, vec![b'A'; 100 << 10]).expect("volume");
    let backup = |options: &strata::BackupOptions| {
        let source = strata::open_volume(&raw).expect("open");
        strata::backup_volume(&target, &volume, &source, options, &mut |_| {})
            .expect("backup")
            .id
    };
    backup(&Default::default());
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .expect("open")
        .set_len(MIB)
        .expect("grow");
    let grown = backup(&strata::BackupOptions {
        changed_ranges: Some(vec![]),
        ..Default::default()
    });
    let dest = dir.path().join("out.raw");
    strata::restore_volume(&target, &volume, Some(&grown), &dest, &mut |_| {})
        .map_err(|e| strata::chain_text(&e))
        .expect("restore");
    assert!(std::fs::read(&dest).expect("restored") == std::fs::read(&raw).expect("volume"));
    let reports = strata::verify(&target, Some(&volume), None).expect("verify");
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.damage.is_empty()), "{reports:?}");
}

#[test]
fn a_file_that_is_not_whole_sectors_is_refused_before_anything_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Target::open(dir.path().join("t").to_str().expect("utf-8")).expect("target");
    let volume = VolumeName::new("odd").expect("name");
    let raw = dir.path().join("odd.raw");
    std::fs::write(&raw, b"abc").expect("volume");
    let source = strata::open_volume(&raw).expect("open");
    let err = strata::backup_volume(&target, &volume, &source, &Default::default(), &mut |_| {})
        .expect_err("3 bytes");
    let text = strata::chain_text(&err);
    assert!(
        text.contains("3 bytes is not a whole number of 512-byte sectors"),
        "{text}"
    );
    assert!(target.backups(&volume).expect("list").is_empty());
}
