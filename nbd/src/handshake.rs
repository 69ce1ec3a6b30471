//! The fixed newstyle handshake and option haggling (proto.md "Handshake", "Option types").

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::proto::{self, Fields, info, opt, rep, tflag};

/// Longest option payload accepted; strings are at most 4096 bytes (proto.md "Conventions"),
/// so anything longer is hostile and ends the connection.
const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Options a client may send before it must choose an export.
const MAX_OPTIONS: usize = 256;
/// Metadata context id of `base:allocation` on this server.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the server says about its export during the handshake.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub max_request: u32,
    /// Copy-on-write mode: writes accepted.
    pub writable: bool,
}

impl ExportInfo {
    /// Whether a client's export name selects this export (the empty name is the default).
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What the client negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was accepted.
    pub structured: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    pub base_allocation: bool,
}

impl Negotiated {
    /// Transmission flags for this session (proto.md "Transmission flags"): read-only, or
    /// writes, write-zeroes, trim and FUA in copy-on-write mode; flush accepted; `DF` only
    /// with structured replies. Every connection sees the same data, overlay included, so
    /// `CAN_MULTI_CONN` holds in both modes.
    pub fn transmission_flags(self, writable: bool) -> u16 {
        let mut flags = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN;
        flags |= if writable {
            tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES
        } else {
            tflag::READ_ONLY
        };
        if self.structured {
            flags |= tflag::SEND_DF;
        }
        flags
    }
}

