//! Retention per application backup (`strata prune --app`, `strata::expire_app_backups`) on a
//! folder target: four application backups of an application with two volumes whose volume
//! backups are shared unevenly, keep-last 2. The kept application backups restore byte for
//! byte (and qemu-img compares their images in the folder), the expired manifests are gone,
//! no volume backup a kept application backup names is removed and the unreferenced ones
//! are; a `strata prune --app` killed between expiring two application backups, or inside a
//! fold, leaves every listed one restorable, and the next run finishes the job.

mod strata_bin;
use strata_bin::{noise, ok, s, strata_command};

use std::collections::HashMap;
use std::process::Command;

use strata::target::{AppBackupId, AppName, BackupId, Target, VolumeBackupRef, VolumeName};

const VOLUME_BYTES: usize = 1 << 20;

/// `base` with its `cluster`-th 64 KiB cluster replaced by noise of `seed`: an incremental
/// that changes one cluster.
fn changed(base: &[u8], cluster: usize, seed: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    out[cluster << 16..(cluster + 1) << 16].copy_from_slice(&noise(1 << 16, seed));
    out
}

struct Repo {
    dir: tempfile::TempDir,
    /// What each volume backup id holds.
    expected: HashMap<String, Vec<u8>>,
}

impl Repo {
    fn target_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("target")
    }

    fn target(&self) -> Target {
        Target::open(s(&self.target_dir())).expect("open the target")
    }

    /// Backs `content` up as a new backup of `volume`; its id.
    fn backup(&mut self, volume: &str, content: &[u8]) -> String {
        let file = self.dir.path().join(format!("{volume}.raw"));
        std::fs::write(&file, content).unwrap();
        let source = strata::open_volume(&file).unwrap();
        let manifest = strata::backup_volume(
            &self.target(),
            &VolumeName::new(volume).unwrap(),
            &source,
            &Default::default(),
            &mut |_| {},
        )
        .expect("backup");
        self.expected
            .insert(manifest.id.to_string(), content.to_vec());
        manifest.id.to_string()
    }

    /// Commits application backup `id` of `shop` naming `(volume, backup)` pairs.
    fn app_backup(&self, id: &str, volumes: &[(&str, &str)]) {
        let refs = volumes
            .iter()
            .map(|(volume, backup)| VolumeBackupRef {
                volume: VolumeName::new(*volume).unwrap(),
                backup: BackupId::new(*backup).unwrap(),
            })
            .collect();
        self.target()
            .put_app_backup(
                &app(),
                &AppBackupId::new(id).unwrap(),
                refs,
                format!("archive of {id}").into_bytes().into(),
            )
            .expect("commit the application backup");
    }

    /// The ids of `volume`'s committed backups, oldest first.
    fn volume_backups(&self, volume: &str) -> Vec<String> {
        self.target()
            .backups(&VolumeName::new(volume).unwrap())
            .unwrap()
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    }

    /// The ids of `shop`'s application backups, oldest first.
    fn app_backups(&self) -> Vec<String> {
        self.target()
            .app_backups(&app())
            .unwrap()
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    }

    /// Every volume backup each listed application backup names restores to its bytes, and
    /// qemu-img finds the same data in the image in the folder.
    fn check_listed_restore(&self, when: &str) {
        let target = self.target();
        for manifest in target.app_backups(&app()).unwrap() {
            for r in &manifest.volumes {
                let dest = self
                    .dir
                    .path()
                    .join(format!("{}-{}.out", r.volume, r.backup));
                strata::restore_volume(&target, &r.volume, Some(&r.backup), &dest, &mut |_| {})
                    .unwrap_or_else(|e| {
                        panic!("{}/{} of {} {when}: {e:?}", r.volume, r.backup, manifest.id)
                    });
                assert!(
                    std::fs::read(&dest).unwrap() == self.expected[r.backup.as_str()],
                    "{}/{} of {} restores its bytes {when}",
                    r.volume,
                    r.backup,
                    manifest.id
                );
                let image = self
                    .target_dir()
                    .join(format!("volumes/{}/images/{}.qcow2", r.volume, r.backup));
                let compare = Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                    .args([s(&dest), s(&image)])
                    .status()
                    .expect("qemu-img");
                assert!(compare.success(), "qemu-img compare {} {when}", r.backup);
            }
        }
    }
}

fn app() -> AppName {
    AppName::new("shop").unwrap()
}

