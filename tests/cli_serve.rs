//! `strata serve-image` and `strata serve` as a user runs them, read back with qemu-img.

mod strata_bin;
use strata_bin::strata_command as strata;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use strata::target::{Target, VolumeName};

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the server when the test ends, even on failure.
struct Served(Child, String);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `strata ARGS --listen 127.0.0.1:0` and reads the URL from its first line.
fn serve(args: &[&str]) -> Served {
    serve_by(strata(), args)
}

/// [`serve`] with `command` standing for `strata` (the binary under a wrapper).
fn serve_by(mut command: Command, args: &[&str]) -> Served {
    let mut child = command
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.starts_with("serving ") && url.starts_with("nbd://127.0.0.1:"),
        "{line}"
    );
    Served(child, url)
}

fn copy_over_nbd(url: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("copy.raw");
    run(
        "qemu-img",
        &["convert", "-f", "raw", url, out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn serve_image_serves_a_local_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
    run("qemu-io", &["-c", "write -P 0x5a 1M 64k", b]);
    let served = serve(&["serve-image", b, "--export", "vol"]);
    assert!(served.1.ends_with("/vol"), "{}", served.1);
    assert_serves(&served.1, b, dir.path());
}

/// What `url` serves is what `qemu-img convert` reads of `image`.
fn assert_serves(url: &str, image: &str, dir: &Path) {
    let reference = dir.join("reference.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", image, reference.to_str().unwrap()],
    );
    assert_eq!(copy_over_nbd(url, dir), std::fs::read(reference).unwrap());
}

#[test]
fn serve_image_outlives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
    run("qemu-io", &["-c", "write -P 0x3c 512k 64k", b]);
    // 48 descriptors for the server; each client it accepts takes two, so the 80 below run
    // it out and its accept fails with EMFILE while they stay connected.
    let mut limited = Command::new("prlimit");
    limited.args(["--nofile=48", "--", env!("CARGO_BIN_EXE_strata")]);
    let mut served = serve_by(limited, &["serve-image", b]);
    let port = served
        .1
        .trim_start_matches("nbd://")
        .split(['/', ':'])
        .nth(1)
        .unwrap()
        .to_owned();
    let address = format!("127.0.0.1:{port}");
    let clients: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(&address).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(
        served.0.try_wait().unwrap().is_none(),
        "the server ended when it ran out of descriptors"
    );
    drop(clients);
    // The clients gone, it serves again.
    assert_serves(&served.1, b, dir.path());
}

#[test]
fn serve_serves_the_latest_backup_of_a_volume_from_a_target() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("volume.raw");
    let r = raw.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", r, "2M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 64k 128k", r]);

    let repo = dir.path().join("repo");
    let target = Target::open(repo.to_str().unwrap()).unwrap();
    let volume = VolumeName::new("data").unwrap();
    let file = std::fs::File::open(&raw).unwrap();
    strata::backup_volume(&target, &volume, &file, &Default::default(), &mut |_| {}).unwrap();

    let served = serve(&[
        "serve",
        "--target",
        repo.to_str().unwrap(),
        "--volume",
        "data",
    ]);
    assert!(served.1.ends_with("/data"), "{}", served.1);
    assert_eq!(
        copy_over_nbd(&served.1, dir.path()),
        std::fs::read(&raw).unwrap()
    );
}

