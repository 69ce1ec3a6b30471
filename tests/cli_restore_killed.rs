//! A `strata restore` killed with SIGKILL at a spread of moments, as a datamover is killed
//! (an OOM kill, a node drain): onto a file, the destination is never half restored (it still
//! holds what it held before, or the whole point), and onto a block device the next restore
//! puts every byte right whatever the killed one left. Each time, the next restore succeeds
//! and is exact, and no partial file is left. And two restores into one file, one of them
//! stopped while it writes, never write it at once.
//!
//! The device leg needs root for `losetup`; without it that leg says so and passes, except
//! under `CI`.

#[path = "../qcow2/tests/common/loop_device.rs"]
mod loop_device;
mod strata_bin;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use strata_bin::{KillOnDrop, backup_vol, listing, noise, ok, restore_command, s};

const VOLUME: usize = 48 << 20;

/// When the kills land, from the restore's start.
const MOMENTS_MS: [u64; 8] = [5, 20, 40, 70, 110, 160, 240, 400];

/// A folder target with two points of one volume: the second rewrites a third of it, in
/// scattered runs, and zeroes a stretch. Returns the target and the points' ids and contents.
fn two_points(dir: &Path) -> (String, [(String, Vec<u8>); 2]) {
    let target = s(&dir.join("target")).to_string();
    let volume = dir.join("volume.raw");
    let mut content = noise(VOLUME, 11);
    std::fs::write(&volume, &content).expect("volume");
    let backup = || {
        ok(backup_vol(&target, &volume));
    };
    backup();
    let first = content.clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .expect("open");
    for run in (0..VOLUME).step_by(3 << 20) {
        let bytes = noise(1 << 20, run as u64 + 12);
        file.write_all_at(&bytes, run as u64).expect("write");
        content[run..run + bytes.len()].copy_from_slice(&bytes);
    }
    let zeros = vec![0u8; 4 << 20];
    file.write_all_at(&zeros, 20 << 20).expect("zero");
    content[20 << 20..24 << 20].fill(0);
    backup();
    let ids = listing(&target);
    let id = |i: usize| ids[i].0.clone();
    (target, [(id(0), first), (id(1), content)])
}

/// Starts `strata restore` of `id` into `dest`, kills it after `after`, and returns whether it
/// had finished (successfully) first.
fn restore_killed_after(target: &str, id: &str, dest: &Path, after: Duration) -> bool {
    let mut child = restore_command(target, id, dest)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start restore");
    let started = Instant::now();
    while started.elapsed() < after {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "the restore failed by itself: {status}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    // It may have finished between the last look and the kill.
    status.success() || {
        assert_eq!(status.signal(), Some(9), "{status}");
        false
    }
}

/// Most kills must land before the restore finished, or the test tests nothing.
fn assert_enough_were_killed(killed: usize) {
    eprintln!(
        "{killed} of {} restores killed before they finished",
        MOMENTS_MS.len()
    );
    assert!(
        killed >= 3,
        "only {killed} of the restores were killed before they finished"
    );
}

fn restore(target: &str, id: &str, dest: &Path) {
    ok(restore_command(target, id, dest)
        .output()
        .expect("run strata"));
}

#[test]
fn a_restore_killed_at_any_moment_never_leaves_a_half_restored_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (target, [(first_id, first), (second_id, second)]) = two_points(dir.path());
    let dest = dir.path().join("restored.raw");
    let partial = dir.path().join("restored.raw.partial");
    let mut killed = 0;
    for ms in MOMENTS_MS {
        // The destination holds the first point; the second is restored over it, and killed.
        restore(&target, &first_id, &dest);
        let finished = restore_killed_after(&target, &second_id, &dest, Duration::from_millis(ms));
        let now = std::fs::read(&dest).expect("the destination is still there");
        // Killed, it holds the first point; done (a kill may land after the rename, before the
        // process ends), the second. Never anything in between.
        if finished {
            assert!(
                now == second,
                "finished at {ms} ms but not the second point"
            );
        } else if now == first {
            killed += 1;
        } else {
            let at = now.iter().zip(&first).position(|(a, b)| a != b);
            assert!(
                now == second,
                "killed at {ms} ms: the destination is neither point (differs from the first at \
                 {at:?})"
            );
        }
        // The next restore succeeds, exactly, and removes nothing it should keep.
        restore(&target, &second_id, &dest);
        assert!(
            std::fs::read(&dest).expect("restored") == second,
            "after the kill at {ms} ms"
        );
        assert!(
            !partial.exists(),
            "a partial file is left after the restore that followed"
        );
    }
    assert_enough_were_killed(killed);
}

