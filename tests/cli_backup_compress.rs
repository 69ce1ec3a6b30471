//! `strata backup` compresses by default: images judged by qemu-img (`check`, `compare`,
//! `info`, `map`), compressed clusters packed byte-adjacent across raw ones, incompressible
//! clusters stored raw, incrementals as minimal as without compression, `--compress none` as
//! before.

mod strata_bin;
use strata_bin::strata_command;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use strata::qcow2::{ExtentKind, Image};

const CLUSTER: u64 = 65536;
/// Clusters of the test volume: text, random, hole, repeated.
const CLUSTERS: u64 = 192;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    ok(Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img"))
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
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

/// Text-like bytes: numbered lines, which compress about tenfold.
fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out: Vec<u8> = (0..)
        .flat_map(|i| format!("line {i:08} of part {seed} of the volume\n").into_bytes())
        .take(len)
        .collect();
    out.truncate(len);
    out
}

/// Writes cluster `index` of the mixed volume: text for `index % 3 == 0`, random for 1, a
/// hole for 2.
fn write_mixed_cluster(file: &std::fs::File, index: u64, seed: u64) {
    let bytes = match index % 3 {
        0 => text_bytes(CLUSTER as usize, seed + index),
        1 => random_bytes(CLUSTER as usize, seed + index),
        _ => return,
    };
    file.write_all_at(&bytes, index * CLUSTER).expect("write");
}

fn mixed_volume(dir: &Path) -> (PathBuf, std::fs::File) {
    let path = dir.join("volume.raw");
    let file = std::fs::File::create(&path).expect("volume");
    file.set_len(CLUSTERS * CLUSTER).expect("size");
    for index in 0..CLUSTERS {
        write_mixed_cluster(&file, index, 1);
    }
    (path, file)
}

/// Backs up `volume` into `target` with `extra` options; returns the new backup's image.
fn backup(target: &Path, volume: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "backup",
        "--quiet",
        "--target",
        s(target),
        "--volume",
        "vol",
    ];
    args.extend_from_slice(extra);
    args.push(s(volume));
    let out = ok(strata_command().args(&args).output().expect("strata"));
    let id = out.lines().last().expect("an id").trim().to_owned();
    target
        .join("volumes/vol/images")
        .join(format!("{id}.qcow2"))
}

fn assert_clean_and_equal(image: &Path, volume: &Path) {
    qemu_img(&["check", s(image)]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(volume), s(image)]);
}

fn compression_type(image: &Path) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(image)])).expect("json");
    info["format-specific"]["data"]["compression-type"]
        .as_str()
        .expect("compression type")
        .to_owned()
}

/// What the top image stores for each guest cluster, by the reader's map: `'c'` compressed
/// (with its host offset), `'r'` raw, `'z'` zero, `'-'` nothing.
fn stored(image: &Path) -> Vec<(char, u64)> {
    let image = Image::open(image).expect("open");
    let mut out = vec![('-', 0); CLUSTERS as usize];
    for extent in image.map(0, CLUSTERS * CLUSTER).expect("map") {
        let kind = match extent.kind {
            ExtentKind::Compressed {
                depth: 0,
                host_offset,
                ..
            } => ('c', host_offset.get()),
            ExtentKind::Data {
                depth: 0,
                host_offset,
            } => ('r', host_offset.get()),
            ExtentKind::Zero { depth: 0 } => ('z', 0),
            _ => continue,
        };
        let clusters = extent.range().clusters(CLUSTER);
        let first = clusters.start;
        for index in clusters {
            let host = match kind.0 {
                'r' => kind.1 + (index - first) * CLUSTER,
                _ => kind.1,
            };
            out[index as usize] = (kind.0, host);
        }
    }
    out
}

