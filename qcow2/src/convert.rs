//! Converting a raw volume (a sparse file or a block device) into a QCOW2 image or overlay.
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` and never read; data ranges are read in large
//! chunks on the reader threads of a [`Pipeline`] and checked for all-zero clusters by the
//! [`Writer`]. For an overlay the reader threads also compare every cluster with what the
//! backing chain reads there, and only differing clusters are written. With compression
//! (`-c`) the reader threads compress the clusters to be stored too, so the writer's thread
//! only appends, in order.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use crate::error::Error;
use crate::offset::GuestRange;
use crate::pipeline::{Buffer, Pipeline};
use crate::volume::{DataRanges, VolumeChunks, VolumeRead, read_chunk};
use crate::writer::options::WriterOptions;
use crate::writer::{ClusterCompressor, WriteSummary, Writer, is_zero};
use crate::{CompressionType, FileSink, ImageSink, ReadAt};

/// Bytes read from the source at a time (rounded up to whole clusters).
const CHUNK: u64 = 4 << 20;

/// What the backing chain of an overlay reads, guest offset by guest offset.
///
/// It is `Sync`: the reader threads of a conversion read it at once.
pub trait BackingRead: Sync {
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
    // Clusters are compressed on the reader threads: the writer only names the method.
    let (writer_options, compression) = options.compress_on_readers();
    let mut writer = Writer::new(sink, &writer_options, size)?;
    let chunk = CHUNK.next_multiple_of(writer.cluster_size());
    // Data ranges end at the source's length; the image's last sector may reach past it.
    match backing {
        None => write_base(&mut writer, source, size, chunk, compression)?,
        Some(backing) => write_overlay(&mut writer, source, size, backing, chunk, compression)?,
    }
    writer.finish()
}

/// Threads reading (and compressing) the source at once: parallel reads from the page cache
/// or a device queue go faster than one, and the writer's thread only checks and appends.
const READERS: usize = 3;

/// A chunk read and classified by a reader thread.
struct Converted {
    /// The chunk.
    range: GuestRange,
    /// Whether anything was read (an overlay's chunk where neither the source nor the backing
    /// holds data is left alone).
    read: bool,
    /// Overlay only: per cluster, whether it differs from the backing.
    differs: Vec<bool>,
    /// Compression on: per cluster to be stored, where its compressed form lies in the
    /// buffer's side vector (`None` for a zero cluster or one that did not shrink).
    compressed: Vec<Option<Range<usize>>>,
}

/// What each reader thread keeps: its compressor and, for an overlay, a buffer for what the
/// backing chain reads in the chunk.
struct Reader {
    compressor: Option<ClusterCompressor>,
    backing: Buffer,
}

/// Reads the data ranges on reader threads (compressing the clusters with compression on)
/// while the writer's thread appends earlier chunks in order: a base image's chunks are the
/// source's data ranges, whole clusters around them.
fn write_base<S: ImageSink>(
    writer: &mut Writer<S>,
    source: &dyn VolumeRead,
    size: u64,
    chunk: u64,
    compression: Option<(CompressionType, Option<i32>)>,
) -> Result<(), Error> {
    let cluster = writer.cluster_size();
    Pipeline::new(READERS, chunk as usize).run(
        |tasks| {
            let mut ranges = DataRanges::new(source, size);
            let mut done = 0;
            while let Some((start, end)) = next_range(&mut ranges, done)? {
                // Whole clusters around the data, never going back over what was planned.
                let range = GuestRange::new(start, end).to_clusters(cluster, size);
                let range = GuestRange::new(range.start.get().max(done), range.end.get());
                for piece in range.pieces(chunk) {
                    if !tasks.submit(piece) {
                        return Ok(());
                    }
                }
                done = done.max(range.end.get());
            }
            Ok(())
        },
        || reader(compression, cluster, None),
        |reader, range: GuestRange, buf| {
            buf.resize(range.len() as usize);
            let (bytes, packed) = buf.split_mut();
            read_source(source, bytes, range.start.get())?;
            let compressed = match reader.compressor.as_mut() {
                Some(compressor) => compress_clusters(compressor, bytes, cluster, packed, |_| true),
                None => Vec::new(),
            };
            Ok(Converted {
                range,
                read: true,
                differs: Vec::new(),
                compressed,
            })
        },
        |converted, buf| {
            let range = converted.range;
            writer.write_clusters(
                range.start.get(),
                buf.bytes(),
                buf.packed(),
                &converted.compressed,
                false,
            )
        },
    )
}

/// Reads every chunk of the source and of the backing chain on reader threads, which compare
/// them cluster by cluster (and compress what differs, with compression on); the writer's
/// thread stores the differing clusters in order: zeros as zero clusters, data over the
/// backing.
fn write_overlay<S: ImageSink>(
    writer: &mut Writer<S>,
    source: &dyn VolumeRead,
    size: u64,
    backing: &dyn BackingRead,
    chunk: u64,
    compression: Option<(CompressionType, Option<i32>)>,
) -> Result<(), Error> {
    let cluster = writer.cluster_size();
    let image_size = writer.virtual_size();
    Pipeline::new(READERS, chunk as usize).run(
        |tasks| {
            let mut chunks = VolumeChunks::new(source, image_size, chunk);
            while let Some((range, data)) = chunks
                .next_chunk()
                .map_err(Error::write_io("looking for data in the source", 0))?
            {
                // Past the source's end it reads as zeros.
                let data: Vec<GuestRange> = data
                    .iter()
                    .filter_map(|piece| piece.intersect(&GuestRange::new(0, size)))
                    .collect();
                if !tasks.submit((range, data)) {
                    return Ok(());
                }
            }
            Ok(())
        },
        || reader(compression, cluster, Some(chunk)),
        |reader, (range, data): (GuestRange, Vec<GuestRange>), buf| {
            buf.resize(range.len() as usize);
            let (new, packed) = buf.split_mut();
            let source_data = !data.is_empty();
            read_chunk(source, range, &data, new)
                .map_err(Error::write_io("reading the source", range.start.get()))?;
            let old = reader.backing.resize(range.len() as usize);
            let backing_data = read_backing(backing, range, old)?;
            if !source_data && !backing_data {
                return Ok(Converted {
                    range,
                    read: false,
                    differs: Vec::new(),
                    compressed: Vec::new(),
                });
            }
            let cl = cluster as usize;
            let differs: Vec<bool> = new
                .chunks(cl)
                .zip(old.chunks(cl))
                .map(|(a, b)| a != b)
                .collect();
            let compressed = match reader.compressor.as_mut() {
                Some(compressor) => compress_clusters(compressor, new, cluster, packed, |i| {
                    differs.get(i) == Some(&true)
                }),
                None => Vec::new(),
            };
            Ok(Converted {
                range,
                read: true,
                differs,
                compressed,
            })
        },
        |converted, buf| {
            if !converted.read {
                return Ok(());
            }
            let (bytes, cl) = (buf.bytes(), cluster as usize);
            let mut i = 0;
            while i < converted.differs.len() {
                if !converted.differs[i] {
                    i += 1;
                    continue;
                }
                let first = i;
                while converted.differs.get(i) == Some(&true) {
                    i += 1;
                }
                let data = bytes
                    .get(first * cl..(i * cl).min(bytes.len()))
                    .unwrap_or_default();
                let compressed = converted.compressed.get(first..i).unwrap_or_default();
                let at = converted.range.start.get() + (first * cl) as u64;
                writer.write_clusters(at, data, buf.packed(), compressed, true)?;
            }
            Ok(())
        },
    )
}

/// A reader thread's state.
fn reader(
    compression: Option<(CompressionType, Option<i32>)>,
    cluster: u64,
    backing_chunk: Option<u64>,
) -> Result<Reader, Error> {
    Ok(Reader {
        compressor: compression
            .map(|(method, level)| ClusterCompressor::new(method, level, cluster))
            .transpose()?,
        backing: Buffer::new(backing_chunk.unwrap_or(0) as usize),
    })
}

/// Fills `old` with what the backing chain reads in `range` (zeros past its end); `false`,
/// with `old` untouched, where the backing holds nothing there.
fn read_backing(
    backing: &dyn BackingRead,
    range: GuestRange,
    old: &mut [u8],
) -> Result<bool, Error> {
    let offset = range.start.get();
    let end = range.end.get().min(backing.size());
    if offset >= end
        || !backing
            .may_hold_data(offset, end - offset)
            .map_err(Error::write_io("mapping the backing chain", offset))?
    {
        old.fill(0);
        return Ok(false);
    }
    let span = (end - offset) as usize;
    let (head, tail) = old.split_at_mut(span.min(old.len()));
    backing
        .read_at(head, offset)
        .map_err(Error::write_io("reading the backing chain", offset))?;
    tail.fill(0);
    Ok(true)
}

/// Compresses every non-zero cluster `i` of `bytes` (`cluster` bytes each, the last one
/// shorter) with `wanted(i)` that shrinks into `packed`, as reader threads do before handing
/// a chunk to [`Writer::write_clusters`]; returns where each one's compressed form lies.
pub fn compress_clusters(
    compressor: &mut ClusterCompressor,
    bytes: &[u8],
    cluster: u64,
    packed: &mut Vec<u8>,
    wanted: impl Fn(usize) -> bool,
) -> Vec<Option<Range<usize>>> {
    packed.clear();
    bytes
        .chunks(cluster as usize)
        .enumerate()
        .map(|(i, data)| {
            if !wanted(i) || is_zero(data) {
                return None;
            }
            let shrunk = compressor.compress(data)?;
            let start = packed.len();
            packed.extend_from_slice(shrunk);
            Some(start..packed.len())
        })
        .collect()
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
