//! Named crash points for fault tests: with the `failpoints` feature, a process whose
//! `STRATA_FAILPOINT` environment variable names a point kills itself with SIGKILL there, as
//! an OOM kill or a node loss would; `POINT:stop` stops it with SIGSTOP instead (a stalled
//! writer: a frozen node, a long pause), to be resumed with SIGCONT. Without the feature,
//! [`hit`] does nothing.
//!
//! The points, in the order a backup passes them: `before-claim` (the writer's lease is
//! recorded, nothing claimed), `claimed` (claim and child slot taken), `mid-upload` (the
//! image's first MiB is sent), `image-complete` (the image is published, side files not yet
//! stored), `before-manifest` (side files stored, the commit not yet made), `after-manifest`
//! (committed, the lease not yet released). Expiring an application backup passes
//! `app-manifest-deleted` (its manifest deleted, its archive not yet); deleting a backup
//! passes `delete-slot-taken` (readers checked and its child slot taken, nothing deleted). A
//! backup taking over a dead writer's child slot passes `takeover-recorded` (its takeover
//! record made, the dead writer's slot not yet removed). Opening a chain for reading passes
//! `chain-manifests-read` (its manifests read, its images not yet opened).

/// Kills the process with SIGKILL when `STRATA_FAILPOINT` is `point`, stops it with SIGSTOP
/// when it is `point:stop` (feature `failpoints`).
#[cfg(feature = "failpoints")]
pub(crate) fn hit(point: &str) {
    let Ok(armed) = std::env::var("STRATA_FAILPOINT") else {
        return;
    };
    let signal = match armed.strip_prefix(point) {
        Some("") => rustix::process::Signal::KILL,
        Some(":stop") => rustix::process::Signal::STOP,
        _ => return,
    };
    let asked = std::time::Instant::now();
    let _ = rustix::process::kill_process(rustix::process::getpid(), signal);
    // A call that came back only after a while was itself stopped and continued (the thread
    // that took the signal was this one): nothing to wait for.
    let stopped_here = asked.elapsed() >= std::time::Duration::from_millis(5);
    if signal == rustix::process::Signal::STOP && !stopped_here {
        // A signal to the process is taken by one of its threads, not necessarily this one
        // (the main thread, waiting, is woken first): until that thread stops the others,
        // this one runs on past the crash point (a test saw a delete it was to stop before
        // already done). It waits, in system calls, until the process shows stopped; its
        // next call then stops it too.
        for _ in 0..1000 {
            let state = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next());
            if state == Some('T') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Does nothing: crash points need the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
pub(crate) fn hit(_point: &str) {}
