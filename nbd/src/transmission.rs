//! The transmission phase (proto.md "Transmission"): a few threads take turns reading the
//! next request, and each answers the request it read, so replies may go out of order (each
//! reply whole, under the writer's lock).
//!
//! The thread that reads a request serves it (leader and followers): a request is never
//! handed to another thread, so a client waiting on one answer at a time (`qemu-img
//! convert` asks for block status that way before it copies) pays no thread wake-up per
//! request, and a client with several requests in flight has them served in parallel.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::export::{Export, Payload};
use crate::handshake::{BASE_ALLOCATION_ID, Negotiated};
use crate::proto::{self, Request, chunk, cmd, cmd_flag, errno};
use crate::reply::Reply;

/// Most block-status descriptors in one reply (proto.md lets a server send fewer than the
/// whole range needs); bounds the reply's memory.
const MAX_DESCRIPTORS: usize = 4096;
/// The message of a request past the end of the export.
const PAST_END: &str = "range past the end of the export";
/// The most a serving thread keeps allocated between requests: a buffer grown past it for a
/// larger request is let go once that request is answered, so a connection that asked for a
/// few maximum-size blocks long ago does not hold them while it idles. Clients copying a disk
/// ask for up to 2 MiB at a time (qemu-img convert, nbdcopy), which stays allocation-free.
const KEEP_BUFFER: usize = 4 << 20;
/// Requests of one connection served at once. Clients such as qemu keep several requests in
/// flight; serving them in parallel overlaps storage latency (object storage above all)
/// and the copies. Memory per connection stays bounded by `SERVERS` requests.
const SERVERS: usize = 4;

/// One connection's transmission state.
pub(crate) struct Transmission<'a> {
    pub export: &'a Export,
    pub session: Negotiated,
    pub max_request: u32,
}

/// What the client sent next.
enum Next {
    /// A request, its write payload (if any) in the thread's buffer.
    Request(Request),
    /// `NBD_CMD_DISC`, or the client hung up between requests.
    End,
}

