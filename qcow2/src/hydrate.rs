//! Hydration: writing the virtual disk of a chain into a raw file or block device.
//!
//! The chain's extents are walked once; holes and zero clusters cost nothing on a regular file
//! (it is sized first, so they stay holes), data is read in large runs, and blocks of zeros
//! inside data are skipped too, so the result is as sparse as the source allows.
//!
//! A block device cannot have holes, so every range that reads as zeros must be zeroed on it,
//! but never with data writes where the device can do better: `fallocate(2)` with
//! `FALLOC_FL_PUNCH_HOLE` (unmaps and reads back zeros, with no fallback to writes in the
//! kernel), else `FALLOC_FL_ZERO_RANGE` (the kernel's write-zeroes, offloaded where the device
//! offers it), and only where the device refuses both, zeros written from one shared buffer.
//! This is what `qemu-img convert -n` does with `BLKZEROOUT` and discard. A destination known to
//! read zeros already (a freshly provisioned thin volume) skips even that with
//! [`HydrateOptions::target_is_zero`], qemu-img's `--target-is-zero`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::{Mutex, mpsc};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

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
    /// Bytes written to the destination as data (zeros written where a device refused to
    /// zero ranges included).
    pub written_bytes: u64,
    /// Bytes of a block device zeroed without data writes (`fallocate`).
    pub zeroed_bytes: u64,
}

/// How to hydrate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HydrateOptions {
    /// The destination already reads as zeros everywhere (a new regular file always does; a
    /// block device only when its provider guarantees it): zero ranges are left alone.
    pub target_is_zero: bool,
}

/// Writes the whole virtual disk of `image` into `dest`.
///
/// A regular file is resized to the virtual size and receives only non-zero data; it should be
/// empty (freshly created or truncated) so that everything else reads as zeros. A block device
/// must be at least as large as the virtual disk and is written in full.
pub fn hydrate(image: &Image, dest: &File, dest_name: &str) -> Result<HydrateStats> {
    hydrate_with_progress(image, dest, dest_name, &mut |_| {})
}

