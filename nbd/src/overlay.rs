//! [`Overlay`]: the local copy-on-write file that takes a writable export's writes, so the
//! backup point under it never changes.
//!
//! # Format
//!
//! One sparse file, all integers big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STRATAOV` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | log2 of the granule size (16: 64 KiB) |
//! | 16 | 8 | size of the export in bytes |
//! | 24 | 4 | length of the owner string (at most [`MAX_OWNER`]) |
//! | 28 | n | owner: what the overlay belongs to (a backup point, an image path) |
//! | 4096 | m | granule map: 2 bits a granule, 4 granules a byte, low bits first |
//! | data | size | data, at `data + guest offset` |
//!
//! `data` is the map's end rounded up to a granule. A granule is [`Granule::Backup`] (read the
//! backup), [`Granule::Data`] (read this file), [`Granule::Zero`] (written zeros) or
//! [`Granule::Trimmed`] (discarded: reads as zeros, reported as a hole).
//!
//! The map lives in memory and goes to the file on [`Overlay::flush`] (`NBD_CMD_FLUSH`, `FUA`,
//! a client's disconnect, dropping the overlay), after the data has been synced: a crash
//! loses only writes not yet flushed (which NBD allows, proto.md "Ordering of messages and
//! writes") and never exposes a granule whose data did not reach the disk.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"STRATAOV";
const VERSION: u32 = 1;
/// Header size; the granule map starts here.
const HEADER_LEN: u64 = 4096;
/// Bytes of the map written at once when it is persisted.
const MAP_PAGE: usize = 4096;
/// Longest owner string.
pub const MAX_OWNER: usize = 2048;
/// log2 of the granule size of new overlays (64 KiB, QCOW2's default cluster size).
const GRANULE_SHIFT: u32 = 16;
/// Largest export an overlay covers (64 TiB: a 256 MiB map in memory).
const MAX_SIZE: u64 = 64 << 40;

/// Where a granule's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Granule {
    /// Never written: the backup's bytes.
    Backup = 0,
    /// Written: the overlay's bytes.
    Data = 1,
    /// Zeroed with `NBD_CMD_WRITE_ZEROES`.
    Zero = 2,
    /// Discarded with `NBD_CMD_TRIM`.
    Trimmed = 3,
}

impl Granule {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            0 => Self::Backup,
            1 => Self::Data,
            2 => Self::Zero,
            _ => Self::Trimmed,
        }
    }
}

/// A copy-on-write overlay file for one export; see the module docs for its format.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    file: File,
    size: u64,
    granule: u64,
    data_offset: u64,
    map: Mutex<GranuleMap>,
}

/// The granule states and which pages of them changed since the last flush.
#[derive(Debug)]
pub(crate) struct GranuleMap {
    bits: Vec<u8>,
    dirty: BTreeSet<usize>,
}

impl GranuleMap {
    /// The state of granule `index` (granules past the end read as [`Granule::Backup`]).
    pub fn get(&self, index: u64) -> Granule {
        let byte = usize::try_from(index / 4)
            .ok()
            .and_then(|i| self.bits.get(i));
        byte.map_or(Granule::Backup, |b| {
            Granule::from_bits(b >> ((index % 4) * 2))
        })
    }

    /// Sets granule `index` to `state`.
    pub fn set(&mut self, index: u64, state: Granule) {
        let Some(i) = usize::try_from(index / 4).ok() else {
            return;
        };
        if let Some(byte) = self.bits.get_mut(i) {
            let shift = (index % 4) * 2;
            let new = (*byte & !(3 << shift)) | ((state as u8) << shift);
            if new != *byte {
                *byte = new;
                self.dirty.insert(i / MAP_PAGE);
            }
        }
    }
}

