//! [`Export`]: what clients see, the backup point with an optional copy-on-write
//! [`Overlay`] on top. Reads, block status and writes are answered here; the transmission
//! module only speaks the protocol.

use strata_qcow2::{Extent, ExtentKind, GuestOffset, Image};

use crate::overlay::{Granule, Overlay};
use crate::proto::{errno, state};

/// Why a request failed: the error its reply carries and the message logged with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The NBD error value (proto.md "Error values"): `ENOSPC` when the overlay's file system
    /// is full, so a client can tell a full disk from a failed one (qemu's `werror=enospc`,
    /// its default, pauses the guest on it instead of failing its I/O), else `EIO`.
    pub errno: u32,
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            errno: errno::EIO,
            message,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl std::ops::Deref for Failure {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

/// The NBD error value for an I/O error: a full file system (or quota) is `ENOSPC`.
fn errno_of(err: &std::io::Error) -> u32 {
    match rustix::io::Errno::from_io_error(err) {
        Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT) => errno::ENOSPC,
        _ => errno::EIO,
    }
}

/// One piece of a read: `len` bytes at `start`, reading as zeros or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub len: u64,
    pub zero: bool,
}

/// What a write request puts in its range.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Payload<'a> {
    /// `NBD_CMD_WRITE`'s bytes.
    Bytes(&'a [u8]),
    /// `NBD_CMD_WRITE_ZEROES`.
    Zeroes,
    /// `NBD_CMD_TRIM`: whole granules are discarded, partial ones left alone (trim is a hint,
    /// proto.md "Request types").
    Trim,
}

/// The served image and, in copy-on-write mode, its overlay.
pub(crate) struct Export {
    pub image: Image,
    pub overlay: Option<Overlay>,
}

