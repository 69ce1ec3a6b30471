//! An NBD server over Strata's QCOW2 chains: instant access to a backup point, read-only or
//! copy-on-write.
//!
//! [`Server`] serves one [`strata_qcow2::Image`] (a chain opened from local files or straight
//! from a backup target) to any number of NBD clients: `qemu-img`, `qemu-io`, `qemu-nbd
//! --connect`, the kernel client, or libnbd's `nbdinfo`, `nbdcopy` and `nbdfuse`. Clients see
//! the chain's holes and zero clusters, so copies stay sparse.
//!
//! ```no_run
//! use std::net::TcpListener;
//!
//! let image = strata_qcow2::Image::open("backup.qcow2")?;
//! let server = strata_nbd::Server::new("disk", image)?;
//! let listener = TcpListener::bind("127.0.0.1:10809")?;
//! // qemu-img convert -f raw nbd://127.0.0.1:10809/disk disk.raw
//! server.serve(&listener)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Protocol coverage
//!
//! Written from the NBD protocol document (NetworkBlockDevice/nbd, `doc/proto.md`):
//!
//! - Handshake: fixed newstyle with `NO_ZEROES`; options `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`,
//!   `NBD_OPT_INFO` (with `NBD_INFO_NAME` and `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_LIST`,
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` with
//!   the `base:allocation` context, and `NBD_OPT_ABORT`. Others get `NBD_REP_ERR_UNSUP`. The
//!   empty export name selects the one export.
//! - Transmission: `NBD_CMD_READ` (structured replies send zero ranges as
//!   `NBD_REPLY_TYPE_OFFSET_HOLE` chunks and data as `NBD_REPLY_TYPE_OFFSET_DATA`; `DF` gives
//!   one data chunk), `NBD_CMD_BLOCK_STATUS` (`base:allocation`: unallocated in the whole chain
//!   is `HOLE | ZERO`, a zero cluster is `ZERO`, data is `0`; `REQ_ONE` honoured),
//!   `NBD_CMD_FLUSH` and `NBD_CMD_DISC`. By default the export is read-only: `WRITE`, `TRIM`,
//!   `WRITE_ZEROES` and `RESIZE` fail with `EPERM`; unknown commands with `EINVAL`.
//! - Copy-on-write ([`Server::with_overlay`]): `NBD_CMD_WRITE` (with `FUA`),
//!   `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_TRIM` and `NBD_CMD_FLUSH` go to an [`Overlay`] file and
//!   never to the backup; `READ_ONLY` is not advertised, `SEND_FUA`, `SEND_TRIM` and
//!   `SEND_WRITE_ZEROES` are. A write past the end gets `ENOSPC`, a trim past it `EINVAL`
//!   (proto.md "Error values"), and the connection goes on. A write or flush the overlay's
//!   file system has no room for gets `ENOSPC` too, other failures `EIO`.
//!
//! # Client
//!
//! [`Client`] reads an export of any NBD server (fixed newstyle, `NBD_OPT_GO`, structured
//! replies, `base:allocation`) and implements [`strata_qcow2::VolumeRead`], so a backup can
//! take a VM disk served by `qemu-nbd` or `nbdkit` as its volume, reading only the ranges
//! block status says may hold data (holes and zero extents are skipped):
//!
//! ```no_run
//! use strata_qcow2::VolumeRead;
//!
//! let client = strata_nbd::Client::open("nbd://127.0.0.1:10809/vm")?;
//! let mut pos = 0;
//! while let Some(range) = client.next_data(pos)? {
//!     // read range.start..range.end with client.read_exact_at(..)
//!     pos = range.end;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every server reply is checked before it is believed: magics, the handle, chunk offsets
//! against the request (no overlap, nothing missing), and lengths against caps before any
//! allocation, so a hostile server gets [`Error::BadServer`] naming what it did.
//!
//! # Hostile clients
//!
//! Every request's range is checked: a zero length, a range past the end of the export or
//! a read above the maximum block size (32 MiB by default, advertised through
//! `NBD_INFO_BLOCK_SIZE`) gets an `EINVAL` reply, and the connection goes on, since no payload
//! follows such a request. A wrong magic, unknown client flags, an option over 16 KiB, more than
//! 256 options, an oversized write (whose payload cannot be skipped safely) or a handshake not
//! over within 30 s (however the client spreads its bytes) ends that connection only; memory
//! per connection stays bounded by four requests of the maximum block size (one per serving
//! thread). At most 64 clients are served at once by default.
//!
//! # Design
//!
//! - **Why not the `nbd` crate.** `nbd` 0.3.1 knows only `NBD_OPT_EXPORT_NAME`, simple replies
//!   and no block status: qemu connects to it only under its fixed export name and sees no
//!   holes, so copies are not sparse. The subset needed here is small and fully specified, so it
//!   is written here against the protocol document.
//! - **Threads, not async.** With `std::net`, each connection has four threads that take turns
//!   reading the next request; each answers the request it read (reads are positional through
//!   `&Image`), and replies go out whole, in completion order, as the protocol allows. Clients
//!   such as qemu keep several requests in flight, so storage latency (object storage above
//!   all) overlaps; a request is never handed from thread to thread, so a client that waits
//!   for each answer (qemu's block-status pass before a copy) pays no wake-up per request. A
//!   reply's headers and data leave in one vectored write, straight from the read buffer. The
//!   crate pulls in neither tokio nor an executor.
//! - **Read-only by default.** A backup point must never change; `NBD_FLAG_READ_ONLY` and
//!   `NBD_FLAG_CAN_MULTI_CONN` are advertised, so clients may open several connections.
//! - **A pool of client connections.** [`Client`]'s reads take `&self` (backups read on
//!   several threads); each caller takes an idle connection or opens one, up to four when the
//!   server advertises `CAN_MULTI_CONN` (one otherwise), so parallel reads overlap their round
//!   trips rather than queue behind one socket as a `Mutex<Connection>` would. A connection
//!   that failed is dropped, since its stream may be out of step.
//! - **Overlay format.** One sparse file: a header naming what it belongs to (backup point or
//!   image, and size), a 2-bit-per-64-KiB-granule map (backup / data / zeroed / trimmed) and the
//!   data at its guest offset. Reads of unwritten granules go to the backup, so a fresh overlay
//!   costs nothing; a partial write of a granule copies the rest of it first. QCOW2 would also
//!   do, but needs allocation tables and refcounts for what a bitmap and file offsets give for
//!   free; a raw sparse file alone cannot tell written zeros from "read the backup". The map is
//!   kept in memory (size / 256 KiB bytes) and persisted on flush after the data, so an
//!   overlay survives restarts and crashes lose only unflushed writes. Writes hold the map's
//!   lock for their duration, so several clients never lose each other's copy-on-write bytes,
//!   and `CAN_MULTI_CONN` stays true. An advisory `flock` keeps two processes off one file.
//!
//! # Crate features
//!
//! None.

mod client;
mod error;
mod export;
mod handshake;
mod overlay;
pub mod proto;
mod reply;
mod server;
mod transmission;

pub use client::{Client, DEFAULT_CONNECTIONS, parse_url};
pub use error::{Error, Result};
pub use overlay::Overlay;
pub use server::{DEFAULT_MAX_CLIENTS, DEFAULT_MAX_REQUEST, Server};
