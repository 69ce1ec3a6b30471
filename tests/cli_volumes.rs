//! `strata backup`, `restore`, `list` and `verify` on a folder target, as a user runs them.

mod strata_bin;
use strata_bin::{ok, s, strata, strata_command};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Restores backup `id` into `dir/<id><suffix>.raw`, asserts it reads as `expected`, and
/// returns the restored file and the backup's image in the folder target.
fn restore_and_check(
    target: &Path,
    dir: &Path,
    id: &str,
    suffix: &str,
    expected: &[u8],
) -> (PathBuf, PathBuf) {
    let dest = dir.join(format!("{id}{suffix}.raw"));
    ok(strata(&[
        "restore",
        "--target",
        s(target),
        "--volume",
        "vol1",
        "--backup",
        id,
        s(&dest),
    ]));
    assert!(
        std::fs::read(&dest).expect("restored") == expected,
        "point {id}{suffix}"
    );
    let image = target
        .join("volumes/vol1/images")
        .join(format!("{id}.qcow2"));
    (dest, image)
}

/// Backs up `volume` and returns the id printed on the last line.
fn backup(target: &Path, volume: &Path, extra: &[&str]) -> String {
    backup_id_of(&backup_output(target, volume, extra))
}

/// Runs `strata backup` of `volume` into `target` with `extra` options, whatever the outcome.
fn backup_output(target: &Path, volume: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "backup",
        "--quiet",
        "--target",
        s(target),
        "--volume",
        "vol1",
    ];
    args.extend_from_slice(extra);
    args.push(s(volume));
    strata(&args)
}