#[test]
fn serve_without_a_backup_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // A repository holding another volume: serve refuses a target without one earlier.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, [7u8; 4096]).unwrap();
    let made = strata()
        .args(["backup", "-q", "--target", dir.path().to_str().unwrap()])
        .args(["--volume", "other", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let out = strata()
        .args([
            "serve",
            "--target",
            dir.path().to_str().unwrap(),
            "--volume",
            "none",
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("volume none has no backup"), "{stderr}");
}

/// Runs qemu-io commands on `url` and returns stdout, failing on any failed command.
fn qemu_io(url: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "{commands:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn serve_image_with_a_writable_overlay_keeps_writes_across_restarts_and_never_writes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
    run("qemu-io", &["-c", "write -P 0x5a 1M 64k", b]);
    let image_before = std::fs::read(&base).unwrap();
    let overlay = dir.path().join("disk.cow");
    let o = overlay.to_str().unwrap();

    let served = serve(&["serve-image", b, "--writable-overlay", o]);
    let wrote = qemu_io(&served.1, &["write -P 0x66 0 4k", "write -P 0x67 1M 512"]);
    assert_eq!(wrote.matches("wrote ").count(), 2, "{wrote}");
    // The server is killed, as a crash or a restart would.
    drop(served);

    let served = serve(&["serve-image", b, "--writable-overlay", o]);
    qemu_io(
        &served.1,
        &[
            "read -P 0x66 0 4k",
            "read -P 0 4k 1020k",
            "read -P 0x67 1M 512",
            "read -P 0x5a 1049088 65024",
        ],
    );
    drop(served);

    assert!(
        std::fs::read(&base).unwrap() == image_before,
        "the image changed"
    );
    run("qemu-img", &["check", "-q", b]);

    // The overlay belongs to base.qcow2: another image of the same size is refused.
    let other = dir.path().join("other.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", other.to_str().unwrap(), "4M"],
    );
    let out = strata()
        .args([
            "serve-image",
            other.to_str().unwrap(),
            "--writable-overlay",
            o,
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to image"), "{stderr}");
}

#[test]
fn serve_refuses_reads_of_a_cluster_that_fails_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("volume.raw");
    let r = raw.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", r, "2M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 64k 128k", r]);
    let repo = dir.path().join("repo");
    let target = Target::open(repo.to_str().unwrap()).unwrap();
    let volume = VolumeName::new("data").unwrap();
    let file = std::fs::File::open(&raw).unwrap();
    // Uncompressed, so the byte flipped below is at a host offset qemu-img map gives.
    let options = strata::BackupOptions {
        compression: None,
        ..Default::default()
    };
    let base = strata::backup_volume(&target, &volume, &file, &options, &mut |_| {}).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x78 1M 64k", r]);
    let top = strata::backup_volume(&target, &volume, &file, &options, &mut |_| {}).unwrap();

    // One byte of the base's second stored cluster (guest 0x20000), found with qemu-img map.
    let image = repo.join(format!("volumes/data/images/{}.qcow2", base.id));
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", image.to_str().unwrap()])
        .output()
        .unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let stored = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true && e["start"] == 65536)
        .unwrap();
    let host = stored["offset"].as_u64().unwrap() + 65536 + 3;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&[0x00], host).unwrap();

    let served = serve(&[
        "serve",
        "--target",
        repo.to_str().unwrap(),
        "--volume",
        "data",
    ]);
    let client = strata::nbd::Client::open(&served.1).unwrap();
    // A 512-byte read inside the damaged cluster is refused with the backup and offset.
    let mut buf = vec![0u8; 512];
    let err = client
        .read_at(&mut buf, 0x20000 + 1024)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "backup data/{}: cluster at guest offset 0x20000 fails its checksum",
            base.id
        )),
        "{err}"
    );
    // The intact clusters of both backups still read.
    client.read_at(&mut buf, 0x10000).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    client.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x78));
    assert_eq!(top.parent.as_ref(), Some(&base.id));
    // qemu-img's copy of the whole export fails rather than copying damaged bytes.
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &served.1])
        .arg(dir.path().join("copy.raw"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `strata serve` on a folder target records itself as a reader of the volume while it
/// serves, proved alive by the lock it holds on its record (judged here on a record made to
/// look a minute old, past the moment a fresh record counts as alive unlocked): the backup it
/// serves cannot be deleted and gc keeps the record. Killed (SIGKILL), it leaves the record
/// unlocked: `gc` removes it and the backup can be deleted.
#[test]
fn serve_is_a_reader_until_it_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = dir.path().join("target");
    let source = dir.path().join("vol.raw");
    std::fs::write(&source, strata_bin::noise(1 << 20, 3)).unwrap();
    let id = strata_bin::backed_up_id(&target_dir, "vol", &source);
    let served = serve(&[
        "serve",
        "--target",
        target_dir.to_str().unwrap(),
        "--volume",
        "vol",
    ]);
    let target = Target::open(target_dir.to_str().unwrap()).unwrap();
    let volume = VolumeName::new("vol").unwrap();
    let backup = strata::target::BackupId::new(&id).unwrap();
    let readers = target_dir.join("volumes/vol/readers");
    let records: Vec<_> = std::fs::read_dir(&readers)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    // The record names the chain it reads.
    let text = std::fs::read_to_string(record).unwrap();
    assert!(text.contains(&id), "{text}");
    let age = |path: &Path| {
        let out = Command::new("touch")
            .args(["-d", "1 minute ago"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    age(record);
    target.gc(std::time::Duration::ZERO).unwrap();
    assert!(record.exists(), "gc removed a live reader's record");
    let err = target.delete_backup(&volume, &backup).unwrap_err();
    assert!(
        matches!(err, strata::target::Error::BeingRead { .. }),
        "{err}"
    );
    drop(served);
    age(record);
    target.gc(std::time::Duration::ZERO).unwrap();
    assert!(!record.exists(), "the killed reader's record stays");
    target.delete_backup(&volume, &backup).unwrap();
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next())
        .is_some_and(|state| state == 'T')
}

/// A reader that starts while `prune` deletes the backup it reads keeps it: `prune` is stopped
/// (SIGSTOP, crash point `delete-slot-taken`) after the delete has checked the readers and
/// taken the backup's child slot, `serve` of that backup starts, and `prune` resumes. The
/// delete sees the reader on its second look, before any data goes, puts the manifest back
/// and `prune` keeps the backup, saying why, and exits 0; the export reads the backup whole.
/// Once the reader is gone, the next prune removes it.
#[test]
fn a_reader_that_starts_while_prune_deletes_its_backup_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = dir.path().join("target");
    let t = target_dir.to_str().unwrap();
    let source = dir.path().join("vol.raw");
    let old_bytes = strata_bin::noise(1 << 20, 5);
    std::fs::write(&source, &old_bytes).unwrap();
    let old = strata_bin::backed_up_id(&target_dir, "vol", &source);
    let new_bytes = strata_bin::noise(1 << 20, 6);
    std::fs::write(&source, &new_bytes).unwrap();
    let out = strata()
        .args(["backup", "-q", "--full", "--target", t, "--volume", "vol"])
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("an id")
        .trim()
        .to_string();
    let prune_args = [
        "prune",
        "--target",
        t,
        "--volume",
        "vol",
        "--keep-last",
        "1",
    ];
    let pruning = strata()
        .args(prune_args)
        .env("STRATA_FAILPOINT", "delete-slot-taken:stop")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stopped(pruning.id()) {
        assert!(
            std::time::Instant::now() < deadline,
            "prune never reached its delete"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let served = serve(&["serve", "--target", t, "--volume", "vol", "--backup", &old]);
    run("kill", &["-CONT", &pruning.id().to_string()]);
    let pruned = pruning.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&pruned.stderr);
    assert!(pruned.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "kept vol/{old}: a restore or an export is reading it"
        )),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&pruned.stdout).contains("0 backups removed, 2 kept"),
        "{}",
        String::from_utf8_lossy(&pruned.stdout)
    );
    assert!(copy_over_nbd(&served.1, dir.path()) == old_bytes);
    let restored = dir.path().join("old.raw");
    assert!(strata_bin::restored_bytes(&target_dir, "vol", &old, &restored) == old_bytes);
    drop(served);
    // The killed reader's record, unlocked, is judged dead once it is no longer fresh.
    for record in std::fs::read_dir(target_dir.join("volumes/vol/readers")).unwrap() {
        run(
            "touch",
            &[
                "-d",
                "1 minute ago",
                record.unwrap().path().to_str().unwrap(),
            ],
        );
    }
    let again = strata().args(prune_args).output().unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains(&format!("removed {old}")), "{stdout}");
    assert!(stdout.contains("1 backups removed, 1 kept"), "{stdout}");
    let restored = dir.path().join("new.raw");
    assert!(strata_bin::restored_bytes(&target_dir, "vol", &new, &restored) == new_bytes);
}

