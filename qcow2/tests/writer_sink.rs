//! Sinks that fail: the writer reports the error and nothing claims to be a complete image.

use std::io;

use strata_qcow2::{Error, FileSink, ImageSink, MemorySink, Writer, WriterOptions, convert_raw};

/// A memory sink that refuses appends once `budget` bytes were taken.
struct FailingSink {
    inner: MemorySink,
    budget: usize,
}

impl ImageSink for FailingSink {
    fn begin(&mut self, header_len: u64) -> io::Result<()> {
        self.inner.begin(header_len)
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() > self.budget {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "upload aborted"));
        }
        self.budget -= data.len();
        self.inner.append(data)
    }

    fn finish(&mut self, header: &[u8]) -> io::Result<()> {
        self.inner.finish(header)
    }
}

fn ten_clusters() -> Vec<u8> {
    (0..10 * 65536).map(|i| (i % 253 + 1) as u8).collect()
}

#[test]
fn failure_while_appending_data_poisons_the_writer() {
    let sink = FailingSink {
        inner: MemorySink::new(),
        budget: 3 * 65536,
    };
    let mut writer = Writer::new(sink, &WriterOptions::default(), 1 << 20).unwrap();
    // Clusters go out one append per cluster once compression is off and zeros split runs.
    let data = ten_clusters();
    let err = writer.write_data(0, &data).unwrap_err();
    assert!(
        matches!(&err, Error::WriteIo { operation, source, .. } if operation.contains("appending") && source.kind() == io::ErrorKind::BrokenPipe),
        "{err:?}"
    );
    assert!(matches!(
        writer.write_data(10 * 65536, &[1; 65536]),
        Err(Error::Poisoned)
    ));
    assert!(matches!(writer.finish(), Err(Error::Poisoned)));
}

#[test]
fn failure_while_appending_metadata_reports_io() {
    let sink = FailingSink {
        inner: MemorySink::new(),
        budget: 10 * 65536 + 100,
    };
    let mut writer = Writer::new(sink, &WriterOptions::default(), 1 << 20).unwrap();
    writer.write_data(0, &ten_clusters()).unwrap();
    let err = writer.finish().map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::WriteIo { operation, .. } if operation.contains("metadata")));
}

#[test]
fn abandoned_file_sink_removes_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.qcow2");
    let mut writer = Writer::new(
        FileSink::create(&path).unwrap(),
        &WriterOptions::default(),
        1 << 20,
    )
    .unwrap();
    writer.write_data(0, &ten_clusters()).unwrap();
    assert!(path.exists());
    drop(writer);
    assert!(!path.exists(), "an abandoned image must not stay behind");
}

#[test]
fn abandoned_handed_over_file_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handed.qcow2");
    std::fs::write(&path, b"QFI\xfb old image").unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut writer = Writer::new(
        FileSink::from_file(file),
        &WriterOptions::default(),
        1 << 20,
    )
    .unwrap();
    writer.write_data(0, &ten_clusters()).unwrap();
    drop(writer);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn full_device_fails_the_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("source.raw");
    std::fs::write(&raw, ten_clusters()).unwrap();
    let source = std::fs::File::open(&raw).unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let err = convert_raw(
        &source,
        FileSink::from_file(full),
        &WriterOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::WriteIo { source, .. } if source.raw_os_error() == Some(28)),
        "expected ENOSPC, got {err:?}"
    );
}

#[test]
fn out_of_order_and_misaligned_writes_are_refused() {
    let mut writer = Writer::new(MemorySink::new(), &WriterOptions::default(), 1 << 20).unwrap();
    writer.write_data(65536, &[1; 65536]).unwrap();
    assert!(matches!(
        writer.write_data(0, &[1; 65536]),
        Err(Error::OutOfOrder { .. })
    ));
    assert!(matches!(
        writer.write_data(3 * 65536 + 512, &[1; 512]),
        Err(Error::BadRange { .. })
    ));
    assert!(matches!(
        writer.write_data(4 * 65536, &[1; 100]),
        Err(Error::BadRange { .. })
    ));
    assert!(matches!(
        writer.write_zeros(15 * 65536, 2 * 65536),
        Err(Error::BadRange { .. })
    ));
    // A refused call changes nothing: the image still finishes.
    let (sink, summary) = writer.finish().unwrap();
    assert_eq!(summary.data_clusters, 1);
    assert!(sink.image().is_some());
}

#[test]
fn abandoned_sink_on_a_device_never_removes_it() {
    // A symlink to /dev/null stands for a block device: removing "what it created" would
    // remove the link, which this test would see (and a device node, which it must never).
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("device");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let mut writer = Writer::new(
        FileSink::create(&link).unwrap(),
        &WriterOptions::default(),
        1 << 20,
    )
    .unwrap();
    writer.write_data(0, &ten_clusters()).unwrap();
    drop(writer);
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "the device path was removed"
    );
}
