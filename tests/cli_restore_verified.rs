//! Verified restores, broken on purpose: a flipped stored byte (in a base, an overlay, a
//! compressed cluster, the metadata) or a tampered manifest makes `strata restore` exit 1 with
//! one line naming the backup and what differs, and leaves no complete-looking destination.

mod strata_bin;
use strata_bin::{s, strata};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use strata::chain::{ChangeSource, DigestAlgorithm};
use strata::qcow2::{ExtentKind, Image, WriterOptions};
use strata::target::{BackupSpec, FileName, Target, VolumeName};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

/// A folder target with two backups of a 4 MiB volume: the base stores 1 MiB at 1 MiB, the
/// incremental 64 KiB at 3 MiB.
struct Fixture {
    dir: tempfile::TempDir,
    target: PathBuf,
    base: String,
    top: String,
    base_bytes: Vec<u8>,
    top_bytes: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        let volume = dir.path().join("volume.raw");
        let file = std::fs::File::create(&volume).expect("volume");
        file.set_len(SIZE).expect("size");
        let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all_at(&pattern, MIB).expect("write");
        let base = backup(&target, &volume);
        let base_bytes = std::fs::read(&volume).expect("read");
        file.write_all_at(&[0x5a; 65536], 3 * MIB).expect("write");
        let top = backup(&target, &volume);
        let top_bytes = std::fs::read(&volume).expect("read");
        Self {
            dir,
            target,
            base,
            top,
            base_bytes,
            top_bytes,
        }
    }

    fn image(&self, id: &str) -> PathBuf {
        self.target
            .join("volumes/vol1/images")
            .join(format!("{id}.qcow2"))
    }

    fn manifest(&self, id: &str) -> PathBuf {
        self.target
            .join("volumes/vol1/backups")
            .join(format!("{id}.json"))
    }

    fn dest(&self) -> PathBuf {
        self.dir.path().join("restored.raw")
    }

    fn restore(&self, id: &str) -> Output {
        strata(&[
            "restore",
            "--quiet",
            "--target",
            s(&self.target),
            "--volume",
            "vol1",
            "--backup",
            id,
            s(&self.dest()),
        ])
    }

    /// Restores `id` and asserts it reads as `expected`.
    fn restores_as(&self, id: &str, expected: &[u8]) {
        let out = self.restore(id);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(self.dest()).expect("restored") == expected,
            "restore of {id} differs"
        );
    }

    /// Restores `id`, asserts exit status 1, one line on stderr, and that no destination
    /// file (nor its partial file) is left; returns the line.
    fn restore_fails(&self, id: &str) -> String {
        let _ = std::fs::remove_file(self.dest());
        let out = self.restore(id);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!self.dest().exists(), "a destination is left: {stderr}");
        let partial = self.dir.path().join("restored.raw.partial");
        assert!(!partial.exists(), "a partial file is left: {stderr}");
        stderr
    }
}

/// Backs up `volume` as `vol1` uncompressed and returns the new id: the flips here aim at
/// raw clusters and metadata at offsets `qemu-img map` gives; damage to compressed clusters
/// has its own test below.
fn backup(target: &Path, volume: &Path) -> String {
    let out = strata(&[
        "backup",
        "--quiet",
        "--compress",
        "none",
        "--target",
        s(target),
        "--volume",
        "vol1",
        s(volume),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("an id").trim().to_owned()
}

/// The host offset of guest offset `guest` stored in `image` itself (`qemu-img map`).
fn host_offset(image: &Path, guest: u64) -> u64 {
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-U", s(image)])
        .output()
        .expect("qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    let extent = map
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap_or(u64::MAX);
            e["depth"] == 0
                && e["data"] == true
                && start <= guest
                && guest < start + e["length"].as_u64().unwrap_or(0)
        })
        .unwrap_or_else(|| panic!("{guest:#x} is not stored in {}: {map}", image.display()));
    extent["offset"].as_u64().expect("offset") + (guest - extent["start"].as_u64().expect("start"))
}

/// XORs the byte at `offset` of `path` with `mask`.
fn flip(path: &Path, offset: u64, mask: u8) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read");
    file.write_all_at(&[byte[0] ^ mask], offset).expect("write");
}

#[test]
fn untampered_points_restore_byte_for_byte() {
    let f = Fixture::new();
    f.restores_as(&f.base, &f.base_bytes);
    f.restores_as(&f.top, &f.top_bytes);
}

