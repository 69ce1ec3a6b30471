//! A disk that fills, for real: a small tmpfs (mounted here) as a folder target that runs out
//! of room in the middle of a backup, as the destination of a restore, under a thin block
//! device (a loop device over a sparse file larger than its tmpfs, as a thin pool runs out)
//! that a restore fills, and under the copy-on-write overlay of a served image (whose clients
//! get `ENOSPC`). The failing command
//! says so in one line naming the problem; nothing committed is lost; nothing half-written is
//! listed or left behind; and once there is room again the next run works and chains on the
//! last committed point.
//!
//! Needs root for `mount`; without it the tests say so and pass, except under `CI`, where they
//! fail (CI runs as root and must run them).

#[path = "../qcow2/tests/common/loop_device.rs"]
mod loop_device;
mod strata_bin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use strata_bin::{KillOnDrop, backup_vol, listing, noise, ok, restore_command, s, strata};

const VOLUME: usize = 8 << 20;

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            if std::env::var_os("CI").is_some() {
                panic!("mounting a tmpfs failed under CI: {why}");
            }
            eprintln!("SKIPPED: mounting a tmpfs failed: {why}");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// A command that must have failed with one line naming the full disk.
fn assert_fails_for_want_of_room(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded on a full disk");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: not one line: {stderr}"
    );
    assert_eq!(
        stderr.matches("No space left on device").count(),
        1,
        "{what}: the error does not name the full disk, once: {stderr}"
    );
}

fn restore(target: &str, id: &str, dest: &Path) -> Output {
    restore_command(target, id, dest)
        .output()
        .expect("run strata")
}

/// A folder target (in a new temporary directory, returned to keep it) holding one backup of a
/// volume of `content`, and that backup's id.
fn backed_up(content: &[u8]) -> (tempfile::TempDir, String, String) {
    let work = tempfile::tempdir().expect("temp dir");
    let target = s(&work.path().join("target")).to_string();
    let volume = work.path().join("volume.raw");
    std::fs::write(&volume, content).expect("volume");
    ok(backup_vol(&target, &volume));
    let id = listing(&target)[0].0.clone();
    (work, target, id)
}

#[test]
fn a_backup_that_fills_its_folder_target_fails_cleanly_and_the_next_one_chains_on() {
    let Some(disk) = Tmpfs::mount("24m") else {
        return;
    };
    let target = disk.path().join("target");
    let target = s(&target).to_string();
    let work = tempfile::tempdir().expect("temp dir");
    let volume = work.path().join("volume.raw");
    let first = noise(VOLUME, 1);
    std::fs::write(&volume, &first).expect("volume");
    let backup = || backup_vol(&target, &volume);
    ok(backup());
    let committed = listing(&target);
    assert_eq!(committed.len(), 1);

    // Fill what is left of the disk, then give back 3 MiB: less than the 8 MiB the next
    // backup (every cluster changed, incompressible) must store.
    let filler_path = disk.path().join("filler");
    let filler = std::fs::File::create(&filler_path).expect("filler");
    let chunk = noise(1 << 20, 7);
    let mut len = 0u64;
    while std::os::unix::fs::FileExt::write_all_at(&filler, &chunk, len).is_ok() {
        len += chunk.len() as u64;
    }
    filler
        .set_len(len.saturating_sub(3 << 20))
        .expect("make room");
    let second = noise(VOLUME, 2);
    std::fs::write(&volume, &second).expect("volume");
    assert_fails_for_want_of_room(&backup(), "a backup into a full folder target");

    // Nothing committed is lost, nothing of the failed backup is listed or left behind.
    assert_eq!(listing(&target), committed);
    let partial: Vec<_> = files(disk.path())
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(".partial"))
        .collect();
    assert!(partial.is_empty(), "left behind: {partial:?}");
    let out = work.path().join("first.raw");
    ok(restore(&target, &committed[0].0, &out));
    assert!(std::fs::read(&out).expect("restored") == first);

    // Room again: the next backup works, on the last committed point.
    drop(filler);
    std::fs::remove_file(&filler_path).expect("remove filler");
    ok(backup());
    let now = listing(&target);
    assert_eq!(now.len(), 2);
    assert_eq!(now[1].1.as_deref(), Some(committed[0].0.as_str()));
    let out = work.path().join("second.raw");
    ok(restore(&target, &now[1].0, &out));
    assert!(std::fs::read(&out).expect("restored") == second);
    ok(strata(&["verify", "--target", &target]));
}

#[test]
fn a_restore_onto_a_full_disk_fails_cleanly_and_leaves_nothing_there() {
    let content = noise(VOLUME, 3);
    let (work, target, id) = backed_up(&content);
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };

    let dest = disk.path().join("restored.raw");
    assert_fails_for_want_of_room(&restore(&target, &id, &dest), "a restore onto a full disk");
    let left = files(disk.path());
    assert!(left.is_empty(), "left on the full disk: {left:?}");

    // The backup is untouched: restored where there is room, it is exact.
    let dest = work.path().join("restored.raw");
    ok(restore(&target, &id, &dest));
    assert!(std::fs::read(&dest).expect("restored") == content);
}