/// [`hydrate`], calling `progress` with the guest offset below which everything is written.
///
/// The chain's map is walked once on this thread, which cuts the data into runs of up to
/// 4 MiB; four threads read the runs and write them at their offsets, so reads from a
/// source with latency (object storage, NFS) overlap. Memory: one 4 MiB buffer per worker
/// besides the reader's caches.
pub fn hydrate_with_progress(
    image: &Image,
    dest: &File,
    dest_name: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<HydrateStats> {
    hydrate_with(image, dest, dest_name, &HydrateOptions::default(), progress)
}

/// [`hydrate_with_progress`] with explicit [`HydrateOptions`].
pub fn hydrate_with(
    image: &Image,
    dest: &File,
    dest_name: &str,
    options: &HydrateOptions,
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
    let output = Output {
        dest,
        dest_name,
        device,
        zeroing: Mutex::new(Zeroing::PunchHole),
    };
    let zero_ranges = device && !options.target_is_zero;
    let (task_tx, task_rx) = mpsc::sync_channel::<Run>(WORKERS);
    let task_rx = Mutex::new(task_rx);
    let (done_tx, done_rx) = mpsc::channel::<Result<Done>>();
    let mut stats = HydrateStats::default();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            let (task_rx, done_tx, output) = (&task_rx, done_tx.clone(), &output);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(RUN_BYTES);
                while let Some(run) = lock_recv(task_rx) {
                    if done_tx.send(output.run(image, run, &mut buf)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        // Returning (on an error too) drops the task sender, which stops the workers.
        let (task_tx, done_rx) = (task_tx, done_rx);
        let mut order = Order::default();
        let mut run = Run::default();
        let mut send = |run: Run, order: &mut Order, stats: &mut HydrateStats| -> Result<()> {
            order.started(run.seq, run.end());
            task_tx
                .send(run)
                .map_err(|_| Error::InvalidArgument("hydration workers stopped".into()))?;
            // Take what is done without waiting, so progress moves and errors stop the walk.
            while let Ok(done) = done_rx.try_recv() {
                order.finished(done?, stats, progress);
            }
            Ok(())
        };
        // Adjacent zero extents are zeroed as one range, on this thread.
        let mut zeros: Option<(u64, u64)> = None;
        image.for_each_extent(0, size, |extent| {
            if extent.kind.is_zero() {
                image.check_zeros(extent.kind, extent.start, extent.length)?;
                if zero_ranges {
                    zeros = match zeros {
                        Some((start, end)) if end == extent.start => Some((start, extent.end())),
                        Some((start, end)) => {
                            output.zero(start, end - start, &mut stats)?;
                            Some((extent.start, extent.end()))
                        }
                        None => Some((extent.start, extent.end())),
                    };
                }
                return Ok(());
            }
            if let Some((start, end)) = zeros.take() {
                output.zero(start, end - start, &mut stats)?;
            }
            let mut pos = extent.start;
            while pos < extent.end() {
                if !run.pieces.is_empty() && (run.end() != pos || run.len() == RUN_BYTES as u64) {
                    let next = Run::after(&run);
                    send(std::mem::replace(&mut run, next), &mut order, &mut stats)?;
                }
                let room = RUN_BYTES as u64 - run.len();
                let n = room.min(extent.end() - pos);
                // A compressed extent's pieces are read from within its cluster.
                run.pieces.push(Extent {
                    start: pos,
                    length: n,
                    kind: shift(extent.kind, pos - extent.start),
                });
                pos += n;
            }
            Ok(())
        })?;
        if let Some((start, end)) = zeros.take() {
            output.zero(start, end - start, &mut stats)?;
        }
        if !run.pieces.is_empty() {
            let next = Run::after(&run);
            send(std::mem::replace(&mut run, next), &mut order, &mut stats)?;
        }
        drop(task_tx);
        for done in done_rx.iter() {
            order.finished(done?, &mut stats, progress);
        }
        Ok::<(), Error>(())
    })?;
    progress(size);
    if device {
        dest.sync_data()
            .map_err(|e| io_err(dest_name, "flushing the device", e))?;
    }
    Ok(stats)
}

/// Hydration threads.
const WORKERS: usize = 4;

fn lock_recv<T>(receiver: &Mutex<mpsc::Receiver<T>>) -> Option<T> {
    receiver.lock().ok()?.recv().ok()
}

/// Adjacent data pieces read and written together.
#[derive(Debug, Default)]
struct Run {
    seq: u64,
    pieces: Vec<Extent>,
}

impl Run {
    fn after(run: &Run) -> Self {
        Self {
            seq: run.seq + 1,
            pieces: Vec::new(),
        }
    }

    fn start(&self) -> u64 {
        self.pieces.first().map_or(0, |p| p.start)
    }

    fn end(&self) -> u64 {
        self.pieces.last().map_or(0, Extent::end)
    }

    fn len(&self) -> u64 {
        self.end() - self.start()
    }
}

/// A run written.
struct Done {
    seq: u64,
    data_bytes: u64,
    written_bytes: u64,
}

/// Runs finish out of order; progress reports the end of the longest finished prefix.
#[derive(Default)]
struct Order {
    ends: BTreeMap<u64, (u64, bool)>,
}

impl Order {
    fn started(&mut self, seq: u64, end: u64) {
        self.ends.insert(seq, (end, false));
    }

    fn finished(&mut self, done: Done, stats: &mut HydrateStats, progress: &mut dyn FnMut(u64)) {
        stats.data_bytes += done.data_bytes;
        stats.written_bytes += done.written_bytes;
        if let Some(entry) = self.ends.get_mut(&done.seq) {
            entry.1 = true;
        }
        let mut reached = None;
        while let Some(entry) = self.ends.first_entry() {
            if !entry.get().1 {
                break;
            }
            reached = Some(entry.remove().0);
        }
        if let Some(end) = reached {
            progress(end);
        }
    }
}

/// Where hydrated bytes go.
struct Output<'a> {
    dest: &'a File,
    dest_name: &'a str,
    device: bool,
    zeroing: Mutex<Zeroing>,
}