#[test]
fn a_flipped_byte_in_a_base_cluster_fails_the_restore_naming_the_base_and_offset() {
    let f = Fixture::new();
    let guest = MIB + 0x20000;
    flip(
        &f.image(&f.base),
        host_offset(&f.image(&f.base), guest) + 10,
        0xff,
    );
    // The incremental reads that cluster from its base: the base is named.
    let line = f.restore_fails(&f.top);
    assert!(
        line.contains(&format!(
            "backup vol1/{}: cluster at guest offset {guest:#x} fails its checksum (stored ",
            f.base
        )),
        "{line}"
    );
    assert!(line.contains(", read "), "{line}");
    f.restore_fails(&f.base);
}

#[test]
fn a_failed_restore_leaves_an_existing_destination_as_it_was() {
    let f = Fixture::new();
    std::fs::write(f.dest(), b"yesterday's copy").expect("write");
    flip(
        &f.image(&f.top),
        host_offset(&f.image(&f.top), 3 * MIB) + 100,
        0x01,
    );
    let out = f.restore(&f.top);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(f.dest()).expect("dest"), b"yesterday's copy");
    assert!(!f.dir.path().join("restored.raw.partial").exists());
}

#[test]
fn a_flipped_byte_in_an_overlay_cluster_fails_only_the_overlay() {
    let f = Fixture::new();
    let guest = 3 * MIB;
    flip(
        &f.image(&f.top),
        host_offset(&f.image(&f.top), guest) + 65535,
        0x80,
    );
    let line = f.restore_fails(&f.top);
    assert!(
        line.contains(&format!(
            "backup vol1/{}: cluster at guest offset 0x300000 fails its checksum",
            f.top
        )),
        "{line}"
    );
    f.restores_as(&f.base, &f.base_bytes);
}

#[test]
fn a_zero_flag_set_on_a_stored_cluster_fails_as_listed_but_reading_zeros() {
    let f = Fixture::new();
    let image = f.image(&f.base);
    let header = std::fs::read(&image).expect("image");
    let l1 = u64::from_be_bytes(header[40..48].try_into().expect("8 bytes"));
    let l2 = u64::from_be_bytes(header[l1 as usize..l1 as usize + 8].try_into().expect("8"))
        & 0x00ff_ffff_ffff_fe00;
    // The L2 entry of guest cluster 16 (1 MiB): bit 0 of its last byte is the "reads as
    // zeros" flag (qcow2.rst, "Standard Cluster Descriptor").
    flip(&image, l2 + 16 * 8 + 7, 0x01);
    let line = f.restore_fails(&f.base);
    assert!(
        line.contains(&format!(
            "backup vol1/{}: cluster at guest offset 0x100000 is in its checksum list but reads as zeros",
            f.base
        )),
        "{line}"
    );
}

#[test]
fn flips_in_the_metadata_give_one_line_never_a_panic() {
    let f = Fixture::new();
    let image = f.image(&f.base);
    let pristine = std::fs::read(&image).expect("image");
    let l1 = u64::from_be_bytes(pristine[40..48].try_into().expect("8 bytes"));
    let l2 = u64::from_be_bytes(
        pristine[l1 as usize..l1 as usize + 8]
            .try_into()
            .expect("8"),
    ) & 0x00ff_ffff_ffff_fe00;
    let places = [
        ("cluster bits", 23),
        ("virtual size", 29),
        ("L1 table offset", 45),
        ("L1 entry", l1 + 5),
        ("L2 entry host offset", l2 + 16 * 8 + 2),
        ("L2 entry low host bits", l2 + 16 * 8 + 6),
        ("L2 entry flags", l2 + 16 * 8),
    ];
    for (what, offset) in places {
        std::fs::write(&image, &pristine).expect("restore image");
        flip(&image, offset, 0x10);
        let line = f.restore_fails(&f.base);
        assert!(
            line.starts_with("strata: ")
                && line.contains(&format!("backup vol1/{}: its image", f.base)),
            "{what}: {line}"
        );
    }
}

/// A change to a JSON manifest.
type Edit = dyn Fn(&mut serde_json::Value);

/// Edits the JSON manifest of `id` with `edit`.
fn tamper(f: &Fixture, id: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = f.manifest(id);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write");
}

