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
//!     &mut outcome.digests.into_reader(),
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
//! Memory is bounded by a budget, not by the volume: **a backup (full or incremental), a
//! verify, a restore and a fold each peak under 64 MiB of resident memory with the default
//! buffers, for any volume size** (measured with `benches/rss.sh`, release build: at 64 KiB
//! clusters and 1 vs 16 GiB written, 40 vs 45 MiB for a full backup, 38 vs 38 for an
//! incremental, 15 vs 16 for a verify, 31 vs 31.5 for a restore; at 4 KiB clusters and 1 vs
//! 4 GiB, that is 262,144 vs 1,048,576 clusters, 47 vs 47, 38 vs 38, 15 vs 15, 31 vs 31;
//! `tests/cli_memory.rs`
//! holds CI to the budget at 2^20 clusters). A restore adds at most 1 MiB of cached L2 tables
//! per image of its chain. The budget is for a folder target: on object storage the target's
//! upload parts and read caches come on top (`strata_target::TargetOptions`).
//!
//! What the budget holds: six 4 MiB chunk buffers (read ahead on three reader threads, which
//! also hash and, with compression on, compress the clusters; each buffer keeps up to 4 MiB
//! more for the compressed clusters), the writer's compressed tail (at most 4 MiB), one more
//! buffer per reader when comparing with the previous point, and one upload part (5 MiB on
//! S3). Hydration holds one 4 MiB buffer per worker (four).
//!
//! What it does not hold: nothing per cluster stays in memory. The digest manifests (24 bytes
//! per non-zero cluster, the previous one and the new) and checksum lists (12 bytes per
//! stored cluster) keep at most 64 KiB of entries before spilling the rest to an unnamed
//! temporary file in `TMPDIR`, and are read back as a cursor in ascending cluster order or
//! through four cached 16 KiB pages; the QCOW2 writer keeps its newest 2,048 mapping and
//! refcount runs and spills the rest likewise. So a backup needs temporary disk space instead:
//! 24 bytes per non-zero cluster for each of the new and the previous digest manifest, plus
//! 44 per stored cluster (its checksum and, compressed, its writer run): about 1.1 GiB for a
//! full 1 TiB volume at 64 KiB clusters. A verified restore needs 12 bytes per stored cluster
//! of each image of its chain.

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
pub use verify::{Damage, MAX_DAMAGE, stored_checksums, verify};