#[test]
fn backup_restore_list_verify_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(16 << 20).expect("size");
    file.write_all_at(&vec![0x11; 3 << 20], 0).expect("write");
    let mut points: Vec<(String, Vec<u8>)> = Vec::new();
    let id = backup(&target, &volume, &[]);
    points.push((id, std::fs::read(&volume).expect("read")));

    // Incremental by digest: a changed megabyte (random, so it is stored raw and the byte
    // flipped below is in plain data) and a zeroed one.
    file.write_all_at(&random_bytes(1 << 20, 1), 8 << 20)
        .expect("write");
    file.write_all_at(&vec![0; 1 << 20], 0).expect("zero");
    let id = backup(&target, &volume, &[]);
    points.push((id, std::fs::read(&volume).expect("read")));

    // Incremental from changed ranges: 4 KiB changed (and, unknown to the ranges, the rest of
    // their cluster, random so that the stored cluster is raw for the byte flipped below).
    file.write_all_at(&random_bytes(65536, 2), 12 << 20)
        .expect("write");
    let ranges = dir.path().join("ranges.json");
    std::fs::write(
        &ranges,
        format!(r#"[{{"offset": {}, "length": 4096}}]"#, 12 << 20),
    )
    .expect("ranges");
    let id = backup(&target, &volume, &["--changed-ranges", s(&ranges)]);
    points.push((id, std::fs::read(&volume).expect("read")));

    // Every point restores byte for byte, and qemu-img reads each image in the folder.
    for (id, expected) in &points {
        let (dest, image) = restore_and_check(&target, dir.path(), id, "", expected);
        let compare = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2", s(&dest), s(&image)])
            .output()
            .expect("qemu-img");
        assert!(
            compare.status.success(),
            "qemu-img compare {id}: {}",
            String::from_utf8_lossy(&compare.stdout)
        );
    }

    let listed: serde_json::Value = serde_json::from_str(&ok(strata(&[
        "list",
        "--target",
        s(&target),
        "--output",
        "json",
    ])))
    .expect("json");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["parent"], serde_json::Value::Null);
    assert_eq!(listed[1]["parent"], points[0].0.as_str());
    assert_eq!(listed[2]["id"], points[2].0.as_str());
    assert_eq!(listed[2]["virtual_size"], 16 << 20);
    // The incrementals hold only what changed: the second its megabyte of data (the zeroed
    // one is zero clusters), the third the cluster holding the 4 KiB written.
    let images = target.join("volumes/vol1/images");
    let stored = |i: usize| stored_data_bytes(&images.join(format!("{}.qcow2", points[i].0)));
    assert_eq!(stored(0), 3 << 20);
    assert_eq!(stored(1), 1 << 20);
    assert_eq!(stored(2), 65536);

    ok(strata(&["verify", "--target", s(&target)]));

    // Keep the last two: the base is folded into the second backup, which becomes the base;
    // both kept points still restore byte for byte, verify is clean, qemu-img check is clean.
    let pruned = ok(strata(&[
        "prune",
        "--target",
        s(&target),
        "--volume",
        "vol1",
        "--keep-last",
        "2",
    ]));
    assert!(
        pruned.contains(&format!("removed {}", points[0].0)),
        "{pruned}"
    );
    let points: Vec<(String, Vec<u8>)> = points.into_iter().skip(1).collect();
    let listed: serde_json::Value = serde_json::from_str(&ok(strata(&[
        "list",
        "--target",
        s(&target),
        "--output",
        "json",
    ])))
    .expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    assert_eq!(listed[0]["id"], points[0].0.as_str());
    assert_eq!(listed[0]["parent"], serde_json::Value::Null);
    for (id, expected) in &points {
        let (_, image) = restore_and_check(&target, dir.path(), id, ".pruned", expected);
        let check = Command::new("qemu-img")
            .args(["check", s(&image)])
            .output()
            .expect("qemu-img");
        assert!(
            check.status.success(),
            "check {id}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    ok(strata(&["verify", "--target", s(&target)]));
    // Flip one byte of stored data in the second backup: verify names it and fails.
    let image: PathBuf = target
        .join("volumes/vol1/images")
        .join(format!("{}.qcow2", points[1].0));
    let map = Command::new("qemu-img")
        .args(["map", "--output", "json", s(&image)])
        .output()
        .expect("qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    let stored = map
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["data"] == true && e["depth"] == 0)
        .expect("a stored extent");
    let host = stored["offset"].as_u64().expect("offset");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open image");
    f.write_all_at(&[0xee], host + 10).expect("flip");
    let out = strata(&["verify", "--target", s(&target), "--volume", "vol1"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{}: DAMAGED at guest offset {:#x}",
            points[1].0,
            stored["start"].as_u64().expect("start")
        )),
        "{stdout}"
    );
}

/// Guest bytes that `image` itself (not its backing chain) stores data for, compressed or
/// not, by `qemu-img map`.
fn stored_data_bytes(image: &Path) -> u64 {
    let map = Command::new("qemu-img")
        .args(["map", "--output", "json", s(image)])
        .output()
        .expect("qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    map.as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| e["length"].as_u64().expect("length"))
        .sum()
}

/// A megabyte-scale run of pseudo-random bytes (xorshift), which no compressor shrinks.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The id on the last line of a successful `strata backup`.
fn backup_id_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("an id").trim().to_owned()
}

/// The algorithm word of a backup's digest manifest (1 BLAKE3, 2 XXH3-128).
fn digest_algorithm(target: &Path, id: &str) -> u64 {
    let path = target.join("volumes/vol1/files").join(id).join("digests");
    let bytes = std::fs::read(&path).expect("digest manifest");
    assert_eq!(&bytes[..8], b"STRDGST2");
    u64::from_be_bytes(bytes[24..32].try_into().expect("8 bytes"))
}

#[test]
fn xxh3_digests_chosen_at_the_full_backup_carry_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let mut bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&volume, &bytes).expect("volume");
    let base = backup(&target, &volume, &["--digests", "xxh3"]);
    assert_eq!(digest_algorithm(&target, &base), 2);

    let original = bytes.clone();
    // One cluster changes; the incremental (no --digests, so the default is asked for) keeps
    // the chain's XXH3 digests and stores that one cluster only.
    bytes[3 << 20..(3 << 20) + 10].fill(0xee);
    std::fs::File::options()
        .write(true)
        .open(&volume)
        .expect("open volume")
        .write_all_at(&bytes[3 << 20..(3 << 20) + 10], 3 << 20)
        .expect("change");
    let next = backup(&target, &volume, &[]);
    assert_eq!(digest_algorithm(&target, &next), 2);
    let (_, image) = restore_and_check(&target, dir.path(), &next, "", &bytes);
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-U", s(&image)])
        .output()
        .expect("qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    let own: u64 = map
        .as_array()
        .expect("map entries")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().expect("length"))
        .sum();
    assert_eq!(
        own, 65536,
        "the incremental stores the one changed cluster: {map}"
    );
    restore_and_check(&target, dir.path(), &base, "", &original);

    // Asking an incremental for other digests changes nothing, and says so.
    let out = backup_output(&target, &volume, &["--digests", "blake3"]);
    let again = backup_id_of(&out);
    assert_eq!(digest_algorithm(&target, &again), 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--digests blake3 applies to the next --full backup"),
        "{stderr}"
    );

    // A full backup may switch back to BLAKE3.
    let full = backup(&target, &volume, &["--full"]);
    assert_eq!(digest_algorithm(&target, &full), 1);
}