#[test]
fn tampered_manifests_fail_the_restore_naming_what_differs() {
    let f = Fixture::new();
    let original = std::fs::read(f.manifest(&f.top)).expect("manifest");
    let cases: Vec<(&str, Box<Edit>, String)> = vec![
        (
            "parent missing",
            Box::new(|m| m["parent"] = "20200101T000000Z-00000000".into()),
            format!(
                "backup vol1/{}: its parent 20200101T000000Z-00000000 has no manifest",
                f.top
            ),
        ),
        (
            "parent is itself",
            Box::new(|m| m["parent"] = m["id"].clone()),
            format!("backup vol1/{}: its manifest names itself as parent", f.top),
        ),
        (
            "no parent",
            Box::new(|m| m["parent"] = serde_json::Value::Null),
            format!(
                "backup vol1/{}: its image names backing file \"{}.qcow2\", its manifest names no parent",
                f.top, f.base
            ),
        ),
        (
            "virtual size",
            Box::new(|m| m["virtual_size"] = (SIZE + 65536).into()),
            format!(
                "backup vol1/{}: its image's virtual size is {SIZE} bytes, its manifest says {}",
                f.top,
                SIZE + 65536
            ),
        ),
        (
            "image size",
            Box::new(|m| {
                let size = m["image"]["size"].as_u64().expect("size");
                m["image"]["size"] = (size + 1).into();
            }),
            {
                let size = std::fs::metadata(f.image(&f.top)).expect("image").len();
                format!(
                    "backup vol1/{}: its image object is {size} bytes, its manifest says {}",
                    f.top,
                    size + 1
                )
            },
        ),
        (
            "cluster size",
            Box::new(|m| m["cluster_size"] = 131072.into()),
            format!(
                "backup vol1/{}: its image's cluster size is 65536 bytes, its manifest says 131072",
                f.top
            ),
        ),
    ];
    for (what, edit, expected) in cases {
        std::fs::write(f.manifest(&f.top), &original).expect("untamper");
        tamper(&f, &f.top, edit);
        let line = f.restore_fails(&f.top);
        assert!(line.contains(&expected), "{what}: {line}");
    }
    // A parent whose parent is the child: the parents loop.
    std::fs::write(f.manifest(&f.top), &original).expect("untamper");
    let top = f.top.clone();
    tamper(&f, &f.base, |m| m["parent"] = top.into());
    let line = f.restore_fails(&f.top);
    assert!(
        line.contains(&format!(
            "backup vol1/{}: its parent {} is already in the chain (the parents loop)",
            f.base, f.top
        )),
        "{line}"
    );
}

/// A backup of `volume` written with deflate-compressed clusters through the library, as
/// `strata backup --compress zlib:6` writes it (digests and checksums side files); returns
/// its id.
fn compressed_backup(target: &Target, volume: &Path) -> String {
    let name = VolumeName::new("vol1").expect("name");
    let source = strata::open_volume(volume).expect("volume");
    let mut upload = target
        .begin_backup(
            &name,
            BackupSpec {
                id: None,
                parent: None,
                virtual_size: SIZE,
                cluster_size: 65536,
            },
        )
        .expect("begin");
    let mut options = WriterOptions::default();
    options.compress();
    let sink = upload.image_sink().expect("sink");
    let (_, outcome) = strata::chain::backup(
        &source,
        sink,
        &options,
        ChangeSource::Full,
        DigestAlgorithm::Blake3,
        &mut |_| {},
    )
    .expect("backup");
    let file = |n: &str| FileName::new(n).expect("name");
    upload
        .put_file(
            &file("digests"),
            outcome.digests.encode().expect("digests").into(),
        )
        .expect("digests");
    upload
        .put_file(
            &file("checksums"),
            outcome.checksums.encode().expect("checksums").into(),
        )
        .expect("checksums");
    upload.commit().expect("commit").id.to_string()
}

#[test]
fn a_flipped_byte_in_a_compressed_cluster_that_still_decompresses_fails_its_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target_dir = dir.path().join("target");
    let target = Target::open(s(&target_dir)).expect("target");
    let volume = dir.path().join("volume.raw");
    // Text compresses, and deflate keeps most of it as literals a flipped bit changes.
    let text: Vec<u8> = (0..SIZE / 4)
        .flat_map(|i| format!("line {i:08} of the volume\n").into_bytes())
        .take(SIZE as usize)
        .collect();
    std::fs::write(&volume, &text).expect("volume");
    let id = compressed_backup(&target, &volume);
    let image_path = target_dir
        .join("volumes/vol1/images")
        .join(format!("{id}.qcow2"));
    let image = Image::open(&image_path).expect("open");
    let (guest, host, len) = image
        .map(0, SIZE)
        .expect("map")
        .iter()
        .find_map(|e| match e.kind {
            ExtentKind::Compressed {
                host_offset,
                compressed_len,
                ..
            } if e.start.get() >= MIB => Some((e.start.get(), host_offset.get(), compressed_len)),
            _ => None,
        })
        .expect("a compressed cluster");
    drop(image);
    let pristine = std::fs::read(&image_path).expect("image");
    // A flip deflate does not notice: qemu-img still reads the image, with other bytes.
    let raw = dir.path().join("qemu.raw");
    let flipped = (len / 4..len / 2).step_by(7).find(|&at| {
        std::fs::write(&image_path, &pristine).expect("reset");
        flip(&image_path, host + at, 0x04);
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw", s(&image_path), s(&raw)])
            .output()
            .expect("qemu-img");
        out.status.success() && std::fs::read(&raw).expect("raw") != text
    });
    assert!(flipped.is_some(), "no flip deflate accepts");
    let dest = dir.path().join("restored.raw");
    let out = strata(&[
        "restore",
        "--quiet",
        "--target",
        s(&target_dir),
        "--volume",
        "vol1",
        "--backup",
        &id,
        s(&dest),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "backup vol1/{id}: cluster at guest offset {guest:#x} fails its checksum"
        )),
        "{stderr}"
    );
    assert!(!dest.exists());
}

