//! `strata prune` killed with SIGKILL in the middle of a fold, on a folder target: every point
//! still restores byte for byte, qemu-img still follows and compares the chain in the folder,
//! and the next `strata prune` finishes or rolls back the fold and completes.

mod strata_bin;
use strata_bin::{backed_up_id, ok, restored_bytes, s, strata, strata_command};

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The committed backup ids, oldest first.
fn listed(target: &Path) -> Vec<String> {
    let out = ok(strata(&["list", "--target", s(target), "--output", "json"]));
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    listed
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect()
}

/// Every committed point restores to its bytes, and qemu-img follows each point's chain in
/// the folder (`info --backing-chain`) and finds the same data (`compare`).
fn check_every_point(target: &Path, dir: &Path, expected: &HashMap<String, Vec<u8>>, when: &str) {
    let images = target.join("volumes/vol1/images");
    for id in listed(target) {
        let dest = dir.join(format!("{id}.raw"));
        assert!(
            restored_bytes(target, "vol1", &id, &dest) == expected[&id],
            "point {id} {when}"
        );
        let image = images.join(format!("{id}.qcow2"));
        let info = Command::new("qemu-img")
            .args(["info", "--backing-chain", s(&image)])
            .output()
            .expect("qemu-img");
        assert!(
            info.status.success(),
            "qemu-img info {id} {when}: {}",
            String::from_utf8_lossy(&info.stderr)
        );
        let compare = Command::new("qemu-img")
            .args([
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "qcow2",
                s(&dest),
                s(&image),
            ])
            .status()
            .expect("qemu-img");
        assert!(compare.success(), "qemu-img compare {id} {when}");
    }
}

/// Whether `dir` holds a file whose name satisfies `matches`.
fn has_file(dir: &Path, matches: impl Fn(&str) -> bool) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_str().is_some_and(&matches))
        })
        .unwrap_or(false)
}

/// A fold intent record (not the staging file object_store's LocalFileSystem writes first,
/// `<name>#<n>`, which a kill at the wrong moment leaves behind and no listing shows).
fn is_intent(name: &str) -> bool {
    name.ends_with(".json")
}

/// When to kill the prune, given the time since it started.
type KillPoint<'a> = Box<dyn Fn(Duration) -> bool + 'a>;

#[test]
fn prune_killed_during_a_fold_leaves_every_point_restorable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(48 << 20).expect("size");
    let mut expected = HashMap::new();
    for i in 0..6u8 {
        // Every point changes a lot of data, so a merge takes long enough to be caught.
        let offset = u64::from(i) * (4 << 20);
        file.write_all_at(&vec![0x10 + i; 24 << 20], offset)
            .expect("write");
        let id = backed_up_id(&target, "vol1", &volume);
        expected.insert(id, std::fs::read(&volume).expect("read"));
    }
    let volume_dir = target.join("volumes/vol1");
    let folds = volume_dir.join("folds");
    let images = volume_dir.join("images");
    // Kill points: as soon as the intent exists (during the merge), once the merged image is
    // published, and after fixed delays that land anywhere.
    let kill_when: [(&str, KillPoint); 4] = [
        (
            "the intent exists",
            Box::new(|_| has_file(&folds, is_intent)),
        ),
        (
            "the merged image is published",
            Box::new(|_| has_file(&images, |n| n.contains(".fold-") && n.ends_with(".qcow2"))),
        ),
        ("20 ms", Box::new(|t| t >= Duration::from_millis(20))),
        ("120 ms", Box::new(|t| t >= Duration::from_millis(120))),
    ];
    let mut interrupted = 0;
    for (round, (point, kill)) in kill_when.iter().enumerate() {
        let keep = (5 - round).to_string();
        let args = [
            "prune",
            "--target",
            s(&target),
            "--volume",
            "vol1",
            "--keep-last",
            &keep,
        ];
        let mut child = strata_command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prune");
        let start = Instant::now();
        loop {
            if kill(start.elapsed()) || child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.kill();
        child.wait().expect("reap prune");
        let when = format!("after a kill when {point}");
        if has_file(&folds, is_intent) {
            interrupted += 1;
        }
        check_every_point(&target, dir.path(), &expected, &when);
        ok(strata(&args));
        assert!(!has_file(&folds, is_intent), "{when}: the intent is left");
        assert_eq!(listed(&target).len(), 5 - round, "{when}");
        check_every_point(&target, dir.path(), &expected, &format!("pruned {when}"));
    }
    assert!(interrupted > 0, "no kill landed inside a fold");
    ok(strata(&["verify", "--target", s(&target)]));
}

/// A parent with two committed children (a writer cut off past its lease that still landed
/// its manifest, or a tampered store) is a fork: `strata prune` refuses to fold it into either
/// child, naming both, so neither branch loses the point it is built on.
#[test]
fn prune_refuses_to_fold_a_parent_the_chain_forks_at() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let volume = dir.path().join("volume.raw");
    let file = std::fs::File::create(&volume).expect("volume");
    file.set_len(4 << 20).expect("size");
    let backup = |fill: u8, at: u64| {
        file.write_all_at(&[fill; 65536], at).expect("write");
        let id = backed_up_id(&target, "vol1", &volume);
        (id, std::fs::read(&volume).expect("read"))
    };
    let (a, _) = backup(1, 0);
    let (b, b_bytes) = backup(2, 1 << 20);
    // Hide B (its manifest and its slot on A) while C is taken on A, then put B back.
    let volume_dir = target.join("volumes/vol1");
    let b_manifest = volume_dir.join(format!("backups/{b}.json"));
    let slot = volume_dir.join(format!("children/{a}.json"));
    let aside = dir.path().join("b.json");
    std::fs::rename(&b_manifest, &aside).expect("hide B");
    std::fs::remove_file(&slot).expect("free A's slot");
    file.write_all_at(&[0; 65536], 1 << 20).expect("undo B");
    let (c, c_bytes) = backup(3, 2 << 20);
    std::fs::rename(&aside, &b_manifest).expect("put B back");
    let mut ids = listed(&target);
    ids.sort();
    let mut all = vec![a.clone(), b.clone(), c.clone()];
    all.sort();
    assert_eq!(ids, all);

    let out = strata(&[
        "prune",
        "--target",
        s(&target),
        "--volume",
        "vol1",
        "--keep-last",
        "2",
    ]);
    assert!(!out.status.success(), "prune folded a forked parent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the chain forks there") && err.contains(&b) && err.contains(&c),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for (id, bytes) in [(&b, &b_bytes), (&c, &c_bytes)] {
        let dest = dir.path().join(format!("{id}.raw"));
        assert_eq!(&restored_bytes(&target, "vol1", id, &dest), bytes, "{id}");
    }
}
