//! The transmission phase (proto.md "Transmission"): one thread reads requests in order,
//! a few workers answer them, and replies may go out of order (each reply whole, under the
//! writer's lock).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::export::{Export, Payload};
use crate::handshake::{BASE_ALLOCATION_ID, Negotiated};
use crate::proto::{self, Request, chunk, cmd, cmd_flag, errno};

/// Most block-status descriptors in one reply (proto.md lets a server send fewer than the
/// whole range needs); bounds the reply's memory.
const MAX_DESCRIPTORS: usize = 4096;
/// The message of a request past the end of the export.
const PAST_END: &str = "range past the end of the export";
/// Requests of one connection served at once. Clients such as qemu keep several requests in
/// flight; serving them in parallel overlaps storage latency (object storage above all)
/// and the copies. Memory per connection stays bounded by `WORKERS + 1` requests.
const WORKERS: usize = 4;

/// One connection's transmission state.
pub(crate) struct Transmission<'a> {
    pub export: &'a Export,
    pub session: Negotiated,
    pub max_request: u32,
}

/// A request handed to a worker, with its write payload if any.
struct Job {
    request: Request,
    payload: Vec<u8>,
}

/// The connection's writer as a worker sees it: locked at the first byte of a reply and
/// released when the reply is complete, so the work before it runs unlocked.
struct ReplyWriter<'a, 'w, W> {
    out: &'a Mutex<&'w mut W>,
    guard: Option<MutexGuard<'a, &'w mut W>>,
}

impl<W: Write> ReplyWriter<'_, '_, W> {
    fn writer(&mut self) -> &mut W {
        let out = self.out;
        self.guard
            .get_or_insert_with(|| out.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<W: Write> Write for ReplyWriter<'_, '_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.guard.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Transmission<'_> {
    /// Serves requests until the client disconnects (`Ok`) or breaks the protocol (`Err`).
    /// A writable export's overlay is flushed when the connection ends.
    pub fn run<W: Write + Send>(&self, reader: &mut impl Read, writer: &mut W) -> Result<()> {
        let out = Mutex::new(writer);
        let failed = AtomicBool::new(false);
        // A rendezvous channel: the reader waits for a free worker, so at most one request
        // beyond those being served is held.
        let (jobs, queue) = sync_channel::<Job>(0);
        let queue = Mutex::new(queue);
        let result = std::thread::scope(|scope| {
            let jobs = jobs;
            let workers: Vec<_> = (0..WORKERS)
                .map(|_| scope.spawn(|| self.work(&queue, &out, &failed)))
                .collect();
            let mut result = self.receive(reader, &jobs, &failed);
            drop(jobs);
            for worker in workers {
                let served = worker
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
        flushed.map_err(|what| Error::Overlay { what })
    }

    /// Reads requests (and write payloads) in order and hands them to the workers.
    fn receive(
        &self,
        reader: &mut impl Read,
        jobs: &SyncSender<Job>,
        failed: &AtomicBool,
    ) -> Result<()> {
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
            if request.kind == cmd::DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            if request.kind == cmd::WRITE {
                // The payload follows and must be consumed to stay in step; one larger than
                // the maximum block size cannot be skipped safely.
                if request.length > self.max_request {
                    return Err(Error::protocol(format!(
                        "write of {} bytes",
                        request.length
                    )));
                }
                payload.resize(request.length as usize, 0);
                reader
                    .read_exact(&mut payload)
                    .map_err(Error::io("reading a write payload"))?;
            }
            // A worker that could not send a reply has failed the connection.
            if jobs.send(Job { request, payload }).is_err() || failed.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// A worker: answers requests until the reader stops; after a failed reply it only
    /// drains the queue, so the reader is never left waiting.
    fn work<W: Write>(
        &self,
        queue: &Mutex<Receiver<Job>>,
        out: &Mutex<&mut W>,
        failed: &AtomicBool,
    ) -> Result<()> {
        // A read buffer per worker: it only grows (up to the maximum block size), and every
        // read overwrites the bytes it sends, so it is neither reallocated nor zeroed per
        // request.
        let mut buffer = Vec::new();
        let mut result = Ok(());
        loop {
            let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
            let Ok(job) = job else {
                return result;
            };
            if result.is_err() {
                continue;
            }
            let mut writer = ReplyWriter { out, guard: None };
            result = self
                .handle(&mut writer, &job, &mut buffer)
                .and_then(|()| writer.flush().map_err(Error::io("sending a reply")));
            if result.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
        }
    }

    fn handle(&self, writer: &mut impl Write, job: &Job, buffer: &mut Vec<u8>) -> Result<()> {
        let request = &job.request;
        match request.kind {
            cmd::READ => self.read(writer, request, buffer),
            cmd::BLOCK_STATUS => self.block_status(writer, request),
            cmd::FLUSH => match self.export.flush() {
                Ok(()) => self.reply_error(writer, request, 0, ""),
                Err(why) => self.reply_error(writer, request, errno::EIO, &why),
            },
            cmd::WRITE => self.write(writer, request, Payload::Bytes(&job.payload)),
            cmd::WRITE_ZEROES => self.write(writer, request, Payload::Zeroes),
            cmd::TRIM => self.write(writer, request, Payload::Trim),
            cmd::RESIZE => self.reply_error(writer, request, errno::EPERM, "the size is fixed"),
            _ => self.reply_error(writer, request, errno::EINVAL, "unknown command"),
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
