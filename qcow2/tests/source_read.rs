//! `Image::source_read` names exactly the bytes `Image::read_extent` reads: a reader that
//! fetches those ranges ahead (a restore from object storage) never misses one.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::Scratch;
use strata_qcow2::{
    CheckFailure, ClusterCheck, Extent, Image, LocalStorage, OpenOptions, ReadAt, Storage,
};

/// Local storage that records every read (source, start, end) once `armed`.
#[derive(Default)]
struct Recording {
    reads: Arc<Mutex<Vec<(String, u64, u64)>>>,
}

struct Recorded {
    name: String,
    inner: Arc<dyn ReadAt>,
    reads: Arc<Mutex<Vec<(String, u64, u64)>>>,
}

impl ReadAt for Recorded {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads
            .lock()
            .unwrap()
            .push((self.name.clone(), offset, offset + buf.len() as u64));
        self.inner.read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl Storage for Recording {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(Recorded {
            name: path.to_owned(),
            inner: LocalStorage::new().open(path)?,
            reads: Arc::clone(&self.reads),
        }))
    }
}

/// Passes every cluster: only the shape of checked reads matters here.
struct PassAll;

impl ClusterCheck for PassAll {
    fn stored(&self, _: usize, _: u64, _: &[u8]) -> Result<(), CheckFailure> {
        Ok(())
    }

    fn zeros(&self, _: Option<usize>, _: u64, _: u64) -> Result<(), CheckFailure> {
        Ok(())
    }
}

/// A base (data, a hole, compressed data) and an overlay writing across cluster boundaries.
fn chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "raw_base.qcow2", "2M"]);
    s.qemu_io(
        "raw_base.qcow2",
        &["write -P 0x11 0 192k", "write -P 0x33 1M 128k"],
    );
    s.qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "raw_base.qcow2",
        "base.qcow2",
    ]);
    s.qemu_io("base.qcow2", &["write -P 0x44 512k 256k"]);
    s.overlay("top.qcow2", "base.qcow2");
    s.qemu_io(
        "top.qcow2",
        &["write -P 0x22 100k 100k", "write -P 0x55 1500k 4k"],
    );
}

/// For every extent of the chain: the reads `read_extent` makes lie inside the range
/// `source_read` names, from the source it names, and they cover it; zero extents read nothing.
fn assert_source_reads_cover_extent_reads(options: &OpenOptions) {
    let s = Scratch::new();
    chain(&s);
    let storage = Recording::default();
    let top = s.path("top.qcow2").display().to_string();
    let image = Image::open_with(&storage, &top, options).unwrap();
    let extents = image.map(0, image.virtual_size()).unwrap();
    let mut kinds = std::collections::HashSet::new();
    for extent in &extents {
        kinds.insert(std::mem::discriminant(&extent.kind));
        let named = image.source_read(extent).unwrap();
        storage.reads.lock().unwrap().clear();
        let mut buf = vec![0u8; extent.length as usize];
        image.read_extent(extent, &mut buf).unwrap();
        let reads = storage.reads.lock().unwrap().clone();
        match named {
            None => assert!(reads.is_empty(), "{extent:?} read {reads:?}"),
            Some(range) => {
                assert!(!reads.is_empty(), "{extent:?}");
                for (source, start, end) in &reads {
                    assert_eq!(source, range.source, "{extent:?}");
                    assert!(
                        *start >= range.start && *end <= range.end,
                        "{extent:?}: read {start:#x}..{end:#x} outside {range:?}"
                    );
                }
                let lowest = reads.iter().map(|r| r.1).min().unwrap();
                let highest = reads.iter().map(|r| r.2).max().unwrap();
                assert_eq!((lowest, highest), (range.start, range.end), "{extent:?}");
            }
        }
    }
    // Data, compressed, unallocated extents all occurred.
    assert!(kinds.len() >= 3, "{extents:?}");
}

#[test]
fn source_reads_name_exactly_what_unchecked_extent_reads_read() {
    assert_source_reads_cover_extent_reads(&OpenOptions::default());
}

#[test]
fn source_reads_of_checked_images_widen_to_whole_clusters() {
    let options = OpenOptions {
        cluster_check: Some(Arc::new(PassAll) as Arc<dyn ClusterCheck>),
        ..OpenOptions::default()
    };
    assert_source_reads_cover_extent_reads(&options);
}

#[test]
fn a_piece_of_an_extent_reads_within_the_extents_range() {
    let s = Scratch::new();
    chain(&s);
    let image = Image::open(s.path("base.qcow2")).unwrap();
    let extents = image.map(0, image.virtual_size()).unwrap();
    let data = extents
        .iter()
        .find(|e| matches!(e.kind, strata_qcow2::ExtentKind::Data { .. }))
        .unwrap();
    let whole = image.source_read(data).unwrap().unwrap();
    let piece = Extent {
        length: 65536,
        ..*data
    };
    let part = image.source_read(&piece).unwrap().unwrap();
    assert_eq!((part.start, part.end), (whole.start, whole.start + 65536));
}