/// Runs `command` (armed with a `:stop` crash point) until it exits, running `meanwhile` once
/// the first time it stops and resuming it (SIGCONT) each time it stops; its output.
fn stopped_once_then(mut command: Command, meanwhile: impl FnOnce()) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut meanwhile = Some(meanwhile);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "never finished");
        if stopped(child.id()) {
            if let Some(run) = meanwhile.take() {
                run();
            }
            run("kill", &["-CONT", &child.id().to_string()]);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// On a folder a fold ends by renaming the merged image over `<child>.qcow2`. A restore and a
/// verify that read the chain's manifests before a prune folded it and opened the images
/// after (each stopped with SIGSTOP between the two: crash point `chain-manifests-read`)
/// would meet the merged image under the old manifests and report a healthy backup damaged
/// (and mark it so). They read the manifests again once the images are open and open the
/// chain anew: the restore gives the point's bytes, verify finds nothing damaged and marks
/// nothing.
#[test]
fn a_restore_and_a_verify_that_a_fold_overtakes_on_a_folder_read_the_chain_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let target_dir = dir.path().join("target");
    let t = target_dir.to_str().unwrap().to_owned();
    let source = dir.path().join("vol.raw");
    let mut bytes = strata_bin::noise(1 << 20, 7);
    std::fs::write(&source, &bytes).unwrap();
    strata_bin::backed_up_id(&target_dir, "vol", &source);
    let mut tops = Vec::new();
    for round in 0..3u8 {
        bytes[..4096].fill(round + 1);
        std::fs::write(&source, &bytes).unwrap();
        tops.push(strata_bin::backed_up_id(&target_dir, "vol", &source));
    }
    let prune = |keep: &str| {
        let t = t.clone();
        let keep = keep.to_owned();
        move || {
            let out = strata()
                .args([
                    "prune",
                    "--target",
                    &t,
                    "--volume",
                    "vol",
                    "--keep-last",
                    &keep,
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let dest = dir.path().join("restored.raw");
    let mut restore = strata();
    restore
        .args([
            "restore", "-q", "--target", &t, "--volume", "vol", "--backup", &tops[2],
        ])
        .arg(&dest)
        .env("STRATA_FAILPOINT", "chain-manifests-read:stop");
    let out = stopped_once_then(restore, prune("2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "the restored point differs"
    );
    let mut verify = strata();
    verify
        .args(["verify", "--target", &t])
        .env("STRATA_FAILPOINT", "chain-manifests-read:stop");
    let out = stopped_once_then(verify, prune("1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("DAMAGED"), "{stdout}");
    let marks = target_dir.join("volumes/vol/damaged");
    assert!(
        !marks.exists() || std::fs::read_dir(&marks).unwrap().next().is_none(),
        "a healthy backup was marked damaged"
    );
    let again = dir.path().join("again.raw");
    assert!(strata_bin::restored_bytes(&target_dir, "vol", &tops[2], &again) == bytes);
}
