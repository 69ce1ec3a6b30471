//! Verifies an arbitrary QCOW2 image against an arbitrary checksum list (both read back from a
//! target), then reads the image with the list as its cluster check, as a verified restore
//! does. The first two bytes (big-endian) are the list's length; the list follows, then the
//! image. Any panic, hang or huge allocation is a bug, and so is a damage report longer than
//! its cap.
#![no_main]

use std::io;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use strata_chain::{ChainChecksums, ClusterChecksums, MAX_DAMAGE, verify};
use strata_qcow2::{Image, OpenOptions, ReadAt, Storage};

/// Serves the image as `top`.
struct Top(Arc<Vec<u8>>);

impl Storage for Top {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        match path {
            "top" => Ok(self.0.clone()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

/// Reading stops after this many bytes of data, so that a huge valid image is not a "hang".
const READ_BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (list, image) = rest.split_at(rest.len().min(usize::from(u16::from_be_bytes(*len))));
    let Ok(checksums) = ClusterChecksums::decode(list) else {
        return;
    };
    let storage = Top(Arc::new(image.to_vec()));
    let Ok(plain) = Image::open_with(&storage, "top", &OpenOptions::default()) else {
        return;
    };
    let damage = verify(&plain, &checksums);
    assert!(
        damage.len() <= MAX_DAMAGE + 1,
        "{} damage entries",
        damage.len()
    );

    let check = ChainChecksums::new(vec![("top".into(), checksums)]);
    let options = OpenOptions {
        cluster_check: Some(Arc::new(check)),
        ..OpenOptions::default()
    };
    let Ok(image) = Image::open_with(&storage, "top", &options) else {
        return;
    };
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 1 << 16];
    let _ = image.for_each_extent(0, image.virtual_size(), |extent| {
        let (mut pos, end) = (extent.start.get(), extent.end().get());
        while pos < end && budget > 0 {
            let n = (end - pos).min(buf.len() as u64).min(budget);
            // A checked read fails on damage; that is an answer, not a bug.
            let _ = image.read_at(&mut buf[..n as usize], pos);
            budget -= n;
            pos += n;
        }
        Ok(())
    });
});
