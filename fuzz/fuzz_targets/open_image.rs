//! Opens arbitrary bytes as a QCOW2 image, with a second arbitrary image as its backing file,
//! and reads everything it maps. Any panic, hang or huge allocation is a bug.
#![no_main]

use std::io;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use strata_qcow2::{Image, OpenOptions, ReadAt, Storage};

/// Serves the input's two halves as `top` and `base`.
struct Halves {
    top: Arc<Vec<u8>>,
    base: Arc<Vec<u8>>,
}

impl Storage for Halves {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        match path {
            "top" => Ok(self.top.clone()),
            "base" | "base.qcow2" => Ok(self.base.clone()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

/// Reading stops after this many bytes of data, so that a huge valid image is not a "hang".
const READ_BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    // The first byte says how long the backing image is (in 256-byte units) and is not part
    // of either image, so a seed is that byte and the images, base first.
    let Some((&selector, images)) = data.split_first() else {
        return;
    };
    let split = images.len().min(usize::from(selector) * 256);
    let (base, top) = images.split_at(split);
    let storage = Halves {
        top: Arc::new(top.to_vec()),
        base: Arc::new(base.to_vec()),
    };
    let Ok(image) = Image::open_with(&storage, "top", &OpenOptions::default()) else {
        return;
    };
    let _ = image.chain();
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 1 << 16];
    let _ = image.for_each_extent(0, image.virtual_size(), |extent| {
        let (mut pos, end) = (extent.start.get(), extent.end().get());
        while pos < end && budget > 0 {
            let n = (end - pos).min(buf.len() as u64).min(budget);
            image.read_at(&mut buf[..n as usize], pos)?;
            budget -= n;
            pos += n;
        }
        Ok(())
    });
});
