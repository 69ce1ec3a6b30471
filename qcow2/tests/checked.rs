//! Reads through a `ClusterCheck`: every stored cluster a reader returns is seen whole, a
//! failure fails the read with the check's words, and what cannot be checked is refused.

mod common;

use std::sync::{Arc, Mutex};

use common::Scratch;
use strata_qcow2::{CheckFailure, ClusterCheck, Error, Image, OpenOptions, hydrate};

/// Records every check and fails the cluster at `fail_at`, if any.
#[derive(Default)]
struct Recorder {
    stored: Mutex<Vec<(usize, u64, usize, u8)>>,
    zeros: Mutex<Vec<(Option<usize>, u64, u64)>>,
    fail_at: Option<u64>,
    /// The failure is one of the check itself (what it checks against did not read).
    unchecked: bool,
}

impl ClusterCheck for Recorder {
    fn stored(&self, depth: usize, guest_offset: u64, data: &[u8]) -> Result<(), CheckFailure> {
        self.stored
            .lock()
            .unwrap()
            .push((depth, guest_offset, data.len(), data[0]));
        match self.fail_at {
            Some(at) if at == guest_offset => Err(CheckFailure {
                depth,
                guest_offset,
                problem: "is not what was written".into(),
                unchecked: self.unchecked,
            }),
            _ => Ok(()),
        }
    }

    fn zeros(&self, depth: Option<usize>, guest_offset: u64, len: u64) -> Result<(), CheckFailure> {
        self.zeros.lock().unwrap().push((depth, guest_offset, len));
        Ok(())
    }

    fn image_name(&self, depth: usize) -> Option<String> {
        Some(format!("layer {depth}"))
    }
}

fn checked(recorder: &Arc<Recorder>) -> OpenOptions {
    OpenOptions {
        cluster_check: Some(Arc::clone(recorder) as Arc<dyn ClusterCheck>),
        ..OpenOptions::default()
    }
}

/// A base with 0x11 in clusters 0-1 and an overlay with 0x22 in cluster 1, 64 KiB clusters.
fn chain(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    s.qemu_io("base.qcow2", &["write -P 0x11 0 128k"]);
    s.overlay("top.qcow2", "base.qcow2");
    s.qemu_io("top.qcow2", &["write -P 0x22 64k 64k"]);
}

#[test]
fn a_read_of_part_of_a_cluster_checks_the_whole_cluster_of_the_layer_storing_it() {
    let s = Scratch::new();
    chain(&s);
    let recorder = Arc::new(Recorder::default());
    let image = Image::open_with_options(s.path("top.qcow2"), &checked(&recorder)).unwrap();
    let mut buf = vec![0u8; 512];
    image.read_at(&mut buf, 65536 + 1000).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    image.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    image.read_at(&mut buf, 512 << 10).unwrap();
    assert_eq!(
        *recorder.stored.lock().unwrap(),
        vec![(0, 65536, 65536, 0x22), (1, 0, 65536, 0x11)]
    );
    assert_eq!(
        *recorder.zeros.lock().unwrap(),
        vec![(None, 512 << 10, 512)]
    );
}

#[test]
fn hydration_checks_every_stored_cluster_once_and_every_zero_range() {
    let s = Scratch::new();
    chain(&s);
    let recorder = Arc::new(Recorder::default());
    let image = Image::open_with_options(s.path("top.qcow2"), &checked(&recorder)).unwrap();
    let out = std::fs::File::create(s.path("out.raw")).unwrap();
    hydrate(&image, &out, "out.raw").unwrap();
    let mut stored = recorder.stored.lock().unwrap().clone();
    stored.sort();
    assert_eq!(stored, vec![(0, 65536, 65536, 0x22), (1, 0, 65536, 0x11)]);
    assert_eq!(
        *recorder.zeros.lock().unwrap(),
        vec![(None, 128 << 10, 896 << 10)]
    );
}

#[test]
fn a_failed_check_fails_the_read_naming_the_image_and_offset() {
    let s = Scratch::new();
    chain(&s);
    let recorder = Arc::new(Recorder {
        fail_at: Some(0),
        ..Recorder::default()
    });
    let image = Image::open_with_options(s.path("top.qcow2"), &checked(&recorder)).unwrap();
    let mut buf = vec![7u8; 4096];
    let err = image.read_at(&mut buf, 100).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ClusterCheck {
                depth: 1,
                guest_offset: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "layer 1: cluster at guest offset 0x0 is not what was written"
    );
    let out = std::fs::File::create(s.path("out.raw")).unwrap();
    assert!(matches!(
        hydrate(&image, &out, "out.raw"),
        Err(Error::ClusterCheck { depth: 1, .. })
    ));
}

/// A check that could not be made (its own list did not read back) fails the read as an I/O
/// error of the image, not as a cluster found wrong: the backup is not taken for damaged.
#[test]
fn a_check_that_could_not_be_made_is_an_io_error_not_a_cluster_check() {
    let s = Scratch::new();
    chain(&s);
    let recorder = Arc::new(Recorder {
        fail_at: Some(0),
        unchecked: true,
        ..Recorder::default()
    });
    let image = Image::open_with_options(s.path("top.qcow2"), &checked(&recorder)).unwrap();
    let mut buf = vec![7u8; 4096];
    let err = image.read_at(&mut buf, 100).unwrap_err();
    assert!(
        matches!(&err, Error::Io { action, .. } if action.contains("guest offset 0x0")),
        "{err:?}"
    );
}

#[test]
fn raw_layers_and_extended_l2_entries_are_refused_with_a_check() {
    let s = Scratch::new();
    let recorder = Arc::new(Recorder::default());
    std::fs::write(s.path("base.raw"), vec![1u8; 65536]).unwrap();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "over-raw.qcow2",
        "64K",
    ]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "ext.qcow2",
        "1M",
    ]);
    for (name, feature) in [
        ("over-raw.qcow2", "cluster checks of a raw image"),
        (
            "ext.qcow2",
            "cluster checks of an image with extended L2 entries",
        ),
    ] {
        match Image::open_with_options(s.path(name), &checked(&recorder)) {
            Err(Error::Unsupported { feature: f, .. }) => assert_eq!(f, feature),
            other => panic!("{name}: {other:?}"),
        }
        Image::open(s.path(name)).unwrap();
    }
}
