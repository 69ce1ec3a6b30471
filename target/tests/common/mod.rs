//! Shared test support: one fixture per backend (local folder, memory, S3 on moto), a fault
//! injecting store, and synthetic images streamed through the sink contract.
#![allow(dead_code)]

pub mod faulty;
pub mod moto;
pub mod qemu;

use std::sync::Arc;

use strata_qcow2::{ImageSink, ReadAt};
use strata_target::{BackupManifest, BackupSpec, BackupUpload, Target, TargetOptions, VolumeName};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestResult = Result<(), BoxError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    Memory,
    S3,
}

pub struct Fixture {
    pub target: Target,
    pub kind: Kind,
    pub url: String,
    pub options: TargetOptions,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// A second handle on the same repository (a separate writer); memory targets share one.
    pub fn reopen(&self) -> Target {
        match self.kind {
            Kind::Memory => self.target.clone(),
            _ => Target::open_with(&self.url, self.options.clone())
                .unwrap_or_else(|e| panic!("reopen: {e}")),
        }
    }
}

/// Options that keep the suite fast while still cutting several parts per image.
pub fn small_options() -> TargetOptions {
    let mut options = TargetOptions::default();
    options.part_size = 5 << 20;
    options.read_block_size = 256 << 10;
    options.max_request = 1 << 20;
    options.max_readahead = 2 << 20;
    // Writers renew every third of a second, so a live one is seen within one lease.
    options.lease = std::time::Duration::from_secs(1);
    options
}

pub fn fixture(kind: Kind) -> Fixture {
    let options = small_options();
    match kind {
        Kind::Local => {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let url = dir.path().join("repo").display().to_string();
            let target = Target::open_with(&url, options.clone())
                .unwrap_or_else(|e| panic!("open {url}: {e}"));
            Fixture {
                target,
                kind,
                url,
                options,
                _dir: Some(dir),
            }
        }
        Kind::Memory => {
            let url = "memory://".to_string();
            let target = Target::open_with(&url, options.clone())
                .unwrap_or_else(|e| panic!("open {url}: {e}"));
            Fixture {
                target,
                kind,
                url,
                options,
                _dir: None,
            }
        }
        Kind::S3 => {
            let server = moto::server();
            let mut options = options;
            options.store_config = server.config();
            let url = format!("s3://{}/{}", server.bucket, unique_prefix());
            let target = Target::open_with(&url, options.clone())
                .unwrap_or_else(|e| panic!("open {url}: {e}"));
            Fixture {
                target,
                kind,
                url,
                options,
                _dir: None,
            }
        }
    }
}

pub fn unique_prefix() -> String {
    format!("t{:016x}", rand_u64())
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Deterministic pseudo-random bytes (xorshift), so expected contents are cheap to rebuild.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Streams a synthetic image through `sink` the way the one-pass writer does: the body after a
/// header area of `header_len` bytes, in uneven chunks, then the header. Returns the file.
pub fn write_synthetic(
    sink: &mut impl ImageSink,
    seed: u64,
    header_len: usize,
    body_len: usize,
) -> std::io::Result<Vec<u8>> {
    let header = pattern(seed ^ 0xdead, header_len);
    let body = pattern(seed, body_len);
    let mut rest = body.as_slice();
    let mut step = 1usize;
    while !rest.is_empty() {
        let n = (step * 37_813 % 700_000 + 1).min(rest.len());
        let (now, later) = rest.split_at(n);
        sink.append(now)?;
        rest = later;
        step += 1;
    }
    sink.finish(&header)?;
    let mut file = header;
    file.extend_from_slice(&body);
    Ok(file)
}

/// The header area a writer would reserve for this sink: its minimum, at least 64 KiB.
pub fn header_len_for(sink: &impl ImageSink) -> usize {
    (sink.min_header_len() as usize).max(64 << 10)
}

pub fn spec(parent: Option<&BackupManifest>) -> BackupSpec {
    BackupSpec {
        id: None,
        parent: parent.map(|m| m.id.clone()),
        virtual_size: 1 << 30,
        cluster_size: 64 << 10,
    }
}

/// Writes and commits one synthetic backup; returns its manifest and file bytes.
pub fn backup(
    target: &Target,
    volume: &VolumeName,
    parent: Option<&BackupManifest>,
    seed: u64,
    body_len: usize,
) -> Result<(BackupManifest, Vec<u8>), BoxError> {
    let mut upload = target.begin_backup(volume, spec(parent))?;
    let bytes = write_image(&mut upload, seed, body_len)?;
    Ok((upload.commit()?, bytes))
}

pub fn write_image(
    upload: &mut BackupUpload,
    seed: u64,
    body_len: usize,
) -> Result<Vec<u8>, BoxError> {
    let mut sink = upload.image_sink()?;
    let header_len = header_len_for(&sink);
    Ok(write_synthetic(&mut sink, seed, header_len, body_len)?)
}

/// Reads a whole source in uneven chunks.
pub fn read_all(source: &Arc<dyn ReadAt>) -> std::io::Result<Vec<u8>> {
    let len = source.len()? as usize;
    let mut out = vec![0u8; len];
    let mut offset = 0usize;
    let mut step = 1usize;
    while offset < len {
        let n = (step * 91_331 % 900_000 + 1).min(len - offset);
        source.read_exact_at(&mut out[offset..offset + n], offset as u64)?;
        offset += n;
        step += 1;
    }
    Ok(out)
}

pub fn volume(name: &str) -> VolumeName {
    VolumeName::new(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A tmpfs of a given size, unmounted when dropped: a disk that fills for real. Needs root for
/// `mount`; without it a test says so and passes, except under `CI`, where it fails.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            if std::env::var_os("CI").is_some() {
                panic!("mounting a tmpfs failed under CI: {why}");
            }
            eprintln!("SKIPPED: mounting a tmpfs failed: {why}");
            return None;
        }
        Some(Self { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