/// Runs the handshake; `Ok(None)` when the client ended it (`NBD_OPT_ABORT`).
pub(crate) fn handshake(
    reader: &mut impl Read,
    writer: &mut impl Write,
    export: &ExportInfo,
) -> Result<Option<Negotiated>> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello[16..]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    writer
        .write_all(&hello)
        .map_err(Error::io("sending the greeting"))?;
    writer.flush().map_err(Error::io("sending the greeting"))?;

    let client_flags = u32::from_be_bytes(proto::read_array(reader, "reading client flags")?);
    let known = u32::from(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    if client_flags & !known != 0 {
        return Err(Error::protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(proto::FLAG_NO_ZEROES) != 0;

    let mut session = Negotiated::default();
    for _ in 0..MAX_OPTIONS {
        let head: [u8; 16] = proto::read_array(reader, "reading an option")?;
        let mut fields = Fields(&head);
        let magic = fields.u64();
        if magic != proto::IHAVEOPT {
            return Err(Error::protocol(format!("option magic {magic:#x}")));
        }
        let option = fields.u32();
        let len = fields.u32();
        if len > MAX_OPTION_LEN {
            return Err(Error::protocol(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        reader
            .read_exact(&mut data)
            .map_err(Error::io("reading option data"))?;

        match option {
            opt::EXPORT_NAME => {
                if !export.matches(&data) {
                    return Err(Error::UnknownExport {
                        name: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.size.to_be_bytes());
                reply.extend_from_slice(&session.transmission_flags(export.writable).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                writer
                    .write_all(&reply)
                    .map_err(Error::io("sending export info"))?;
                writer.flush().map_err(Error::io("sending export info"))?;
                return Ok(Some(session));
            }
            opt::ABORT => {
                proto::write_option_reply(writer, option, rep::ACK, &[])?;
                writer.flush().map_err(Error::io("acknowledging abort"))?;
                return Ok(None);
            }
            opt::LIST => {
                if data.is_empty() {
                    let mut server = Vec::new();
                    put_string32(&mut server, &export.name);
                    proto::write_option_reply(writer, option, rep::SERVER, &server)?;
                    proto::write_option_reply(writer, option, rep::ACK, &[])?;
                } else {
                    refuse(
                        writer,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )?;
                }
            }
            opt::INFO | opt::GO => {
                if info_or_go(writer, option, &data, export, session)? {
                    writer.flush().map_err(Error::io("sending export info"))?;
                    return Ok(Some(session));
                }
            }
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    session.structured = true;
                    proto::write_option_reply(writer, option, rep::ACK, &[])?;
                } else {
                    refuse(writer, option, rep::ERR_INVALID, "option takes no data")?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(writer, option, &data, export, &mut session)?;
            }
            _ => refuse(writer, option, rep::ERR_UNSUP, "option not supported")?,
        }
        writer
            .flush()
            .map_err(Error::io("sending an option reply"))?;
    }
    Err(Error::protocol(format!("more than {MAX_OPTIONS} options")))
}

/// Answers `NBD_OPT_INFO` / `NBD_OPT_GO`; returns whether transmission begins.
///
/// Data: 32-bit name length, name, 16-bit count of info requests, 16-bit requests.
fn info_or_go(
    writer: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    session: Negotiated,
) -> Result<bool> {
    let Some((name, rest)) = split_string32(data) else {
        refuse(writer, option, rep::ERR_INVALID, "bad export name")?;
        return Ok(false);
    };
    let mut fields = Fields(rest);
    let count = usize::from(fields.u16());
    let requests = rest.get(2..).unwrap_or_default();
    if rest.len() < 2 || requests.len() != count * 2 {
        refuse(
            writer,
            option,
            rep::ERR_INVALID,
            "bad information request list",
        )?;
        return Ok(false);
    }
    if !export.matches(name) {
        refuse(writer, option, rep::ERR_UNKNOWN, "no such export")?;
        return Ok(false);
    }
    let mut export_info = Vec::with_capacity(12);
    export_info.extend_from_slice(&info::EXPORT.to_be_bytes());
    export_info.extend_from_slice(&export.size.to_be_bytes());
    export_info.extend_from_slice(&session.transmission_flags(export.writable).to_be_bytes());
    proto::write_option_reply(writer, option, rep::INFO, &export_info)?;
    for request in requests.chunks_exact(2) {
        match u16::from_be_bytes([request[0], request[1]]) {
            info::NAME => {
                let mut reply = info::NAME.to_be_bytes().to_vec();
                reply.extend_from_slice(export.name.as_bytes());
                proto::write_option_reply(writer, option, rep::INFO, &reply)?;
            }
            info::BLOCK_SIZE => {
                let mut reply = info::BLOCK_SIZE.to_be_bytes().to_vec();
                for size in [1u32, 4096, export.max_request] {
                    reply.extend_from_slice(&size.to_be_bytes());
                }
                proto::write_option_reply(writer, option, rep::INFO, &reply)?;
            }
            _ => {}
        }
    }
    proto::write_option_reply(writer, option, rep::ACK, &[])?;
    Ok(option == opt::GO)
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
///
/// Data: 32-bit export name length, name, 32-bit query count, then each query as a 32-bit
/// length and a string. Only `base:allocation` exists; the query `base:` lists it too.
fn meta_context(
    writer: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &ExportInfo,
    session: &mut Negotiated,
) -> Result<()> {
    if !session.structured {
        return refuse(writer, option, rep::ERR_INVALID, "structured replies first");
    }
    let Some((name, mut rest)) = split_string32(data) else {
        return refuse(writer, option, rep::ERR_INVALID, "bad export name");
    };
    if rest.len() < 4 {
        return refuse(writer, option, rep::ERR_INVALID, "missing query count");
    }
    let count = Fields(rest).u32();
    rest = rest.get(4..).unwrap_or_default();
    let mut queries = Vec::new();
    for _ in 0..count {
        let Some((query, tail)) = split_string32(rest) else {
            return refuse(writer, option, rep::ERR_INVALID, "bad query");
        };
        queries.push(query);
        rest = tail;
    }
    if !rest.is_empty() {
        return refuse(writer, option, rep::ERR_INVALID, "trailing bytes");
    }
    if !export.matches(name) {
        return refuse(writer, option, rep::ERR_UNKNOWN, "no such export");
    }
    let listing = option == opt::LIST_META_CONTEXT;
    let selected = queries
        .iter()
        .any(|q| *q == proto::BASE_ALLOCATION.as_bytes() || (listing && *q == b"base:".as_slice()))
        || (listing && queries.is_empty());
    if !listing {
        session.base_allocation = selected;
    }
    if selected {
        let mut reply = if listing { 0 } else { BASE_ALLOCATION_ID }
            .to_be_bytes()
            .to_vec();
        reply.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        proto::write_option_reply(writer, option, rep::META_CONTEXT, &reply)?;
    }
    proto::write_option_reply(writer, option, rep::ACK, &[])
}

/// Sends an error reply with a message for people.
fn refuse(writer: &mut impl Write, option: u32, kind: u32, message: &str) -> Result<()> {
    proto::write_option_reply(writer, option, kind, message.as_bytes())
}

/// Splits a 32-bit length-prefixed string off the front of `data`.
fn split_string32(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(Fields(data.get(..4)?).u32()).ok()?;
    let rest = data.get(4..)?;
    if len > rest.len() {
        return None;
    }
    Some(rest.split_at(len))
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    // Export names are capped at 4096 bytes when the server is built.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
