//! `strata discover` as a user runs it, on the sample dump that ships with the repository.

mod strata_bin;
use strata_bin::strata_command as strata;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/sample-app.json")
}

fn discover(args: &[&str]) -> Output {
    strata()
        .arg("discover")
        .arg("--objects")
        .arg(sample())
        .args(["--namespace", "shop"])
        .args(args)
        .output()
        .expect("run strata")
}

#[test]
fn json_lists_resources_in_restore_order_and_volumes() {
    let out = discover(&["--helm-release", "db", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let resources = report["resources"].as_array().expect("resources");
    let line = |i: usize| {
        let r = &resources[i];
        format!(
            "{} {} {}",
            r["apiVersion"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or("")
        )
    };
    assert_eq!(resources.len(), 13);
    assert_eq!(line(0), "v1 Namespace shop");
    assert_eq!(line(1), "v1 PersistentVolumeClaim data-db-postgresql-0");
    assert_eq!(line(12), "apps/v1 StatefulSet db-postgresql");
    assert_eq!(resources[1]["namespace"], "shop");
    assert_eq!(resources[0]["namespace"], serde_json::Value::Null);
    let volumes = report["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 2);
    assert_eq!(volumes[1]["pvc"], "data-db-postgresql-1");
    assert_eq!(volumes[1]["storageClass"], "standard");
    assert_eq!(volumes[1]["size"], "8Gi");
    assert_eq!(volumes[1]["volumeMode"], "Filesystem");
}

#[test]
fn archive_is_written_and_readable_by_tar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("meta.tar.gz");
    let out = discover(&[
        "--selector",
        "app=worker",
        "--archive",
        archive.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        [
            "strata-metadata.json",
            "objects/0000-core-Namespace-_-shop.yaml",
            "objects/0001-core-ConfigMap-shop-web-config.yaml",
            "objects/0002-apps-Deployment-shop-worker.yaml",
        ]
    );
}

#[test]
fn a_bad_selector_is_one_line_with_status_1() {
    let out = discover(&["--selector", "tier in (a"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("invalid label selector") && stderr.contains("at byte 10"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_release_names_it() {
    let out = discover(&["--helm-release", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Helm release nope in namespace shop not found")
    );
}
