//! Backup targets for Strata: a versioned repository of QCOW2 chains on object storage or in a
//! folder, with atomic commits, streaming uploads and reads, and safe concurrent writers.
//!
//! A [`Target`] is opened by URL: a folder path or `file://` URL (the default, also an NFS
//! mount), `s3://bucket/prefix` (configured from the `AWS_*` environment variables such as
//! `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`, plus [`TargetOptions::store_config`]),
//! `memory://` for tests, and `gs://` / `az://` with the `gcs` / `azure` features.
//!
//! # Example
//!
//! ```no_run
//! use strata_qcow2::ImageSink;
//! use strata_target::{BackupSpec, Target, VolumeName};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let target = Target::open("s3://backups/prod")?;
//! let volume = VolumeName::new("pvc-data")?;
//! let parent = target.latest(&volume)?;
//! let mut upload = target.begin_backup(&volume, BackupSpec {
//!     id: None,
//!     parent: parent.map(|m| m.id),
//!     virtual_size: 10 << 30,
//!     cluster_size: 64 << 10,
//! })?;
//! // The overlay's header names its backing file `upload.backing_name()`.
//! let mut sink = upload.image_sink()?;
//! let header = vec![0u8; sink.min_header_len() as usize];
//! sink.append(b"...clusters, in file order...")?;
//! sink.finish(&header)?;
//! let manifest = upload.commit()?;
//!
//! // Reading back: the QCOW2 reader opens the chain by name through `target.storage(..)`.
//! let image = target.open_image(&volume, &manifest.id)?;
//! # let _ = image;
//! # Ok(())
//! # }
//! ```
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use strata_qcow2::{ImageSink, ReadAt};
//! use strata_target::{BackupSpec, Target, VolumeName};
//!
//! let target = Target::open("memory://")?;
//! let volume = VolumeName::new("data")?;
//! let spec = BackupSpec { id: None, parent: None, virtual_size: 1 << 20, cluster_size: 65536 };
//! let mut upload = target.begin_backup(&volume, spec)?;
//! let mut sink = upload.image_sink()?;
//! let header = vec![7u8; sink.min_header_len() as usize];
//! sink.append(&[1, 2, 3])?;
//! sink.finish(&header)?;
//! drop(sink);
//! let committed = upload.commit()?;
//! assert_eq!(target.backups(&volume)?, vec![committed.clone()]);
//!
//! let image = target.open_image(&volume, &committed.id)?;
//! let mut tail = [0u8; 3];
//! image.read_exact_at(&mut tail, header.len() as u64)?;
//! assert_eq!(tail, [1, 2, 3]);
//! # Ok(())
//! # }
//! ```
//!
//! # Repository layout (format version 1)
//!
//! ```text
//! <prefix>/strata-repository.json               {"format": "strata-target", "version": 1}
//! <prefix>/volumes/<volume>/images/<id>.qcow2    the volume's images; an overlay's backing
//!                                                name is "<parent id>.qcow2" (relative)
//! <prefix>/volumes/<volume>/backups/<id>.json    manifest (the commit point)
//! <prefix>/volumes/<volume>/claims/<id>.json     reservation of a backup id
//! <prefix>/volumes/<volume>/children/<id>.json   reservation of the one child extending <id>
//! <prefix>/volumes/<volume>/files/<id>/<name>    side files (digest manifests, ...)
//! <prefix>/volumes/<volume>/images/<id>.<token>.qcow2  the merged image a fold wrote for <id>
//! <prefix>/volumes/<volume>/files/<id>/<token>/<name>  side files a fold wrote for <id>
//! <prefix>/volumes/<volume>/folds/<parent>.json  intent of a fold of <parent> (create-only)
//! <prefix>/volumes/<volume>/retired/<token>.json objects a committed fold superseded
//! <prefix>/applications/<app>/<id>.json          application backup manifest (commit point)
//! <prefix>/applications/<app>/<id>.archive       its metadata archive
//! ```
//!
//! A manifest ([`BackupManifest`]) holds the id, parent id, creation time, virtual size,
//! cluster size, the image object's name, size, header length and CRC-32, and each side file's
//! name, size, CRC-32 and, when it is not `<name>`, its object under `files/<id>/`. Readers
//! resolve objects through the manifest: after a fold the child's manifest names the merged
//! image, and [`VolumeStorage`] resolves a backing name `<id>.qcow2` to the image the
//! manifest of `<id>` names. Every name is checked ([`VolumeName`], [`BackupId`], ...: ASCII
//! letters, digits, `.`, `_`, `-`), so no key leaves its folder. The marker's version is
//! checked on open; a newer layout is refused with [`Error::UnsupportedFormat`]. On a
//! filesystem target the images of a volume sit in one folder
//! ([`Target::local_image_dir`]), so `qemu-img info --backing-chain` and `qemu-img convert`
//! work on it directly.
//!
//! # Guarantees
//!
//! - **Atomic commit.** The image and side files are written first, the manifest last with
//!   `PutMode::Create`. Readers list manifests only, so a backup is visible complete or not at
//!   all. Images appear under their final name only once whole (multipart completion, or a
//!   synced staging file hard-linked into place).
//! - **One writer per id, one child per parent.** Before any upload, the writer creates
//!   `claims/<id>.json` and, for an overlay, `children/<parent>.json`, both create-only. The
//!   loser gets [`Error::BackupExists`] or [`Error::ParentNotHead`] (naming the child that won)
//!   before sending a byte, so chains never fork silently. Create-only puts are the one
//!   conditional operation every object_store backend offers, the local filesystem included
//!   (which has no compare-and-swap for a mutable HEAD object). A retried create recognises
//!   its own earlier attempt by content (each writer puts a random token in its reservations).
//! - **Clean failure.** An upload dropped before commit aborts its multipart upload (or
//!   removes its staging file), deletes what it stored and releases its reservations. After a
//!   crash, [`Target::gc`] removes the leftovers once older than a grace period; a writer must
//!   commit within that period. Incomplete multipart uploads of a crashed process cannot be
//!   listed through object_store: give buckets a lifecycle rule that aborts them.
//! - **Safe deletion.** [`Target::delete_backup`] takes the backup's child slot first, so it
//!   refuses a backup that has (or is getting) a child and no overlay can start on a backup
//!   being deleted; the manifest goes before the data.
//! - **Retention never rewrites in place.** [`Target::fold_into_child`] creates the intent
//!   `folds/<parent>.json` first (create-only, so a second fold of the same parent gets
//!   [`Error::FoldInProgress`]), stores the merged image and its side files under new names,
//!   and commits by switching the child's manifest to them: a conditional put
//!   (`PutMode::Update` with the e-tag read when the fold began) where the store has one, a
//!   whole-object put under the exclusive intent elsewhere (the local filesystem). On a folder
//!   it then re-points `<child>.qcow2` to the merged image by a rename over it, so qemu-img
//!   follows the overlays' backing names to the current image at every step. A reader that
//!   opened a chain before the fold reads the same bytes while it runs and after it commits:
//!   superseded objects are only listed in `retired/<token>.json`, and [`Target::gc`] removes
//!   them once that record is older than the grace period (so a reader must finish within
//!   it). A crash at any step leaves every point restorable; [`Target::recover_folds`] rolls
//!   the fold forward when the child's manifest names the new image and back otherwise.
//!   `target/tests/fold.rs` breaks this on purpose (a fold killed at each request in turn,
//!   readers held across folds on every backend, a child manifest changed under a fold), as
//!   does `tests/cli_prune.rs` with SIGKILL of a real `strata prune`.
//! - **Application backups expire by manifest.** [`Target::delete_app_backup`] deletes the
//!   manifest (the commit point) before the archive, and deleting an absent one succeeds, so
//!   an interrupted expiry is finished by running it again. It never touches volume backups:
//!   the facade's `expire_app_backups` removes only those no remaining application backup
//!   names, after the manifests are gone, so a crash never leaves a listed application backup
//!   naming a removed volume backup.
//! - **Retries.** Transient errors (object_store's `Generic`) are retried with exponential
//!   backoff ([`RetryPolicy`]) on top of the HTTP client's own retries; part uploads are
//!   idempotent, and short range reads count as transient.
//!
//! # Streaming and memory
//!
//! [`ImageUpload`] implements [`strata_qcow2::ImageSink`]: body parts (16 MiB, doubling every
//! 1,000 parts) are sent in the background, 4 at a time; the header, handed over last, goes out
//! as multipart part 1 with the body's first bytes (the store's minimum part size of them, 5
//! MiB, held back), so the writer keeps its one-cluster header and an image holds no padding.
//! One upload holds at most [`TargetOptions::upload_memory_bound`] bytes (85 MiB by default).
//! On a filesystem the image is written in place with a 1 MiB write buffer.
//!
//! [`ObjectReader`] implements [`strata_qcow2::ReadAt`] over range GETs: 1 MiB blocks (64 KiB
//! for a planned restore's metadata readers), adjacent misses coalesced into one request (up to
//! 4 MiB, larger windows fetched in parallel), and a read-ahead window doubling to 16 MiB on
//! sequential reads. Blocks land in one LRU cache that all the target's readers share: at most
//! [`TargetOptions::read_cache_budget`] bytes (64 MiB by default) over every open image, an
//! image holding at most 32 MiB of it, so a 64-deep chain holds no more than two images
//! could; at most [`TargetOptions::read_memory_bound`] bytes (48 MiB by default) per open
//! image besides the caller's buffers. [`VolumeStorage`] implements [`strata_qcow2::Storage`], so the QCOW2
//! reader opens a chain straight from the target and follows its relative backing names; on a
//! filesystem target it opens the files themselves.
//!
//! A restore does not read data through that cache: [`FetchPlanner`] cuts the ranges the
//! chain's extents read into parts (8 MiB, gaps up to 1 MiB merged) and [`PartStorage`] fetches
//! them with one range GET each, 8 at once, the restore writing each part as it arrives: at
//! most [`TargetOptions::fetch_memory_bound`] bytes (64 MiB by default) of fetched data.
//!
//! # Sync and async
//!
//! The QCOW2 traits are synchronous, so is this crate's API. Each [`Target`] owns a small
//! tokio runtime (2 threads by default); a call spawns its work there and blocks the calling
//! thread on a channel. This never nests runtimes and never panics, but it does block: from
//! async code, call the target inside `tokio::task::spawn_blocking`.
//!
//! # Performance
//!
//! `benches/target.rs` with `STRATA_BENCH_SIDE_BY_SIDE_MIB=1024` streams one 1 GiB image and
//! compares with plain object_store on the same store (multipart put with 16 MiB parts, 4 in
//! flight; one streaming get). On the shared 2-core development machine, moto 5 on 127.0.0.1
//! and a local ext4 folder, three runs (MB/s, strata / plain):
//!
//! | leg | operation | strata | plain | ratio |
//! |---|---|---|---|---|
//! | S3 (moto) | upload through [`ImageUpload`] | 58-66 | 62-81 | 0.76-1.06 |
//! | S3 (moto) | [`Target::download_image`] | 580-677 | 682-788 | 0.85-0.86 |
//! | S3 (moto) | sequential [`ObjectReader`] reads | 236-243 | 682-788 | 0.30-0.36 |
//! | folder | upload | 241-272 | 363-562 | 0.48-0.68 |
//! | folder | download / reads (direct file) | 4,258-10,674 | 296-555 | > 10 |
//!
//! Uploads to a folder are synced (`fsync`) before they are published and the plain put is
//! not, which is the likely cause of the folder upload gap (not measured separately). Moto
//! materialises the whole object for every GET, ranged or not, so a reader's first range GET
//! on a 1 GiB object costs as much as a full download: on moto the positional reader trails a
//! plain get, while [`Target::download_image`] (one GET) does not. Memory is bounded by
//! construction (the bounds above; no buffer grows with the image); peak memory was not
//! measured separately.
//!
//! # Crate features
//!
//! - `s3` (default): `s3://` targets through object_store's `aws` feature.
//! - `gcs`: `gs://` targets. `azure`: `az://` targets.