/// `strata prune --keep-last 1` of the fixture's volume.
fn prune_to_one(f: &Fixture) -> std::process::Output {
    strata(&[
        "prune",
        "--target",
        s(&f.target),
        "--volume",
        "vol1",
        "--keep-last",
        "1",
    ])
}

#[test]
fn prune_refuses_to_fold_a_cluster_that_fails_its_checksum() {
    let f = Fixture::new();
    let guest = MIB + 0x40000;
    flip(
        &f.image(&f.base),
        host_offset(&f.image(&f.base), guest) + 1,
        0x20,
    );
    let out = prune_to_one(&f);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The fold says it failed (it said "upload of ... misused" before).
    assert!(
        stderr.contains(&format!("folding into {}.qcow2 failed: ", f.top))
            && stderr.contains(&format!(
                "backup vol1/{}: cluster at guest offset {guest:#x} fails its checksum",
                f.base
            ))
            && !stderr.contains("misused"),
        "{stderr}"
    );
    // Nothing was folded: both backups are still there, the damage still found by verify.
    let listed = strata(&["list", "--target", s(&f.target), "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    let verify = strata(&["verify", "--target", s(&f.target)]);
    assert_eq!(verify.status.code(), Some(1));
}

/// A flipped byte in the base: verify names the cluster at the base, and the incremental on
/// it, whose own clusters are intact but which does not restore, is damaged too: no point
/// that fails to restore reads "ok".
#[test]
fn verify_names_a_damaged_base_at_every_backup_built_on_it() {
    let f = Fixture::new();
    let guest = MIB + 0x20000;
    flip(
        &f.image(&f.base),
        host_offset(&f.image(&f.base), guest) + 10,
        0xff,
    );
    let out = strata(&["verify", "--target", s(&f.target)]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "vol1/{}: DAMAGED at guest offset {guest:#x}: checksum mismatch",
            f.base
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "vol1/{}: DAMAGED: chain: backup vol1/{} under it is damaged",
            f.top, f.base
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(": ok"), "{stdout}");
    f.restore_fails(&f.top);
}

#[test]
fn verify_reports_a_manifest_that_differs_from_its_image() {
    let f = Fixture::new();
    tamper(&f, &f.top, |m| m["virtual_size"] = (SIZE * 2).into());
    let out = strata(&["verify", "--target", s(&f.target)]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "vol1/{}: DAMAGED: chain: backup vol1/{}: its image's virtual size is {SIZE} bytes, its manifest says {}",
            f.top,
            f.top,
            SIZE * 2
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("vol1/{}: ok", f.base)), "{stdout}");
}

/// A manifest stored under another backup's name (a copy, a rename by hand) is refused when the
/// volume's backups are listed, as reading it by its name always refused it: the latest
/// backup is not chosen from a listing that holds one backup twice, and the error names the
/// file. Backups asked for by id still restore.
#[test]
fn a_manifest_under_another_backups_name_fails_the_listing_naming_it() {
    let f = Fixture::new();
    let stray = f.manifest("20300101T000000Z-00000000");
    std::fs::copy(f.manifest(&f.base), &stray).expect("copy");
    let out = strata(&[
        "restore",
        "--quiet",
        "--target",
        s(&f.target),
        "--volume",
        "vol1",
        s(&f.dest()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("20300101T000000Z-00000000.json")
            && stderr.contains(&format!("names backup vol1/{}", f.base)),
        "{stderr}"
    );
    f.restores_as(&f.top, &f.top_bytes);
    f.restores_as(&f.base, &f.base_bytes);
}

/// The manifest of backup `id` in the fixture's target, as JSON.
fn manifest_json(f: &Fixture, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(f.manifest(id)).expect("manifest")).expect("json")
}

/// Writes 4 KiB of `byte` at the start of the fixture's volume and backs it up; the new id.
fn change_and_back_up(f: &Fixture, byte: u8) -> String {
    let volume = f.dir.path().join("volume.raw");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .expect("volume");
    file.write_all_at(&[byte; 4096], 0).expect("write");
    backup(&f.target, &volume)
}

/// Damage that `verify` found is remembered beside the backup, and the next backup starts a
/// new chain instead of building on it (before, its image being stored at its size, the
/// backup extended the damaged chain, and the new point did not restore). A verify that finds
/// the backup whole again removes the mark.
#[test]
fn after_verify_finds_a_base_damaged_the_next_backup_starts_a_new_chain() {
    let f = Fixture::new();
    let guest = MIB + 0x20000;
    let at = host_offset(&f.image(&f.base), guest) + 10;
    flip(&f.image(&f.base), at, 0xff);
    let mark = f
        .target
        .join("volumes/vol1/damaged")
        .join(format!("{}.json", f.base));
    let out = strata(&["verify", "--target", s(&f.target)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(mark.exists(), "verify left no mark");
    let text = std::fs::read_to_string(&mark).expect("mark");
    assert!(
        text.contains("checksum mismatch") && text.contains(&format!("at guest offset {guest:#x}")),
        "{text}"
    );
    let next = change_and_back_up(&f, 0x66);
    let manifest = manifest_json(&f, &next);
    assert_eq!(manifest["parent"], serde_json::Value::Null, "{manifest}");
    let reason = manifest["full_reason"].as_str().expect("a full reason");
    assert!(
        reason.contains(&format!("backup vol1/{}", f.base))
            && reason.contains("found its data damaged")
            && reason.contains("checksum mismatch"),
        "{reason}"
    );
    let mut expected = f.top_bytes.clone();
    expected[..4096].fill(0x66);
    f.restores_as(&next, &expected);
    // Repaired (the byte flipped back), the base verifies whole and loses its mark.
    flip(&f.image(&f.base), at, 0xff);
    let out = strata(&["verify", "--target", s(&f.target)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!mark.exists(), "the repaired backup keeps its mark");
}

/// A prune whose fold finds a cluster failing its checksum marks the backup that stored it
/// and keeps it, still folds the other older backups, and fails saying so: one damaged backup
/// no longer stops retention for good. The next backup starts a new chain.
#[test]
fn a_prune_that_finds_a_base_damaged_marks_it_and_still_folds_the_others() {
    let f = Fixture::new();
    change_and_back_up(&f, 0x5a);
    let guest = MIB + 0x20000;
    flip(
        &f.image(&f.base),
        host_offset(&f.image(&f.base), guest) + 10,
        0xff,
    );
    let out = prune_to_one(&f);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "backup vol1/{}: cluster at guest offset {guest:#x}",
            f.base
        )) && stderr.contains("marked damaged"),
        "{stderr}"
    );
    // The middle backup was folded into the third all the same.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("removed {}", f.top)), "{stdout}");
    let mark = f
        .target
        .join("volumes/vol1/damaged")
        .join(format!("{}.json", f.base));
    assert!(mark.exists(), "the prune left no mark");
    assert!(f.image(&f.base).exists(), "the damaged base was removed");
    let next = change_and_back_up(&f, 0x6b);
    let manifest = manifest_json(&f, &next);
    assert_eq!(manifest["parent"], serde_json::Value::Null, "{manifest}");
}

/// A restore that finds a cluster failing its checksum marks the backup that stored it too:
/// the next backup starts a new chain, naming it.
#[test]
fn after_a_restore_finds_a_base_damaged_the_next_backup_starts_a_new_chain() {
    let f = Fixture::new();
    let guest = MIB + 0x20000;
    flip(
        &f.image(&f.base),
        host_offset(&f.image(&f.base), guest) + 10,
        0xff,
    );
    f.restore_fails(&f.top);
    let next = change_and_back_up(&f, 0x67);
    let manifest = manifest_json(&f, &next);
    assert_eq!(manifest["parent"], serde_json::Value::Null, "{manifest}");
    let reason = manifest["full_reason"].as_str().expect("a full reason");
    assert!(
        reason.contains(&format!("backup vol1/{}", f.base))
            && reason.contains(&format!(
                "found its data damaged: cluster at guest offset {guest:#x} fails its checksum"
            )),
        "{reason}"
    );
    let mut expected = f.top_bytes.clone();
    expected[..4096].fill(0x67);
    f.restores_as(&next, &expected);
}
