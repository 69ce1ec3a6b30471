//! Named crash points for fault tests: with the `failpoints` feature, a process whose
//! `STRATA_FAILPOINT` environment variable names a point kills itself with SIGKILL there, as
//! an OOM kill or a node loss would. Without the feature, [`hit`] does nothing.
//!
//! The points, in the order a backup passes them: `before-claim` (the writer's lease is
//! recorded, nothing claimed), `claimed` (claim and child slot taken), `mid-upload` (the
//! image's first MiB is sent), `image-complete` (the image is published, side files not yet
//! stored), `before-manifest` (side files stored, the commit not yet made), `after-manifest`
//! (committed, the lease not yet released).

/// Kills the process with SIGKILL when `STRATA_FAILPOINT` is `point` (feature `failpoints`).
#[cfg(feature = "failpoints")]
pub(crate) fn hit(point: &str) {
    if std::env::var("STRATA_FAILPOINT").is_ok_and(|armed| armed == point) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Does nothing: crash points need the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
pub(crate) fn hit(_point: &str) {}
