//! A pure-Rust QCOW2 reader and writer with backing chains, safe with hostile images.
//!
//! Strata stores every backup of a volume as a QCOW2 image: the first a full base image, each
//! later one an overlay whose backing file is the previous backup. This crate reads every image
//! `qemu-img` makes exactly as `qemu-img` reads it, and refuses hostile ones with a typed error.
//!
//! # Example
//!
//! ```no_run
//! use strata_qcow2::{Image, ExtentKind};
//!
//! let image = Image::open("backups/vol/0003.qcow2")?;
//! println!("{} bytes, {} images in the chain", image.virtual_size(), image.depth());
//! for extent in image.map(0, image.virtual_size())? {
//!     if let ExtentKind::Data { depth, .. } = extent.kind {
//!         println!("{:#x}+{:#x} stored in layer {depth}", extent.start, extent.length);
//!     }
//! }
//! let mut sector = [0u8; 512];
//! image.read_at(&mut sector, 0)?;
//! # Ok::<(), strata_qcow2::Error>(())
//! ```
//!
//! Writing a backup: a base image from a raw volume, then an overlay holding only what changed
//! since, compared against the previous image's chain:
//!
//! ```no_run
//! use strata_qcow2::{Image, WriterOptions, convert_raw_file};
//!
//! let mut options = WriterOptions::default();          // v3, 64 KiB clusters
//! options.parse_qemu_options("cluster_size=64k")?;     // qemu-img's -o syntax
//! convert_raw_file("vol.raw".as_ref(), "backups/0000.qcow2".as_ref(), &options, None)?;
//!
//! let previous = Image::open("backups/0000.qcow2")?;
//! options.backing_file = Some("0000.qcow2".into());   // stored as given, relative
//! let summary = convert_raw_file("vol.raw".as_ref(), "backups/0001.qcow2".as_ref(), &options, Some(&previous))?;
//! println!("{} changed clusters, {} now zero", summary.data_clusters, summary.zero_clusters);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What is read (QEMU's `docs/interop/qcow2.rst`)
//!
//! - Headers of versions 2 and 3 with every field validated ("Header", "Additional fields");
//!   header extensions: backing format, feature name table, external data file, bitmaps; unknown
//!   extensions are skipped and unknown incompatible feature bits refused by name.
//! - Cluster sizes from 512 B to 2 MiB; standard, zero and unallocated clusters ("Cluster
//!   mapping"); extended L2 entries with subcluster bitmaps ("Extended L2 Entries");
//!   compressed clusters in deflate and zstd ("Compressed Clusters Descriptor").
//! - Backing chains of QCOW2 and raw images, names resolved relative to the naming image and
//!   checked by a [`BackingPolicy`]; external data files under the same policy.
//! - Internal snapshots and bitmaps are present but ignored: the active layer is read. Dirty
//!   images read normally; the corrupt bit is reported in [`Qcow2Info`]. Encrypted images are
//!   refused.
//!
//! # What is written
//!
//! [`Writer`] produces version 3 images (version 2 with [`Compat::V2`]), cluster sizes from
//! 512 B to 2 MiB, 16-bit refcounts that `qemu-img check` finds exact, optional deflate or zstd
//! compressed clusters, and overlays naming their backing file with the backing-format
//! extension. It works in one pass: guest clusters come in ascending order and are appended as
//! they come (compressed ones byte-adjacent in segments of their own, so raw clusters between
//! them cost no padding; [`ClusterCompressor`] and [`Writer::write_compressed`] let callers
//! compress on their own threads); all-zero clusters are not stored (an overlay marks them as zero clusters where its
//! backing has data, or stores zeros in version 2). The L2 tables, the L1 table and the
//! refcount structures follow the data, and the header area goes to the [`ImageSink`] last, so
//! an interrupted write never looks like an image. Memory holds runs of written clusters only:
//! a 1 TiB sparse volume costs what its data costs. [`FileSink`] writes a local file or device;
//! any sink may ask for a larger header area ([`ImageSink::min_header_len`]), as a multipart
//! upload that sends its first part last does. [`convert_raw`] feeds the writer from a raw file
//! or block device, skipping holes with `SEEK_DATA`/`SEEK_HOLE`.
//!
//! # Safety with hostile images
//!
//! Every size and offset is checked before memory is allocated or bytes are read: the L1
//! table is capped at 32 MiB and must lie inside the file, the refcount table at 8 MiB, chains
//! at [`DEFAULT_MAX_DEPTH`] with loop detection, and an entry pointing past the end of the file
//! is an error rather than zeros. Memory is bounded per chain, whatever its depth and table
//! sizes: an image loads only the L1 entries its virtual size needs, and a chain's L1 tables
//! may total 64 MiB (a 1 TiB volume needs 16 KiB an image at 64 KiB clusters); its images'
//! L2 caches share 64 MiB (each at most 1 MiB, at least two tables while the chain has room),
//! plus the tables a reader is looking up (one cluster each, a few per reading thread). No
//! input makes the reader panic (a fuzz target in `fuzz/` keeps it so).
//!
//! # Design
//!
//! Bytes come through [`ReadAt`] (positional reads through `&self`) and names through
//! [`Storage`], so the same reader serves a local folder or an object store. Extents of the
//! resolved chain come out merged and in order ([`Image::for_each_extent`]), which is what a
//! hydration loop wants: one walk, large reads, holes skipped.
//!
//! A chain opened with [`OpenOptions::cluster_check`] hands every stored cluster it reads,
//! whole and decompressed, to the caller's [`ClusterCheck`] (and the ranges it reads as zeros)
//! before returning any of its bytes, so every reader of the [`Image`] (hydration, an NBD
//! export, a merge) is verified by the same code. Partial reads read the whole cluster.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod backing;
mod check;
mod compressed;
mod convert;
mod error;
mod header;
mod hydrate;
mod image;
mod io;
mod l2;
mod layer;
mod map;
mod offset;
pub mod pipeline;
mod sink;
mod volume;
mod writer;

pub use backing::BackingPolicy;
pub use check::{CheckFailure, ClusterCheck};
pub use error::{Error, Escaped, Result};
pub use header::CompressionType;
pub use hydrate::{
    DeviceWriter, DeviceZeroer, HydrateOptions, HydrateStats, Zeroed, hydrate, hydrate_with,
    hydrate_with_progress, nonzero_spans,
};
pub use image::{DEFAULT_MAX_DEPTH, Format, Image, LayerInfo, OpenOptions, Qcow2Info, SourceRead};
pub use io::{
    ChunkedWriter, FLUSH_EVERY, ImageSink, LocalStorage, ReadAt, Storage, WRITE_CHUNK, WriteBehind,
    outside_folder, write_all_at, write_behind,
};
pub use map::{Extent, ExtentKind};
pub use offset::{GuestOffset, GuestRange, HostOffset};

pub use convert::{BackingRead, RawBacking, compress_clusters, convert_raw, convert_raw_file};
pub use sink::{FileSink, MemorySink};
pub use volume::{DataRanges, DenseVolume, VolumeChunks, VolumeRead, read_chunk};
pub use writer::options::{
    Compat, DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE, WriterOptions,
};
pub use writer::{ClusterCompressor, WriteSummary, Writer, is_zero};