#[test]
fn restore_of_a_missing_volume_is_one_line_and_status_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    // A repository holding another volume (a target without one is refused earlier).
    let other = dir.path().join("other.raw");
    std::fs::write(&other, [7u8; 4096]).expect("other volume");
    ok(strata(&[
        "backup",
        "-q",
        "--target",
        s(&target),
        "--volume",
        "other",
        s(&other),
    ]));
    let out = strata(&[
        "restore",
        "--target",
        s(&target),
        "--volume",
        "nope",
        s(&dir.path().join("x.raw")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
}

/// The datamover's changed-block path: `--changed-since` uses the ranges only when they
/// describe the change since the volume's latest backup; otherwise digests find the change.
/// A change outside the listed ranges tells which way the backup went.
#[test]
fn changed_since_uses_the_ranges_only_on_their_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    let base = backup(&target, &volume, &[]);
    let ranges = dir.path().join("ranges.json");
    std::fs::write(&ranges, r#"[{"offset": 0, "length": 65536}]"#).expect("ranges");
    // Changed at 1 MiB, listed at 0: the ranges miss it.
    file.write_all_at(&[0x44; 4096], 1 << 20).expect("write");
    let with_ranges = |since: &str| {
        let out = backup_output(
            &target,
            &volume,
            &["--changed-ranges", s(&ranges), "--changed-since", since],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (backup_id_of(&out), stderr)
    };
    let restored = |id: &str| {
        let dest = dir.path().join(format!("{id}.raw"));
        ok(strata(&[
            "restore",
            "--target",
            s(&target),
            "--volume",
            "vol1",
            "--backup",
            id,
            s(&dest),
        ]));
        std::fs::read(&dest).expect("restored")[1 << 20]
    };

    // On its base the list is trusted, so the unlisted change is not seen.
    let (trusted, stderr) = with_ranges(&base);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(restored(&trusted), 0);

    // The latest is now `trusted`, not `base`: digests, which find the change.
    let (stale, stderr) = with_ranges(&base);
    assert!(
        stderr.contains(&format!(
            "the ranges are since {base}, the latest backup is {trusted}; comparing digests"
        )),
        "{stderr}"
    );
    assert_eq!(restored(&stale), 0x44);

    // No list at all (changed-block tracking was unavailable): digests too.
    file.write_all_at(&[0x55; 4096], 2 << 20).expect("write");
    std::fs::remove_file(&ranges).expect("remove");
    let (missing, stderr) = with_ranges(&stale);
    assert!(stderr.contains("no changed ranges at"), "{stderr}");
    let dest = dir.path().join("missing.raw");
    ok(strata(&[
        "restore",
        "--target",
        s(&target),
        "--volume",
        "vol1",
        "--backup",
        &missing,
        s(&dest),
    ]));
    assert_eq!(std::fs::read(&dest).expect("restored")[2 << 20], 0x55);

    // `--changed-since` alone is refused.
    let out = strata(&[
        "backup",
        "--target",
        s(&target),
        "--volume",
        "vol1",
        "--changed-since",
        &base,
        s(&volume),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The datamover's init step with `--allow-unavailable`: no cluster to ask, so it says why,
/// removes a stale list and succeeds, leaving the backup step to compare digests.
#[cfg(feature = "kubernetes")]
#[test]
fn changed_blocks_allow_unavailable_leaves_no_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("changed-ranges.json");
    std::fs::write(&output, "[]").expect("stale list");
    let run = |extra: &[&str]| {
        strata_command()
            .args([
                "changed-blocks",
                "--namespace",
                "shop",
                "--snapshot",
                "tuesday",
                "--base-snapshot-handle",
                "snap-handle-monday",
                "--output",
                s(&output),
            ])
            .args(extra)
            .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run strata")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output.exists(),
        "a failure without the flag touches nothing"
    );
    let out = run(&["--allow-unavailable"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with(
            "strata: changed-block tracking unavailable, the backup will compare digests:"
        ),
        "{stderr}"
    );
    assert!(!output.exists());
}

/// A way to damage a side file at a path.
type Damage = Box<dyn Fn(&Path)>;

/// The latest backup's digests gone, cut short or grown (tampered): the next backup is a full
/// one that says why, rather than every later backup failing, and every point still restores.
#[test]
fn backups_after_the_latest_digests_are_lost_or_damaged_start_a_new_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    let mut points = Vec::new();
    let digests = |id: &str| target.join(format!("volumes/vol/files/{id}/digests"));
    let damages: [(&str, Damage); 4] = [
        (
            "removed",
            Box::new(|p| std::fs::remove_file(p).expect("remove")),
        ),
        (
            "cut short",
            Box::new(|p| {
                let len = std::fs::metadata(p).expect("stat").len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.set_len(len / 2))
                    .expect("truncate")
            }),
        ),
        (
            "grown",
            Box::new(|p| {
                let mut bytes = std::fs::read(p).expect("read");
                bytes.extend_from_slice(&[0u8; 4096]);
                std::fs::write(p, bytes).expect("write")
            }),
        ),
        (
            // Replaced by bytes that do not parse, and the manifest's size and CRC with
            // theirs: only parsing the file finds it.
            "rewritten with its manifest",
            Box::new(|p| {
                let garbage = vec![0x5a; std::fs::metadata(p).expect("stat").len() as usize];
                std::fs::write(p, &garbage).expect("write");
                let id = p.parent().and_then(|d| d.file_name()).expect("id");
                let manifest = p
                    .ancestors()
                    .nth(3)
                    .expect("volume folder")
                    .join("backups")
                    .join(id)
                    .with_extension("json");
                let mut json: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&manifest).expect("manifest"))
                        .expect("json");
                let files = json["files"].as_array_mut().expect("files");
                let entry = files
                    .iter_mut()
                    .find(|f| f["name"] == "digests")
                    .expect("digests entry");
                entry["checksums"]["crc32"] = format!("{:08x}", crc32fast::hash(&garbage)).into();
                std::fs::write(&manifest, serde_json::to_vec(&json).expect("json"))
                    .expect("write manifest");
            }),
        ),
    ];
    file.write_all_at(&[1; 65536], 0).expect("write");
    let first = ok(backup_named(&target, &volume));
    let mut latest = first.lines().last().expect("id").to_string();
    points.push((latest.clone(), std::fs::read(&volume).expect("read")));
    for (round, (how, damage)) in damages.iter().enumerate() {
        damage(&digests(&latest));
        file.write_all_at(&[round as u8 + 2; 65536], (round as u64 + 1) << 20)
            .expect("write");
        let out = ok(backup_named(&target, &volume));
        assert!(out.starts_with("full backup"), "{how}: {out}");
        assert!(
            out.contains(&format!(
                "full because the digests of the latest backup {latest} do not read"
            )),
            "{how}: {out}"
        );
        // The rewritten file passed its size and CRC checks: what refused it is its parse.
        if how.starts_with("rewritten") {
            assert!(out.contains("malformed digest manifest"), "{how}: {out}");
        }
        latest = out.lines().last().expect("id").to_string();
        points.push((latest.clone(), std::fs::read(&volume).expect("read")));
    }
    // The next backup, on intact digests, is an incremental again.
    file.write_all_at(&[9; 65536], 3 << 20).expect("write");
    let out = ok(backup_named(&target, &volume));
    assert!(out.starts_with("incremental backup"), "{out}");
    points.push((
        out.lines().last().expect("id").to_string(),
        std::fs::read(&volume).expect("read"),
    ));
    restore_every_point(&target, dir.path(), points);
}

/// Changed ranges describe the change since the latest backup: a backup that is taken full
/// all the same (`--full`, a chain at its length limit, the first of a volume) reads the whole
/// volume, never only the ranges (its base image would read zeros everywhere else).
#[test]
fn a_full_backup_given_changed_ranges_reads_the_whole_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    file.write_all_at(&[0x11; 1 << 20], 0).expect("write");
    let ranges = dir.path().join("ranges.json");
    std::fs::write(
        &ranges,
        format!(r#"[{{"offset": {}, "length": 4096}}]"#, 2 << 20),
    )
    .expect("ranges");
    let first = backup(&target, &volume, &["--changed-ranges", s(&ranges)]);
    restore_and_check(
        &target,
        dir.path(),
        &first,
        "",
        &std::fs::read(&volume).expect("read"),
    );
    file.write_all_at(&[0x22; 4096], 2 << 20).expect("write");
    for extra in [&["--full"][..], &["--max-chain-length", "1"][..]] {
        let mut args = vec!["--changed-ranges", s(&ranges)];
        args.extend_from_slice(extra);
        let id = backup(&target, &volume, &args);
        restore_and_check(
            &target,
            dir.path(),
            &id,
            "",
            &std::fs::read(&volume).expect("read"),
        );
    }
}

/// Digests of another geometry than their backup's (another volume's side file put there by
/// hand, with its manifest's size and CRC): the next backup is a full one that says so, and
/// the one after it an incremental again (before, every later incremental failed).
#[test]
fn digests_of_another_geometry_make_the_next_backup_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    file.write_all_at(&[1; 65536], 0).expect("write");
    let latest = backup(&target, &volume, &[]);
    // Another volume of 4 KiB clusters in the same target; its digests go over vol1's.
    let other = ok(strata(&[
        "backup",
        "--quiet",
        "--target",
        s(&target),
        "--volume",
        "other",
        "--cluster-size",
        "4096",
        s(&volume),
    ]));
    let other = other.lines().last().expect("id").trim().to_owned();
    let theirs = std::fs::read(target.join(format!("volumes/other/files/{other}/digests")))
        .expect("their digests");
    std::fs::write(
        target.join(format!("volumes/vol1/files/{latest}/digests")),
        &theirs,
    )
    .expect("swap");
    let manifest = target.join(format!("volumes/vol1/backups/{latest}.json"));
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).expect("json");
    let entry = json["files"]
        .as_array_mut()
        .expect("files")
        .iter_mut()
        .find(|f| f["name"] == "digests")
        .expect("digests entry");
    entry["size"] = theirs.len().into();
    entry["checksums"]["crc32"] = format!("{:08x}", crc32fast::hash(&theirs)).into();
    std::fs::write(&manifest, serde_json::to_vec(&json).expect("json")).expect("manifest");

    file.write_all_at(&[2; 65536], 1 << 20).expect("write");
    let out = backup_output(&target, &volume, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = backup_id_of(&out);
    let text = std::fs::read_to_string(target.join(format!("volumes/vol1/backups/{full}.json")))
        .expect("manifest");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["parent"], serde_json::Value::Null, "{stdout}");
    assert!(
        json["full_reason"]
            .as_str()
            .is_some_and(|r| r.contains("cover 4096 byte clusters")),
        "{text}"
    );
    file.write_all_at(&[3; 65536], 2 << 20).expect("write");
    let next = backup(&target, &volume, &[]);
    let text = std::fs::read_to_string(target.join(format!("volumes/vol1/backups/{next}.json")))
        .expect("manifest");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["parent"].as_str(), Some(full.as_str()));
}

