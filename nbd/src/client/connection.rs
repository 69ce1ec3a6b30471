//! One client connection: the fixed newstyle handshake and one request at a time, every
//! server reply checked before it is believed (proto.md "Handshake", "Transmission").

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{self, Fields, chunk, cmd, info, opt, rep, tflag};

/// Longest option reply accepted (strings are at most 4096 bytes, proto.md "Conventions").
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest error or unknown chunk payload accepted.
const MAX_SMALL_CHUNK: u32 = 64 * 1024;
/// Most block-status descriptors accepted in one reply (8 bytes each).
const MAX_DESCRIPTORS: u32 = 1 << 20;
/// Most chunks in one read reply; bounds the coverage bookkeeping.
const MAX_READ_CHUNKS: usize = 1 << 16;
/// How long the server may take to answer anything.
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    /// The id of `base:allocation`, when the server offers it.
    pub base_allocation: Option<u32>,
    /// Largest request the server takes (`NBD_INFO_BLOCK_SIZE`, else 32 MiB).
    pub max_request: u32,
}

/// One connection in transmission.
pub(crate) struct Connection {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    structured: bool,
    next_cookie: u64,
    pub negotiated: Negotiated,
}

impl Connection {
    /// Connects to `addr`, negotiates structured replies and `base:allocation` if the server
    /// has them, and enters transmission with `NBD_OPT_GO` on `export`.
    pub fn open(addr: &str, export: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr).map_err(Error::io("connecting to the server"))?;
        let setup = |s: &TcpStream| {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.set_write_timeout(Some(TIMEOUT))
        };
        setup(&stream).map_err(Error::io("configuring the socket"))?;
        let reader = BufReader::with_capacity(
            256 * 1024,
            stream
                .try_clone()
                .map_err(Error::io("configuring the socket"))?,
        );
        let mut conn = Self {
            reader,
            writer: BufWriter::new(stream),
            structured: false,
            next_cookie: 1,
            negotiated: Negotiated {
                size: 0,
                flags: 0,
                base_allocation: None,
                max_request: 32 << 20,
            },
        };
        conn.handshake(export)?;
        Ok(conn)
    }

    fn read_bytes(&mut self, buf: &mut [u8], op: &'static str) -> Result<()> {
        self.reader.read_exact(buf).map_err(Error::io(op))
    }

    fn handshake(&mut self, export: &str) -> Result<()> {
        let hello: [u8; 18] = proto::read_array(&mut self.reader, "reading the greeting")?;
        let mut f = Fields(&hello);
        let (magic, second, flags) = (f.u64(), f.u64(), f.u16());
        if magic != proto::NBD_MAGIC {
            return Err(Error::bad_server(format!("greeting magic {magic:#x}")));
        }
        if second != proto::IHAVEOPT {
            return Err(Error::bad_server(format!(
                "not a newstyle server (second magic {second:#x})"
            )));
        }
        if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::bad_server("server lacks fixed newstyle negotiation"));
        }
        let client_flags = u32::from(flags & (proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        self.send(&client_flags.to_be_bytes(), "sending client flags")?;

        let (kind, _) = self.option(opt::STRUCTURED_REPLY, &[])?;
        self.structured = kind == rep::ACK;
        if self.structured {
            self.set_meta_context(export)?;
        }
        let mut go = Vec::with_capacity(export.len() + 8);
        put_string32(&mut go, export);
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        self.send_option(opt::GO, &go)?;
        let mut got_export = false;
        loop {
            let (kind, data) = self.option_reply(opt::GO)?;
            match kind {
                rep::ACK => break,
                rep::INFO => got_export |= self.info(&data)?,
                k if k & (1 << 31) != 0 => {
                    return Err(Error::Refused {
                        op: format!("export {export:?}"),
                        code: k,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                k => return Err(Error::bad_server(format!("reply type {k} to NBD_OPT_GO"))),
            }
        }
        if !got_export {
            return Err(Error::bad_server(
                "NBD_OPT_GO acknowledged without export size",
            ));
        }
        Ok(())
    }

    /// Parses one `NBD_REP_INFO`; returns whether it was `NBD_INFO_EXPORT`.
    fn info(&mut self, data: &[u8]) -> Result<bool> {
        let mut f = Fields(data);
        match f.u16() {
            info::EXPORT if data.len() == 12 => {
                self.negotiated.size = f.u64();
                self.negotiated.flags = f.u16();
                Ok(true)
            }
            info::BLOCK_SIZE if data.len() == 14 => {
                let (_min, _preferred, max) = (f.u32(), f.u32(), f.u32());
                // Keep requests within what the server takes, and within our own cap.
                self.negotiated.max_request = max.clamp(4096, 32 << 20);
                Ok(false)
            }
            info::EXPORT | info::BLOCK_SIZE => Err(Error::bad_server(format!(
                "information reply of {} bytes",
                data.len()
            ))),
            _ => Ok(false),
        }
    }

    fn set_meta_context(&mut self, export: &str) -> Result<()> {
        let mut data = Vec::new();
        put_string32(&mut data, export);
        data.extend_from_slice(&1u32.to_be_bytes());
        put_string32(&mut data, proto::BASE_ALLOCATION);
        self.send_option(opt::SET_META_CONTEXT, &data)?;
        loop {
            let (kind, data) = self.option_reply(opt::SET_META_CONTEXT)?;
            match kind {
                rep::ACK => return Ok(()),
                rep::META_CONTEXT => {
                    let name = data.get(4..).unwrap_or_default();
                    if data.len() < 4 || name != proto::BASE_ALLOCATION.as_bytes() {
                        return Err(Error::bad_server("unrequested metadata context"));
                    }
                    self.negotiated.base_allocation = Some(Fields(&data).u32());
                }
                // The server has no such context: everything may hold data.
                k if k & (1 << 31) != 0 => return Ok(()),
                k => {
                    return Err(Error::bad_server(format!(
                        "reply type {k} to NBD_OPT_SET_META_CONTEXT"
                    )));
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8], op: &'static str) -> Result<()> {
        self.writer.write_all(bytes).map_err(Error::io(op))?;
        self.writer.flush().map_err(Error::io(op))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg, "sending an option")
    }

    /// Sends an option with a single reply and returns it.
    fn option(&mut self, option: u32, data: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.send_option(option, data)?;
        self.option_reply(option)
    }

    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let head: [u8; 20] = proto::read_array(&mut self.reader, "reading an option reply")?;
        let mut f = Fields(&head);
        let (magic, echoed, kind, len) = (f.u64(), f.u32(), f.u32(), f.u32());
        if magic != proto::OPTION_REPLY_MAGIC {
            return Err(Error::bad_server(format!("option reply magic {magic:#x}")));
        }
        if echoed != option {
            return Err(Error::bad_server(format!(
                "reply to option {echoed} while {option} was asked"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(Error::bad_server(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_bytes(&mut data, "reading an option reply")?;
        Ok((kind, data))
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut msg = [0u8; 28];
        msg[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        msg[6..8].copy_from_slice(&kind.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..].copy_from_slice(&length.to_be_bytes());
        self.send(&msg, "sending a request")?;
        Ok(cookie)
    }

    /// Reads the next reply header for `cookie`: a simple reply's error, or a chunk's
    /// (flags, type, payload length).
    fn reply_header(&mut self, cookie: u64) -> Result<Header> {
        let magic = u32::from_be_bytes(proto::read_array(&mut self.reader, "reading a reply")?);
        let (header, got) = match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let rest: [u8; 12] = proto::read_array(&mut self.reader, "reading a reply")?;
                let mut f = Fields(&rest);
                (Header::Simple { error: f.u32() }, f.u64())
            }
            proto::STRUCTURED_REPLY_MAGIC if self.structured => {
                let rest: [u8; 16] = proto::read_array(&mut self.reader, "reading a reply")?;
                let mut f = Fields(&rest);
                let (flags, kind, got, len) = (f.u16(), f.u16(), f.u64(), f.u32());
                (Header::Chunk { flags, kind, len }, got)
            }
            m => return Err(Error::bad_server(format!("reply magic {m:#x}"))),
        };
        if got != cookie {
            return Err(Error::bad_server(format!(
                "reply for unknown handle {got:#x} (expected {cookie:#x})"
            )));
        }
        Ok(header)
    }

    fn payload(&mut self, len: u32, cap: u32, what: &str) -> Result<Vec<u8>> {
        if len > cap {
            return Err(Error::bad_server(format!("{what} chunk of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_bytes(&mut data, "reading a reply chunk")?;
        Ok(data)
    }

    /// Reads `buf.len()` bytes at `offset` (at most `max_request`); returns how many bytes
    /// came as data (holes cost nothing on the wire).
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<u64> {
        let length = buf.len() as u32;
        let end = offset + u64::from(length);
        let cookie = self.request(cmd::READ, offset, length)?;
        let mut covered = Coverage::default();
        let mut failure = None;
        loop {
            match self.reply_header(cookie)? {
                Header::Simple { error } if error != 0 => {
                    return Err(refused("a read", error, String::new()));
                }
                Header::Simple { .. } if self.structured => {
                    return Err(Error::bad_server(
                        "simple reply with data to a structured read",
                    ));
                }
                Header::Simple { .. } => {
                    self.read_bytes(buf, "reading data")?;
                    return Ok(u64::from(length));
                }
                Header::Chunk { flags, kind, len } => {
                    match kind {
                        chunk::OFFSET_DATA => {
                            let at: [u8; 8] = proto::read_array(&mut self.reader, "reading data")?;
                            let start = u64::from_be_bytes(at);
                            let n = len.checked_sub(8).ok_or_else(|| {
                                Error::bad_server(format!("data chunk of {len} bytes"))
                            })?;
                            let part = covered.claim(buf, offset, end, start, u64::from(n))?;
                            self.read_bytes(part, "reading data")?;
                        }
                        chunk::OFFSET_HOLE => {
                            let p = self.payload(len, 12, "hole")?;
                            let mut f = Fields(&p);
                            let (start, n) = (f.u64(), f.u32());
                            if p.len() != 12 {
                                return Err(Error::bad_server(format!(
                                    "hole chunk of {len} bytes"
                                )));
                            }
                            covered
                                .claim(buf, offset, end, start, u64::from(n))?
                                .fill(0);
                            covered.holes += u64::from(n);
                        }
                        chunk::NONE if len == 0 && flags & chunk::FLAG_DONE != 0 => {}
                        k if k & (1 << 15) != 0 => {
                            let p = self.payload(len, MAX_SMALL_CHUNK, "error")?;
                            failure = Some(chunk_error(&p, "a read"));
                        }
                        k => {
                            return Err(Error::bad_server(format!(
                                "chunk type {k} in a read reply"
                            )));
                        }
                    }
                    if flags & chunk::FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if covered.bytes != u64::from(length) {
            return Err(Error::bad_server(format!(
                "read reply covered {} of {length} bytes",
                covered.bytes
            )));
        }
        Ok(covered.bytes - covered.holes)
    }

    /// `base:allocation` descriptors (length, flags) from `offset` for up to `length` bytes;
    /// they may cover less, never more than the request or the export.
    ///
    /// A successful reply has exactly one status chunk per negotiated context, and only the
    /// last descriptor may run past the request (proto.md `NBD_REPLY_TYPE_BLOCK_STATUS`): a
    /// second chunk is refused before its payload is read, so one reply costs at most one
    /// chunk of [`MAX_DESCRIPTORS`], and the last descriptor is cut at the request's end.
    pub fn block_status(&mut self, offset: u64, length: u32) -> Result<Vec<(u64, u32)>> {
        let Some(context) = self.negotiated.base_allocation else {
            return Ok(vec![(u64::from(length), 0)]);
        };
        let cookie = self.request(cmd::BLOCK_STATUS, offset, length)?;
        let end = offset
            .saturating_add(u64::from(length))
            .min(self.negotiated.size);
        let mut descriptors = Vec::new();
        let mut failure = None;
        loop {
            match self.reply_header(cookie)? {
                Header::Simple { error } if error != 0 => {
                    return Err(refused("block status", error, String::new()));
                }
                Header::Simple { .. } => {
                    return Err(Error::bad_server("simple success reply to block status"));
                }
                Header::Chunk { flags, kind, len } => {
                    match kind {
                        chunk::BLOCK_STATUS if !descriptors.is_empty() => {
                            return Err(Error::bad_server(
                                "a second block status chunk in one reply (one per context)",
                            ));
                        }
                        chunk::BLOCK_STATUS => {
                            let p = self.payload(len, 4 + 8 * MAX_DESCRIPTORS, "block status")?;
                            if p.len() < 12 || (p.len() - 4) % 8 != 0 {
                                return Err(Error::bad_server(format!(
                                    "block status chunk of {len} bytes"
                                )));
                            }
                            let mut f = Fields(&p);
                            let id = f.u32();
                            if id != context {
                                return Err(Error::bad_server(format!(
                                    "block status for unknown context {id}"
                                )));
                            }
                            let mut pos = offset;
                            for _ in 0..(p.len() - 4) / 8 {
                                let (n, state) = (u64::from(f.u32()), f.u32());
                                if n == 0 {
                                    return Err(Error::bad_server("empty block status extent"));
                                }
                                if pos >= end {
                                    return Err(Error::bad_server(
                                        "block status past the request or the export",
                                    ));
                                }
                                let n = n.min(end - pos);
                                descriptors.push((n, state));
                                pos += n;
                            }
                        }
                        chunk::NONE if len == 0 && flags & chunk::FLAG_DONE != 0 => {}
                        k if k & (1 << 15) != 0 => {
                            let p = self.payload(len, MAX_SMALL_CHUNK, "error")?;
                            failure = Some(chunk_error(&p, "block status"));
                        }
                        k => {
                            return Err(Error::bad_server(format!(
                                "chunk type {k} in a block status reply"
                            )));
                        }
                    }
                    if flags & chunk::FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if descriptors.is_empty() {
            return Err(Error::bad_server("block status without extents"));
        }
        Ok(descriptors)
    }

    /// Ends the session politely (`NBD_CMD_DISC`); errors are moot at that point.
    pub fn disconnect(&mut self) {
        let _ = self.request(cmd::DISC, 0, 0);
    }

    /// Whether the server said all connections see the same data.
    pub fn multi_conn(&self) -> bool {
        self.negotiated.flags & tflag::CAN_MULTI_CONN != 0
    }
}

enum Header {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, len: u32 },
}

/// Which parts of a read were answered; chunks must stay inside the request and not overlap
/// (proto.md "Structured reply types").
#[derive(Default)]
struct Coverage {
    /// Answered ranges, sorted by start.
    ranges: Vec<(u64, u64)>,
    bytes: u64,
    holes: u64,
}

impl Coverage {
    /// Checks the chunk `start..start + n` and returns where its bytes go in `buf`.
    fn claim<'b>(
        &mut self,
        buf: &'b mut [u8],
        offset: u64,
        end: u64,
        start: u64,
        n: u64,
    ) -> Result<&'b mut [u8]> {
        let chunk_end = start.saturating_add(n);
        if n == 0 || start < offset || chunk_end > end {
            return Err(Error::bad_server(format!(
                "chunk {start:#x}+{n:#x} past the request {offset:#x}..{end:#x}"
            )));
        }
        let i = self.ranges.partition_point(|r| r.0 < start);
        let overlaps_before = i > 0 && self.ranges.get(i - 1).is_some_and(|r| r.1 > start);
        let overlaps_after = self.ranges.get(i).is_some_and(|r| r.0 < chunk_end);
        if overlaps_before || overlaps_after {
            return Err(Error::bad_server(format!(
                "overlapping chunk at {start:#x}"
            )));
        }
        if self.ranges.len() >= MAX_READ_CHUNKS {
            return Err(Error::bad_server("too many chunks in one read reply"));
        }
        self.ranges.insert(i, (start, chunk_end));
        self.bytes += n;
        let from = (start - offset) as usize;
        buf.get_mut(from..from + n as usize)
            .ok_or_else(|| Error::bad_server("chunk outside the buffer"))
    }
}

fn refused(op: &str, code: u32, message: String) -> Error {
    Error::Refused {
        op: op.to_owned(),
        code,
        message,
    }
}

/// An error chunk's payload: error value, message length, message (proto.md
/// `NBD_REPLY_TYPE_ERROR`).
fn chunk_error(payload: &[u8], op: &str) -> Error {
    let mut f = Fields(payload);
    let code = f.u32();
    let len = usize::from(f.u16());
    let message = payload.get(6..6 + len).unwrap_or_default();
    refused(op, code, String::from_utf8_lossy(message).into_owned())
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