impl Transmission<'_> {
    /// Serves requests until the client disconnects (`Ok`) or breaks the protocol (`Err`).
    /// A writable export's overlay is flushed when the connection ends.
    pub fn run<R: Read + Send, W: Write + Send>(&self, reader: R, writer: W) -> Result<()> {
        let input = Mutex::new(reader);
        let output = Mutex::new(writer);
        let ended = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..SERVERS)
                .map(|_| scope.spawn(|| self.serve(&input, &output, &ended)))
                .collect();
            let mut result = self.serve(&input, &output, &ended);
            for helper in helpers {
                let served = helper
                    .join()
                    .unwrap_or_else(|_| Err(Error::protocol("a request handler panicked")));
                if result.is_ok() {
                    result = served;
                }
            }
            result
        });
        let flushed = self.export.flush();
        result?;
        flushed.map_err(|why| Error::Overlay { what: why.message })
    }

    /// One serving thread: takes the next request, answers it, and again, until the
    /// connection ends. Replies of requests that are being served when it ends still go out
    /// (proto.md "Terminating the transmission phase").
    fn serve<R: Read, W: Write>(
        &self,
        input: &Mutex<R>,
        output: &Mutex<W>,
        ended: &AtomicBool,
    ) -> Result<()> {
        // One buffer per thread for read data and write payloads: it grows up to the maximum
        // block size, and every use overwrites the bytes it needs, so it is neither
        // reallocated nor zeroed per request of up to `KEEP_BUFFER` bytes.
        let mut buffer = Vec::new();
        loop {
            let request = {
                let mut reader = input.lock().unwrap_or_else(PoisonError::into_inner);
                if ended.load(Ordering::SeqCst) {
                    return Ok(());
                }
                // The end is marked before the reader is released, so no other thread
                // waits for a request that cannot come.
                match self.receive(&mut *reader, &mut buffer) {
                    Ok(Next::Request(request)) => request,
                    Ok(Next::End) => {
                        ended.store(true, Ordering::SeqCst);
                        return Ok(());
                    }
                    Err(err) => {
                        ended.store(true, Ordering::SeqCst);
                        return Err(err);
                    }
                }
            };
            let handled = self.handle(output, &request, &mut buffer);
            settle(&mut buffer);
            if let Err(err) = handled {
                ended.store(true, Ordering::SeqCst);
                return Err(err);
            }
        }
    }

    /// Reads the next request, and a write's payload into `buffer`.
    fn receive(&self, reader: &mut impl Read, buffer: &mut Vec<u8>) -> Result<Next> {
        let head: [u8; Request::LEN] = match proto::read_array(reader, "reading a request") {
            Ok(head) => head,
            // A client that hangs up between requests has just left.
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Next::End);
            }
            Err(err) => return Err(err),
        };
        let request = Request::parse(&head)?;
        if request.kind == cmd::DISC {
            return Ok(Next::End);
        }
        if request.kind == cmd::WRITE {
            // The payload follows and must be consumed to stay in step; one larger than
            // the maximum block size cannot be skipped safely.
            if request.length > self.max_request {
                return Err(Error::protocol(format!(
                    "write of {} bytes",
                    request.length
                )));
            }
            let payload = sized(buffer, request.length as usize);
            reader
                .read_exact(payload)
                .map_err(Error::io("reading a write payload"))?;
        }
        Ok(Next::Request(request))
    }

    fn handle<W: Write>(
        &self,
        output: &Mutex<W>,
        request: &Request,
        buffer: &mut Vec<u8>,
    ) -> Result<()> {
        let mut reply = Reply::default();
        match request.kind {
            cmd::READ => self.read(&mut reply, request, buffer)?,
            cmd::BLOCK_STATUS => self.block_status(&mut reply, request)?,
            cmd::FLUSH => match self.export.flush() {
                Ok(()) => self.reply_error(&mut reply, request, 0, "")?,
                Err(why) => self.reply_error(&mut reply, request, why.errno, &why)?,
            },
            cmd::WRITE => {
                let payload = buffer.get(..request.length as usize).unwrap_or_default();
                self.write(&mut reply, request, Payload::Bytes(payload))?;
            }
            cmd::WRITE_ZEROES => self.write(&mut reply, request, Payload::Zeroes)?,
            cmd::TRIM => self.write(&mut reply, request, Payload::Trim)?,
            cmd::RESIZE => {
                self.reply_error(&mut reply, request, errno::EPERM, "the size is fixed")?
            }
            _ => self.reply_error(&mut reply, request, errno::EINVAL, "unknown command")?,
        }
        reply.send(output)
    }

    /// `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM`: `EPERM` on a read-only
    /// export, `ENOSPC` for a write past the end and `EINVAL` for a trim past it (proto.md
    /// "Error values").
    fn write(&self, reply: &mut Reply<'_>, request: &Request, payload: Payload<'_>) -> Result<()> {
        if !self.export.writable() {
            return self.reply_error(reply, request, errno::EPERM, "read-only export");
        }
        if let Some(why) = self.check_range(request, u32::MAX) {
            let past_end = why == PAST_END && !matches!(payload, Payload::Trim);
            let error = if past_end {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return self.reply_error(reply, request, error, why);
        }
        let fua = request.flags & cmd_flag::FUA != 0;
        match self
            .export
            .write(request.offset, u64::from(request.length), payload, fua)
        {
            Ok(()) => self.reply_error(reply, request, 0, ""),
            Err(why) => self.reply_error(reply, request, why.errno, &why),
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

    fn read<'d>(
        &self,
        reply: &mut Reply<'d>,
        request: &Request,
        buffer: &'d mut Vec<u8>,
    ) -> Result<()> {
        if let Some(why) = self.check_range(request, self.max_request) {
            return self.reply_error(reply, request, errno::EINVAL, why);
        }
        let data = sized(buffer, request.length as usize);
        let runs = match self.export.read(request.offset, data) {
            Ok(runs) => runs,
            Err(why) => return self.reply_error(reply, request, errno::EIO, &why),
        };
        let data: &'d [u8] = data;
        if !self.session.structured {
            proto::write_simple_reply(reply, 0, request.cookie)?;
            reply.data(data);
            return Ok(());
        }
        if request.flags & cmd_flag::DF != 0 {
            return data_chunk(reply, request.cookie, request.offset, data, true);
        }
        // Zero runs go out as holes, data runs as data.
        let last = runs.len().saturating_sub(1);
        for (i, run) in runs.into_iter().enumerate() {
            let (start, len) = (run.start, run.len);
            let done = i == last;
            if run.zero {
                let flags = if done { chunk::FLAG_DONE } else { 0 };
                proto::write_chunk_header(reply, flags, chunk::OFFSET_HOLE, request.cookie, 12)?;
                let mut payload = [0u8; 12];
                payload[..8].copy_from_slice(&start.to_be_bytes());
                // Within one request, so it fits the 32-bit length.
                payload[8..].copy_from_slice(&(len as u32).to_be_bytes());
                reply
                    .write_all(&payload)
                    .map_err(Error::io("sending a hole"))?;
            } else {
                let from = (start - request.offset) as usize;
                let part = data.get(from..from + len as usize).unwrap_or_default();
                data_chunk(reply, request.cookie, start, part, done)?;
            }
        }
        Ok(())
    }

    fn block_status(&self, reply: &mut Reply<'_>, request: &Request) -> Result<()> {
        if !self.session.structured || !self.session.base_allocation {
            return self.reply_error(reply, request, errno::EINVAL, "no metadata context");
        }
        if let Some(why) = self.check_range(request, u32::MAX) {
            return self.reply_error(reply, request, errno::EINVAL, why);
        }
        let one = request.flags & cmd_flag::REQ_ONE != 0;
        let limit = if one { 1 } else { MAX_DESCRIPTORS };
        let descriptors = match self
            .export
            .status(request.offset, u64::from(request.length), limit)
        {
            Ok(descriptors) => descriptors,
            Err(why) => return self.reply_error(reply, request, errno::EIO, &why),
        };
        let payload_len = 4 + 8 * descriptors.len();
        proto::write_chunk_header(
            reply,
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
        reply
            .write_all(&payload)
            .map_err(Error::io("sending block status"))
    }

    /// Replies with `error` (0 for success without data): a simple reply, or with structured
    /// replies for reads an error chunk carrying `message` (proto.md "Simple reply message").
    fn reply_error(
        &self,
        reply: &mut Reply<'_>,
        request: &Request,
        error: u32,
        message: &str,
    ) -> Result<()> {
        let structured_needed = self.session.structured
            && error != 0
            && matches!(request.kind, cmd::READ | cmd::BLOCK_STATUS);
        if !structured_needed {
            return proto::write_simple_reply(reply, error, request.cookie);
        }
        let message = message.get(..message.len().min(1024)).unwrap_or_default();
        let mut payload = Vec::with_capacity(6 + message.len());
        payload.extend_from_slice(&error.to_be_bytes());
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message.as_bytes());
        proto::write_chunk_header(
            reply,
            chunk::FLAG_DONE,
            chunk::ERROR,
            request.cookie,
            payload.len() as u32,
        )?;
        reply
            .write_all(&payload)
            .map_err(Error::io("sending an error"))
    }
}

/// Lets go of `buffer` when a request grew it past [`KEEP_BUFFER`].
fn settle(buffer: &mut Vec<u8>) {
    if buffer.capacity() > KEEP_BUFFER {
        *buffer = Vec::new();
    }
}

/// The first `len` bytes of `buffer`, grown to hold them if needed.
fn sized(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    buffer.get_mut(..len).unwrap_or_default()
}

/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `data` read at `offset`.
fn data_chunk<'d>(
    reply: &mut Reply<'d>,
    cookie: u64,
    offset: u64,
    data: &'d [u8],
    done: bool,
) -> Result<()> {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    // Reads are capped well below 4 GiB, so the length fits.
    proto::write_chunk_header(
        reply,
        flags,
        chunk::OFFSET_DATA,
        cookie,
        8 + data.len() as u32,
    )?;
    reply
        .write_all(&offset.to_be_bytes())
        .map_err(Error::io("sending read data"))?;
    reply.data(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_grown_past_the_kept_size_is_let_go_and_a_smaller_one_kept() {
        let mut copying = Vec::new();
        sized(&mut copying, 2 << 20);
        settle(&mut copying);
        assert!(copying.capacity() >= 2 << 20);
        let mut large = Vec::new();
        sized(&mut large, 32 << 20);
        settle(&mut large);
        assert_eq!(large.capacity(), 0);
    }
}
