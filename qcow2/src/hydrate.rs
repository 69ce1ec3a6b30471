//! Hydration: writing the virtual disk of a chain into a raw file or block device.
//!
//! The chain's extents are walked once; holes and zero clusters cost nothing on a regular file
//! (it is sized first, so they stay holes), data is read in large runs, and blocks of zeros
//! inside data are skipped too, so the result is as sparse as the source allows. A block device
//! cannot have holes: there every range that reads as zeros is written as zeros.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};

use crate::error::{Error, Result, io_err};
use crate::image::Image;
use crate::map::{Extent, ExtentKind};

/// The largest run read or written at once.
const RUN_BYTES: usize = 4 << 20;
/// The granularity at which zeros inside data are left as holes (as `qemu-img convert -S 4k`).
const SPARSE_BLOCK: usize = 4096;

/// What a hydration did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HydrateStats {
    /// Guest bytes read from stored data (plain or compressed).
    pub data_bytes: u64,
    /// Bytes written to the destination.
    pub written_bytes: u64,
}

/// Writes the whole virtual disk of `image` into `dest`.
///
/// A regular file is resized to the virtual size and receives only non-zero data; it should be
/// empty (freshly created or truncated) so that everything else reads as zeros. A block device
/// must be at least as large as the virtual disk and is written in full.
pub fn hydrate(image: &Image, dest: &File, dest_name: &str) -> Result<HydrateStats> {
    hydrate_with_progress(image, dest, dest_name, &mut |_| {})
}

/// [`hydrate`], calling `progress` with the guest offset reached after each extent.
pub fn hydrate_with_progress(
    image: &Image,
    dest: &File,
    dest_name: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<HydrateStats> {
    let size = image.virtual_size();
    let meta = dest
        .metadata()
        .map_err(|e| io_err(dest_name, "reading metadata", e))?;
    let device = meta.file_type().is_block_device();
    if device {
        let dev_size = crate::io::ReadAt::len(dest)
            .map_err(|e| io_err(dest_name, "reading the device size", e))?;
        if dev_size < size {
            return Err(Error::InvalidArgument(format!(
                "{dest_name}: device of {dev_size} bytes is smaller than the virtual size {size}"
            )));
        }
    } else {
        dest.set_len(size)
            .map_err(|e| io_err(dest_name, "setting the file size", e))?;
    }
    let mut out = Output {
        dest,
        dest_name,
        device,
        buf: Vec::with_capacity(RUN_BYTES),
        start: 0,
        stats: HydrateStats::default(),
    };
    image.for_each_extent(0, size, |extent| {
        out.extent(image, extent)?;
        progress(extent.end());
        Ok(())
    })?;
    out.flush()?;
    if device {
        dest.sync_data()
            .map_err(|e| io_err(dest_name, "flushing the device", e))?;
    }
    Ok(out.stats)
}

/// Gathers adjacent data into one buffer so that writes are large.
struct Output<'a> {
    dest: &'a File,
    dest_name: &'a str,
    device: bool,
    buf: Vec<u8>,
    /// Guest offset of `buf[0]`.
    start: u64,
    stats: HydrateStats,
}

impl Output<'_> {
    fn extent(&mut self, image: &Image, extent: Extent) -> Result<()> {
        if extent.kind.is_zero() {
            self.flush()?;
            if self.device {
                self.write_zeros(extent.start, extent.length)?;
            }
            return Ok(());
        }
        let mut pos = extent.start;
        while pos < extent.end() {
            if self.buf.is_empty() {
                self.start = pos;
            } else if self.start + self.buf.len() as u64 != pos || self.buf.len() == RUN_BYTES {
                self.flush()?;
                self.start = pos;
            }
            let room = (RUN_BYTES - self.buf.len()) as u64;
            let n = room.min(extent.end() - pos) as usize;
            // For a compressed extent, a piece must not leave its cluster: split at cluster ends.
            let piece = Extent {
                start: pos,
                length: n as u64,
                kind: shift(extent.kind, pos - extent.start),
            };
            let from = self.buf.len();
            self.buf.resize(from + n, 0);
            image.read_extent(&piece, &mut self.buf[from..])?;
            self.stats.data_bytes += n as u64;
            pos += n as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let mut block = 0;
        let blocks: Vec<&[u8]> = self.buf.chunks(SPARSE_BLOCK).collect();
        while block < blocks.len() {
            if blocks[block].iter().all(|&b| b == 0) && !self.device {
                block += 1;
                continue;
            }
            let first = block;
            while block < blocks.len() && (self.device || blocks[block].iter().any(|&b| b != 0)) {
                block += 1;
            }
            let from = first * SPARSE_BLOCK;
            let to = (block * SPARSE_BLOCK).min(self.buf.len());
            let offset = self.start + from as u64;
            self.dest
                .write_all_at(&self.buf[from..to], offset)
                .map_err(|e| io_err(self.dest_name, format!("writing at {offset:#x}"), e))?;
            self.stats.written_bytes += (to - from) as u64;
        }
        self.buf.clear();
        Ok(())
    }

    fn write_zeros(&mut self, mut offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; RUN_BYTES.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = zeros.len().min((end - offset) as usize);
            self.dest
                .write_all_at(&zeros[..n], offset)
                .map_err(|e| io_err(self.dest_name, format!("writing zeros at {offset:#x}"), e))?;
            self.stats.written_bytes += n as u64;
            offset += n as u64;
        }
        Ok(())
    }
}

/// The kind of the part of an extent that starts `by` bytes into it.
fn shift(kind: ExtentKind, by: u64) -> ExtentKind {
    match kind {
        ExtentKind::Data { depth, host_offset } => ExtentKind::Data {
            depth,
            host_offset: host_offset + by,
        },
        other => other,
    }
}
