//! `strata convert -O qcow2` as a user runs it: a base image, an overlay with `-B`, bad options.

mod strata_bin;
use strata_bin::strata_command;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

/// Runs the `strata` example binary.
fn strata(dir: &Path, args: &[&str]) -> Output {
    strata_command()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("strata runs")
}

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img runs")
}

fn sparse_volume(path: &Path, writes: &[(u64, u8, usize)]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(16 << 20).unwrap();
    for &(offset, byte, len) in writes {
        file.write_all_at(&vec![byte; len], offset).unwrap();
    }
}

#[test]
fn base_and_overlay_pass_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sparse_volume(
        &dir.join("mon.raw"),
        &[(0, 0x41, 1 << 20), (8 << 20, 0x42, 4096)],
    );
    sparse_volume(
        &dir.join("tue.raw"),
        &[(0, 0x41, 1 << 20), (8 << 20, 0x43, 4096)],
    );
    let out = strata(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=1.1",
            "mon.raw",
            "mon.qcow2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = strata(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compression_type=zstd",
            "-B",
            "mon.qcow2",
            "tue.raw",
            "tue.qcow2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for image in ["mon.qcow2", "tue.qcow2"] {
        assert!(
            qemu_img(dir, &["check", "-q", image]).status.success(),
            "{image}"
        );
    }
    assert!(
        qemu_img(dir, &["compare", "-q", "-f", "raw", "tue.raw", "tue.qcow2"])
            .status
            .success()
    );
    let info = qemu_img(dir, &["info", "tue.qcow2"]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("backing file: mon.qcow2\n"), "{info}");
    // One changed 64 KiB cluster: header, that cluster, one L2 table, the L1 table, one refcount
    // block and the refcount table.
    assert_eq!(
        std::fs::metadata(dir.join("tue.qcow2")).unwrap().len(),
        6 * 65536
    );
}

#[test]
fn bad_option_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    sparse_volume(&dir.path().join("v.raw"), &[]);
    let out = strata(
        dir.path(),
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,compression_type=zstd",
            "v.raw",
            "v.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("zstd"), "{stderr}");
    assert!(!dir.path().join("v.qcow2").exists());
}
