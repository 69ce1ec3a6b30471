//! The transmission phase: requests in, replies out, one at a time (proto.md "Transmission").

use std::io::{self, Read, Write};

use strata_qcow2::{Extent, ExtentKind, Image};

use crate::error::{Error, Result};
use crate::handshake::{BASE_ALLOCATION_ID, Negotiated};
use crate::proto::{self, Request, chunk, cmd, cmd_flag, errno, state};

/// Most block-status descriptors in one reply (proto.md lets a server send fewer than the
/// whole range needs); bounds the reply's memory.
const MAX_DESCRIPTORS: usize = 4096;

/// One connection's transmission state.
pub(crate) struct Transmission<'a> {
    pub image: &'a Image,
    pub session: Negotiated,
    pub max_request: u32,
}

impl Transmission<'_> {
    /// Serves requests until the client disconnects (`Ok`) or breaks the protocol (`Err`).
    pub fn run(&self, reader: &mut impl Read, writer: &mut impl Write) -> Result<()> {
        loop {
            let head: [u8; Request::LEN] = match proto::read_array(reader, "reading a request") {
                Ok(head) => head,
                // A client that hangs up between requests has just left.
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(err) => return Err(err),
            };
            let request = Request::parse(&head)?;
            match request.kind {
                cmd::DISC => return Ok(()),
                cmd::READ => self.read(writer, &request)?,
                cmd::BLOCK_STATUS => self.block_status(writer, &request)?,
                cmd::FLUSH => self.reply_error(writer, &request, 0, "")?,
                cmd::WRITE => {
                    // The payload follows; skip it when it is of a size we accept, otherwise
                    // the stream cannot be resynchronised safely.
                    if request.length > self.max_request {
                        return Err(Error::protocol(format!(
                            "write of {} bytes",
                            request.length
                        )));
                    }
                    let skipped =
                        io::copy(&mut reader.take(u64::from(request.length)), &mut io::sink())
                            .map_err(Error::io("skipping a write payload"))?;
                    if skipped != u64::from(request.length) {
                        return Err(Error::protocol("write payload cut short"));
                    }
                    self.reply_error(writer, &request, errno::EPERM, "read-only export")?;
                }
                cmd::TRIM | cmd::WRITE_ZEROES | cmd::RESIZE => {
                    self.reply_error(writer, &request, errno::EPERM, "read-only export")?
                }
                _ => self.reply_error(writer, &request, errno::EINVAL, "unknown command")?,
            }
            writer.flush().map_err(Error::io("sending a reply"))?;
        }
    }

    /// Checks a request's range against the export; the message says what is wrong.
    fn check_range(&self, request: &Request, max_len: u32) -> Option<&'static str> {
        let size = self.image.virtual_size();
        if request.length == 0 {
            Some("zero length")
        } else if request.length > max_len {
            Some("request larger than the maximum block size")
        } else if request
            .offset
            .checked_add(u64::from(request.length))
            .is_none_or(|end| end > size)
        {
            Some("range past the end of the export")
        } else {
            None
        }
    }

    fn read(&self, writer: &mut impl Write, request: &Request) -> Result<()> {
        if let Some(why) = self.check_range(request, self.max_request) {
            return self.reply_error(writer, request, errno::EINVAL, why);
        }
        let extents = match self.image.map(request.offset, u64::from(request.length)) {
            Ok(extents) => extents,
            Err(err) => return self.reply_error(writer, request, errno::EIO, &err.to_string()),
        };
        let mut data = vec![0u8; request.length as usize];
        if let Err(err) = read_extents(self.image, &extents, request.offset, &mut data) {
            return self.reply_error(writer, request, errno::EIO, &err.to_string());
        }
        if !self.session.structured {
            proto::write_simple_reply(writer, 0, request.cookie)?;
            return writer
                .write_all(&data)
                .map_err(Error::io("sending read data"));
        }
        if request.flags & cmd_flag::DF != 0 {
            return send_data(writer, request.cookie, request.offset, &data, true);
        }
        // Zero ranges go out as holes, data runs (adjacent data extents joined) as data.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in &extents {
            let zero = e.kind.is_zero();
            match runs.last_mut() {
                Some((_, len, z)) if *z == zero => *len += e.length,
                _ => runs.push((e.start, e.length, zero)),
            }
        }
        let last = runs.len().saturating_sub(1);
        for (i, (start, len, zero)) in runs.into_iter().enumerate() {
            let done = i == last;
            let flags = if done { chunk::FLAG_DONE } else { 0 };
            if zero {
                proto::write_chunk_header(writer, flags, chunk::OFFSET_HOLE, request.cookie, 12)?;
                let mut payload = [0u8; 12];
                payload[..8].copy_from_slice(&start.to_be_bytes());
                // Within one request, so it fits the 32-bit length.
                payload[8..].copy_from_slice(&(len as u32).to_be_bytes());
                writer
                    .write_all(&payload)
                    .map_err(Error::io("sending a hole"))?;
            } else {
                let from = (start - request.offset) as usize;
                let part = data.get(from..from + len as usize).unwrap_or_default();
                send_data(writer, request.cookie, start, part, done)?;
            }
        }
        Ok(())
    }

    fn block_status(&self, writer: &mut impl Write, request: &Request) -> Result<()> {
        if !self.session.structured || !self.session.base_allocation {
            return self.reply_error(writer, request, errno::EINVAL, "no metadata context");
        }
        if let Some(why) = self.check_range(request, u32::MAX) {
            return self.reply_error(writer, request, errno::EINVAL, why);
        }
        let one = request.flags & cmd_flag::REQ_ONE != 0;
        let limit = if one { 1 } else { MAX_DESCRIPTORS };
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        // Walk the range in windows so a fragmented chain never makes a huge extent list.
        let window = self.image.cluster_size().max(512) * 1024;
        let end = request.offset + u64::from(request.length);
        let mut pos = request.offset;
        while pos < end && descriptors.len() < limit {
            let len = window.min(end - pos);
            let mut full = false;
            let result = self.image.for_each_extent(pos, len, |e| {
                if full {
                    return Ok(());
                }
                let flags = allocation_flags(e.kind);
                let count = descriptors.len();
                match descriptors.last_mut() {
                    // Lengths add up to at most the request's 32-bit length.
                    Some((l, f)) if *f == flags => *l += e.length as u32,
                    _ if count >= limit => full = true,
                    _ => descriptors.push((e.length as u32, flags)),
                }
                Ok(())
            });
            if let Err(err) = result {
                return self.reply_error(writer, request, errno::EIO, &err.to_string());
            }
            if full {
                break;
            }
            pos += len;
        }
        let payload_len = 4 + 8 * descriptors.len();
        proto::write_chunk_header(
            writer,
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS,
            request.cookie,
            payload_len as u32,
        )?;
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in descriptors {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        writer
            .write_all(&payload)
            .map_err(Error::io("sending block status"))
    }

    /// Replies with `error` (0 for success without data): a simple reply, or with structured
    /// replies for reads an error chunk carrying `message` (proto.md "Simple reply message").
    fn reply_error(
        &self,
        writer: &mut impl Write,
        request: &Request,
        error: u32,
        message: &str,
    ) -> Result<()> {
        let structured_needed = self.session.structured
            && error != 0
            && matches!(request.kind, cmd::READ | cmd::BLOCK_STATUS);
        if !structured_needed {
            return proto::write_simple_reply(writer, error, request.cookie);
        }
        let message = message.get(..message.len().min(1024)).unwrap_or_default();
        let mut payload = Vec::with_capacity(6 + message.len());
        payload.extend_from_slice(&error.to_be_bytes());
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message.as_bytes());
        proto::write_chunk_header(
            writer,
            chunk::FLAG_DONE,
            chunk::ERROR,
            request.cookie,
            payload.len() as u32,
        )?;
        writer
            .write_all(&payload)
            .map_err(Error::io("sending an error"))
    }
}

/// `base:allocation` flags of an extent: unallocated in the whole chain is a hole that reads as
/// zeros; a zero cluster reads as zeros but is allocated.
fn allocation_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Unallocated => state::HOLE | state::ZERO,
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
        let from = (e.start - offset) as usize;
        let Some(part) = buf.get_mut(from..from + e.length as usize) else {
            return Err(strata_qcow2::Error::InvalidArgument(
                "extent outside the request".into(),
            ));
        };
        image.read_extent(e, part)?;
    }
    Ok(())
}

fn send_data(
    writer: &mut impl Write,
    cookie: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) -> Result<()> {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    // Reads are capped well below 4 GiB, so the length fits.
    proto::write_chunk_header(
        writer,
        flags,
        chunk::OFFSET_DATA,
        cookie,
        8 + data.len() as u32,
    )?;
    writer
        .write_all(&offset.to_be_bytes())
        .map_err(Error::io("sending read data"))?;
    writer
        .write_all(data)
        .map_err(Error::io("sending read data"))
}
