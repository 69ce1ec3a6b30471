//! `strata backup ... nbd://HOST:PORT/EXPORT`: a volume served by qemu-nbd, backed up full and
//! then incrementally, restores byte-identical.

mod strata_bin;
use strata_bin::{ok, s, strata};

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn tool(program: &str, args: &[&str]) -> String {
    ok(Command::new(program)
        .args(args)
        .output()
        .expect("tool runs"))
}

/// `qemu-nbd -r` serving `file` as export `vol` on a free port; killed on drop.
struct QemuNbd(Child, String);

impl QemuNbd {
    fn start(file: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "raw",
                "-x",
                "vol",
                "-b",
                "127.0.0.1",
                "--persistent",
            ])
            .args(["-p", &port.to_string()])
            .arg(file)
            .spawn()
            .expect("qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self(child, format!("nbd://127.0.0.1:{port}/vol"))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Backs up the export at `url`; returns (first line, id).
fn backup(target: &Path, url: &str) -> (String, String) {
    let stdout = ok(strata(&[
        "backup",
        "--quiet",
        "--target",
        s(target),
        "--volume",
        "vm",
        url,
    ]));
    let mut lines = stdout.lines();
    let first = lines.next().unwrap_or_default().to_owned();
    (first, lines.last().unwrap_or_default().trim().to_owned())
}

fn restore_equals(target: &Path, id: &str, dest: &Path, expected: &Path) {
    ok(strata(&[
        "restore",
        "--quiet",
        "--target",
        s(target),
        "--volume",
        "vm",
        "--backup",
        id,
        s(dest),
    ]));
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            s(dest),
            s(expected),
        ],
    );
}

#[test]
fn full_then_incremental_backups_of_a_qemu_nbd_export_restore_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("vm.raw");
    let target = dir.path().join("repo");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&volume), "256M"],
    );
    for cmd in [
        "write -P 0x11 0 1M",
        "write -P 0x22 100M 3M",
        "write -P 0x33 255M 1M",
    ] {
        tool("qemu-io", &["-f", "raw", "-c", cmd, s(&volume)]);
    }
    let first_state = dir.path().join("first.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", s(&volume), s(&first_state)],
    );

    let served = QemuNbd::start(&volume);
    let (kind, full) = backup(&target, &served.1);
    assert!(kind.starts_with("full backup of vm"), "{kind}");
    drop(served);

    for cmd in [
        "write -P 0x44 100M 64k",
        "write -z 0 1M",
        "write -P 0x55 200M 128k",
    ] {
        tool("qemu-io", &["-f", "raw", "-c", cmd, s(&volume)]);
    }
    let served = QemuNbd::start(&volume);
    let (kind, incremental) = backup(&target, &served.1);
    assert!(kind.starts_with("incremental backup of vm"), "{kind}");
    drop(served);

    restore_equals(
        &target,
        &incremental,
        &dir.path().join("second.out"),
        &volume,
    );
    restore_equals(&target, &full, &dir.path().join("first.out"), &first_state);
}

#[test]
fn a_backup_from_an_nbd_url_nobody_serves_fails_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("nbd://127.0.0.1:{port}/vol");
    let out = strata(&["backup", "--target", s(dir.path()), "--volume", "vm", &url]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("connecting to {url}")), "{stderr}");
}
