//! A loop device over a file, for tests that write to a real block device (root only).
//!
//! Without root (`losetup` fails) the caller skips its block-device leg and says so, except
//! under `CI`, which runs as root and must run it.

use std::process::Command;

/// A loop device over a file, detached when dropped.
pub struct Loop {
    pub device: String,
}

impl Loop {
    pub fn attach(file: &std::path::Path) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            if std::env::var_os("CI").is_some() {
                panic!("losetup failed under CI: {why}");
            }
            eprintln!("SKIPPED block-device leg: losetup failed: {why}");
            return None;
        }
        Some(Self {
            device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}