/// The scenario, returning the repository and the ids: volume `shop.a` gets a backup per
/// application backup; `shop.b` keeps one backup `b1` for app1 to app3, then gets an
/// unreferenced backup `bx` (a backup outside any application backup), `b4` for app4, and
/// `b5` after app4 (a run whose application backup is not committed yet).
fn scenario() -> (Repo, HashMap<&'static str, String>) {
    let mut repo = Repo {
        dir: tempfile::tempdir().unwrap(),
        expected: HashMap::new(),
    };
    let mut ids = HashMap::new();
    let mut a = noise(VOLUME_BYTES, 1);
    let mut b = noise(VOLUME_BYTES, 2);
    ids.insert("b1", repo.backup("shop.b", &b));
    for i in 1..=4u64 {
        a = changed(&a, i as usize, 10 + i);
        let a_id = repo.backup("shop.a", &a);
        if i == 4 {
            b = changed(&b, 3, 30);
            ids.insert("bx", repo.backup("shop.b", &b));
            b = changed(&b, 5, 40);
            ids.insert("b4", repo.backup("shop.b", &b));
        }
        let b_id = if i == 4 { &ids["b4"] } else { &ids["b1"] };
        repo.app_backup(&format!("app{i}"), &[("shop.a", &a_id), ("shop.b", b_id)]);
        ids.insert(["a1", "a2", "a3", "a4"][i as usize - 1], a_id);
    }
    b = changed(&b, 7, 50);
    ids.insert("b5", repo.backup("shop.b", &b));
    (repo, ids)
}

/// The state retention must reach, whether in one run or after a crash and a second run.
fn assert_expired_and_kept(repo: &Repo, ids: &HashMap<&str, String>) {
    assert_eq!(repo.app_backups(), ["app3", "app4"]);
    let apps = repo.target_dir().join("applications/shop");
    for gone in ["app1.json", "app1.archive", "app2.json", "app2.archive"] {
        assert!(!apps.join(gone).exists(), "{gone} is gone");
    }
    assert_eq!(
        repo.volume_backups("shop.a"),
        [ids["a3"].clone(), ids["a4"].clone()]
    );
    // b1 stays although it is older than bx and was named by the expired app1 and app2: the
    // kept app3 names it. b5 is newer than anything an application backup names.
    assert_eq!(
        repo.volume_backups("shop.b"),
        [ids["b1"].clone(), ids["b4"].clone(), ids["b5"].clone()]
    );
    repo.check_listed_restore("after retention");
    // b5 was built on bx, folded into b4: it still restores too.
    assert_b5_restores(repo, ids);
}

/// `shop.b`'s backup b5, which no application backup names, restores to its bytes.
fn assert_b5_restores(repo: &Repo, ids: &HashMap<&str, String>) {
    let b5 = repo.dir.path().join("b5.out");
    let volume = VolumeName::new("shop.b").unwrap();
    let id = BackupId::new(&ids["b5"]).unwrap();
    strata::restore_volume(&repo.target(), &volume, Some(&id), &b5, &mut |_| {}).unwrap();
    assert!(std::fs::read(&b5).unwrap() == repo.expected[&ids["b5"]]);
}

#[test]
fn keep_last_two_expires_the_oldest_application_backups_and_only_unreferenced_volume_backups() {
    let (repo, ids) = scenario();
    assert_eq!(repo.volume_backups("shop.a").len(), 4);
    let expiry = strata::expire_app_backups(&repo.target(), &app(), 2).expect("retention");
    let names = |list: &[AppBackupId]| list.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&expiry.expired), ["app1", "app2"]);
    assert_eq!(names(&expiry.kept), ["app3", "app4"]);
    let removed: Vec<(String, String)> = expiry
        .removed
        .iter()
        .map(|(v, id)| (v.to_string(), id.to_string()))
        .collect();
    let pair = |v: &str, id: &str| (v.to_owned(), ids[id].clone());
    assert_eq!(
        removed,
        [
            pair("shop.a", "a1"),
            pair("shop.a", "a2"),
            pair("shop.b", "bx")
        ]
    );
    assert_expired_and_kept(&repo, &ids);

    // Nothing more to do: a second run expires and removes nothing.
    let again = strata::expire_app_backups(&repo.target(), &app(), 2).unwrap();
    assert!(
        again.expired.is_empty() && again.removed.is_empty(),
        "{again:?}"
    );
    assert!(strata::expire_app_backups(&repo.target(), &app(), 0).is_err());
}

