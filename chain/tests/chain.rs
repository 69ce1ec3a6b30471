//! Backup chains end to end on a local folder: every point restores byte-identical, overlays
//! stay bounded by the changed clusters, change sources agree, merge keeps points restorable,
//! verify finds damage; checked with strata's reader and with qemu-img.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use strata_chain::{
    BackupOutcome, ByteRange, ChangeSource, ClusterChecksums, DigestAlgorithm, DigestManifest,
    backup, merge, verify,
};
use strata_qcow2::{FileSink, Image, WriterOptions, hydrate};

const CLUSTER: u64 = 65536;

/// A change to the volume between backups.
#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
}

fn apply(volume: &Path, changes: &[Change]) -> Vec<ByteRange> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(volume)
        .expect("open volume");
    let size = file.metadata().expect("stat").len();
    changes
        .iter()
        .map(|c| {
            let (offset, len, byte) = match *c {
                Change::Write { offset, len, byte } => (offset, len, byte),
                Change::Zero { offset, len } => (offset, len, 0),
            };
            let offset = offset % size;
            let len = len.min(size - offset);
            file.write_all_at(&vec![byte; len as usize], offset)
                .expect("write");
            ByteRange {
                offset,
                length: len,
            }
        })
        .collect()
}

struct Repo {
    dir: PathBuf,
    images: Vec<String>,
    digests: Vec<DigestManifest>,
    checksums: Vec<ClusterChecksums>,
    /// Digests of a new chain.
    algorithm: DigestAlgorithm,
}

