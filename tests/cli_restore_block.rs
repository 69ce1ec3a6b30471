//! `strata restore` onto a real block device (a loop device filled with garbage), as a
//! datamover restores onto a raw block PVC: every byte ends up as the backed-up volume's, holes
//! included, and `--target-is-zero` trusts the device to read zeros.
//!
//! Needs root for `losetup`; without it the test says so and passes, except under `CI`.

mod strata_bin;
use strata_bin::strata_command;

use std::os::unix::fs::FileExt;
use std::process::Command;

const SIZE: u64 = 16 << 20;

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// `backing` as a loop device; `None` (said on stderr) where `losetup` fails, except under
/// `CI`, where that fails the test.
fn attach(backing: &std::path::Path) -> Option<Loop> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .expect("losetup");
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "losetup failed under CI: {why}"
        );
        eprintln!("SKIPPED: losetup failed: {why}");
        return None;
    }
    Some(Loop(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

fn ok(args: &[&str]) -> String {
    let out = strata_command().args(args).output().expect("run strata");
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn restores_onto_a_block_device_byte_for_byte() {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(SIZE).expect("size");
    // Data at the start and in the middle; the rest a hole.
    file.write_all_at(&vec![0x5au8; 3 << 20], 0).expect("write");
    file.write_all_at(&vec![0x77u8; 1 << 20], 9 << 20)
        .expect("write");
    let target = dir.path().join("target");
    let (t, v) = (
        target.to_str().expect("utf-8"),
        volume.to_str().expect("utf-8"),
    );
    ok(&["backup", "--target", t, "--volume", "vol", "-q", v]);

    let backing = dir.path().join("device.img");
    let device_file = std::fs::File::create(&backing).expect("backing");
    device_file
        .write_all_at(&vec![0xeeu8; SIZE as usize], 0)
        .expect("garbage");
    device_file.sync_all().expect("sync");
    let Some(dev) = attach(&backing) else {
        return;
    };
    let expected = std::fs::read(&volume).expect("volume");
    let read_device = || {
        let device = std::fs::File::open(&dev.0).expect("open device");
        let mut content = vec![0u8; SIZE as usize];
        device.read_exact_at(&mut content, 0).expect("read device");
        content
    };

    ok(&["restore", "--target", t, "--volume", "vol", "-q", &dev.0]);
    assert!(
        read_device() == expected,
        "the device differs from the volume"
    );

    // With --target-is-zero the holes are left as the device has them: garbage here, which
    // shows the flag is only for devices that really read zeros.
    device_file
        .write_all_at(&vec![0xeeu8; SIZE as usize], 0)
        .expect("garbage");
    device_file.sync_all().expect("sync");
    let flush = Command::new("blockdev")
        .args(["--flushbufs", &dev.0])
        .status()
        .expect("blockdev");
    assert!(flush.success());
    ok(&[
        "restore",
        "--target",
        t,
        "--volume",
        "vol",
        "--target-is-zero",
        "-q",
        &dev.0,
    ]);
    let content = read_device();
    assert!(content[..3 << 20] == expected[..3 << 20]);
    assert!(content[9 << 20..10 << 20] == expected[9 << 20..10 << 20]);
    assert!(content[4 << 20..9 << 20].iter().all(|&b| b == 0xee));
}

#[test]
fn a_device_smaller_than_the_volume_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = dir.path().join("volume.raw");
    std::fs::write(&volume, vec![0x5au8; 1 << 20]).expect("volume");
    let target = dir.path().join("target");
    let (t, v) = (
        target.to_str().expect("utf-8"),
        volume.to_str().expect("utf-8"),
    );
    ok(&["backup", "--target", t, "--volume", "vol", "-q", v]);
    let backing = dir.path().join("device.img");
    std::fs::write(&backing, vec![0xeeu8; 512 << 10]).expect("backing");
    let Some(dev) = attach(&backing) else {
        return;
    };
    let out = strata_command()
        .args(["restore", "--target", t, "--volume", "vol", "-q", &dev.0])
        .output()
        .expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the device holds 524288 bytes, the volume 1048576; nothing was written")
            && !stderr.contains("incomplete"),
        "{stderr}"
    );
    drop(dev);
    assert!(
        std::fs::read(&backing)
            .expect("backing")
            .iter()
            .all(|&b| b == 0xee),
        "the device was written"
    );
}