#[test]
fn prune_app_killed_between_expiries_or_inside_a_fold_leaves_every_listed_backup_restorable() {
    let (repo, ids) = scenario();
    let prune = |failpoint: Option<&str>| {
        let mut command = strata_command();
        command.args(["prune", "--target", s(&repo.target_dir())]);
        command.args(["--app", "shop", "--keep-last", "2"]);
        match failpoint {
            Some(point) => command.env("STRATA_FAILPOINT", point),
            None => command.env_remove("STRATA_FAILPOINT"),
        };
        command.output().expect("run strata prune")
    };
    let killed = prune(Some("app-manifest-deleted"));
    assert!(!killed.status.success(), "the crash point killed it");
    // app1's manifest went, its archive and every volume backup stayed.
    assert_eq!(repo.app_backups(), ["app2", "app3", "app4"]);
    assert!(
        repo.target_dir()
            .join("applications/shop/app1.archive")
            .exists()
    );
    assert_eq!(repo.volume_backups("shop.a").len(), 4);
    repo.check_listed_restore("after the crash");

    // Killed again inside the first fold (shop.a's oldest into its child): the merged image
    // is stored, the child's manifest not yet switched. app2 is expired by then.
    let killed = prune(Some("image-complete"));
    assert!(!killed.status.success(), "the crash point killed it");
    assert_eq!(repo.app_backups(), ["app3", "app4"]);
    let folds = repo.target_dir().join("volumes/shop.a/folds");
    let intents = std::fs::read_dir(&folds).map_or(0, |d| d.count());
    assert_eq!(intents, 1, "the fold's intent is left");
    assert_eq!(repo.volume_backups("shop.a").len(), 4);
    repo.check_listed_restore("after a crash inside a fold");

    let out = ok(prune(None));
    assert!(
        out.contains("0 application backups expired, 2 kept; 3 volume backups removed"),
        "{out}"
    );
    // The archive the crash left behind is not listed; gc removes it.
    ok(strata_bin::strata(&[
        "gc",
        "--target",
        s(&repo.target_dir()),
        "--grace",
        "0",
    ]));
    assert_expired_and_kept(&repo, &ids);
}

/// `strata::delete_app_backup` (a Backup's `deletionPolicy: Delete`): only the volume backups
/// the deleted application backup alone names go (folded into their children, deleted when
/// nothing rests on them); a volume backup other application backups name, and unnamed ones
/// it does not name, stay; every listed application backup restores byte for byte. Running it
/// again, its manifest gone, removes nothing more.
#[test]
fn delete_app_backup_removes_only_the_volume_backups_it_alone_names() {
    let (repo, ids) = scenario();
    let target = repo.target();
    let refs = |pairs: &[(&str, &str)]| -> Vec<VolumeBackupRef> {
        pairs
            .iter()
            .map(|(volume, id)| VolumeBackupRef {
                volume: VolumeName::new(*volume).unwrap(),
                backup: BackupId::new(&ids[id]).unwrap(),
            })
            .collect()
    };
    let removed = |list: Vec<(VolumeName, BackupId)>| -> Vec<(String, String)> {
        list.into_iter()
            .map(|(v, id)| (v.to_string(), id.to_string()))
            .collect()
    };
    let pair = |v: &str, id: &str| (v.to_owned(), ids[id].clone());

    let app2 = AppBackupId::new("app2").unwrap();
    let named = refs(&[("shop.a", "a2"), ("shop.b", "b1")]);
    let gone = strata::delete_app_backup(&target, &app(), &app2, &named).unwrap();
    assert_eq!(removed(gone), [pair("shop.a", "a2")]);
    assert_eq!(repo.app_backups(), ["app1", "app3", "app4"]);
    assert_eq!(
        repo.volume_backups("shop.a"),
        [ids["a1"].clone(), ids["a3"].clone(), ids["a4"].clone()]
    );
    assert_eq!(
        repo.volume_backups("shop.b"),
        [
            ids["b1"].clone(),
            ids["bx"].clone(),
            ids["b4"].clone(),
            ids["b5"].clone()
        ]
    );
    repo.check_listed_restore("after deleting app2");
    let again = strata::delete_app_backup(&target, &app(), &app2, &named).unwrap();
    assert_eq!(again, []);

    // The newest: a4 has nothing built on it and is deleted; b4 is folded into b5, the
    // uncommitted run's backup built on it, which still restores.
    let app4 = AppBackupId::new("app4").unwrap();
    let named = refs(&[("shop.a", "a4"), ("shop.b", "b4")]);
    let gone = strata::delete_app_backup(&target, &app(), &app4, &named).unwrap();
    assert_eq!(removed(gone), [pair("shop.a", "a4"), pair("shop.b", "b4")]);
    assert_eq!(repo.app_backups(), ["app1", "app3"]);
    assert_eq!(
        repo.volume_backups("shop.b"),
        [ids["b1"].clone(), ids["bx"].clone(), ids["b5"].clone()]
    );
    repo.check_listed_restore("after deleting app4");
    assert_b5_restores(&repo, &ids);
}
