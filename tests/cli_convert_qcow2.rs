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

/// A QCOW2 source converts to QCOW2 as qemu-img converts it, whether or not `-f qcow2` is
/// given: the chain is read as the volume (an overlay on its base flattens into one image),
/// never the source file's own bytes taken as guest data. Zero and unallocated ranges are
/// not stored.
#[test]
fn a_qcow2_chain_converts_to_one_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let qemu = |args: &[&str]| {
        let out = qemu_img(dir, args);
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    qemu(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let io = |image: &str, command: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", command, image])
            .current_dir(dir)
            .output()
            .expect("qemu-io runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    io("base.qcow2", "write -P 0x41 0 1M");
    io("top.qcow2", "write -P 0x42 512k 64k");
    io("top.qcow2", "write -z 8M 1M");
    for (format, out_name) in [(None, "flat-probed.qcow2"), (Some("qcow2"), "flat.qcow2")] {
        let mut args = vec!["convert"];
        if let Some(format) = format {
            args.extend(["-f", format]);
        }
        args.extend(["-O", "qcow2", "top.qcow2", out_name]);
        let out = strata(dir, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu(&["check", "-q", out_name]);
        qemu(&["compare", "-q", "top.qcow2", out_name]);
        let info = qemu_img(dir, &["info", "--output", "json", out_name]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
        // 1 MiB of data in 64 KiB clusters, and the metadata around it: far less than the
        // source files hold together, and nothing of the zeroed 1 MiB.
        let len = std::fs::metadata(dir.join(out_name)).unwrap().len();
        assert!(len < (1 << 20) + 6 * 65536, "{out_name}: {len} bytes");
    }
}

/// A destination that is neither a file nor a block device is refused, not replaced by the
/// converted file. (A conversion that fails part-way: `tests/cli_disk_full.rs`.)
#[test]
fn a_destination_that_is_not_a_file_or_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sparse_volume(&dir.join("v.raw"), &[(0, 0x41, 1 << 20)]);
    std::os::unix::fs::symlink("/dev/null", dir.join("null-link")).unwrap();
    for (output, dest) in [
        ("raw", "/dev/null"),
        ("qcow2", "/dev/null"),
        ("raw", "null-link"),
    ] {
        let out = strata(dir, &["convert", "-O", output, "v.raw", dest]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("neither a regular file nor a block device"),
            "{stderr}"
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }
}

/// A conversion over an existing file keeps its permissions: a 0600 file stays 0600 (its
/// replacement is created so, never readable by others meanwhile).
#[test]
fn a_replaced_destination_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    sparse_volume(&dir.join("v.raw"), &[(0, 0x41, 1 << 20)]);
    for (output, dest) in [("qcow2", "v.qcow2"), ("raw", "copy.raw")] {
        let path = dir.join(dest);
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let source = if output == "raw" { "v.qcow2" } else { "v.raw" };
        let out = strata(dir, &["convert", "-O", output, source, dest]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{dest}: {mode:o}");
    }
    assert!(
        qemu_img(dir, &["compare", "-q", "-f", "raw", "v.raw", "copy.raw"])
            .status
            .success()
    );
}