#[test]
fn a_restore_onto_a_thin_device_that_runs_out_of_room_fails_and_says_so() {
    // 24 MiB of incompressible data in a 32 MiB volume.
    let mut content = noise(24 << 20, 4);
    content.resize(32 << 20, 0);
    let (_work, target, id) = backed_up(&content);
    // The device claims 32 MiB; what backs it has room for 8.
    let Some(pool) = Tmpfs::mount("8m") else {
        return;
    };
    let backing = pool.path().join("thin.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(32 << 20))
        .expect("sparse backing file");
    let Some(device) = loop_device::Loop::attach(&backing) else {
        return;
    };
    let dest = Path::new(&device.device);
    assert_fails_for_want_of_room(
        &restore(&target, &id, dest),
        "a restore onto a full thin device",
    );
    let stderr = String::from_utf8_lossy(&restore(&target, &id, dest).stderr).to_string();
    assert!(
        stderr.contains("the device content is incomplete"),
        "the error does not say the device is incomplete: {stderr}"
    );

    // Room again (the pool grown): the same restore puts every byte right.
    let out = Command::new("mount")
        .args(["-o", "remount,size=48m"])
        .arg(pool.path())
        .output()
        .expect("remount");
    assert!(
        out.status.success(),
        "remount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(restore(&target, &id, dest));
    let mut back = vec![0u8; content.len()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(dest).expect("open device"),
        &mut back,
        0,
    )
    .expect("read device");
    assert!(back == content, "the device differs from the volume");
}

/// `strata serve-image IMAGE --writable-overlay OVERLAY` on 127.0.0.1, killed when dropped.
struct Served {
    /// Held for its drop: the server is killed with it.
    _server: KillOnDrop,
    url: String,
}

impl Served {
    fn start(image: &Path, overlay: &Path) -> Self {
        use std::io::BufRead;
        let mut child = strata_bin::strata_command()
            .args(["serve-image", s(image), "--writable-overlay", s(overlay)])
            .args(["--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start serve-image");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned();
        assert!(url.starts_with("nbd://127.0.0.1:"), "{line}");
        Self {
            _server: KillOnDrop(child),
            url,
        }
    }

    /// qemu-io `commands` on the export: its status and what it printed.
    fn qemu_io(&self, commands: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = cmd.arg(&self.url).output().expect("run qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success() && !text.contains("failed"), text)
    }
}

#[test]
fn a_served_overlay_on_a_full_disk_answers_enospc_and_keeps_what_it_flushed() {
    let work = tempfile::tempdir().expect("temp dir");
    let image = work.path().join("base.qcow2");
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().expect(program);
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    };
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "64M"],
    );
    run("qemu-io", &["-c", "write -P 0x5a 30M 1M", s(&image)]);
    let Some(disk) = Tmpfs::mount("8m") else {
        return;
    };
    let overlay = disk.path().join("disk.cow");

    let served = Served::start(&image, &overlay);
    let (fine, text) = served.qemu_io(&["write -P 0x11 0 4M", "flush"]);
    assert!(fine, "{text}");
    // 16 MiB more do not fit: the client is told the disk is full, not that it failed.
    let (fine, text) = served.qemu_io(&["write -P 0x22 8M 16M"]);
    assert!(!fine, "a 16 MiB write fitted in an 8 MiB tmpfs: {text}");
    assert!(text.contains("No space left on device"), "{text}");
    // The server goes on serving what it had.
    let reads = [
        "read -P 0x11 0 4M",
        "read -P 0x5a 30M 1M",
        "read -P 0 40M 1M",
    ];
    let (fine, text) = served.qemu_io(&reads);
    assert!(fine, "{text}");
    drop(served);

    // Killed and started again on the same overlay: what was flushed is there.
    let served = Served::start(&image, &overlay);
    let (fine, text) = served.qemu_io(&reads);
    assert!(fine, "{text}");
}

/// `TMPDIR` full (where side files are downloaded): `verify` and `restore` fail with the full
/// disk, in one line, without calling the intact backup damaged; with room again, verify
/// finds it whole.
#[test]
fn a_full_tmpdir_fails_verify_and_restore_without_calling_the_backup_damaged() {
    let (work, target, id) = backed_up(&noise(VOLUME, 5));
    let Some(tmp) = Tmpfs::mount("64k") else {
        return;
    };
    // Fill it to the last byte.
    let filler = tmp.path().join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![1u8; 4096];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let verify = strata_bin::strata_command()
        .args(["verify", "--target", &target])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("verify");
    assert_fails_for_want_of_room(&verify, "verify");
    let said = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        !said.contains("DAMAGED") && !said.contains("damaged"),
        "{said}"
    );
    // The failing write is named as the local copy's, not as a download failing.
    assert!(said.contains("write download of"), "{said}");
    let dest = work.path().join("restored.raw");
    let restore = restore_command(&target, &id, &dest)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("restore");
    assert_fails_for_want_of_room(&restore, "restore");
    let said = String::from_utf8_lossy(&restore.stderr);
    assert!(!said.contains(&format!("backup vol/{id}:")), "{said}");
    std::fs::remove_file(&filler).expect("room again");
    let verify = ok(strata(&["verify", "--target", &target]));
    assert!(verify.contains("ok"), "{verify}");
}

