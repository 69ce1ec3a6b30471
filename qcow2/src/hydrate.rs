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
//! [`HydrateOptions::target_is_zero`], qemu-img's `--target-is-zero`. Its data goes around the
//! page cache where the writes are aligned ([`DeviceWriter`], `O_DIRECT`), and what is written is
//! flushed as it goes ([`WriteBehind`]), so the flush that ends the job waits for the tail only.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result, io_err};
use crate::image::Image;
use crate::io::WriteBehind;
use crate::map::Extent;
use crate::offset::{GuestOffset, GuestRange};
use crate::pipeline::{Buffer, Pipeline, Tasks};
use crate::writer::is_zero;

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
    /// Flush a regular file's data before returning, as a block device's always is (a restore
    /// does; a conversion, like `qemu-img convert`'s default, leaves it to the kernel).
    pub flush: bool,
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
/// Runs on the [`Pipeline`](crate::pipeline::Pipeline): its planner walks the chain's map once
/// and cuts the data into runs of up to 4 MiB; four workers read the runs, so reads from a
/// source with latency (object storage, NFS) overlap. A block device is written by the
/// workers, at the runs' offsets, out of order (and its zero ranges are zeroed by them too);
/// a regular file is written by this thread in order, only its non-zero 4 KiB blocks, as
/// writes to one file serialize on its inode lock anyway (on a tmpfs, four writers spent a
/// sixth of the CPU time spinning on it). Progress is the end of the finished prefix: jobs are
/// planned in guest order. A block device (and a regular file with [`HydrateOptions::flush`])
/// is flushed before this returns, written behind ([`WriteBehind`](crate::WriteBehind)): a
/// flush every [`FLUSH_EVERY`](crate::FLUSH_EVERY) bytes on a thread of its own.
/// Memory: six 4 MiB buffers besides the reader's caches.
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
    let zero_ranges = device && !options.target_is_zero;
    // A flushed destination is flushed as it is written, so the last flush waits for the tail.
    let behind = (device || options.flush).then(|| WriteBehind::start(dest));
    let output = Output {
        dest,
        dest_name,
        device,
        zeroer: DeviceZeroer::new(dest, dest_name),
        writer: device.then(|| DeviceWriter::new(dest)),
        behind: behind.as_ref(),
    };
    let mut stats = HydrateStats::default();
    Pipeline::new(WORKERS, RUN_BYTES).run(
        |tasks| plan_runs(image, size, zero_ranges, tasks),
        || Ok(()),
        |(), job, buf| output.run(image, job, buf),
        |done: Done, buf| {
            // A regular file's data is written here, in order: writes to one file take its
            // inode lock, so writers on several threads would only wait for each other.
            for span in &done.spans {
                let bytes = buf.bytes().get(span.clone()).unwrap_or_default();
                output.write(bytes, done.start + span.start as u64)?;
                stats.written_bytes += bytes.len() as u64;
            }
            stats.data_bytes += done.data_bytes;
            stats.written_bytes += done.written_bytes;
            stats.zeroed_bytes += done.zeroed_bytes;
            progress(done.end.get());
            Ok(())
        },
    )?;
    if let Some(behind) = behind {
        let flushing = match device {
            true => "flushing the device",
            false => "flushing written data",
        };
        behind
            .finish()
            .and_then(|()| dest.sync_data())
            .map_err(|e| io_err(dest_name, flushing, e))?;
    }
    progress(size);
    Ok(stats)
}

/// Hydration threads: more than the cores, so reads from a source with latency overlap.
const WORKERS: usize = 4;

/// What a worker does: read adjacent data pieces and write them, or zero a range of a device.
enum Job {
    Data(Vec<Extent>),
    Zero(GuestRange),
}

/// The guest range adjacent pieces cover.
fn span(pieces: &[Extent]) -> GuestRange {
    GuestRange {
        start: pieces.first().map_or(GuestOffset(0), |p| p.start),
        end: pieces.last().map_or(GuestOffset(0), Extent::end),
    }
}

/// A job done: where it ends, what it cost, and (a regular file) the spans of its buffer,
/// from `start`, still to be written.
struct Done {
    start: GuestOffset,
    end: GuestOffset,
    spans: Vec<std::ops::Range<usize>>,
    data_bytes: u64,
    written_bytes: u64,
    zeroed_bytes: u64,
}