/// A chain the latest backup stands on, broken under it (its base image deleted, an image
/// cut short, a parent's manifest deleted): the next backup is a full one that says which
/// backup is wanting, rather than an incremental that could never restore, and it and the
/// incremental after it restore.
#[test]
fn backups_over_a_broken_chain_start_a_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    let image = |id: &str| target.join(format!("volumes/vol/images/{id}.qcow2"));
    let manifest = |id: &str| target.join(format!("volumes/vol/backups/{id}.json"));
    // How, which backup of the three-deep chain (base first), and whether its image (else
    // its manifest) is damaged.
    let breaks = [
        ("base image deleted", 0, true),
        ("middle image cut short", 1, true),
        ("middle manifest deleted", 1, false),
    ];
    let mut points: Vec<(String, Vec<u8>)> = Vec::new();
    let mut chain = Vec::new();
    for (round, (how, at, image_goes)) in breaks.into_iter().enumerate() {
        // The first round makes a chain of three; each later one extends the two backups the
        // round before left to three.
        while chain.len() < 3 {
            let step = chain.len() as u64;
            file.write_all_at(&[round as u8 * 3 + step as u8 + 1; 65536], step << 20)
                .expect("write");
            let out = ok(backup_named(&target, &volume));
            assert_eq!(
                out.starts_with("incremental backup"),
                step > 0,
                "{how}, step {step}: {out}"
            );
            chain.push(out.lines().last().expect("id").to_string());
        }
        let broken = chain[at].clone();
        // A point of the round before that is damaged here no longer restores.
        points.retain(|(id, _)| id != &broken);
        match (image_goes, at) {
            (true, 0) => std::fs::remove_file(image(&broken)).expect("remove image"),
            (true, _) => {
                let len = std::fs::metadata(image(&broken)).expect("stat").len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(image(&broken))
                    .and_then(|f| f.set_len(len - 512))
                    .expect("truncate")
            }
            (false, _) => std::fs::remove_file(manifest(&broken)).expect("remove manifest"),
        }
        file.write_all_at(&[0xee; 65536], 3 << 20).expect("write");
        let out = ok(backup_named(&target, &volume));
        let latest = chain.last().expect("latest").clone();
        assert!(out.starts_with("full backup"), "{how}: {out}");
        assert!(
            out.contains(&format!(
                "full because the chain of the latest backup {latest} is broken"
            )),
            "{how}: {out}"
        );
        // The reason names the backup that is wanting: the deleted manifest is named by the
        // backup whose parent it was.
        let named = if image_goes { &broken } else { &latest };
        assert!(out.contains(&format!("backup vol/{named}")), "{how}: {out}");
        chain.clear();
        chain.push(out.lines().last().expect("id").to_string());
        points.push((chain[0].clone(), std::fs::read(&volume).expect("read")));
        // The new chain is whole: the next backup extends it.
        file.write_all_at(&[0xdd; 4096], 3 << 20).expect("write");
        let out = ok(backup_named(&target, &volume));
        assert!(out.starts_with("incremental backup"), "{how}: {out}");
        chain.push(out.lines().last().expect("id").to_string());
        points.push((chain[1].clone(), std::fs::read(&volume).expect("read")));
    }
    restore_every_point(&target, dir.path(), points);
}