#[test]
fn default_backups_are_zstd_compressed_and_qemu_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let (volume, _file) = mixed_volume(dir.path());
    let image = backup(&target, &volume, &[]);
    assert_clean_and_equal(&image, &volume);
    assert_eq!(compression_type(&image), "zstd");
    let map = stored(&image);
    for (index, &(kind, _)) in map.iter().enumerate() {
        // Text compresses, random clusters do not shrink and are stored raw, holes stay holes.
        let expected = ['c', 'r', '-'][index % 3];
        assert_eq!(kind, expected, "cluster {index}: {map:?}");
    }
    // Consecutive compressed clusters are byte-adjacent although a raw cluster lies between
    // them: the next starts within the sector where the previous one ends, no host cluster
    // padding, except where the writer starts a new segment (none in 4 MiB of data).
    let compressed: Vec<u64> = map
        .iter()
        .filter(|&&(kind, _)| kind == 'c')
        .map(|&(_, host)| host)
        .collect();
    for pair in compressed.windows(2) {
        assert!(
            pair[1] > pair[0] && pair[1] - pair[0] < CLUSTER / 4,
            "compressed clusters at {:#x} and {:#x} are not packed",
            pair[0],
            pair[1]
        );
    }
    ok(strata_command()
        .args(["verify", "--target", s(&target)])
        .output()
        .expect("strata"));

    // `--compress none`: the old behaviour, every cluster raw, the header says zlib.
    let plain = backup(&target, &volume, &["--full", "--compress", "none"]);
    assert_clean_and_equal(&plain, &volume);
    assert_eq!(compression_type(&plain), "zlib");
    assert!(stored(&plain).iter().all(|&(kind, _)| kind != 'c'));
    // The 64 text clusters take less than 16 clusters compressed, so the compressed image is
    // smaller by at least 48 clusters (both have the same header area and metadata).
    let size = |image: &Path| std::fs::metadata(image).expect("image").len();
    assert!(
        size(&plain) >= size(&image) + 48 * CLUSTER,
        "{} against {}",
        size(&plain),
        size(&image)
    );
}

#[test]
fn compressed_incrementals_store_only_the_changed_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let (volume, file) = mixed_volume(dir.path());
    let base = backup(&target, &volume, &["--compress", "zstd:3"]);
    // Change a text cluster, a random one, fill a hole with text, zero a text cluster.
    write_mixed_cluster(&file, 30, 7);
    write_mixed_cluster(&file, 31, 7);
    file.write_all_at(&text_bytes(CLUSTER as usize, 9), 32 * CLUSTER)
        .expect("write");
    file.write_all_at(&vec![0; CLUSTER as usize], 60 * CLUSTER)
        .expect("zero");
    let overlay = backup(&target, &volume, &[]);
    assert_clean_and_equal(&overlay, &volume);
    assert_eq!(compression_type(&overlay), "zstd");
    let changed: Vec<(usize, char)> = stored(&overlay)
        .into_iter()
        .enumerate()
        .filter(|&(_, (kind, _))| kind != '-')
        .map(|(index, (kind, _))| (index, kind))
        .collect();
    assert_eq!(changed, [(30, 'c'), (31, 'r'), (32, 'c'), (60, 'z')]);

    // A zlib overlay on the zstd chain reads correctly too: each image names its method.
    write_mixed_cluster(&file, 90, 11);
    let third = backup(&target, &volume, &["--compress", "zlib"]);
    assert_clean_and_equal(&third, &volume);
    assert_eq!(compression_type(&third), "zlib");
    assert_eq!(compression_type(&base), "zstd");
    ok(strata_command()
        .args(["verify", "--target", s(&target)])
        .output()
        .expect("strata"));
    let restored = dir.path().join("restored.raw");
    ok(strata_command()
        .args([
            "restore",
            "--quiet",
            "--target",
            s(&target),
            "--volume",
            "vol",
        ])
        .arg(&restored)
        .output()
        .expect("strata"));
    assert!(std::fs::read(&restored).expect("restored") == std::fs::read(&volume).expect("volume"));
}

#[test]
fn bad_compress_choices_are_refused_before_the_target_is_touched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let (volume, _file) = mixed_volume(dir.path());
    for choice in ["lz4", "zstd:99", "zlib:10", "none:1", "zstd:x"] {
        let out = strata_command()
            .args([
                "backup",
                "--quiet",
                "--target",
                s(&target),
                "--volume",
                "vol",
            ])
            .args(["--compress", choice])
            .arg(&volume)
            .output()
            .expect("strata");
        assert_eq!(out.status.code(), Some(2), "{choice}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(choice),
            "{choice}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!target.exists());
}

/// A prune's merged image is compressed as the backups were: retention does not inflate them.
#[test]
fn a_fold_keeps_the_clusters_compressed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let (volume, file) = mixed_volume(dir.path());
    backup(&target, &volume, &[]);
    write_mixed_cluster(&file, 30, 7);
    let overlay = backup(&target, &volume, &[]);
    ok(strata_command()
        .args([
            "prune",
            "--target",
            s(&target),
            "--volume",
            "vol",
            "--keep-last",
            "1",
        ])
        .output()
        .expect("strata"));
    // On a folder the child's canonical name is re-pointed to the merged image.
    assert_clean_and_equal(&overlay, &volume);
    let kinds: Vec<char> = stored(&overlay).into_iter().map(|(kind, _)| kind).collect();
    let text_clusters = (0..CLUSTERS as usize).filter(|i| i % 3 == 0).count();
    assert!(
        kinds.iter().filter(|&&k| k == 'c').count() >= text_clusters,
        "the merged image stores its text clusters raw: {kinds:?}"
    );
}