impl Output<'_> {
    /// Reads a run's pieces into `buf` and writes them, leaving blocks of zeros as holes on
    /// a regular file.
    fn run(&self, image: &Image, run: Run, buf: &mut Vec<u8>) -> Result<Done> {
        let start = run.start();
        buf.clear();
        buf.resize(run.len() as usize, 0);
        for piece in &run.pieces {
            let from = (piece.start - start) as usize;
            let part = buf
                .get_mut(from..from + piece.length as usize)
                .ok_or_else(|| Error::InvalidArgument("piece outside its run".into()))?;
            image.read_extent(piece, part)?;
        }
        let written_bytes = self.write_sparse(buf, start)?;
        Ok(Done {
            seq: run.seq,
            data_bytes: run.len(),
            written_bytes,
        })
    }

    fn write_sparse(&self, buf: &[u8], start: u64) -> Result<u64> {
        let mut written = 0;
        let mut block = 0;
        let blocks: Vec<&[u8]> = buf.chunks(SPARSE_BLOCK).collect();
        while block < blocks.len() {
            if !self.device && blocks[block].iter().all(|&b| b == 0) {
                block += 1;
                continue;
            }
            let first = block;
            while block < blocks.len() && (self.device || blocks[block].iter().any(|&b| b != 0)) {
                block += 1;
            }
            let from = first * SPARSE_BLOCK;
            let to = (block * SPARSE_BLOCK).min(buf.len());
            let offset = start + from as u64;
            self.dest
                .write_all_at(&buf[from..to], offset)
                .map_err(|e| io_err(self.dest_name, format!("writing at {offset:#x}"), e))?;
            written += (to - from) as u64;
        }
        Ok(written)
    }

    /// Zeroes `len` bytes of the device at `offset` the cheapest way it accepts (see the
    /// module docs), remembering what it refused.
    fn zero(&self, offset: u64, len: u64, stats: &mut HydrateStats) -> Result<()> {
        let mut zeroing = self
            .zeroing
            .lock()
            .map_err(|_| Error::InvalidArgument("hydration zeroing state poisoned".into()))?;
        while *zeroing != Zeroing::Write {
            let mode = match *zeroing {
                Zeroing::PunchHole => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                _ => FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            };
            match rustix::fs::fallocate(self.dest, mode, offset, len) {
                Ok(()) => {
                    stats.zeroed_bytes += len;
                    return Ok(());
                }
                // Not offered by this device (or not for this alignment): try the next way.
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL | Errno::NODEV) => {
                    *zeroing = zeroing.next();
                }
                Err(err) => {
                    return Err(io_err(
                        self.dest_name,
                        format!("zeroing {len:#x} bytes at {offset:#x}"),
                        err.into(),
                    ));
                }
            }
        }
        drop(zeroing);
        self.write_zeros(offset, len, stats)
    }

    fn write_zeros(&self, mut offset: u64, len: u64, stats: &mut HydrateStats) -> Result<()> {
        let end = offset + len;
        while offset < end {
            let n = ZEROS.len().min((end - offset) as usize);
            self.dest
                .write_all_at(&ZEROS[..n], offset)
                .map_err(|e| io_err(self.dest_name, format!("writing zeros at {offset:#x}"), e))?;
            stats.written_bytes += n as u64;
            offset += n as u64;
        }
        Ok(())
    }
}

/// How a block device takes zero ranges, tried in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    PunchHole,
    ZeroRange,
    Write,
}

impl Zeroing {
    fn next(self) -> Self {
        match self {
            Self::PunchHole => Self::ZeroRange,
            Self::ZeroRange | Self::Write => Self::Write,
        }
    }
}

/// The zeros written where a device refuses `fallocate`: one shared buffer, never a fresh one.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

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