impl Export {
    pub fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Splits `offset..offset + len` into runs of granules in the same state; without an
    /// overlay the whole range comes from the backup.
    fn segments(&self, offset: u64, len: u64) -> Vec<(u64, u64, Granule)> {
        let Some(overlay) = &self.overlay else {
            return vec![(offset, len, Granule::Backup)];
        };
        let map = overlay.lock();
        let granule = overlay.granule();
        let end = offset + len;
        let mut out: Vec<(u64, u64, Granule)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / granule + 1) * granule).min(end);
            let state = map.get(pos / granule);
            match out.last_mut() {
                Some((_, n, s)) if *s == state => *n += next - pos,
                _ => out.push((pos, next - pos, state)),
            }
            pos = next;
        }
        out
    }

    /// Reads `offset..offset + buf.len()` (already checked against the size) into `buf` and
    /// says which runs of it read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<Run>, Failure> {
        let mut runs: Vec<Run> = Vec::new();
        let mut push = |start: u64, len: u64, zero: bool| match runs.last_mut() {
            Some(run) if run.zero == zero => run.len += len,
            _ => runs.push(Run { start, len, zero }),
        };
        for (start, len, state) in self.segments(offset, buf.len() as u64) {
            let from = (start - offset) as usize;
            let Some(part) = buf.get_mut(from..from + len as usize) else {
                return Err("segment outside the request".into());
            };
            match (state, &self.overlay) {
                (Granule::Data, Some(overlay)) => {
                    overlay
                        .read_data(part, start)
                        .map_err(|e| format!("reading the overlay: {e}"))?;
                    push(start, len, false);
                }
                (Granule::Zero | Granule::Trimmed, _) => {
                    part.fill(0);
                    push(start, len, true);
                }
                _ => {
                    let extents = self.image.map(start, len).map_err(|e| describe(&e))?;
                    read_extents(&self.image, &extents, start, part).map_err(|e| describe(&e))?;
                    for e in &extents {
                        push(e.start.get(), e.length, e.kind.is_zero());
                    }
                }
            }
        }
        Ok(runs)
    }

    /// `base:allocation` descriptors (length, flags) from `offset` on, adjacent ones with the
    /// same flags joined, at most `limit` of them; they may cover less than `len`.
    pub fn status(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<(u32, u32)>, Failure> {
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        // Returns false once the list is full.
        let mut push = |len: u64, flags: u32| {
            let count = descriptors.len();
            match descriptors.last_mut() {
                // Lengths add up to at most the request's 32-bit length.
                Some((l, f)) if *f == flags => *l += len as u32,
                _ if count >= limit => return false,
                _ => descriptors.push((len as u32, flags)),
            }
            true
        };
        'segments: for (start, seg_len, granule) in self.segments(offset, len) {
            let flags = match granule {
                Granule::Data => 0,
                Granule::Zero => state::ZERO,
                Granule::Trimmed => state::HOLE | state::ZERO,
                Granule::Backup => {
                    // Windows keep a fragmented chain from making a huge extent list, and
                    // grow from 16 clusters so that a `REQ_ONE` query (qemu sends one per
                    // extent) resolves little more of the chain than its first extent.
                    let cluster = self.image.cluster_size().max(512);
                    let mut window = cluster * 16;
                    let end = start + seg_len;
                    let mut pos = start;
                    while pos < end {
                        let n = window.min(end - pos);
                        window = (window * 4).min(cluster * 1024);
                        let mut full = false;
                        self.image
                            .for_each_extent(pos, n, |e| {
                                full = full || !push(e.length, allocation_flags(e.kind));
                                Ok(())
                            })
                            .map_err(|e| describe(&e))?;
                        if full {
                            break 'segments;
                        }
                        pos += n;
                    }
                    continue;
                }
            };
            if !push(seg_len, flags) {
                break;
            }
        }
        Ok(descriptors)
    }

    /// Applies a write, write-zeroes or trim to the overlay (the range is checked already).
    /// Whole granules are written in place; a granule written in part is first filled from
    /// what it read as (copy on write). `fua` makes the result durable before returning.
    pub fn write(
        &self,
        offset: u64,
        len: u64,
        payload: Payload<'_>,
        fua: bool,
    ) -> Result<(), Failure> {
        let Some(overlay) = &self.overlay else {
            return Err("read-only export".into());
        };
        let granule = overlay.granule();
        let size = self.size();
        let end = offset + len;
        let mut map = overlay.lock();
        // Bytes ready to go to the overlay as they are: (start, end) of a contiguous run.
        let mut direct: Option<(u64, u64)> = None;
        let write_direct = |run: Option<(u64, u64)>| -> Result<(), Failure> {
            if let (Some((from, to)), Payload::Bytes(data)) = (run, payload) {
                let bytes = data
                    .get((from - offset) as usize..(to - offset) as usize)
                    .unwrap_or_default();
                overlay
                    .write_data(bytes, from)
                    .map_err(|e| io_failure("writing", &e))?;
            }
            Ok(())
        };
        let mut pos = offset;
        while pos < end {
            let index = pos / granule;
            let granule_start = index * granule;
            let granule_end = (granule_start + granule).min(size);
            let piece_end = end.min(granule_end);
            let whole = pos == granule_start && piece_end == granule_end;
            let state = map.get(index);
            match payload {
                Payload::Bytes(data) => {
                    if whole || state == Granule::Data {
                        direct = Some((direct.map_or(pos, |(from, _)| from), piece_end));
                    } else {
                        write_direct(direct.take())?;
                        let mut block = vec![0u8; (granule_end - granule_start) as usize];
                        if state == Granule::Backup {
                            self.image
                                .read_at(&mut block, granule_start)
                                .map_err(|e| describe(&e))?;
                        }
                        let at = (pos - granule_start) as usize;
                        let bytes = data
                            .get((pos - offset) as usize..(piece_end - offset) as usize)
                            .unwrap_or_default();
                        if let Some(dst) = block.get_mut(at..at + bytes.len()) {
                            dst.copy_from_slice(bytes);
                        }
                        overlay
                            .write_data(&block, granule_start)
                            .map_err(|e| io_failure("writing", &e))?;
                    }
                    map.set(index, Granule::Data);
                }
                Payload::Zeroes if whole => map.set(index, Granule::Zero),
                Payload::Zeroes => match state {
                    Granule::Zero | Granule::Trimmed => {}
                    Granule::Data => {
                        let zeros = vec![0u8; (piece_end - pos) as usize];
                        overlay
                            .write_data(&zeros, pos)
                            .map_err(|e| io_failure("zeroing", &e))?;
                    }
                    Granule::Backup => {
                        let mut block = vec![0u8; (granule_end - granule_start) as usize];
                        self.image
                            .read_at(&mut block, granule_start)
                            .map_err(|e| describe(&e))?;
                        let at = (pos - granule_start) as usize;
                        let to = (piece_end - granule_start) as usize;
                        if let Some(dst) = block.get_mut(at..to) {
                            dst.fill(0);
                        }
                        overlay
                            .write_data(&block, granule_start)
                            .map_err(|e| io_failure("zeroing", &e))?;
                        map.set(index, Granule::Data);
                    }
                },
                Payload::Trim if whole => map.set(index, Granule::Trimmed),
                Payload::Trim => {}
            }
            pos = piece_end;
        }
        write_direct(direct)?;
        if fua {
            overlay.flush_locked(&mut map).map_err(|e| describe(&e))?;
        }
        Ok(())
    }

    /// Makes completed writes durable (`NBD_CMD_FLUSH`); nothing to do when read-only.
    pub fn flush(&self) -> Result<(), Failure> {
        match &self.overlay {
            Some(overlay) => overlay.flush().map_err(|e| describe(&e)),
            None => Ok(()),
        }
    }
}

fn io_failure(what: &str, err: &std::io::Error) -> Failure {
    Failure {
        errno: errno_of(err),
        message: format!("{what} the overlay: {err}"),
    }
}

/// An error and its causes on one line, for an error reply (`ENOSPC` when one of the causes is
/// a full file system).
fn describe(err: &(dyn std::error::Error + 'static)) -> Failure {
    let mut out = err.to_string();
    let mut errno = errno::EIO;
    let mut cause = Some(err);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && errno_of(io) == errno::ENOSPC
        {
            errno = errno::ENOSPC;
        }
        if !std::ptr::eq(c, err) {
            out.push_str(": ");
            out.push_str(&c.to_string());
        }
        cause = c.source();
    }
    Failure {
        errno,
        message: out,
    }
}

/// `base:allocation` flags of an extent: unallocated in the whole chain is a hole that reads as
/// zeros; a zero cluster reads as zeros but is allocated.
fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Unallocated | ExtentKind::Beyond { .. } => state::HOLE | state::ZERO,
        ExtentKind::Zero { .. } => state::ZERO,
        _ => 0,
    }
}

/// Reads the data of `extents` (which cover `offset..offset + buf.len()`) into `buf`.
fn read_extents(
    image: &Image,
    extents: &[Extent],
    offset: u64,
    buf: &mut [u8],
) -> strata_qcow2::Result<()> {
    for e in extents {
        let from = e.start.distance_from(GuestOffset(offset)) as usize;
        let Some(part) = buf.get_mut(from..from + e.length as usize) else {
            return Err(strata_qcow2::Error::InvalidArgument(
                "extent outside the request".into(),
            ));
        };
        image.read_extent(e, part)?;
    }
    Ok(())
}