mod apps;
mod cache;
mod damage;
mod delete;
mod error;
mod failpoint;
mod fetch;
mod fold;
mod fold_recovery;
mod gc;
mod layout;
mod liveness;
mod local_sink;
mod manifest;
mod name;
mod options;
mod reader;
mod readers;
mod runtime;
mod side;
mod sink;
mod storage;
mod target;
mod upload;
mod url;

/// A named crash point for the fault tests of crates built on this one, as this crate's own
/// (`STRATA_FAILPOINT`; does nothing without the `failpoints` feature).
#[doc(hidden)]
pub fn failpoint(point: &str) {
    failpoint::hit(point);
}

pub use apps::MAX_APP_ARCHIVE;
pub use damage::DamageMark;
pub use error::{Error, Result};
pub use fetch::{FetchPlanner, Fetched, InFlight, Part, PartStorage};
pub use gc::GcReport;
pub use layout::{FORMAT_NAME, FORMAT_VERSION, IMAGE_EXTENSION, MARKER, image_name};
pub use manifest::{
    AppManifest, BackupManifest, Checksums, Crc32, ImageInfo, RepositoryMarker, SideFile,
    VolumeBackupRef,
};
pub use name::{AppBackupId, AppName, BackupId, FileName, VolumeName};
pub use options::{Notices, TargetOptions};
pub use reader::ObjectReader;
pub use readers::ReadLease;
pub use runtime::RetryPolicy;
pub use side::SideBody;
pub use sink::ImageUpload;
pub use storage::{ChainStorage, PREOPEN_TAIL, Preopen, VolumeStorage};
pub use target::{Target, UnreadableManifest};
pub use upload::{BackupSpec, BackupUpload};

/// The grace period `strata gc` and the controller give leftovers before removing them: long
/// enough that clock differences between writers and the store never matter. A live writer's
/// objects are kept whatever their age.
pub const DEFAULT_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The longest chain (base included) any backup may complete: the QCOW2 reader's own limit, so
/// that no point this build commits is one its restore, verify, serve or prune cannot open.
/// [`Target::begin_backup`] refuses to extend a chain already this long, and
/// [`Target::chain`] calls a longer one corrupt.
pub const MAX_CHAIN_DEPTH: usize = strata_qcow2::DEFAULT_MAX_DEPTH;