/// `strata convert` into a disk that fills part-way, to raw and to QCOW2: it fails with one
/// line naming the full disk, a new destination is not created (nor its partial file left),
/// and an existing one keeps its bytes; with room, the same conversion then succeeds.
#[test]
fn a_conversion_that_fills_its_disk_leaves_the_destination_as_it_was() {
    let Some(disk) = Tmpfs::mount("4m") else {
        return;
    };
    let work = tempfile::tempdir().expect("temp dir");
    let raw = work.path().join("volume.raw");
    std::fs::write(&raw, noise(VOLUME, 7)).expect("volume");
    let image = work.path().join("volume.qcow2");
    ok(strata(&["convert", "-O", "qcow2", s(&raw), s(&image)]));
    let old = disk.path().join("old.raw");
    std::fs::write(&old, b"earlier content").expect("old destination");
    for (output, source, dest) in [
        ("raw", &image, "new.raw"),
        ("raw", &image, "old.raw"),
        ("qcow2", &raw, "new.qcow2"),
        ("qcow2", &image, "old.raw"),
    ] {
        let dest = disk.path().join(dest);
        let out = strata(&["convert", "-O", output, s(source), s(&dest)]);
        assert_fails_for_want_of_room(
            &out,
            &format!("convert -O {output} into {}", dest.display()),
        );
    }
    let mut left: Vec<PathBuf> = files(disk.path());
    left.sort();
    assert_eq!(left, vec![old.clone()]);
    assert_eq!(std::fs::read(&old).expect("old"), b"earlier content");
    // Where there is room the same conversion writes the volume.
    let roomy = work.path().join("restored.raw");
    ok(strata(&["convert", "-O", "raw", s(&image), s(&roomy)]));
    assert_eq!(
        std::fs::read(&roomy).expect("restored"),
        std::fs::read(&raw).expect("volume")
    );
}

/// A destination file that is a mount point (a file bind-mounted into a container, say) cannot
/// be replaced by a rename: `strata convert` writes it in place, and it reads as the volume.
#[test]
fn a_conversion_into_a_bind_mounted_file_writes_it_in_place() {
    let work = tempfile::tempdir().expect("temp dir");
    let raw = work.path().join("volume.raw");
    let content = noise(VOLUME, 8);
    std::fs::write(&raw, &content).expect("volume");
    let image = work.path().join("volume.qcow2");
    ok(strata(&["convert", "-O", "qcow2", s(&raw), s(&image)]));
    let mounted = work.path().join("mounted.raw");
    let backing = work.path().join("backing.raw");
    std::fs::write(&mounted, b"").expect("mount point");
    std::fs::write(&backing, b"earlier").expect("backing file");
    if !bind_mount(&backing, &mounted) {
        return;
    }
    let converted = strata(&["convert", "-O", "raw", s(&image), s(&mounted)]);
    let read = std::fs::read(&mounted).expect("read");
    let _ = Command::new("umount").arg(&mounted).status();
    ok(converted);
    assert_eq!(read, content);
    assert_eq!(std::fs::read(&backing).expect("backing"), content);
    assert!(!work.path().join("mounted.raw.partial").exists());
}

/// `strata restore` into a bind-mounted file: written in place (a rename over a mount point
/// fails with EBUSY after all the work), reading as the backup.
#[test]
fn a_restore_into_a_bind_mounted_file_writes_it_in_place() {
    let content = noise(VOLUME, 9);
    let (work, target, id) = backed_up(&content);
    let mounted = work.path().join("mounted.raw");
    let backing = work.path().join("backing.raw");
    std::fs::write(&mounted, b"").expect("mount point");
    std::fs::write(&backing, b"earlier").expect("backing file");
    if !bind_mount(&backing, &mounted) {
        return;
    }
    let restored = restore(&target, &id, &mounted);
    let read = std::fs::read(&mounted).expect("read");
    let _ = Command::new("umount").arg(&mounted).status();
    ok(restored);
    assert_eq!(read, content);
    assert_eq!(std::fs::read(&backing).expect("backing"), content);
    assert!(!work.path().join("mounted.raw.partial").exists());
}

/// Bind-mounts file `backing` over file `mounted`; false (and why, on stderr) where this
/// process may not, which only a run outside CI may meet: CI runs as root and must run these.
fn bind_mount(backing: &Path, mounted: &Path) -> bool {
    let out = Command::new("mount")
        .arg("--bind")
        .arg(backing)
        .arg(mounted)
        .output()
        .expect("run mount");
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "bind-mounting a file failed under CI: {why}"
        );
        eprintln!("SKIPPED: bind-mounting a file failed: {why}");
    }
    out.status.success()
}
