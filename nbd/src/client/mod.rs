//! [`Client`]: reads an NBD export (a VM disk served by `qemu-nbd`, an `nbdkit` plugin, or a
//! Strata server), skipping holes through `base:allocation` block status. It is the source of
//! a backup of an NBD export.

mod connection;

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use connection::Connection;

use crate::error::{Error, Result};
use crate::proto::state;

/// Connections a client opens at most when the server allows several (`CAN_MULTI_CONN`).
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Largest range asked about in one block-status request.
const STATUS_SPAN: u64 = 1 << 30;

/// A read-only NBD client of one export.
///
/// `&self` methods may be called from several threads: each takes a connection from a small
/// pool (one connection per concurrent reader, up to [`DEFAULT_CONNECTIONS`], and only one
/// unless the server advertises `NBD_FLAG_CAN_MULTI_CONN`), so parallel readers overlap their
/// round trips instead of queueing behind one socket.
pub struct Client {
    addr: String,
    export: String,
    size: u64,
    base_allocation: bool,
    max_request: u32,
    max_connections: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
    data_bytes: AtomicU64,
}

struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("size", &self.size)
            .field("base_allocation", &self.base_allocation)
            .finish_non_exhaustive()
    }
}

/// Splits `nbd://HOST[:PORT][/EXPORT]` into `HOST:PORT` (port 10809 by default) and the
/// export name (empty for the server's default export).
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let invalid = |why| Error::InvalidUrl {
        url: url.to_owned(),
        why,
    };
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| invalid("not an nbd:// URL"))?;
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(host, _)| !host.is_empty() && !host.ends_with(':'))
        && !authority.ends_with(']');
    let addr = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:10809")
    };
    if export.len() > 4096 || export.contains('\0') {
        return Err(invalid("export name too long or with NUL"));
    }
    Ok((addr, export.to_owned()))
}

impl Client {
    /// Connects to `nbd://HOST[:PORT]/EXPORT`.
    pub fn open(url: &str) -> Result<Self> {
        let (addr, export) = parse_url(url)?;
        Self::connect(&addr, &export)
    }

    /// Connects to the export `export` of the server at `addr` (`host:port`).
    pub fn connect(addr: &str, export: &str) -> Result<Self> {
        let first = Connection::open(addr, export)?;
        let negotiated = first.negotiated;
        let max_connections = if first.multi_conn() {
            DEFAULT_CONNECTIONS
        } else {
            1
        };
        Ok(Self {
            addr: addr.to_owned(),
            export: export.to_owned(),
            size: negotiated.size,
            base_allocation: negotiated.base_allocation.is_some(),
            max_request: negotiated.max_request,
            max_connections,
            pool: Mutex::new(Pool {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
            data_bytes: AtomicU64::new(0),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server reports holes and zeros (`base:allocation`).
    pub fn has_block_status(&self) -> bool {
        self.base_allocation
    }

    /// Bytes received as data so far (holes sent as `NBD_REPLY_TYPE_OFFSET_HOLE` not
    /// counted): what reading the export cost on the wire.
    pub fn data_bytes_read(&self) -> u64 {
        self.data_bytes.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled connection. A connection that failed is dropped, since its
    /// stream may be out of step; the next caller opens a fresh one, refused if it reports
    /// another export size than the first (every bound here is checked against that one).
    fn with_connection<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(conn) = pool.idle.pop() {
                    break Some(conn);
                }
                if pool.open < self.max_connections {
                    pool.open += 1;
                    break None;
                }
                pool = self
                    .returned
                    .wait(pool)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let result = match conn.as_mut() {
            Some(conn) => f(conn),
            None => Connection::open(&self.addr, &self.export).and_then(|mut c| {
                if c.negotiated.size != self.size {
                    return Err(Error::bad_server(format!(
                        "a new connection reports a {}-byte export, the first a {}-byte one",
                        c.negotiated.size, self.size
                    )));
                }
                let result = f(&mut c);
                conn = Some(c);
                result
            }),
        };
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        match conn {
            Some(conn) if result.is_ok() => pool.idle.push(conn),
            _ => pool.open -= 1,
        }
        self.returned.notify_one();
        result
    }

    /// Fills `buf` with the export's bytes at `offset`, in requests of at most the server's
    /// maximum block size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| Error::Refused {
                op: format!("a read of {} bytes at {offset:#x}", buf.len()),
                code: crate::proto::errno::EINVAL,
                message: format!("past the end of the {}-byte export", self.size),
            })?;
        for (i, part) in buf.chunks_mut(self.max_request as usize).enumerate() {
            let at = offset + (i as u64) * u64::from(self.max_request);
            let data = self.with_connection(|c| c.read(part, at))?;
            self.data_bytes.fetch_add(data, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The first range at or after `offset` that may hold data, or `None` when only holes
    /// remain. Holes and zero extents (`NBD_STATE_HOLE`, `NBD_STATE_ZERO`) are not data;
    /// without `base:allocation` everything is.
    pub fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        let mut pos = offset;
        while pos < self.size {
            if !self.base_allocation {
                return Ok(Some(pos..self.size));
            }
            let span = (self.size - pos).min(STATUS_SPAN) as u32;
            let extents = self.with_connection(|c| c.block_status(pos, span))?;
            let mut start = None;
            for (len, flags) in extents {
                let data = flags & (state::HOLE | state::ZERO) == 0;
                match (data, start) {
                    (true, None) => start = Some(pos),
                    (false, Some(s)) => return Ok(Some(s..pos.min(self.size))),
                    _ => {}
                }
                pos += len;
            }
            if let Some(s) = start {
                return Ok(Some(s..pos.min(self.size)));
            }
        }
        Ok(None)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(PoisonError::into_inner);
        for conn in &mut pool.idle {
            conn.disconnect();
        }
    }
}

/// An NBD export as the source of a backup (`strata_chain::backup`, `strata::backup_volume`).
impl strata_qcow2::VolumeRead for Client {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset).map_err(to_io)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        Client::next_data(self, offset).map_err(to_io)
    }
}

/// Errors as `std::io::Error` for the volume-reading trait, the cause kept inside.
fn to_io(err: Error) -> io::Error {
    let kind = match &err {
        Error::Io { source, .. } => source.kind(),
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, err)
}
