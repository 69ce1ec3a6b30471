//! The Containerfile (no container builder works offline on CI): the binaries it copies into
//! the image are this package's, built with the features its `cargo install` line names, and
//! run; the Deployment `strata install` prints starts the one it copies to /usr/local/bin.

mod strata_bin;
use strata_bin::{ok, strata};

use std::process::Command;

const CONTAINERFILE: &str = include_str!("../Containerfile");

/// The binaries the run stage copies from the build stage's `/out/bin`.
fn copied_binaries() -> Vec<&'static str> {
    let line = CONTAINERFILE
        .lines()
        .find(|l| l.starts_with("COPY --from=build "))
        .expect("a COPY --from=build line");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.last(), Some(&"/usr/local/bin/"), "{line}");
    words[2..words.len() - 1]
        .iter()
        .map(|w| w.strip_prefix("/out/bin/").expect("copied from /out/bin"))
        .collect()
}

/// The binary cargo built for this test under `name`.
fn built(name: &str) -> &'static str {
    match name {
        "strata" => env!("CARGO_BIN_EXE_strata"),
        "strata-controller" => env!("CARGO_BIN_EXE_strata-controller"),
        other => panic!("the Containerfile copies {other}, which is no binary of this package"),
    }
}

#[test]
fn the_image_gets_both_binaries_and_each_runs_version() {
    let names = copied_binaries();
    assert_eq!(names, ["strata", "strata-controller"]);
    for name in names {
        let out = Command::new(built(name)).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name} --version");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn the_build_stage_installs_with_the_features_the_binaries_require() {
    let install = CONTAINERFILE
        .lines()
        .find(|l| l.starts_with("RUN cargo install "))
        .expect("a cargo install line");
    assert!(install.contains(" --features cli,kubernetes "), "{install}");
    assert!(install.contains(" --root /out"), "{install}");
    assert!(install.contains(" --locked "), "{install}");
    // Datamover Jobs give `strata ...` as args: an ENTRYPOINT would swallow them.
    assert!(!CONTAINERFILE.lines().any(|l| l.starts_with("ENTRYPOINT")));
}

#[test]
fn the_deployment_starts_the_controller_where_the_image_puts_it() {
    let printed = ok(strata(&["install"]));
    assert!(
        printed.contains("- /usr/local/bin/strata-controller\n"),
        "{printed}"
    );
}