/// Walks the chain's map once and cuts it into jobs: runs of adjacent data of up to
/// [`RUN_BYTES`], and (on a device to zero) each stretch of adjacent zero extents as one range.
fn plan_runs(image: &Image, size: u64, zero_ranges: bool, tasks: &mut Tasks<Job>) -> Result<()> {
    let mut run: Vec<Extent> = Vec::new();
    let mut zeros: Option<GuestRange> = None;
    // The walk is ended with this error when the pipeline has stopped.
    const STOPPED: &str = "hydration stopped";
    let mut submit = |job: Job| match tasks.submit(job) {
        true => Ok(()),
        false => Err(Error::InvalidArgument(STOPPED.into())),
    };
    let walked = image.for_each_extent(0, size, |extent| {
        if extent.kind.is_zero() {
            image.check_zeros(extent.kind, extent.start.get(), extent.length)?;
            if zero_ranges {
                zeros = match zeros {
                    Some(range) if range.end == extent.start => Some(GuestRange {
                        end: extent.end(),
                        ..range
                    }),
                    Some(range) => {
                        submit(Job::Zero(range))?;
                        Some(extent.range())
                    }
                    None => Some(extent.range()),
                };
            }
            return Ok(());
        }
        if let Some(range) = zeros.take() {
            // Jobs go in guest order, so progress (the end of the finished prefix) holds: the
            // data before the zeros first.
            if !run.is_empty() {
                submit(Job::Data(std::mem::take(&mut run)))?;
            }
            submit(Job::Zero(range))?;
        }
        let mut pos = extent.start;
        while pos < extent.end() {
            let range = span(&run);
            if !run.is_empty() && (range.end != pos || range.len() == RUN_BYTES as u64) {
                submit(Job::Data(std::mem::take(&mut run)))?;
            }
            let room = RUN_BYTES as u64 - span(&run).len();
            let n = room.min(extent.end().distance_from(pos));
            // A compressed extent's pieces are read from within its cluster.
            run.push(extent.slice(pos, n));
            pos += n;
        }
        Ok(())
    });
    match walked {
        Err(Error::InvalidArgument(why)) if why == STOPPED => return Ok(()),
        walked => walked?,
    }
    if !run.is_empty() {
        submit(Job::Data(run))?;
    }
    if let Some(range) = zeros.take() {
        submit(Job::Zero(range))?;
    }
    Ok(())
}

/// Where hydrated bytes go.
struct Output<'a> {
    dest: &'a File,
    dest_name: &'a str,
    device: bool,
    zeroer: DeviceZeroer<'a>,
    /// Writes a device's data (direct where it can).
    writer: Option<DeviceWriter<'a>>,
    /// Counts what is written, for the background flushes.
    behind: Option<&'a WriteBehind>,
}

impl Output<'_> {
    /// Does one job: reads a run's pieces into `buf` and writes them to a device (or, for a
    /// regular file, finds the spans to write, leaving blocks of zeros as holes), or zeroes a
    /// range of the device.
    fn run(&self, image: &Image, job: Job, buf: &mut Buffer) -> Result<Done> {
        let pieces = match job {
            Job::Data(pieces) => pieces,
            Job::Zero(range) => {
                let mut done = Done {
                    start: range.start,
                    end: range.end,
                    spans: Vec::new(),
                    data_bytes: 0,
                    written_bytes: 0,
                    zeroed_bytes: 0,
                };
                let zeroed = self.zeroer.zero(range.start.get(), range.len())?;
                if let Some(behind) = self.behind {
                    behind.wrote(zeroed.written_bytes);
                }
                done.zeroed_bytes = zeroed.zeroed_bytes;
                done.written_bytes = zeroed.written_bytes;
                return Ok(done);
            }
        };
        let range = span(&pieces);
        // The pieces are adjacent and cover the run: every byte is read over.
        let bytes = buf.resize(range.len() as usize);
        for piece in &pieces {
            let from = range.index_of(piece.start);
            let part = bytes
                .get_mut(from..from + piece.length as usize)
                .ok_or_else(|| Error::InvalidArgument("piece outside its run".into()))?;
            image.read_extent(piece, part)?;
        }
        let mut done = Done {
            start: range.start,
            end: range.end,
            spans: Vec::new(),
            data_bytes: range.len(),
            written_bytes: 0,
            zeroed_bytes: 0,
        };
        if self.device {
            self.write(bytes, range.start)?;
            done.written_bytes = range.len();
        } else {
            done.spans = nonzero_spans(bytes);
        }
        Ok(done)
    }

    fn write(&self, bytes: &[u8], offset: GuestOffset) -> Result<()> {
        match &self.writer {
            Some(writer) => writer.write_all_at(bytes, offset.get()),
            None => crate::io::write_all_at(self.dest, bytes, offset.get()),
        }
        .map_err(|e| io_err(self.dest_name, format!("writing at {offset}"), e))?;
        if let Some(behind) = self.behind {
            behind.wrote(bytes.len() as u64);
        }
        Ok(())
    }
}

/// Zeroes ranges of a block device the cheapest way it accepts (see the module docs):
/// `fallocate` punching a hole, else zeroing the range, else zeros written from one shared
/// buffer, remembering what the device refused so later ranges go straight to what works.
#[derive(Debug)]
pub struct DeviceZeroer<'a> {
    dest: &'a File,
    dest_name: &'a str,
    zeroing: Mutex<Zeroing>,
}

