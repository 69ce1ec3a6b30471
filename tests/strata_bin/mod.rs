//! The `strata` example binary, for the tests that run the CLI as a user does.

use std::process::Command;

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
