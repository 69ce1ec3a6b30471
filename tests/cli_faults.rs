//! A `strata backup` killed with SIGKILL at every step of a backup, on a folder target and on
//! S3 (moto): nothing committed is lost, nothing half-written becomes visible, the next backup
//! chains on the last committed point (taking the dead writer's slot over: at once on a folder,
//! after the lease on S3), every point restores byte-identical, and `strata gc` removes what the
//! dead writer left.
//!
//! The kills come from the target crate's crash points (`STRATA_FAILPOINT`, feature
//! `failpoints`, on in test builds): the process SIGKILLs itself exactly there. A second test
//! kills processes from outside at a spread of moments.

#[path = "../target/tests/common/moto.rs"]
mod moto;
mod strata_bin;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_bin::strata_command;

/// The crash points a backup passes, in order (see strata-target's `failpoint` module).
const POINTS: [&str; 6] = [
    "before-claim",
    "claimed",
    "mid-upload",
    "image-complete",
    "before-manifest",
    "after-manifest",
];

const VOLUME_BYTES: u64 = 6 << 20;
const LEASE: &str = "2s";

/// Where backups go: a folder, or a fresh prefix of the moto bucket.
struct Leg {
    url: String,
    env: Vec<(String, String)>,
    s3: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Leg {
    fn folder() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            url: dir
                .path()
                .join("target")
                .to_str()
                .expect("utf-8")
                .to_string(),
            env: Vec::new(),
            s3: false,
            _dir: Some(dir),
        }
    }

    fn s3(name: &str) -> Option<Self> {
        if !moto::available() {
            return None;
        }
        let server = moto::server();
        // The store settings as the `AWS_*` variables the CLI reads.
        let env = server
            .config()
            .into_iter()
            .map(|(key, value)| (key.to_uppercase(), value))
            .collect();
        let prefix = format!("cli-faults-{name}-{:08x}", rand_u32());
        Some(Self {
            url: format!("s3://{}/{prefix}", server.bucket),
            env,
            s3: true,
            _dir: None,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = strata_command();
        command.args(args).envs(self.env.iter().cloned());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run strata")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn backup_args<'a>(&'a self, source: &'a str) -> Vec<&'a str> {
        vec![
            "backup", "--target", &self.url, "--volume", "vol", "--lease", LEASE, "-q", source,
        ]
    }

    /// The committed backups as (id, parent).
    /// The committed backups, none when the target holds no repository yet (a first backup
    /// killed before it opened the target made nothing there, and `list` refuses such a
    /// target).
    fn list_or_none(&self) -> Listing {
        let out = self.run(&["list", "--target", &self.url, "--output", "json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains(&format!("repository {} not found", self.url)) {
            return Vec::new();
        }
        self.list()
    }

    fn list(&self) -> Listing {
        let out = self.ok(&["list", "--target", &self.url, "--output", "json"]);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list json");
        entries
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().expect("id").to_string(),
                    e["parent"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    fn restore(&self, id: &str, dest: &Path) -> Vec<u8> {
        self.ok(&[
            "restore",
            "--target",
            &self.url,
            "--volume",
            "vol",
            "--backup",
            id,
            "-q",
            dest.to_str().expect("utf-8"),
        ]);
        std::fs::read(dest).expect("restored")
    }
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

/// Fills the volume with a version's content: every 64 KiB cluster gets bytes derived from
/// `version` where `version` touches it, so each version differs from the last in some
/// clusters and not in others.
fn write_version(volume: &std::fs::File, version: u32) -> Vec<u8> {
    let cluster = 64 << 10;
    for index in 0..VOLUME_BYTES / cluster {
        if index % (version as u64 + 2) == 0 || version == 1 {
            let mut state = (index << 32) ^ u64::from(version).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let bytes: Vec<u8> = (0..cluster)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            volume
                .write_all_at(&bytes, index * cluster)
                .expect("write volume");
        }
    }
    volume.sync_all().expect("sync volume");
    let mut content = vec![0u8; VOLUME_BYTES as usize];
    volume.read_exact_at(&mut content, 0).expect("read volume");
    content
}

/// A volume file of `VOLUME_BYTES` in `dir`: its path and the open file.
fn new_volume(dir: &Path) -> (String, std::fs::File) {
    let path = dir.join("volume.raw");
    let file = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("volume");
    file.set_len(VOLUME_BYTES).expect("size");
    (path.to_str().expect("utf-8").to_string(), file)
}

/// Kills a backup at `point`, then checks the target as the module docs say.
fn kill_at(leg: &Leg, point: &str) {
    let work = tempfile::tempdir().expect("temp dir");
    let (source_arg, source) = new_volume(work.path());
    let source_arg = source_arg.as_str();
    let mut versions = vec![write_version(&source, 1)];
    leg.ok(&leg.backup_args(source_arg));
    let base = leg.list();
    assert_eq!(base.len(), 1, "{point}: the base is committed");

    versions.push(write_version(&source, 2));
    let killed = leg
        .command(&leg.backup_args(source_arg))
        .env("STRATA_FAILPOINT", point)
        .output()
        .expect("run strata");
    assert_eq!(
        killed.status.signal(),
        Some(9),
        "{point}: the backup should die by SIGKILL, got {:?}: {}",
        killed.status,
        String::from_utf8_lossy(&killed.stderr)
    );
    let after_kill = leg.list();
    let committed_by_killed = point == "after-manifest";
    assert_eq!(
        after_kill.len(),
        if committed_by_killed { 2 } else { 1 },
        "{point}: what the killed writer committed: {after_kill:?}"
    );
    let last_committed = after_kill.last().expect("a backup").0.clone();

    versions.push(write_version(&source, 3));
    let started = Instant::now();
    let next = leg.run(&leg.backup_args(source_arg));
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&next.stderr).into_owned();
    assert!(
        next.status.success(),
        "{point}: the backup after the kill failed: {stderr}"
    );
    let took_over = !committed_by_killed && point != "before-claim";
    if took_over {
        assert!(
            stderr.contains("took over from the dead writer"),
            "{point}: no takeover reported: {stderr}"
        );
    }
    if took_over && leg.s3 {
        assert!(
            stderr.contains("waiting up to 2s for its lease to lapse"),
            "{point}: no wait reported: {stderr}"
        );
        assert!(
            waited >= Duration::from_secs(1),
            "{point}: waited {waited:?}"
        );
    }
    eprintln!("{point} ({}): next backup took {waited:?}", leg.url);
    let all = leg.list();
    assert_eq!(all.len(), after_kill.len() + 1, "{point}: {all:?}");
    let (new_id, new_parent) = all.last().expect("the new backup").clone();
    assert_eq!(
        new_parent.as_deref(),
        Some(last_committed.as_str()),
        "{point}: the next backup chains on the last committed point"
    );

    // Every committed point restores as the volume was when it was taken.
    let expected: Vec<&Vec<u8>> = if committed_by_killed {
        versions.iter().collect()
    } else {
        vec![&versions[0], &versions[2]]
    };
    for ((id, _), want) in all.iter().zip(expected) {
        let got = leg.restore(id, &work.path().join(format!("{id}.raw")));
        assert!(got == *want, "{point}: point {id} differs");
    }
    assert_eq!(all.last().map(|(id, _)| id), Some(&new_id));
    leg.ok(&["verify", "--target", &leg.url]);

    // gc removes the dead writer's leftovers (after its lease lapsed twice on S3), and then
    // finds nothing more.
    if leg.s3 {
        // Past two leases and a second (Last-Modified has one-second resolution).
        std::thread::sleep(Duration::from_millis(5500));
    }
    let report = leg.ok(&["gc", "--target", &leg.url, "--grace", "0"]);
    assert!(
        report.contains("/writers/"),
        "{point}: gc removed no writer record: {report}"
    );
    if took_over {
        assert!(
            report.contains("/claims/"),
            "{point}: gc removed no claim: {report}"
        );
    }
    if point == "mid-upload" && !leg.s3 {
        assert!(
            report.contains(".partial"),
            "{point}: gc removed no partial image: {report}"
        );
    }
    let again = leg.ok(&["gc", "--target", &leg.url, "--grace", "0"]);
    assert!(
        again.contains("0 objects removed"),
        "{point}: a second gc found more: {again}"
    );
    assert_eq!(leg.list(), all, "{point}: gc touched committed backups");
    leg.ok(&["verify", "--target", &leg.url]);
}

#[test]
fn a_backup_killed_at_any_step_never_blocks_the_volume_on_a_folder() {
    for point in POINTS {
        kill_at(&Leg::folder(), point);
    }
}

#[test]
fn a_backup_killed_at_any_step_never_blocks_the_volume_on_s3() {
    for point in POINTS {
        let Some(leg) = Leg::s3(point) else {
            return;
        };
        kill_at(&leg, point);
    }
}

/// SIGKILLs from outside at a spread of moments of a larger backup; after each, the next
/// backup succeeds on the last committed point and the newest point restores exactly.
#[test]
fn backups_killed_from_outside_at_many_moments_leave_the_chain_whole() {
    let leg = Leg::folder();
    let work = tempfile::tempdir().expect("temp dir");
    let (source_arg, source) = new_volume(work.path());
    let source_arg = source_arg.as_str();
    let mut version = 1;
    write_version(&source, version);
    let mut committed: Vec<(String, Vec<u8>)> = Vec::new();
    for delay_ms in [0u64, 2, 5, 10, 20, 40, 80, 160] {
        version += 1;
        let content = write_version(&source, version);
        let mut child = leg
            .command(&leg.backup_args(source_arg))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strata");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        eprintln!("killed at {delay_ms} ms: {status:?}");
        let listed = leg.list_or_none();
        if listed.len() > committed.len() {
            // It finished before the kill: that point counts.
            assert!(status.success() || status.signal() == Some(9));
            committed.push((listed.last().expect("new").0.clone(), content.clone()));
        }
        // The next backup goes through on the last committed point.
        version += 1;
        let content = write_version(&source, version);
        leg.ok(&leg.backup_args(source_arg));
        let listed = leg.list();
        let (id, parent) = listed.last().expect("new").clone();
        assert_eq!(
            parent.as_deref(),
            committed.last().map(|(id, _)| id.as_str()),
            "after a kill at {delay_ms} ms"
        );
        committed.push((id, content));
        assert_eq!(listed.len(), committed.len());
    }
    for (id, want) in &committed {
        let got = leg.restore(id, &work.path().join(format!("{id}.raw")));
        assert!(got == *want, "point {id} differs");
    }
    leg.ok(&["gc", "--target", &leg.url, "--grace", "0"]);
    leg.ok(&["verify", "--target", &leg.url]);
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = stat.rsplit_once(')')?.1.trim_start().to_string();
            after_name.chars().next()
        })
        .is_some_and(|state| state == 'T')
}

/// The committed backups as (id, parent), oldest first.
type Listing = Vec<(String, Option<String>)>;

/// A writer stalled (SIGSTOP) right after taking its claim; a second backup runs meanwhile,
/// then the first is resumed (SIGCONT). Returns the second backup's output, the first's, the
/// target's backups and the volume's content that both backed up.
fn stall_and_race(leg: &Leg) -> (Output, Output, Listing, Vec<u8>) {
    let work = tempfile::tempdir().expect("temp dir");
    let (source_arg, source) = new_volume(work.path());
    let source_arg = source_arg.as_str();
    write_version(&source, 1);
    leg.ok(&leg.backup_args(source_arg));
    let content = write_version(&source, 2);
    let stalled = leg
        .command(&leg.backup_args(source_arg))
        .env("STRATA_FAILPOINT", "claimed:stop")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stopped(stalled.id()) {
        assert!(
            Instant::now() < deadline,
            "the writer never reached its claim"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = leg.run(&leg.backup_args(source_arg));
    let resumed = Command::new("kill")
        .args(["-CONT", &stalled.id().to_string()])
        .status()
        .expect("kill -CONT");
    assert!(resumed.success());
    let first = stalled.wait_with_output().expect("wait");
    (second, first, leg.list(), content)
}

/// On S3 the stalled writer's lease lapses: the second backup takes over and commits, and the
/// resumed writer finds its slot taken and aborts before its commit, leaving nothing behind.
#[test]
fn a_stalled_writer_taken_over_on_s3_aborts_before_its_commit() {
    let Some(leg) = Leg::s3("stall") else {
        return;
    };
    let (second, first, listed, content) = stall_and_race(&leg);
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{second_err}");
    assert!(
        second_err.contains("took over from the dead writer"),
        "{second_err}"
    );
    let first_err = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(1), "{first_err}");
    let (winner, parent) = listed.last().expect("the winner").clone();
    assert!(
        first_err.contains(&format!("superseded by backup {winner}")),
        "{first_err}"
    );
    assert_eq!(first_err.trim().lines().count(), 1, "{first_err}");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(parent.as_deref(), Some(listed[0].0.as_str()));
    let work = tempfile::tempdir().expect("temp dir");
    assert!(leg.restore(&winner, &work.path().join("w.raw")) == content);
    leg.ok(&["verify", "--target", &leg.url]);
}

/// On a folder the stalled writer still holds its lock: it is alive, so the second backup is
/// refused and the resumed writer commits.
#[test]
fn a_stalled_writer_on_a_folder_keeps_its_slot() {
    let leg = Leg::folder();
    let (second, first, listed, content) = stall_and_race(&leg);
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{second_err}");
    assert!(
        second_err.contains("is no longer the head of its chain"),
        "{second_err}"
    );
    let first_err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{first_err}");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let work = tempfile::tempdir().expect("temp dir");
    assert!(leg.restore(&listed[1].0, &work.path().join("w.raw")) == content);
}

/// A writer killed while it takes over a dead writer's slot (crash point `takeover-recorded`:
/// its takeover record made, the dead slot not yet removed) does not block the volume: the
/// next backup judges the killed taker dead too, removes its record, takes the slot over and
/// commits on the base. Before, every later backup failed with "the child slot kept changing
/// hands" until gc's grace had passed.
fn killed_taker(leg: &Leg) {
    let work = tempfile::tempdir().expect("temp dir");
    let (source_arg, source) = new_volume(work.path());
    let source_arg = source_arg.as_str();
    write_version(&source, 1);
    leg.ok(&leg.backup_args(source_arg));
    let base = leg.list()[0].0.clone();
    write_version(&source, 2);
    for point in ["mid-upload", "takeover-recorded"] {
        let killed = leg
            .command(&leg.backup_args(source_arg))
            .env("STRATA_FAILPOINT", point)
            .output()
            .expect("run strata");
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "{point}: {:?}: {}",
            killed.status,
            String::from_utf8_lossy(&killed.stderr)
        );
    }
    let content = write_version(&source, 3);
    let next = leg.run(&leg.backup_args(source_arg));
    let stderr = String::from_utf8_lossy(&next.stderr);
    assert!(next.status.success(), "{stderr}");
    assert!(
        stderr.contains("took over from the dead writer"),
        "{stderr}"
    );
    let listed = leg.list();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[1].1.as_deref(), Some(base.as_str()));
    assert!(leg.restore(&listed[1].0, &work.path().join("r.raw")) == content);
}

#[test]
fn a_writer_killed_while_taking_over_does_not_block_the_volume_on_a_folder() {
    killed_taker(&Leg::folder());
}

#[test]
fn a_writer_killed_while_taking_over_does_not_block_the_volume_on_s3() {
    if let Some(leg) = Leg::s3("killed-taker") {
        killed_taker(&leg);
    }
}
