//! Shared helpers for the writer tests: raw volumes on disk and verdicts from qemu-img.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

/// One piece of a generated volume.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes from a seeded generator.
    Random { len: u64, seed: u64 },
    /// One byte repeated.
    Constant { len: u64, byte: u8 },
    /// Written zeros (data to SEEK_DATA, zeros to the writer).
    Zeros { len: u64 },
    /// Never written: a hole in the sparse file.
    Hole { len: u64 },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Random { len, .. }
            | Piece::Constant { len, .. }
            | Piece::Zeros { len }
            | Piece::Hole { len } => len,
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the pieces one after another into a new sparse file; returns its size.
pub fn write_volume(path: &Path, pieces: &[Piece]) -> u64 {
    let file = File::create(path).unwrap();
    let mut offset = 0;
    for piece in pieces {
        let bytes = match *piece {
            Piece::Random { len, seed } => Some(random_bytes(len as usize, seed)),
            Piece::Constant { len, byte } => Some(vec![byte; len as usize]),
            Piece::Zeros { len } => Some(vec![0; len as usize]),
            Piece::Hole { .. } => None,
        };
        if let Some(bytes) = bytes {
            file.write_all_at(&bytes, offset).unwrap();
        }
        offset += piece.len();
    }
    file.set_len(offset).unwrap();
    offset
}

/// Runs `qemu-img check` and fails the test unless it reports neither errors nor leaks.
pub fn assert_check_clean(image: &Path) {
    let output = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(image)
        .output()
        .expect("qemu-img is installed");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check gave no JSON for {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    for field in [
        "check-errors",
        "corruptions",
        "leaks",
        "corruptions-fixed",
        "leaks-fixed",
    ] {
        let count = report.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(
            count,
            0,
            "qemu-img check {}: {field} = {count}\n{report:#}",
            image.display()
        );
    }
    assert!(
        output.status.success(),
        "qemu-img check exit {:?}: {report:#}",
        output.status
    );
}

/// Runs `qemu-img compare` between two images of the given formats; true when identical.
pub fn images_equal(first: &Path, first_format: &str, second: &Path, second_format: &str) -> bool {
    let output = Command::new("qemu-img")
        .args(["compare", "-q", "-f", first_format, "-F", second_format])
        .arg(first)
        .arg(second)
        .output()
        .expect("qemu-img is installed");
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!(
            "qemu-img compare failed ({other:?}): {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// `qemu-img info --output=json` of an image.
pub fn info(image: &Path, chain: bool) -> serde_json::Value {
    let mut command = Command::new("qemu-img");
    command.args(["info", "--output=json"]);
    if chain {
        command.arg("--backing-chain");
    }
    let output = command.arg(image).output().expect("qemu-img is installed");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
