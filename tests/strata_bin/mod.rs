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

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
