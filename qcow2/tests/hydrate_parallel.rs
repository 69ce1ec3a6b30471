//! Hydration reads runs on several threads, so a source with latency (object storage, NFS)
//! is read with requests in flight at once, and the result stays byte for byte right.

mod common;

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Scratch;
use strata_qcow2::{Image, LocalStorage, OpenOptions, ReadAt, Storage, hydrate};

/// Local files whose large reads take a while and count how many are in flight at once.
struct SlowStorage {
    inner: LocalStorage,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

struct SlowFile {
    inner: Arc<dyn ReadAt>,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Storage for SlowStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(SlowFile {
            inner: self.inner.open(path)?,
            in_flight: Arc::clone(&self.in_flight),
            most: Arc::clone(&self.most),
        }))
    }
}

impl ReadAt for SlowFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Metadata reads (headers, tables) are small; data runs are large.
        if buf.len() < 1 << 20 {
            return self.inner.read_exact_at(buf, offset);
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(40));
        let result = self.inner.read_exact_at(buf, offset);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

#[test]
fn runs_are_read_in_parallel_and_land_in_place() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    s.qemu_io(
        "base.qcow2",
        &["write -P 0x5a 0 24M", "write -P 0x33 40M 8M"],
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    s.qemu_io("top.qcow2", &["write -P 0x77 4M 2M", "write -z 44M 1M"]);

    let (in_flight, most) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
    let storage = SlowStorage {
        inner: LocalStorage::with_root(s.dir()),
        in_flight,
        most: Arc::clone(&most),
    };
    let image = Image::open_with(&storage, "top.qcow2", &OpenOptions::default()).expect("open");
    let out = s.path("out.raw");
    let stats = hydrate(&image, &File::create(&out).expect("create"), "out").expect("hydrate");
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "at most {} data reads were in flight at once",
        most.load(Ordering::SeqCst)
    );
    assert_eq!(stats.data_bytes, 31 << 20, "bytes read from stored data");

    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "qemu.raw"]);
    let (ours, theirs) = (
        std::fs::read(&out).expect("ours"),
        std::fs::read(s.path("qemu.raw")).expect("theirs"),
    );
    assert!(
        ours == theirs,
        "hydrated bytes differ from qemu-img convert"
    );
}
