//! Feeds arbitrary bytes as everything a client sends to the NBD server (handshake, options,
//! then transmission requests and write payloads) serving a small in-memory QCOW2 image, read
//! only or over a copy-on-write overlay, and discards the replies. Any panic, hang or huge
//! allocation is a bug; errors are expected.
#![no_main]

use std::io;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use strata_nbd::{Overlay, Server};
use strata_qcow2::{Image, MemorySink, OpenOptions, ReadAt, Storage, Writer, WriterOptions};

/// Virtual size of the image: not a multiple of its clusters or of the overlay's 64 KiB
/// granules, so requests meet partial clusters and granules at the end.
const SIZE: u64 = (1 << 20) + 3 * 512;
/// The image's cluster size.
const CLUSTER: u64 = 4096;

/// An image with data, zero clusters and holes: data at 0..64 KiB and 200..204 KiB, zero
/// clusters at 128..192 KiB, data in the last (partial) cluster, holes elsewhere.
fn image_bytes() -> &'static Arc<Vec<u8>> {
    static IMAGE: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let mut options = WriterOptions::default();
        options.cluster_size = CLUSTER;
        let mut writer = Writer::new(MemorySink::new(), &options, SIZE).expect("writer");
        let pattern = |len: u64, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
                .collect()
        };
        writer.write_data(0, &pattern(64 << 10, 1)).expect("data");
        writer.write_zeros(128 << 10, 64 << 10).expect("zeros");
        writer
            .write_data(200 << 10, &pattern(4 << 10, 2))
            .expect("data");
        let last = SIZE / CLUSTER * CLUSTER;
        writer
            .write_data(last, &pattern(SIZE - last, 3))
            .expect("tail");
        let (sink, _) = writer.finish().expect("finish");
        Arc::new(sink.into_image().expect("finished image"))
    })
}

/// Serves [`image_bytes`] as `disk`.
struct Memory;

impl Storage for Memory {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        match path {
            "disk" => Ok(image_bytes().clone()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

/// Where the overlays of copy-on-write runs live (tmpfs when there is one, so flushes are
/// cheap); each run starts from a fresh overlay.
fn overlay_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        match shm.is_dir() {
            true => tempfile::tempdir_in(shm),
            false => tempfile::tempdir(),
        }
        .expect("overlay folder")
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the server: bit 0 copy-on-write, else bit 1 read-only with the
    // smallest maximum request (4 KiB) rather than the default 32 MiB.
    let Some((&mode, client)) = data.split_first() else {
        return;
    };
    let image = Image::open_with(&Memory, "disk", &OpenOptions::default()).expect("image");
    let max_request = if mode & 2 != 0 {
        4096
    } else {
        strata_nbd::DEFAULT_MAX_REQUEST
    };
    let server = if mode & 1 != 0 {
        let path = overlay_dir().path().join("overlay");
        let _ = std::fs::remove_file(&path);
        let overlay = Overlay::open_or_create(&path, SIZE, "fuzz").expect("overlay");
        Server::with_overlay("disk", image, overlay).expect("server")
    } else {
        Server::with_limits("disk", image, max_request, 1).expect("server")
    };
    let _ = server.serve_stream(client, io::sink());
});
