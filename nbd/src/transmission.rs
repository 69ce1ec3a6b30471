//! The transmission phase: requests in, replies out, one at a time (proto.md "Transmission").

use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::export::{Export, Payload};
use crate::handshake::{BASE_ALLOCATION_ID, Negotiated};
use crate::proto::{self, Request, chunk, cmd, cmd_flag, errno};

/// Most block-status descriptors in one reply (proto.md lets a server send fewer than the
/// whole range needs); bounds the reply's memory.
const MAX_DESCRIPTORS: usize = 4096;
/// The message of a request past the end of the export.
const PAST_END: &str = "range past the end of the export";

/// One connection's transmission state.
pub(crate) struct Transmission<'a> {
    pub export: &'a Export,
    pub session: Negotiated,
    pub max_request: u32,
}

impl Transmission<'_> {
    /// Serves requests until the client disconnects (`Ok`) or breaks the protocol (`Err`).
    /// A writable export's overlay is flushed when the connection ends.
    pub fn run(&self, reader: &mut impl Read, writer: &mut impl Write) -> Result<()> {
        let result = self.serve_requests(reader, writer);
        let flushed = self.export.flush();
        result?;
        flushed.map_err(|what| Error::Overlay { what })
    }

    fn serve_requests(&self, reader: &mut impl Read, writer: &mut impl Write) -> Result<()> {
        // One read buffer for the connection: it only grows (up to the maximum block size),
        // and every read overwrites the bytes it sends, so it is neither reallocated nor
        // zeroed per request.
        let mut buffer = Vec::new();
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
                cmd::READ => self.read(writer, &request, &mut buffer)?,
                cmd::BLOCK_STATUS => self.block_status(writer, &request)?,
                cmd::FLUSH => match self.export.flush() {
                    Ok(()) => self.reply_error(writer, &request, 0, "")?,
                    Err(why) => self.reply_error(writer, &request, errno::EIO, &why)?,
                },
                cmd::WRITE => {
                    // The payload follows and must be consumed to stay in step; one larger
                    // than the maximum block size cannot be skipped safely.
                    if request.length > self.max_request {
                        return Err(Error::protocol(format!(
                            "write of {} bytes",
                            request.length
                        )));
                    }
                    let mut data = vec![0u8; request.length as usize];
                    reader
                        .read_exact(&mut data)
                        .map_err(Error::io("reading a write payload"))?;
                    self.write(writer, &request, Payload::Bytes(&data))?;
                }
                cmd::WRITE_ZEROES => self.write(writer, &request, Payload::Zeroes)?,
                cmd::TRIM => self.write(writer, &request, Payload::Trim)?,
                cmd::RESIZE => {
                    self.reply_error(writer, &request, errno::EPERM, "the size is fixed")?
                }
                _ => self.reply_error(writer, &request, errno::EINVAL, "unknown command")?,
            }
            writer.flush().map_err(Error::io("sending a reply"))?;
        }
    }

    /// `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM`: `EPERM` on a read-only
    /// export, `ENOSPC` for a write past the end and `EINVAL` for a trim past it (proto.md
    /// "Error values").
    fn write(
        &self,
        writer: &mut impl Write,
        request: &Request,
        payload: Payload<'_>,
    ) -> Result<()> {
        if !self.export.writable() {
            return self.reply_error(writer, request, errno::EPERM, "read-only export");
        }
        if let Some(why) = self.check_range(request, u32::MAX) {
            let past_end = why == PAST_END && !matches!(payload, Payload::Trim);
            let error = if past_end {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return self.reply_error(writer, request, error, why);
        }
        let fua = request.flags & cmd_flag::FUA != 0;
        match self
            .export
            .write(request.offset, u64::from(request.length), payload, fua)
        {
            Ok(()) => self.reply_error(writer, request, 0, ""),
            Err(why) => self.reply_error(writer, request, errno::EIO, &why),
        }
    }

    /// Checks a request's range against the export; the message says what is wrong.
    fn check_range(&self, request: &Request, max_len: u32) -> Option<&'static str> {
        let size = self.export.size();
        if request.length == 0 {
            Some("zero length")
        } else if request.length > max_len {
            Some("request larger than the maximum block size")
        } else if request
            .offset
            .checked_add(u64::from(request.length))
            .is_none_or(|end| end > size)
        {
            Some(PAST_END)
        } else {
            None
        }
    }

    fn read(&self, writer: &mut impl Write, request: &Request, buffer: &mut Vec<u8>) -> Result<()> {
        if let Some(why) = self.check_range(request, self.max_request) {
            return self.reply_error(writer, request, errno::EINVAL, why);
        }
        let len = request.length as usize;
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        let data = buffer.get_mut(..len).unwrap_or_default();
        let runs = match self.export.read(request.offset, data) {
            Ok(runs) => runs,
            Err(why) => return self.reply_error(writer, request, errno::EIO, &why),
        };
        if !self.session.structured {
            proto::write_simple_reply(writer, 0, request.cookie)?;
            return writer
                .write_all(data)
                .map_err(Error::io("sending read data"));
        }
        if request.flags & cmd_flag::DF != 0 {
            return send_data(writer, request.cookie, request.offset, data, true);
        }
        // Zero runs go out as holes, data runs as data.
        let last = runs.len().saturating_sub(1);
        for (i, run) in runs.into_iter().enumerate() {
            let (start, len) = (run.start, run.len);
            let done = i == last;
            let flags = if done { chunk::FLAG_DONE } else { 0 };
            if run.zero {
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
        let descriptors = match self
            .export
            .status(request.offset, u64::from(request.length), limit)
        {
            Ok(descriptors) => descriptors,
            Err(why) => return self.reply_error(writer, request, errno::EIO, &why),
        };
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
