//! The `strata` example binary, for the tests that run the CLI as a user does, and the helpers
//! those tests share (not every test file uses each).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// A command for the `strata` example binary cargo built next to the running test's folder
/// (`build/debug/examples/strata`; `cargo test` builds examples, a filtered `cargo test --test`
/// needs `cargo build --example strata` first).
pub fn strata_command() -> Command {
    let mut path = std::env::current_exe().expect("test binary path");
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    Command::new(path.join("examples").join("strata"))
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

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
