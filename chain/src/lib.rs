//! Backup chains of QCOW2 images: changed-block deltas, hydration, merge and verify.
//!
//! A volume's backups form a chain: a full base image, then overlays holding only the clusters
//! that changed, each naming the previous backup as its backing file. This crate does the
//! datamover's work on such chains, independent of where they are stored: it writes into any
//! [`ImageSink`](strata_qcow2::ImageSink) and reads through any
//! [`Storage`](strata_qcow2::Storage).
//!
//! # Example
//!
//! ```no_run
//! use strata_chain::{ChangeSource, DigestAlgorithm, backup};
//! use strata_qcow2::{FileSink, WriterOptions};
//!
//! let volume = std::fs::File::open("/dev/vdb")?;
//! let sink = FileSink::create("backups/0001.qcow2")?;
//! let options = WriterOptions::default();
//! let digests = DigestAlgorithm::Blake3;
//! let (_, outcome) = backup(&volume, sink, &options, ChangeSource::Full, digests, &mut |p| {
//!     eprintln!("{}/{} bytes scanned", p.scanned_bytes, p.total_bytes);
//! })?;
//! std::io::copy(
//!     &mut outcome.digests.reader(),
//!     &mut std::fs::File::create("backups/0001.digests")?,
//! )?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Change sources
//!
//! - [`ChangeSource::Full`]: every allocated, non-zero cluster (holes found with
//!   `SEEK_DATA`/`SEEK_HOLE` cost nothing, zero clusters are detected).
//! - [`ChangeSource::ChangedRanges`]: ranges from changed-block tracking (the CSI
//!   SnapshotMetadata API's `GetMetadataDelta`); only those clusters are read.
//! - [`ChangeSource::Digests`]: per-cluster 128-bit digests saved with the previous backup
//!   ([`DigestManifest`]; BLAKE3 by default, XXH3-128 for speed, see [`DigestAlgorithm`]); the
//!   volume is read and only differing clusters written.
//! - [`ChangeSource::Compare`]: comparison with the previous point's content.
//!
//! In an overlay, a cluster that held data and is now zero becomes a zero cluster.
//!
//! # Memory
//!
//! A backup holds six 4 MiB chunk buffers (read ahead on three reader threads, which also hash
//! and, with compression on, compress the clusters; each buffer keeps up to 4 MiB more for the
//! compressed clusters), the writer's compressed tail (at most 4 MiB), one more per reader when comparing with the previous point, the writer's
//! metadata (about 16 bytes per stored cluster), the new digest manifest (24 bytes per
//! non-zero cluster) and the previous one, and the checksum list (12 bytes per stored
//! cluster): for a 1 TiB volume full of data at 64 KiB clusters, about 1 GiB; for a typical
//! incremental, a few tens of MiB. Hydration holds one 4 MiB buffer per worker (four) and the
//! reader's bounded L2 cache.
//!
//! # Design choices
//!
//! The change sources are one enum, [`ChangeSource`], rather than a trait: deciding whether a
//! cluster changed needs what the scan computes anyway (its digest, whether it is zero, the
//! previous point's bytes), so the scan owns the decision, and any outside change tracker
//! comes in through [`ChangeSource::ChangedRanges`]. Volumes come in through
//! [`VolumeRead`](strata_qcow2::VolumeRead) (files, block devices, NBD exports).

mod backup;
mod checked;
mod checksum;
mod codec;
mod digest;
mod error;
mod merge;
mod progress;
mod ranges;
mod read_ahead;
mod table;
mod verify;

pub use backup::{BackupOutcome, ChangeSource, backup};
pub use checked::ChainChecksums;
pub use checksum::ClusterChecksums;
pub use digest::{Digest, DigestAlgorithm, DigestManifest};
pub use error::{Error, Result};
pub use merge::{merge, top_is_empty};
pub use progress::Progress;
pub use ranges::{ByteRange, parse_changed_ranges};
pub use verify::{Damage, stored_checksums, verify};