impl Overlay {
    /// Opens the overlay at `path` for an export of `size` bytes belonging to `owner`, or
    /// creates it (sparse) when the file does not exist. An existing overlay made for another
    /// owner or size is refused ([`Error::OverlayMismatch`]), as is one another process has
    /// open ([`Error::OverlayBusy`]).
    pub fn open_or_create(path: impl AsRef<Path>, size: u64, owner: &str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if owner.len() > MAX_OWNER || size > MAX_SIZE {
            return Err(Error::OverlayCorrupt {
                path,
                what: format!("owner of {} bytes or size {size} too large", owner.len()),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io("opening the overlay"))?;
        // An advisory lock keeps two servers from writing one overlay.
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(Error::OverlayBusy { path });
        }
        let len = file
            .metadata()
            .map_err(Error::io("opening the overlay"))?
            .len();
        let granule = 1u64 << GRANULE_SHIFT;
        let granules = size.div_ceil(granule);
        let map_len = granules.div_ceil(4).next_multiple_of(MAP_PAGE as u64);
        let data_offset = (HEADER_LEN + map_len).next_multiple_of(granule);
        let mut overlay = Self {
            path,
            file,
            size,
            granule,
            data_offset,
            map: Mutex::new(GranuleMap {
                // Bounded by MAX_SIZE above.
                bits: vec![0; map_len as usize],
                dirty: BTreeSet::new(),
            }),
        };
        if len == 0 {
            overlay.create(owner)?;
        } else {
            overlay.load(owner, len)?;
        }
        Ok(overlay)
    }

    fn create(&self, owner: &str) -> Result<()> {
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_be_bytes());
        header.extend_from_slice(&GRANULE_SHIFT.to_be_bytes());
        header.extend_from_slice(&self.size.to_be_bytes());
        header.extend_from_slice(&(owner.len() as u32).to_be_bytes());
        header.extend_from_slice(owner.as_bytes());
        self.file
            .set_len(self.data_offset + self.size)
            .map_err(Error::io("creating the overlay"))?;
        self.file
            .write_all_at(&header, 0)
            .map_err(Error::io("creating the overlay"))?;
        self.file
            .sync_all()
            .map_err(Error::io("creating the overlay"))
    }

    fn load(&mut self, owner: &str, len: u64) -> Result<()> {
        let mut header = [0u8; 28 + MAX_OWNER];
        self.file
            .read_exact_at(&mut header, 0)
            .map_err(Error::io("reading the overlay header"))?;
        let corrupt = |what: String| Error::OverlayCorrupt {
            path: self.path.clone(),
            what,
        };
        let field = |at: usize, n: usize| header.get(at..at + n).unwrap_or_default();
        if field(0, 8) != MAGIC {
            return Err(corrupt("not a Strata overlay (bad magic)".into()));
        }
        let be32 = |at| u32::from_be_bytes(field(at, 4).try_into().unwrap_or_default());
        let version = be32(8);
        let shift = be32(12);
        if version != VERSION || shift != GRANULE_SHIFT {
            return Err(corrupt(format!(
                "version {version} with granule shift {shift} (want {VERSION}, {GRANULE_SHIFT})"
            )));
        }
        let size = u64::from_be_bytes(field(16, 8).try_into().unwrap_or_default());
        let owner_len = be32(24) as usize;
        if owner_len > MAX_OWNER {
            return Err(corrupt(format!("owner of {owner_len} bytes")));
        }
        let recorded = String::from_utf8_lossy(field(28, owner_len)).into_owned();
        if size != self.size || recorded != owner {
            return Err(Error::OverlayMismatch {
                path: self.path.clone(),
                recorded: format!("{recorded} ({size} bytes)"),
                wanted: format!("{owner} ({} bytes)", self.size),
            });
        }
        if len < self.data_offset {
            return Err(corrupt(format!("file of {len} bytes is cut short")));
        }
        let map = self.map.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.file
            .read_exact_at(&mut map.bits, HEADER_LEN)
            .map_err(Error::io("reading the overlay map"))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The export size the overlay was made for.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granule size in bytes.
    pub(crate) fn granule(&self) -> u64 {
        self.granule
    }

    /// Locks the granule map; writers hold it for a whole request so concurrent partial
    /// writes of one granule cannot lose each other's bytes.
    pub(crate) fn lock(&self) -> MutexGuard<'_, GranuleMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads overlay data at guest offset `offset`.
    pub(crate) fn read_data(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, self.data_offset + offset)
    }

    /// Writes overlay data at guest offset `offset` (the caller updates the map), at most
    /// [`strata_qcow2::WRITE_CHUNK`] a call, as every write of Strata's to a file.
    pub(crate) fn write_data(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        strata_qcow2::write_all_at(&self.file, buf, self.data_offset + offset)
    }

    /// Makes every completed write durable: syncs the data, then writes the changed pages of
    /// the granule map and syncs again.
    pub fn flush(&self) -> Result<()> {
        let mut map = self.lock();
        self.flush_locked(&mut map)
    }

    pub(crate) fn flush_locked(&self, map: &mut GranuleMap) -> Result<()> {
        if map.dirty.is_empty() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(Error::io("syncing the overlay"))?;
        for &page in &map.dirty {
            let start = page * MAP_PAGE;
            let bytes = map
                .bits
                .get(start..(start + MAP_PAGE).min(map.bits.len()))
                .unwrap_or_default();
            self.file
                .write_all_at(bytes, HEADER_LEN + start as u64)
                .map_err(Error::io("writing the overlay map"))?;
        }
        self.file
            .sync_data()
            .map_err(Error::io("syncing the overlay"))?;
        map.dirty.clear();
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // Best effort: clients that wanted durability sent NBD_CMD_FLUSH.
        let _ = self.flush();
    }
}