#[test]
fn a_restore_onto_a_device_killed_at_any_moment_is_put_right_by_the_next() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (target, [(_, first), (second_id, second)]) = two_points(dir.path());
    let backing = dir.path().join("device.img");
    std::fs::write(&backing, &first).expect("backing file");
    let Some(dev) = loop_device::Loop::attach(&backing) else {
        return;
    };
    let device = Path::new(&dev.device);
    let read_device = || {
        let file = std::fs::File::open(device).expect("open the device");
        let mut bytes = vec![0u8; VOLUME];
        file.read_exact_at(&mut bytes, 0).expect("read the device");
        bytes
    };
    let mut killed = 0;
    for ms in MOMENTS_MS {
        if !restore_killed_after(&target, &second_id, device, Duration::from_millis(ms)) {
            killed += 1;
        }
        restore(&target, &second_id, device);
        assert!(read_device() == second, "after the kill at {ms} ms");
        // The next round starts from old content again, so a kill leaves a mix to put right.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .expect("open");
        file.write_all_at(&first, 0).expect("write the old content");
        file.sync_all().expect("sync");
    }
    assert_enough_were_killed(killed);
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit(") ").next()?.split(' ').next()?.to_owned();
            Some(state == "T")
        })
        .unwrap_or(false)
}

/// Starts a restore of `id` into `dest` and stops it (SIGSTOP) once it holds the partial file.
fn stopped_restore(target: &str, id: &str, dest: &Path) -> KillOnDrop {
    let partial = dest.with_extension("raw.partial");
    let child = restore_command(target, id, dest)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start restore");
    let held = KillOnDrop(child);
    let started = Instant::now();
    while !partial.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no partial file"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = held.0.id().to_string();
    ok(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .output()
        .expect("kill"));
    while !stopped(held.0.id()) {
        std::thread::sleep(Duration::from_millis(1));
    }
    held
}

#[test]
fn two_restores_into_one_file_never_write_it_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (target, [(first_id, first), (second_id, second)]) = two_points(dir.path());
    let dest = dir.path().join("restored.raw");
    restore(&target, &first_id, &dest);

    // A restore of the second point holds the partial file (stopped there, as a datamover on
    // a partitioned node may be); a second restore into the same file fails at once, on one
    // line, and touches neither file.
    let mut held = stopped_restore(&target, &second_id, &dest);
    let out = restore_command(&target, &first_id, &dest)
        .output()
        .expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second restore wrote the same file"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("another restore is writing it"), "{stderr}");
    assert!(
        std::fs::read(&dest).expect("read") == first,
        "the destination changed"
    );
    let pid = held.0.id().to_string();
    ok(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .output()
        .expect("kill"));
    assert!(
        held.0.wait().expect("wait").success(),
        "the first restore failed"
    );
    assert!(
        std::fs::read(&dest).expect("read") == second,
        "the first restore's file is not whole"
    );

    // A restore killed while it holds the file does not block the next one.
    let mut held = stopped_restore(&target, &first_id, &dest);
    held.0.kill().expect("SIGKILL");
    held.0.wait().expect("wait");
    restore(&target, &first_id, &dest);
    assert!(std::fs::read(&dest).expect("read") == first);
}
