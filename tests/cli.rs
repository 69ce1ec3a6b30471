//! The `strata` CLI as a user runs it: exit status, one-line errors, output formats.

mod strata_bin;
use strata_bin::strata_command as strata;

use std::path::PathBuf;
use std::process::{Command, Output};

fn run(dir: &std::path::Path, program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn chain(dir: &std::path::Path) -> PathBuf {
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"],
    );
    run(dir, "qemu-io", &["-c", "write -P 0x41 0 1M", "base.qcow2"]);
    run(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    run(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x42 8M 64k",
            "-c",
            "write -z 0 64k",
            "top.qcow2",
        ],
    );
    dir.join("top.qcow2")
}

#[test]
fn info_json_describes_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path());
    let out = strata()
        .args(["info", "--output", "json"])
        .arg(&top)
        .output()
        .expect("run");
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 16 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["format-specific"]["compat"], "1.1");
    assert_eq!(info["backing-chain"][0]["format"], "qcow2");
}

#[test]
fn map_json_matches_qemu_img_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path());
    let ours = strata()
        .args(["map", "--output", "json"])
        .arg(&top)
        .output()
        .expect("run");
    assert!(ours.status.success());
    let theirs = run(
        dir.path(),
        "qemu-img",
        &["map", "--output", "json", "top.qcow2"],
    );
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).expect("json");
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).expect("json");
    assert_eq!(ours, theirs);
}

#[test]
fn convert_hydrates_sparse_and_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path());
    let dest = dir.path().join("out.raw");
    let out = strata()
        .args(["convert", "-O", "raw"])
        .arg(&top)
        .arg(&dest)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(
        dir.path(),
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "ref.raw"],
    );
    assert_eq!(
        std::fs::read(&dest).expect("ours"),
        std::fs::read(dir.path().join("ref.raw")).expect("ref")
    );
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&dest).expect("stat").blocks();
    assert!(blocks * 512 < 4 << 20, "not sparse: {blocks} blocks");
}

/// A destination that is an input of the conversion (the source itself, by another path, a
/// backing file of its chain, or an external data file) is refused before it is opened, and
/// left as it was.
#[test]
fn convert_refuses_to_overwrite_its_own_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = chain(dir.path());
    let base = dir.path().join("base.qcow2");
    let raw = dir.path().join("a.raw");
    std::fs::write(&raw, vec![0x5a; 1 << 20]).expect("raw");
    let alias = dir.path().join("alias.raw");
    std::fs::hard_link(&raw, &alias).expect("link");
    // A source named as the partial file a conversion into `disk` writes first (what a
    // killed restore into `disk` leaves): it would be emptied before it is read.
    let partial = dir.path().join("disk.partial");
    std::fs::write(&partial, vec![0x6b; 1 << 20]).expect("partial");
    let disk = dir.path().join("disk");
    // An image whose clusters are in an external data file, named relative to it.
    let qemu = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir.path())
            .output()
            .expect("run qemu");
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=ext.raw",
        "ext.qcow2",
        "1M",
    ]);
    qemu(&["qemu-io", "-c", "write -P 0x4d 0 64k", "ext.qcow2"]);
    let (external, data_file) = (dir.path().join("ext.qcow2"), dir.path().join("ext.raw"));
    let cases: [(&[&str], &std::path::Path, &std::path::Path); 8] = [
        (&["-O", "raw"], &raw, &raw),
        (&["-O", "raw"], &raw, &alias),
        (&["-O", "raw"], &top, &base),
        (&["-f", "raw", "-O", "qcow2"], &raw, &alias),
        (&["-O", "raw"], &partial, &disk),
        (&["-f", "raw", "-O", "qcow2"], &partial, &disk),
        (&["-O", "raw"], &external, &data_file),
        (&["-O", "qcow2"], &external, &data_file),
    ];
    for (flags, source, dest) in cases {
        let before = std::fs::read(dest).ok();
        let source_before = std::fs::read(source).expect("source");
        let out = strata()
            .arg("convert")
            .args(flags)
            .arg(source)
            .arg(dest)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?} {dest:?}: {err}");
        assert!(err.contains("an input of the conversion"), "{err}");
        assert_eq!(std::fs::read(dest).ok(), before, "{dest:?} changed");
        assert_eq!(
            std::fs::read(source).expect("source after"),
            source_before,
            "{source:?} changed"
        );
    }
}

/// Names stored in an image reach the terminal escaped: a backing name holding a terminal
/// control sequence is printed as its escape by `info` and `map`.
#[test]
fn info_and_map_escape_the_names_an_image_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "b\u{1b}[2Jase.qcow2";
    run(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base, "1M"],
    );
    run(dir.path(), "qemu-io", &["-c", "write -P 0x21 0 64k", base]);
    run(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base,
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    for command in ["info", "map"] {
        let out = strata()
            .arg(command)
            .arg(dir.path().join("top.qcow2"))
            .output()
            .expect("run");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command}: {out:?}");
        assert!(!printed.contains('\u{1b}'), "{command}: {printed:?}");
        assert!(
            printed.contains("b\\u{1b}[2Jase.qcow2"),
            "{command}: {printed}"
        );
    }
}

#[test]
fn errors_are_one_line_with_status_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bogus = dir.path().join("bogus.qcow2");
    let mut header = b"QFI\xfb\0\0\0\x07".to_vec();
    header.resize(4096, 0);
    std::fs::write(&bogus, header).expect("write");
    for args in [vec!["info"], vec!["map"], vec!["convert", "-O", "raw"]] {
        let mut cmd = strata();
        cmd.args(&args).arg(&bogus);
        if args[0] == "convert" {
            cmd.arg(dir.path().join("x.raw"));
        }
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("version 7"), "{stderr}");
    }
    let out = strata()
        .arg("info")
        .arg(dir.path().join("missing.qcow2"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    // A directory given as the volume (a filesystem mount point) is named as one.
    let target = dir.path().join("target");
    let out = strata()
        .args(["backup", "--target"])
        .arg(&target)
        .args(["--volume", "v"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("it is a directory"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// A backing file the default policy refuses is named, and so is the flag that allows it.
#[test]
fn a_refused_backing_file_names_trust_backing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let out = strata().arg("info").arg(&top).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(stderr.contains("--trust-backing"), "{stderr}");
    let trusted = strata()
        .args(["info", "--trust-backing"])
        .arg(&top)
        .output()
        .expect("run");
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
}

/// A lease longer than other writers honour (10 minutes) is refused before anything runs:
/// renewed every third of it, it would lapse in their eyes while its writer lives.
#[test]
fn a_lease_longer_than_ten_minutes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("vol.raw");
    std::fs::write(&source, [0u8; 4096]).unwrap();
    let target = dir.path().join("target");
    let out = strata_bin::strata(&[
        "backup",
        "--lease",
        "40m",
        "--target",
        target.to_str().unwrap(),
        "--volume",
        "v",
        source.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("longer than the longest lease, 10m"),
        "{stderr}"
    );
    assert!(!target.exists(), "the refused backup made its target");
}