/// Restores each `(id, bytes)` point of volume `vol` of `target` into `dir` and checks it
/// reads as `bytes`.
fn restore_every_point(target: &Path, dir: &Path, points: Vec<(String, Vec<u8>)>) {
    for (id, bytes) in points {
        let dest = dir.join(format!("{id}.raw"));
        let out = strata_bin::restore_command(s(target), &id, &dest)
            .output()
            .expect("restore");
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&dest).expect("restored"), bytes, "{id}");
    }
}

/// `strata backup` of `source` into volume `vol` of `target`, not quiet (its report lines).
fn backup_named(target: &Path, source: &Path) -> Output {
    strata(&[
        "backup",
        "--target",
        s(target),
        "--volume",
        "vol",
        s(source),
    ])
}

/// Every command that only reads or removes refuses a target that holds no repository with
/// one line naming it, and creates nothing there (a mistyped `--target` used to become a new
/// empty repository that listed nothing and verified clean); `backup` still makes one.
#[test]
fn readers_refuse_a_target_without_a_repository_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("typo");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("empty folder");
    let dest = dir.path().join("restored.raw");
    for target in [&missing, &empty] {
        let t = s(target);
        let commands: [Vec<&str>; 6] = [
            vec!["list", "--target", t],
            vec!["verify", "--target", t],
            vec!["restore", "--target", t, "--volume", "vol", s(&dest)],
            vec![
                "prune",
                "--target",
                t,
                "--volume",
                "vol",
                "--keep-last",
                "1",
            ],
            vec!["gc", "--target", t],
            vec![
                "serve",
                "--target",
                t,
                "--volume",
                "vol",
                "--listen",
                "127.0.0.1:0",
            ],
        ];
        for args in commands {
            let out = strata(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(
                stderr.contains(&format!("repository {t} not found")),
                "{args:?}: {stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        }
        assert!(!dest.exists(), "a restore wrote {}", dest.display());
    }
    assert!(!missing.exists(), "the mistyped folder was created");
    assert_eq!(std::fs::read_dir(&empty).expect("read").count(), 0);

    let source = dir.path().join("vol.raw");
    std::fs::write(&source, strata_bin::noise(1 << 20, 5)).expect("source");
    ok(strata_bin::backup_vol(s(&missing), &source));
    assert_eq!(strata_bin::listing(s(&missing)).len(), 1);
}

/// A character device is no volume: `backup /dev/null` used to commit an empty volume as the
/// latest point of the chain. It is refused with one line, and nothing is committed.
#[test]
fn backup_refuses_a_character_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let source = dir.path().join("vol.raw");
    std::fs::write(&source, strata_bin::noise(1 << 20, 9)).expect("source");
    ok(strata_bin::backup_vol(s(&target), &source));
    let out = strata_bin::backup_vol(s(&target), Path::new("/dev/null"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("neither a regular file nor a block device"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(strata_bin::listing(s(&target)).len(), 1);
}

/// A restore whose destination is not a place for a volume is refused, one line, before
/// anything is written: a character device (it used to be replaced by a regular file, the
/// restore exiting 0), a folder, and a file inside a folder target's repository (the rename
/// would have replaced the backup's own image). Each is left as it was.
#[test]
fn restore_refuses_destinations_that_are_not_for_a_volume() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let source = dir.path().join("vol.raw");
    std::fs::write(&source, strata_bin::noise(1 << 20, 5)).expect("source");
    let out = ok(strata_bin::backup_vol(s(&target), &source));
    let id = out.lines().last().expect("id").to_string();
    let image = target.join(format!("volumes/vol/images/{id}.qcow2"));
    let image_bytes = std::fs::read(&image).expect("image");
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).expect("folder");
    let cases: [(&Path, &str); 4] = [
        (
            Path::new("/dev/null"),
            "neither a regular file nor a block device",
        ),
        (&folder, "neither a regular file nor a block device"),
        (&image, "inside the target's repository"),
        (
            &target.join("restored.raw"),
            "inside the target's repository",
        ),
    ];
    for (dest, problem) in cases {
        let out = strata_bin::restore_command(s(&target), &id, dest)
            .output()
            .expect("restore");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", dest.display());
        assert!(stderr.contains(problem), "{}: {stderr}", dest.display());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let null = std::fs::metadata("/dev/null").expect("/dev/null");
    assert!(null.file_type().is_char_device(), "/dev/null is still one");
    assert!(folder.is_dir() && !dir.path().join("a-folder.partial").exists());
    assert_eq!(std::fs::read(&image).expect("image"), image_bytes);
    assert!(!target.join("restored.raw").exists());
    assert!(!target.join("restored.raw.partial").exists());
    ok(strata(&["verify", "--target", s(&target)]));
}

/// A restore over an existing file keeps that file's permissions (a 0600 file does not become
/// world-readable), and one through a symbolic link replaces the file the link names and
/// keeps the link.
#[test]
fn restore_keeps_the_replaced_files_mode_and_follows_links() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let source = dir.path().join("vol.raw");
    let data = strata_bin::noise(1 << 20, 6);
    std::fs::write(&source, &data).expect("source");
    let out = ok(strata_bin::backup_vol(s(&target), &source));
    let id = out.lines().last().expect("id").to_string();

    let private = dir.path().join("private.raw");
    std::fs::write(&private, b"old").expect("old file");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    ok(strata_bin::restore_command(s(&target), &id, &private)
        .output()
        .expect("restore"));
    assert_eq!(std::fs::read(&private).expect("restored"), data);
    let mode = std::fs::metadata(&private)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let linked = dir.path().join("linked.raw");
    let link = dir.path().join("link.raw");
    std::fs::write(&linked, b"old").expect("old file");
    std::os::unix::fs::symlink(&linked, &link).expect("symlink");
    ok(strata_bin::restore_command(s(&target), &id, &link)
        .output()
        .expect("restore"));
    let link_meta = std::fs::symlink_metadata(&link).expect("lstat");
    assert!(link_meta.file_type().is_symlink(), "the link is kept");
    assert_eq!(std::fs::read_link(&link).expect("readlink"), linked);
    assert_eq!(std::fs::read(&linked).expect("restored"), data);

    // A link to a file not made yet (relative, as links often are): that file is made.
    let dangling = dir.path().join("dangling.raw");
    std::os::unix::fs::symlink("made-by-restore.raw", &dangling).expect("symlink");
    ok(strata_bin::restore_command(s(&target), &id, &dangling)
        .output()
        .expect("restore"));
    assert!(
        std::fs::symlink_metadata(&dangling)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(dir.path().join("made-by-restore.raw")).expect("restored"),
        data
    );
}

/// One manifest that does not read (garbage where a backup's manifest was) hides no other
/// backup: `list` names it on stderr and lists the rest, `verify` reports it as that backup's
/// damage, verifies the others and exits 1, and `backup` goes on (a full backup when the
/// damaged one holds the child slot of the latest that reads: it is the real latest).
/// `verify --backup` of an id that does not exist says so.
#[test]
fn a_damaged_manifest_hides_no_other_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    let mut ids = Vec::new();
    for step in 0..3u64 {
        file.write_all_at(&[step as u8 + 1; 65536], step << 20)
            .expect("write");
        let out = ok(backup_named(&target, &volume));
        ids.push(out.lines().last().expect("id").to_string());
    }
    let manifest = |id: &str| target.join(format!("volumes/vol/backups/{id}.json"));
    // The latest is the damaged one.
    std::fs::write(manifest(&ids[2]), b"{ not json").expect("damage");
    let out = strata(&["list", "--target", s(&target), "--output", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains(&format!("{}.json", ids[2])),
        "{stderr}"
    );
    let listed: Vec<String> = strata_bin::listing(s(&target))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, ids[..2]);

    let out = strata(&["verify", "--target", s(&target)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("vol/{}: ok", ids[0])), "{stdout}");
    assert!(stdout.contains(&format!("vol/{}: ok", ids[1])), "{stdout}");
    assert!(
        stdout.contains(&format!("vol/{}: DAMAGED: manifest: ", ids[2])),
        "{stdout}"
    );
    assert!(!stdout.contains("guest offset"), "{stdout}");

    // Restoring "the latest" cannot tell which it is: refused, naming the damaged one; by id
    // the others restore.
    let dest = dir.path().join("restored.raw");
    let out = strata(&[
        "restore",
        "--target",
        s(&target),
        "--volume",
        "vol",
        s(&dest),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "backup vol/{}: its manifest does not read",
            ids[2]
        )) && stderr.contains("ask for a backup by its id"),
        "{stderr}"
    );
    ok(strata_bin::restore_command(s(&target), &ids[1], &dest)
        .output()
        .expect("restore"));

    // The damaged backup holds the child slot of the latest that reads, which is not
    // forked: a full backup, saying why (with the flags that look at the latest backup). A
    // second later, so that its id tells it is newer than the damaged one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    file.write_all_at(&[9; 65536], 3 << 20).expect("write");
    let out = ok(strata(&[
        "backup",
        "--target",
        s(&target),
        "--volume",
        "vol",
        "--digests",
        "blake3",
        s(&volume),
    ]));
    assert!(out.starts_with("full backup"), "{out}");
    assert!(
        out.contains(&format!(
            "full because the latest backup {} cannot be extended",
            ids[1]
        )),
        "{out}"
    );
    let full = out.lines().last().expect("id").to_string();
    // The new chain is whole: incrementals again, changed ranges since it used, and the
    // latest restores.
    file.write_all_at(&[10; 4096], 0).expect("write");
    let ranges = dir.path().join("ranges.json");
    std::fs::write(&ranges, r#"[{"offset": 0, "length": 4096}]"#).expect("ranges");
    let out = ok(strata(&[
        "backup",
        "--target",
        s(&target),
        "--volume",
        "vol",
        "--changed-ranges",
        s(&ranges),
        "--changed-since",
        &full,
        s(&volume),
    ]));
    assert!(out.starts_with("incremental backup"), "{out}");
    ok(strata(&[
        "restore",
        "--target",
        s(&target),
        "--volume",
        "vol",
        s(&dest),
    ]));
    assert_eq!(
        std::fs::read(&dest).expect("restored"),
        std::fs::read(&volume).expect("volume")
    );
    assert_ne!(full, ids[2]);

    let unknown = "20200101T000000Z-00000000";
    let out = strata(&["verify", "--target", s(&target), "--backup", unknown]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("backup {unknown} not found")),
        "{stderr}"
    );
}
