//! The `strata` binary, for the tests that run the CLI as a user does, and the helpers
//! those tests share (not every test file uses each).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// A command for the `strata` binary cargo built for this test (`CARGO_BIN_EXE_strata`; the
/// package's dev-dependency on itself turns on the `cli` feature the binary requires).
pub fn strata_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// Runs `strata ARGS` and returns what it did.
pub fn strata(args: &[&str]) -> Output {
    strata_command().args(args).output().expect("run strata")
}

/// The stdout of a command that must have succeeded; fails the test with its output otherwise.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes that neither repeat nor compress (xorshift from `seed`), so a backup sends every MiB.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Kubernetes version of the workspace's k8s-openapi feature (`v1_33`).
pub const KUBERNETES: &str = "1.33.0";

/// `kubernetes-validate --strict` over `file`; the tool is required, not optional.
pub fn kubernetes_validate(file: &Path) -> Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate is needed by this test and cannot run ({e}); \
                 install it with `pip install kubernetes-validate` (scripts/test does)"
            )
        })
}

/// Asserts that the YAML stream `text` passes `kubernetes-validate --strict`, each of its
/// `documents` reported as passed.
pub fn assert_valid_manifests(text: &str, documents: usize) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, text).expect("write the manifests");
    let out = kubernetes_validate(&file);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report.matches(" passed for resource ").count(),
        documents,
        "{report}"
    );
}

/// `strata restore` of backup `id` of volume `vol` in `target` into `dest`, not yet run.
pub fn restore_command(target: &str, id: &str, dest: &Path) -> Command {
    let mut command = strata_command();
    command
        .args([
            "restore", "--target", target, "--volume", "vol", "--backup", id, "-q",
        ])
        .arg(dest);
    command
}

/// `strata backup` of `source` into volume `vol` of `target`, run.
pub fn backup_vol(target: &str, source: &Path) -> Output {
    strata(&[
        "backup",
        "--target",
        target,
        "--volume",
        "vol",
        "-q",
        s(source),
    ])
}

/// `strata backup --quiet` of `source` into volume `volume` of `target`, which must succeed;
/// the new backup's id.
pub fn backed_up_id(target: &Path, volume: &str, source: &Path) -> String {
    let out = ok(strata(&[
        "backup",
        "--quiet",
        "--target",
        s(target),
        "--volume",
        volume,
        s(source),
    ]));
    out.lines().last().expect("id").trim().to_string()
}

/// `strata restore` of backup `id` of volume `volume` in `target` into `dest`, which must
/// succeed; the restored bytes.
pub fn restored_bytes(target: &Path, volume: &str, id: &str, dest: &Path) -> Vec<u8> {
    ok(strata(&[
        "restore",
        "--target",
        s(target),
        "--volume",
        volume,
        "--backup",
        id,
        s(dest),
    ]));
    std::fs::read(dest).expect("restored")
}

/// The committed backups in `target` as (id, parent), oldest first (`strata list`).
pub fn listing(target: &str) -> Vec<(String, Option<String>)> {
    let out = ok(strata(&["list", "--target", target, "--output", "json"]));
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

/// A child process killed (and reaped) when dropped, so none outlives a failed test (a stopped
/// one would keep the test's output open).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
