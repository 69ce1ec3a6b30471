//! Helpers shared by the integration tests: real qemu tools and byte-for-byte comparisons.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_qcow2::{Image, OpenOptions, hydrate};

/// A scratch folder for one test.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `qemu-img ARGS` in this folder; panics with its stderr when it fails.
    pub fn qemu_img(&self, args: &[&str]) -> String {
        run(self.dir(), "qemu-img", args)
    }

    /// `qemu-img create` of QCOW2 overlay `name` on QCOW2 `backing`, of the backing's size.
    pub fn overlay(&self, name: &str, backing: &str) {
        self.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
        ]);
    }

    /// `qemu-io -f FORMAT IMAGE -c CMD...`.
    pub fn qemu_io(&self, image: &str, commands: &[&str]) {
        let mut args = vec![image];
        for c in commands {
            args.push("-c");
            args.push(c);
        }
        run(self.dir(), "qemu-io", &args);
    }

    /// Hydrates `image` with strata (default policy) and with `qemu-img convert -O raw`, and
    /// asserts the two are byte for byte the same.
    pub fn assert_hydrates_like_qemu(&self, image: &str) {
        self.assert_hydrates_like_qemu_with(image, &OpenOptions::default());
    }

    pub fn assert_hydrates_like_qemu_with(&self, image: &str, options: &OpenOptions) {
        let ours = self.path(&format!("{image}.strata.raw").replace('/', "_"));
        let theirs = self.path(&format!("{image}.qemu.raw").replace('/', "_"));
        let opened = Image::open_with_options(self.path(image), options)
            .unwrap_or_else(|e| panic!("strata cannot open {image}: {e}"));
        let dest = File::create(&ours).expect("create output");
        hydrate(&opened, &dest, "out").unwrap_or_else(|e| panic!("hydrating {image}: {e}"));
        drop(dest);
        self.qemu_img(&[
            "convert",
            "-O",
            "raw",
            image,
            theirs.to_str().expect("utf-8 path"),
        ]);
        let a = std::fs::read(&ours).expect("read ours");
        let b = std::fs::read(&theirs).expect("read theirs");
        assert_eq!(a.len(), b.len(), "{image}: sizes differ");
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!(
                "{image}: first difference at byte {at:#x}: strata {:#04x}, qemu {:#04x}",
                a[at], b[at]
            );
        }
        // Reading through read_at gives the same bytes as hydration.
        let mut buf = vec![0u8; a.len().min(1 << 20)];
        opened.read_at(&mut buf, 0).expect("read_at");
        assert_eq!(buf, a[..buf.len()], "{image}: read_at differs");
    }
}

pub fn run(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Overwrites bytes of a file.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patching");
    file.write_all_at(bytes, offset).expect("patch");
}

/// Reads a big-endian u64 at `offset`.
pub fn be64(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    File::open(path)
        .expect("open")
        .read_exact_at(&mut b, offset)
        .expect("read");
    u64::from_be_bytes(b)
}

/// File offset of the first L2 entry of the first L2 table (the image must have one).
pub fn first_l2_entry(path: &Path) -> u64 {
    let l1 = be64(path, 40);
    let l2 = be64(path, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "image has no L2 table");
    l2
}

/// A hand-built 4 KiB v3 header (for the hostile cases `qemu-img` refuses to make): 2^`bits`
/// clusters, virtual size `size`, an L1 table of `l1_size` entries at `l1_offset`, the
/// incompatible feature bits `incompat`, and `backing` stored at 512 when given.
pub fn hand_header(
    bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    incompat: u64,
    backing: Option<&str>,
) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    if let Some(name) = backing {
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[512..512 + name.len()].copy_from_slice(name.as_bytes());
    }
    h[20..24].copy_from_slice(&bits.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&l1_size.to_be_bytes());
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    h[72..80].copy_from_slice(&incompat.to_be_bytes());
    // refcount_order 4, header_length 104.
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    h
}
