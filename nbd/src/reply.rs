//! [`Reply`]: one transmission reply assembled in memory and sent with vectored writes, so
//! a reply's headers and its read data leave in one system call, and replies of requests
//! served at once never interleave (proto.md "Transmission": replies may come in any order,
//! but each is a unit on the wire).

use std::io::{self, IoSlice, Write};
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};

/// A piece of a reply: bytes it owns (headers, small payloads) or borrowed read data.
enum Part<'d> {
    Owned(Range<usize>),
    Data(&'d [u8]),
}

/// A reply being assembled. Headers and small payloads are written into it through its
/// [`Write`] impl; read data is borrowed with [`data`](Self::data), never copied.
#[derive(Default)]
pub(crate) struct Reply<'d> {
    bytes: Vec<u8>,
    parts: Vec<Part<'d>>,
}

impl<'d> Reply<'d> {
    /// Appends read data, sent as it is.
    pub fn data(&mut self, data: &'d [u8]) {
        if !data.is_empty() {
            self.parts.push(Part::Data(data));
        }
    }

    /// Sends the whole reply on `out`, holding its lock from the first byte to the last.
    pub fn send<W: Write>(&self, out: &Mutex<W>) -> Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .map(|part| {
                IoSlice::new(match part {
                    Part::Owned(range) => self.bytes.get(range.clone()).unwrap_or_default(),
                    Part::Data(data) => data,
                })
            })
            .collect();
        let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
        // The flush ends the reply: a writer with a deadline per reply starts the next one.
        write_all_vectored(&mut *out, &mut slices)
            .and_then(|()| out.flush())
            .map_err(Error::io("sending a reply"))
    }
}

impl Write for Reply<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(buf);
        let end = self.bytes.len();
        match self.parts.last_mut() {
            Some(Part::Owned(range)) if range.end == start => range.end = end,
            _ => self.parts.push(Part::Owned(start..end)),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every byte of `slices`, however the writer splits them (a socket may take part of
/// a long reply; the kernel takes at most `IOV_MAX` slices a call).
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes a call, of the first slice only, like a
    /// congested socket.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_send_every_byte_in_order() {
        let data: Vec<u8> = (0..=255).collect();
        let mut reply = Reply::default();
        reply.write_all(b"head").unwrap();
        reply.write_all(b"er").unwrap();
        reply.data(&data[..100]);
        reply.data(&[]);
        reply.write_all(b"mid").unwrap();
        reply.data(&data[100..]);
        let out = Mutex::new(Trickle {
            got: Vec::new(),
            step: 7,
        });
        reply.send(&out).unwrap();
        let mut want = b"header".to_vec();
        want.extend_from_slice(&data[..100]);
        want.extend_from_slice(b"mid");
        want.extend_from_slice(&data[100..]);
        assert_eq!(out.into_inner().unwrap().got, want);
        assert_eq!(reply.parts.len(), 4, "adjacent owned bytes share one slice");
    }

    #[test]
    fn a_writer_that_takes_nothing_is_an_error() {
        let mut reply = Reply::default();
        reply.write_all(b"x").unwrap();
        let out = Mutex::new(Trickle {
            got: Vec::new(),
            step: 0,
        });
        let err = reply.send(&out).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::WriteZero),
            "{err:?}"
        );
    }
}
