//! Converting a raw volume (a sparse file or a block device) into a QCOW2 image or overlay.
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` and never read; data ranges are read in large
//! chunks and checked for all-zero clusters by the [`Writer`]. With compression (`-c`) the
//! reader threads of a base image compress the clusters too, so the writer's thread only
//! appends. For an overlay every cluster is
//! compared with what the backing chain reads there, and only differing clusters are written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, mpsc};

use crate::error::Error;
use crate::volume::{DataRanges, VolumeRead};
use crate::writer::options::WriterOptions;
use crate::writer::{ClusterCompressor, WriteSummary, Writer, is_zero};
use crate::{FileSink, ImageSink, ReadAt};

/// Bytes read from the source at a time (rounded up to whole clusters).
const CHUNK: u64 = 4 << 20;

/// What the backing chain of an overlay reads, guest offset by guest offset.
pub trait BackingRead {
    /// Virtual size of the backing chain; past it, the overlay's backing reads as zeros.
    fn size(&self) -> u64;

    /// Fills `buf` with the guest bytes at `offset` (`offset + buf.len() <= size()`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Whether `offset..offset + len` may hold anything but zeros; `false` lets the converter
    /// skip reading it. The default always answers `true`.
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }
}

/// A raw image (file, buffer, object) used as a backing file.
#[derive(Debug, Clone)]
pub struct RawBacking<R>(pub R);

impl<R: ReadAt> BackingRead for RawBacking<R> {
    fn size(&self) -> u64 {
        self.0.len().unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// A resolved QCOW2 (or raw) chain as the backing of a new overlay: the usual case, where the
/// previous backup is opened with [`Image::open`](crate::Image::open).
impl BackingRead for crate::Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::Image::read_at(self, buf, offset).map_err(io::Error::other)
    }

    /// Asks the chain's map: only ranges with stored data anywhere in the chain are read.
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut data = false;
        self.for_each_extent(offset, len, |extent| {
            data |= !extent.kind.is_zero();
            Ok(())
        })
        .map_err(io::Error::other)?;
        Ok(data)
    }
}

/// Converts the raw file at `source` into a QCOW2 image at `destination` (created or
/// replaced), as `qemu-img convert -f raw -O qcow2` does; with `backing`, the result is an
/// overlay holding only what differs from it (name it in `options.backing_file`).
pub fn convert_raw_file(
    source: &Path,
    destination: &Path,
    options: &WriterOptions,
    backing: Option<&dyn BackingRead>,
) -> Result<WriteSummary, Error> {
    let source = File::open(source).map_err(Error::write_io("opening the source", 0))?;
    let sink =
        FileSink::create(destination).map_err(Error::write_io("creating the destination", 0))?;
    convert_raw(&source, sink, options, backing).map(|(_, summary)| summary)
}

/// Converts a raw file or block device into a QCOW2 image written to `sink`.
///
/// Without `backing`, clusters in holes and all-zero clusters are left unallocated. With
/// `backing` (the chain named by `options.backing_file`), a cluster equal to what the backing
/// reads is left unallocated, one that became all zeros is a zero cluster, any other is stored.
pub fn convert_raw<S: ImageSink>(
    source: &dyn VolumeRead,
    sink: S,
    options: &WriterOptions,
    backing: Option<&dyn BackingRead>,
) -> Result<(S, WriteSummary), Error> {
    if backing.is_some() != options.backing_file.is_some() {
        return Err(Error::InvalidOption {
            option: "backing_file".to_owned(),
            reason: "an overlay needs both the backing file name and its content",
        });
    }
    let size = source
        .size()
        .map_err(Error::write_io("reading the source size", 0))?;
    // A base image is compressed on the reader threads: the writer only names the method.
    let (writer_options, compression) = match (backing, options.compression) {
        (None, Some(method)) => {
            let mut writer_options = options.clone();
            writer_options.compression = None;
            writer_options.compression_type = method;
            (writer_options, Some((method, options.compression_level)))
        }
        _ => (options.clone(), None),
    };
    let mut writer = Writer::new(sink, &writer_options, size)?;
    let chunk = CHUNK.next_multiple_of(writer.cluster_size());
    // Ranges end at the source's length; the image's last sector may reach past it.
    let mut ranges = DataRanges::new(source, size);
    match backing {
        None => write_base(&mut writer, source, &mut ranges, chunk, compression)?,
        Some(backing) => write_overlay(&mut writer, source, &mut ranges, backing, chunk)?,
    }
    writer.finish()
}

/// Threads reading the source at once: parallel reads from the page cache or a device queue
/// go faster than one, and the writer's thread checks and appends meanwhile.
const READERS: usize = 3;
/// Chunk buffers in flight (being read, queued, or being written).
const BUFFERS: usize = READERS + 2;

/// A chunk to read: its order among chunks, guest offset and length.
type Task = (u64, u64, usize);
/// A chunk read, or why reading failed.
type Delivery = Result<(u64, Read), Error>;

/// A chunk read: its guest offset, its buffer and the chunk's bytes in it, and (compression
/// on) each cluster's compressed form in `packed`, `None` for a cluster that is zero or did
/// not shrink.
struct Read {
    offset: u64,
    buf: Vec<u8>,
    range: Range<usize>,
    packed: Vec<u8>,
    compressed: Vec<Option<Range<usize>>>,
}

impl Read {
    /// Hands the chunk to the writer: compressed clusters one at a time, the rest in runs.
    fn write_to<S: ImageSink>(&self, writer: &mut Writer<S>) -> Result<(), Error> {
        let bytes = &self.buf[self.range.clone()];
        if self.compressed.is_empty() {
            return writer.write_data(self.offset, bytes);
        }
        let cluster = writer.cluster_size() as usize;
        let mut raw_from = 0;
        for (i, packed) in self.compressed.iter().enumerate() {
            let Some(packed) = packed.clone().and_then(|range| self.packed.get(range)) else {
                continue;
            };
            if raw_from < i {
                let raw = &bytes[raw_from * cluster..i * cluster];
                writer.write_data(self.offset + (raw_from * cluster) as u64, raw)?;
            }
            writer.write_compressed(self.offset + (i * cluster) as u64, packed)?;
            raw_from = i + 1;
        }
        match bytes.get(raw_from * cluster..) {
            Some(raw) if !raw.is_empty() => {
                writer.write_data(self.offset + (raw_from * cluster) as u64, raw)
            }
            _ => Ok(()),
        }
    }
}

/// Compresses every non-zero cluster of `bytes` that shrinks into `packed`.
fn compress_chunk(
    compressor: &mut ClusterCompressor,
    bytes: &[u8],
    cluster: usize,
    packed: &mut Vec<u8>,
) -> Vec<Option<Range<usize>>> {
    packed.clear();
    bytes
        .chunks(cluster)
        .map(|data| {
            if is_zero(data) {
                return None;
            }
            let shrunk = compressor.compress(data)?;
            let start = packed.len();
            packed.extend_from_slice(shrunk);
            Some(start..packed.len())
        })
        .collect()
}

/// Reads the data ranges on helper threads while the writer checks and appends earlier chunks,
/// so reading the source overlaps writing the image. Chunks are reassembled in order.
fn write_base<S: ImageSink>(
    writer: &mut Writer<S>,
    source: &dyn VolumeRead,
    ranges: &mut DataRanges<'_, dyn VolumeRead + '_>,
    chunk: u64,
    compression: Option<(crate::CompressionType, Option<i32>)>,
) -> Result<(), Error> {
    let cluster = writer.cluster_size();
    let (task_tx, task_rx) = mpsc::sync_channel::<Task>(BUFFERS);
    let task_rx = Mutex::new(task_rx);
    let (done_tx, done_rx) = mpsc::channel::<Delivery>();
    let (pool_tx, pool_rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>();
    let pool_rx = Mutex::new(pool_rx);
    for _ in 0..BUFFERS {
        // The receiver is alive: it is ours.
        let _ = pool_tx.send((Vec::with_capacity(chunk as usize + PAGE), Vec::new()));
    }
    std::thread::scope(|scope| {
        let planner_done = done_tx.clone();
        scope.spawn(move || {
            if let Err(err) = plan_chunks(ranges, cluster, chunk, &task_tx) {
                let _ = planner_done.send(Err(err));
            }
        });
        for _ in 0..READERS {
            let (task_rx, pool_rx, done_tx) = (&task_rx, &pool_rx, done_tx.clone());
            scope.spawn(move || {
                let compressor = compression
                    .map(|(method, level)| ClusterCompressor::new(method, level, cluster))
                    .transpose();
                let mut compressor = match compressor {
                    Ok(compressor) => compressor,
                    Err(err) => {
                        let _ = done_tx.send(Err(err));
                        return;
                    }
                };
                // A buffer first, then the next task: the lowest unfinished chunk always holds
                // a buffer, so reassembly can always make progress.
                while let Some((mut buf, mut packed)) = lock_recv(pool_rx) {
                    let Some((seq, offset, len)) = lock_recv(task_rx) else {
                        return;
                    };
                    let range = page_aligned(&mut buf, len);
                    let message = read_source(source, &mut buf[range.clone()], offset).map(|()| {
                        let compressed = match compressor.as_mut() {
                            Some(compressor) => compress_chunk(
                                compressor,
                                &buf[range.clone()],
                                cluster as usize,
                                &mut packed,
                            ),
                            None => Vec::new(),
                        };
                        let read = Read {
                            offset,
                            buf,
                            range,
                            packed,
                            compressed,
                        };
                        (seq, read)
                    });
                    if done_tx.send(message).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        // Returning (on an error too) drops the pool's sender and the deliveries' receiver,
        // which stops the helper threads at their next wait.
        let (pool_tx, done_rx) = (pool_tx, done_rx);
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        for message in done_rx.iter() {
            let (seq, read) = message?;
            waiting.insert(seq, read);
            while let Some(read) = waiting.remove(&next) {
                read.write_to(writer)?;
                let _ = pool_tx.send((read.buf, read.packed));
                next += 1;
            }
        }
        Ok(())
    })
}

/// Page size the read buffers are aligned to.
const PAGE: usize = 4096;

/// The range of `buf` (grown as needed) holding `len` bytes from a page boundary: the kernel
/// copies out of the page cache markedly faster into page-aligned memory.
fn page_aligned(buf: &mut Vec<u8>, len: usize) -> Range<usize> {
    buf.resize(len + PAGE, 0);
    let start = buf.as_ptr().align_offset(PAGE).min(PAGE);
    start..start + len
}

fn lock_recv<T>(receiver: &Mutex<mpsc::Receiver<T>>) -> Option<T> {
    receiver.lock().ok()?.recv().ok()
}

/// Splits whole clusters around every data range into chunks of at most `chunk` bytes.
fn plan_chunks(
    ranges: &mut DataRanges<'_, dyn VolumeRead + '_>,
    cluster: u64,
    chunk: u64,
    tasks: &mpsc::SyncSender<Task>,
) -> Result<(), Error> {
    let size = ranges.size();
    let mut done = 0;
    let mut seq = 0;
    while let Some((start, end)) = next_range(ranges, done)? {
        // Whole clusters around the data, never going back over what was planned.
        let start = (start - start % cluster).max(done);
        let end = end.next_multiple_of(cluster).min(size);
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(chunk);
            if tasks.send((seq, offset, len as usize)).is_err() {
                return Ok(());
            }
            seq += 1;
            offset += len;
        }
        done = done.max(end);
    }
    Ok(())
}

fn write_overlay<S: ImageSink>(
    writer: &mut Writer<S>,
    source: &dyn VolumeRead,
    ranges: &mut DataRanges<'_, dyn VolumeRead + '_>,
    backing: &dyn BackingRead,
    chunk: u64,
) -> Result<(), Error> {
    let cluster = writer.cluster_size() as usize;
    let size = writer.virtual_size();
    let backing_size = backing.size();
    let (mut new, mut old) = (Vec::new(), Vec::new());
    let new_range = page_aligned(&mut new, chunk as usize);
    let old_range = page_aligned(&mut old, chunk as usize);
    let mut pending = next_range(ranges, 0)?;
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(chunk);
        let end = offset + len;
        let new = &mut new[new_range.start..new_range.start + len as usize];
        let old = &mut old[old_range.start..old_range.start + len as usize];

        // The source: data ranges read, holes zero.
        new.fill(0);
        let mut source_data = false;
        while let Some((start, stop)) = pending {
            if start >= end {
                break;
            }
            let lo = start.max(offset);
            let hi = stop.min(end);
            if lo < hi {
                read_source(
                    source,
                    &mut new[(lo - offset) as usize..(hi - offset) as usize],
                    lo,
                )?;
                source_data = true;
            }
            if stop > end {
                break;
            }
            pending = next_range(ranges, end)?;
        }

        // The backing: zero past its end or where it says it holds nothing.
        old.fill(0);
        let backing_end = end.min(backing_size);
        let mut backing_data = false;
        if offset < backing_end {
            let span = backing_end - offset;
            let may = backing
                .may_hold_data(offset, span)
                .map_err(Error::write_io("mapping the backing chain", offset))?;
            if may {
                backing
                    .read_at(&mut old[..span as usize], offset)
                    .map_err(Error::write_io("reading the backing chain", offset))?;
                backing_data = true;
            }
        }

        if source_data || backing_data {
            for (i, (now, before)) in new.chunks(cluster).zip(old.chunks(cluster)).enumerate() {
                if now == before {
                    continue;
                }
                let at = offset + (i * cluster) as u64;
                if is_zero(now) {
                    writer.write_zeros(at, now.len() as u64)?;
                } else {
                    writer.write_data_over_backing(at, now)?;
                }
            }
        }
        offset = end;
    }
    Ok(())
}

fn read_source(source: &dyn VolumeRead, buf: &mut [u8], offset: u64) -> Result<(), Error> {
    source
        .read_exact_at(buf, offset)
        .map_err(Error::write_io("reading the source", offset))
}

fn next_range(
    ranges: &mut DataRanges<'_, dyn VolumeRead + '_>,
    at: u64,
) -> Result<Option<(u64, u64)>, Error> {
    ranges
        .next_range()
        .map_err(Error::write_io("looking for data in the source", at))
}
