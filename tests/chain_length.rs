//! One chain-length policy: a year of daily incrementals without prune stays restorable, because
//! a backup that would make its chain longer than `BackupOptions::max_chain_length` is taken
//! full, and no option lets a chain grow past what every reader of this build opens.

use std::os::unix::fs::FileExt;

use strata::target::{BackupId, BackupSpec, Error, Target, VolumeName};

const CLUSTER: u64 = 64 << 10;
const CLUSTERS: u64 = 16;

fn restore(target: &Target, volume: &VolumeName, id: &BackupId) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp");
    strata::restore_volume(target, volume, Some(id), out.path(), &mut |_| {}).expect("restore");
    std::fs::read(out.path()).expect("read")
}

/// Day `day`'s change: two clusters rewritten with bytes naming the day.
fn change(volume: &std::fs::File, day: u64) {
    for k in 0..2 {
        let index = (day * 7 + k * 5) % CLUSTERS;
        let byte = (day % 251) as u8 + 1;
        let mut bytes = vec![byte; CLUSTER as usize];
        bytes[..8].copy_from_slice(&day.to_be_bytes());
        volume
            .write_all_at(&bytes, index * CLUSTER)
            .expect("write volume");
    }
}

#[test]
fn three_hundred_daily_incrementals_without_prune_all_restore() {
    let target = Target::open("memory://").expect("memory target");
    let volume = VolumeName::new("daily").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(CLUSTERS * CLUSTER).expect("size");
    let options = strata::BackupOptions::default();
    assert_eq!(options.max_chain_length, strata::DEFAULT_MAX_CHAIN_LENGTH);
    let mut points = Vec::new();
    for day in 0..300u64 {
        change(file.as_file(), day);
        let manifest =
            strata::backup_volume(&target, &volume, file.as_file(), &options, &mut |_| {})
                .expect("backup");
        let length = target.chain_length(&manifest).expect("chain length");
        // Days 0, 64, 128, ... start a new chain; the others extend the previous day's.
        let expected_length = (day % 64) as usize + 1;
        assert_eq!(length, expected_length, "day {day}");
        assert_eq!(manifest.parent.is_none(), day % 64 == 0, "day {day}");
        assert_eq!(
            manifest.full_reason.is_some(),
            day > 0 && day % 64 == 0,
            "day {day}: {:?}",
            manifest.full_reason
        );
        points.push((manifest.id, std::fs::read(file.path()).expect("read")));
    }
    for (day, (id, expected)) in points.iter().enumerate() {
        assert!(restore(&target, &volume, id) == *expected, "day {day}");
    }
    let reports = strata::verify(&target, Some(&volume), None).expect("verify");
    assert_eq!(reports.len(), 300);
    for report in &reports {
        assert!(
            report.damage.is_empty(),
            "{}: {:?}",
            report.id,
            report.damage
        );
    }
}

#[test]
fn no_option_builds_a_chain_the_readers_refuse() {
    let target = Target::open("memory://").expect("memory target");
    let volume = VolumeName::new("long").expect("name");
    let file = tempfile::NamedTempFile::new().expect("volume");
    file.as_file().set_len(CLUSTERS * CLUSTER).expect("size");
    let options = strata::BackupOptions {
        max_chain_length: usize::MAX,
        ..Default::default()
    };
    let limit = strata::target::MAX_CHAIN_DEPTH;
    assert_eq!(limit, strata::qcow2::DEFAULT_MAX_DEPTH);
    let mut last = None;
    for day in 0..=limit as u64 {
        change(file.as_file(), day);
        let manifest =
            strata::backup_volume(&target, &volume, file.as_file(), &options, &mut |_| {})
                .expect("backup");
        if day == limit as u64 {
            assert_eq!(manifest.parent, None, "the backup past the limit is full");
            let reason = manifest.full_reason.clone().expect("a reason");
            assert!(reason.contains(&format!("limit is {limit}")), "{reason}");
        } else {
            assert_eq!(manifest.parent.is_some(), day > 0);
            last = Some(manifest);
        }
    }
    // The longest chain restores, and the target itself refuses to extend it.
    let last = last.expect("the 128th backup");
    assert_eq!(target.chain_length(&last).expect("length"), limit);
    assert_eq!(target.chain(&volume, &last.id).expect("chain").len(), limit);
    restore(&target, &volume, &last.id);
    let refused = target.begin_backup(
        &volume,
        BackupSpec {
            id: None,
            parent: Some(last.id.clone()),
            virtual_size: CLUSTERS * CLUSTER,
            cluster_size: CLUSTER,
        },
    );
    assert!(
        matches!(refused, Err(Error::ChainTooLong { length, .. }) if length == limit),
        "{refused:?}"
    );
}