impl Repo {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            images: Vec::new(),
            digests: Vec::new(),
            checksums: Vec::new(),
            algorithm: DigestAlgorithm::Blake3,
        }
    }

    fn options(&self) -> WriterOptions {
        let mut options = WriterOptions::default();
        options.cluster_size = CLUSTER;
        options.backing_file = self.images.last().cloned();
        options
    }

    /// Takes the next backup with `source` (Full when `source` is None on the first).
    fn take(&mut self, volume: &Path, mode: &str, ranges: &[ByteRange]) -> BackupOutcome {
        let name = format!("{}.qcow2", self.images.len());
        let options = self.options();
        let previous_chain = self
            .images
            .last()
            .map(|n| Image::open(self.dir.join(n)).expect("previous chain"));
        let source = match (mode, self.digests.last(), previous_chain.as_ref()) {
            (_, None, _) | ("full", _, _) => ChangeSource::Full,
            ("digest", Some(previous), _) => ChangeSource::Digests { previous },
            ("ranges", Some(previous), _) => ChangeSource::ChangedRanges {
                ranges,
                previous: Some(previous),
            },
            ("compare", _, Some(previous)) => ChangeSource::Compare { previous },
            other => panic!("unknown mode {other:?}"),
        };
        let sink = FileSink::create(self.dir.join(&name)).expect("sink");
        let volume = File::open(volume).expect("volume");
        let mut calls = 0;
        let (_, outcome) = backup(&volume, sink, &options, source, self.algorithm, &mut |_| {
            calls += 1
        })
        .expect("backup");
        assert!(calls > 0, "progress was never reported");
        self.images.push(name);
        let digests = outcome.digests.encode().expect("digests");
        let checksums = outcome.checksums.encode().expect("checksums");
        self.digests
            .push(DigestManifest::decode(&digests).expect("digests"));
        self.checksums
            .push(ClusterChecksums::decode(&checksums).expect("checksums"));
        outcome
    }

    fn restore(&self, point: usize) -> Vec<u8> {
        let image = Image::open(self.dir.join(&self.images[point])).expect("open point");
        let out = tempfile::tempfile().expect("temp");
        hydrate(&image, &out, "restore").expect("hydrate");
        let mut bytes = vec![0u8; image.virtual_size() as usize];
        out.read_exact_at(&mut bytes, 0).expect("read back");
        bytes
    }
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..4u64 << 20, 1..300_000u64, 1..=255u8).prop_map(|(offset, len, byte)| Change::Write { offset, len, byte }),
        1 => (0..4u64 << 20, 1..300_000u64).prop_map(|(offset, len)| Change::Zero { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Every point restores byte-identical, overlays hold no more than the changed clusters,
    /// and the digest and changed-range modes store the same clusters.
    #[test]
    fn every_point_restores_and_modes_agree(
        size in (1u64..=64).prop_map(|n| n * CLUSTER + (n % 3) * 4096),
        generations in prop::collection::vec(prop::collection::vec(change(), 1..6), 1..4),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = dir.path().join("volume.raw");
        std::fs::write(&volume, vec![0u8; size as usize]).expect("volume");
        apply(&volume, &[Change::Write { offset: 0, len: size / 2, byte: 0x5a }]);
        let digest_dir = dir.path().join("digest");
        let ranges_dir = dir.path().join("ranges");
        std::fs::create_dir_all(&digest_dir).expect("mkdir");
        std::fs::create_dir_all(&ranges_dir).expect("mkdir");
        let mut by_digest = Repo::new(&digest_dir);
        let mut by_ranges = Repo::new(&ranges_dir);
        let xxh3_dir = dir.path().join("xxh3");
        std::fs::create_dir_all(&xxh3_dir).expect("mkdir");
        let mut by_xxh3 = Repo::new(&xxh3_dir);
        by_xxh3.algorithm = DigestAlgorithm::Xxh3 { seed: size.wrapping_mul(0x9e37_79b9) };
        by_digest.take(&volume, "digest", &[]);
        by_ranges.take(&volume, "ranges", &[]);
        by_xxh3.take(&volume, "digest", &[]);
        let mut points = vec![std::fs::read(&volume).expect("read volume")];
        for changes in &generations {
            let ranges = apply(&volume, changes);
            let changed: std::collections::BTreeSet<u64> = ranges
                .iter()
                .flat_map(|r| r.offset / CLUSTER..(r.offset + r.length).div_ceil(CLUSTER))
                .collect();
            let a = by_digest.take(&volume, "digest", &[]);
            let b = by_ranges.take(&volume, "ranges", &ranges);
            prop_assert!(a.summary.data_clusters + a.summary.zero_clusters <= changed.len() as u64);
            prop_assert!(b.summary.data_clusters + b.summary.zero_clusters <= changed.len() as u64);
            // Digest mode stores exactly the clusters whose content changed; ranges mode may
            // also rewrite clusters written with the same bytes, so digest ⊆ ranges.
            let stored_a: Vec<u64> = a.checksums.iter().map(|e| e.expect("entry").0).collect();
            let stored_b: Vec<u64> = b.checksums.iter().map(|e| e.expect("entry").0).collect();
            prop_assert!(stored_a.iter().all(|c| stored_b.contains(c)));
            prop_assert_eq!(&a.digests, &b.digests);
            // XXH3 digests find exactly the clusters BLAKE3 digests find.
            let x = by_xxh3.take(&volume, "digest", &[]);
            let stored_x: Vec<u64> = x.checksums.iter().map(|e| e.expect("entry").0).collect();
            prop_assert_eq!(&stored_x, &stored_a);
            prop_assert_eq!(x.digests.algorithm, by_xxh3.algorithm);
            points.push(std::fs::read(&volume).expect("read volume"));
        }
        for (i, expected) in points.iter().enumerate() {
            prop_assert!(by_digest.restore(i) == *expected, "digest chain point {i}");
            prop_assert!(by_ranges.restore(i) == *expected, "ranges chain point {i}");
            prop_assert!(by_xxh3.restore(i) == *expected, "xxh3 chain point {i}");
        }
    }
}

fn qemu_img(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img")
}

#[test]
fn qemu_img_reads_every_point_and_check_is_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("volume.raw");
    std::fs::write(&volume, vec![0u8; 8 << 20]).expect("volume");
    let mut repo = Repo::new(dir.path());
    let steps: [&[Change]; 4] = [
        &[Change::Write {
            offset: 0,
            len: 3 << 20,
            byte: 1,
        }],
        &[Change::Write {
            offset: 1 << 20,
            len: 100_000,
            byte: 2,
        }],
        &[Change::Zero {
            offset: 0,
            len: 1 << 20,
        }],
        &[Change::Write {
            offset: 7 << 20,
            len: 1 << 20,
            byte: 3,
        }],
    ];
    for (i, step) in steps.iter().enumerate() {
        apply(&volume, step);
        let mode = ["full", "digest", "compare", "digest"][i];
        repo.take(&volume, mode, &[]);
        let copy = dir.path().join(format!("point{i}.raw"));
        std::fs::copy(&volume, &copy).expect("copy");
        let image = &repo.images[i];
        let check = qemu_img(dir.path(), &["check", image]);
        assert!(
            check.status.success(),
            "check {image}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let compare = qemu_img(
            dir.path(),
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                copy.to_str().expect("utf-8"),
                image,
            ],
        );
        assert!(
            compare.status.success(),
            "compare {image}: {}",
            String::from_utf8_lossy(&compare.stdout)
        );
    }
    // The zeroed megabyte is held as zero clusters, not data.
    let image = Image::open(dir.path().join("2.qcow2")).expect("open");
    let extents = image.map(0, 1 << 20).expect("map");
    assert!(
        extents
            .iter()
            .all(|e| e.kind == strata_qcow2::ExtentKind::Zero { depth: 0 }),
        "{extents:?}"
    );
}

