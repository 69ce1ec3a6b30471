//! Wire constants and framing of the NBD protocol (NetworkBlockDevice/nbd, `doc/proto.md`).
//!
//! Every integer is big-endian ("network byte order", proto.md "Conventions").

use std::io::{Read, Write};

use crate::error::{Error, Result};

/// `NBDMAGIC`, the first 8 bytes a server sends (proto.md "Newstyle negotiation").
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second server magic and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of a fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC` (proto.md "Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC` (proto.md "Simple reply message").
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC` (proto.md "Structured reply chunk message").
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE` (server) / `NBD_FLAG_C_FIXED_NEWSTYLE` (client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES` / `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Options (proto.md "Option types").
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission, no reply framing.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: soft disconnect.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: describe an export.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (proto.md "Option reply types"); errors have bit 31 set.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export of a list.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one piece of export information.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
}

/// `NBD_INFO_*` types sent in `NBD_REP_INFO` replies.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (proto.md "Transmission flags").
pub mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: writes may carry `NBD_CMD_FLAG_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: only with structured replies.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: connections see the same data.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Command types (proto.md "Request types").
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`: carries a payload.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
    /// `NBD_CMD_RESIZE`.
    pub const RESIZE: u16 = 8;
}

/// Command flags.
pub mod cmd_flag {
    /// `NBD_CMD_FLAG_FUA`: the write is durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: answer a read with one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one block-status descriptor is enough.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags (proto.md "Structured reply types").
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// `base:allocation` status flags (proto.md "Metadata contexts").
pub mod state {
    /// `NBD_STATE_HOLE`.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`.
    pub const ZERO: u32 = 1 << 1;
}

/// Error values carried by replies (proto.md "Error values").
pub mod errno {
    /// `EPERM`: the export is read-only.
    pub const EPERM: u32 = 1;
    /// `EIO`.
    pub const EIO: u32 = 5;
    /// `EINVAL`: bad offset, length or flags.
    pub const EINVAL: u32 = 22;
    /// `ENOSPC`: a write past the end of the export, or one the overlay's file system has no
    /// room for.
    pub const ENOSPC: u32 = 28;
}

/// The name of the one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A transmission request (proto.md "Request message"), payload not included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Size of a request on the wire.
    pub const LEN: usize = 28;

    /// Parses a request header; a wrong magic is a protocol violation.
    pub fn parse(bytes: &[u8; Self::LEN]) -> Result<Self> {
        let mut r = Fields(bytes);
        let magic = r.u32();
        if magic != REQUEST_MAGIC {
            return Err(Error::protocol(format!("request magic {magic:#x}")));
        }
        Ok(Self {
            flags: r.u16(),
            kind: r.u16(),
            cookie: r.u64(),
            offset: r.u64(),
            length: r.u32(),
        })
    }
}

/// Consumes big-endian fields from a byte slice; missing bytes read as zero, so callers check
/// lengths first (the request header has a fixed size).
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        let (head, tail) = self.0.split_at(n);
        out[..n].copy_from_slice(head);
        self.0 = tail;
        out
    }

    /// The next 16-bit field.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    /// The next 32-bit field.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    /// The next 64-bit field.
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

/// Reads exactly `N` bytes.
pub fn read_array<const N: usize>(r: &mut impl Read, op: &'static str) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf).map_err(Error::io(op))?;
    Ok(buf)
}

/// Writes a fixed-newstyle option reply (proto.md "Fixed newstyle negotiation").
pub fn write_option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| Error::protocol("option reply too long"))?;
    let mut head = [0u8; 20];
    head[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    head[8..12].copy_from_slice(&option.to_be_bytes());
    head[12..16].copy_from_slice(&kind.to_be_bytes());
    head[16..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)
        .map_err(Error::io("sending an option reply"))?;
    w.write_all(data)
        .map_err(Error::io("sending an option reply"))
}

/// Writes a simple reply header (its data, if any, follows).
pub fn write_simple_reply(w: &mut impl Write, error: u32, cookie: u64) -> Result<()> {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&error.to_be_bytes());
    head[8..].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&head).map_err(Error::io("sending a reply"))
}

/// Writes a structured reply chunk header; `len` bytes of payload must follow.
pub fn write_chunk_header(
    w: &mut impl Write,
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u32,
) -> Result<()> {
    let mut head = [0u8; 20];
    head[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    head[4..6].copy_from_slice(&flags.to_be_bytes());
    head[6..8].copy_from_slice(&kind.to_be_bytes());
    head[8..16].copy_from_slice(&cookie.to_be_bytes());
    head[16..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)
        .map_err(Error::io("sending a reply chunk"))
}