/// What zeroing a range cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Zeroed {
    /// Bytes zeroed without data writes (`fallocate`).
    pub zeroed_bytes: u64,
    /// Bytes of zeros written, where the device refused `fallocate`.
    pub written_bytes: u64,
}

impl<'a> DeviceZeroer<'a> {
    /// A zeroer of `dest` (named `dest_name` in errors).
    pub fn new(dest: &'a File, dest_name: &'a str) -> Self {
        Self {
            dest,
            dest_name,
            zeroing: Mutex::new(Zeroing::PunchHole),
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) -> Result<Zeroed> {
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
                    return Ok(Zeroed {
                        zeroed_bytes: len,
                        written_bytes: 0,
                    });
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
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = ZEROS.len().min((end - at) as usize);
            self.dest
                .write_all_at(&ZEROS[..n], at)
                .map_err(|e| io_err(self.dest_name, format!("writing zeros at {at:#x}"), e))?;
            at += n as u64;
        }
        Ok(Zeroed {
            zeroed_bytes: 0,
            written_bytes: len,
        })
    }
}

/// Writes data to a block device around the page cache where it can: through a second
/// descriptor of the device opened with `O_DIRECT`, every write whose buffer, offset and length
/// are multiples of the device's logical block size (a hydration's runs are: whole clusters, in
/// page-aligned buffers), and through the device's own descriptor the rest.
///
/// A restore writes the volume once and never reads it back. Through the page cache each byte
/// costs a copy, the node's cache fills with it at the expense of what its other pods cache, and
/// its writeback waits for the flush at the end; `qemu-img convert -t none` writes direct for the
/// same reasons. On the 2-core machine here, 128 MiB onto a loop device with `dd` and a final
/// `fdatasync` took 0.12 to 0.17 s direct (`bs=4M`) against 0.22 to 1.01 s through the cache
/// (`bs=1M`). A device that refuses `O_DIRECT` (when it is opened, or later with `EINVAL`) is
/// written through its own descriptor only. The flush that ends a restore covers both: it
/// flushes the device's cache.
#[derive(Debug)]
pub struct DeviceWriter<'a> {
    dest: &'a File,
    direct: Option<File>,
    /// The device's logical block size: what direct writes must be aligned to.
    block: usize,
    /// Set when a direct write failed with `EINVAL`: the rest go through `dest`.
    refused: AtomicBool,
    /// Bytes written direct.
    direct_bytes: AtomicU64,
}

impl<'a> DeviceWriter<'a> {
    /// A writer of the block device `dest`.
    pub fn new(dest: &'a File) -> Self {
        let block = rustix::fs::ioctl_blksszget(dest).map_or(4096, |n| n as usize);
        // A second open file description, so `dest`'s own flags stay as its owner set them.
        let direct = rustix::fs::open(
            format!("/proc/self/fd/{}", dest.as_raw_fd()),
            OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(File::from);
        Self {
            dest,
            direct,
            block: block.max(512),
            refused: AtomicBool::new(false),
            direct_bytes: AtomicU64::new(0),
        }
    }

    /// Whether aligned writes go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && !self.refused.load(Ordering::Relaxed)
    }

    /// Bytes written direct so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    /// Writes `bytes` at `offset`, direct when they are aligned, in calls of at most
    /// [`WRITE_CHUNK`](crate::WRITE_CHUNK) bytes.
    pub fn write_all_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned = (bytes.as_ptr() as usize | bytes.len() | offset as usize) % self.block == 0;
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned && self.is_direct()) {
            match crate::io::write_all_at(direct, bytes, offset) {
                // Rewriting what a direct write did put down is harmless: same bytes, same place.
                Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                    self.refused.store(true, Ordering::Relaxed);
                }
                done => {
                    if done.is_ok() {
                        self.direct_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    return done;
                }
            }
        }
        crate::io::write_all_at(self.dest, bytes, offset)
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

/// The spans of `buf` holding anything but zeros, in blocks of 4 KiB (as `qemu-img convert
/// -S 4k`): what a hydration writes to a regular file, the rest staying holes.
pub fn nonzero_spans(buf: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut from = None;
    for (block, bytes) in buf.chunks(SPARSE_BLOCK).enumerate() {
        let at = block * SPARSE_BLOCK;
        match (is_zero(bytes), from) {
            (false, None) => from = Some(at),
            (true, Some(first)) => {
                spans.push(first..at);
                from = None;
            }
            _ => {}
        }
    }
    if let Some(first) = from {
        spans.push(first..buf.len());
    }
    spans
}

/// The zeros written where a device refuses `fallocate`: one shared buffer, never a fresh one.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