#[test]
fn merge_keeps_every_remaining_point_restorable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("volume.raw");
    std::fs::write(&volume, vec![0u8; 4 << 20]).expect("volume");
    let mut repo = Repo::new(dir.path());
    let mut points = Vec::new();
    for (i, step) in [
        Change::Write {
            offset: 0,
            len: 2 << 20,
            byte: 9,
        },
        Change::Zero {
            offset: 512 << 10,
            len: 256 << 10,
        },
        Change::Write {
            offset: 3 << 20,
            len: 70_000,
            byte: 8,
        },
    ]
    .iter()
    .enumerate()
    {
        apply(&volume, std::slice::from_ref(step));
        repo.take(&volume, if i == 0 { "full" } else { "digest" }, &[]);
        points.push(std::fs::read(&volume).expect("read"));
    }
    // Fold 1.qcow2 into 0.qcow2: the result is a new base standing for point 1.
    let chain = Image::open(dir.path().join("1.qcow2")).expect("chain");
    let mut options = WriterOptions::default();
    options.cluster_size = CLUSTER;
    let merged = dir.path().join("1.merged.qcow2");
    let (_, summary, checksums) =
        merge(&chain, FileSink::create(&merged).expect("sink"), &options).expect("merge");
    assert!(summary.data_clusters > 0);
    std::fs::rename(&merged, dir.path().join("1.qcow2")).expect("switch");
    std::fs::remove_file(dir.path().join("0.qcow2")).expect("drop the old base");
    assert_eq!(repo.restore(1), points[1]);
    assert_eq!(repo.restore(2), points[2]);
    let image = Image::open(dir.path().join("1.qcow2")).expect("merged");
    assert_eq!(image.depth(), 1);
    assert!(verify(&image, &checksums).is_empty());
}

#[test]
fn verify_names_a_flipped_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("volume.raw");
    std::fs::write(&volume, vec![0u8; 2 << 20]).expect("volume");
    apply(
        &volume,
        &[Change::Write {
            offset: 0,
            len: 2 << 20,
            byte: 0x61,
        }],
    );
    let mut repo = Repo::new(dir.path());
    repo.take(&volume, "full", &[]);
    let path = dir.path().join("0.qcow2");
    let image = Image::open(&path).expect("open");
    assert!(verify(&image, &repo.checksums[0]).is_empty());
    let target = image.map(CLUSTER * 5, CLUSTER).expect("map")[0];
    let strata_qcow2::ExtentKind::Data { host_offset, .. } = target.kind else {
        panic!("cluster 5 is not stored: {target:?}");
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.write_all_at(&[0x62], host_offset.get() + 100)
        .expect("flip");
    let image = Image::open(&path).expect("open");
    let damage = verify(&image, &repo.checksums[0]);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].guest_offset, Some(CLUSTER * 5));
    assert!(damage[0].problem.contains("checksum mismatch"));
}

#[test]
fn full_backup_of_a_sparse_volume_costs_its_data_not_its_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("sparse.raw");
    let file = File::create(&volume).expect("volume");
    file.set_len(64 << 30).expect("64 GiB sparse");
    for i in 0..16u64 {
        file.write_all_at(&vec![i as u8 + 1; 1 << 20], i * (4 << 30))
            .expect("data");
    }
    let mut repo = Repo::new(dir.path());
    let started = std::time::Instant::now();
    let outcome = repo.take(&volume, "full", &[]);
    let took = started.elapsed();
    assert_eq!(outcome.summary.data_clusters, 16 * (1 << 20) / CLUSTER);
    assert_eq!(outcome.progress.scanned_bytes, 64 << 30);
    // Reading 64 GiB of holes would take minutes; 16 MiB of data takes well under seconds.
    assert!(took.as_secs_f64() < 5.0, "sparse full backup took {took:?}");
    let image_len = std::fs::metadata(dir.path().join("0.qcow2"))
        .expect("stat")
        .len();
    assert!(image_len < 20 << 20, "image of {image_len} bytes");
}

/// Ranges coarser than the change (changed-block tracking reports in blocks, doubling as it
/// merges them): the overlay stores only the clusters that differ from the previous point.
#[test]
fn ranges_wider_than_the_change_store_only_the_changed_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("volume.raw");
    let size = 16 * CLUSTER;
    std::fs::write(&volume, vec![0u8; size as usize]).expect("volume");
    apply(
        &volume,
        &[Change::Write {
            offset: 0,
            len: 8 * CLUSTER,
            byte: 0x5a,
        }],
    );
    let mut repo = Repo::new(dir.path());
    repo.take(&volume, "full", &[]);
    apply(
        &volume,
        &[Change::Write {
            offset: 3 * CLUSTER + 100,
            len: 4096,
            byte: 0x77,
        }],
    );
    let everything = [ByteRange {
        offset: 0,
        length: size,
    }];
    let outcome = repo.take(&volume, "ranges", &everything);
    assert_eq!(
        outcome.progress.changed_clusters, 1,
        "{:?}",
        outcome.progress
    );
    assert_eq!(
        outcome.progress.zeroed_clusters, 0,
        "{:?}",
        outcome.progress
    );
    assert!(repo.restore(1) == std::fs::read(&volume).expect("read"));
}
