//! [`Server`]: accepts connections and serves each on its own thread.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use strata_qcow2::Image;

use crate::error::{Error, Result};
use crate::export::Export;
use crate::handshake::{self, ExportInfo};
use crate::overlay::Overlay;
use crate::transmission::Transmission;

/// Largest read a client may ask for (32 MiB, advertised as the maximum block size).
pub const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Clients served at once by default.
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// How long a client may take for its whole handshake, from connecting to `NBD_OPT_GO`.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);

/// An NBD server of one export (a QCOW2 chain, or a raw image) under one name: read-only, or
/// copy-on-write over an [`Overlay`].
///
/// Cheap to clone: clones share the image and the client count.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    export: Export,
    info: ExportInfo,
    max_clients: usize,
    clients: AtomicUsize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.inner.info.name)
            .field("size", &self.inner.info.size)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server of `image` under the export name `name` (at most 4096 bytes, as NBD strings
    /// are; proto.md "Conventions").
    pub fn new(name: impl Into<String>, image: Image) -> Result<Self> {
        Self::with_limits(name, image, DEFAULT_MAX_REQUEST, DEFAULT_MAX_CLIENTS)
    }

    /// A copy-on-write server: clients may write, and their writes go to `overlay`, never to
    /// `image`. The overlay must have been opened for the image's size.
    pub fn with_overlay(name: impl Into<String>, image: Image, overlay: Overlay) -> Result<Self> {
        Self::build(
            name.into(),
            image,
            Some(overlay),
            DEFAULT_MAX_REQUEST,
            DEFAULT_MAX_CLIENTS,
        )
    }

    /// Like [`new`](Self::new) with explicit limits: the largest read in bytes and the number
    /// of clients served at once.
    pub fn with_limits(
        name: impl Into<String>,
        image: Image,
        max_request: u32,
        max_clients: usize,
    ) -> Result<Self> {
        Self::build(name.into(), image, None, max_request, max_clients)
    }

    fn build(
        name: String,
        image: Image,
        overlay: Option<Overlay>,
        max_request: u32,
        max_clients: usize,
    ) -> Result<Self> {
        if let Some(overlay) = overlay
            .as_ref()
            .filter(|o| o.size() != image.virtual_size())
        {
            return Err(Error::OverlayMismatch {
                path: overlay.path().to_path_buf(),
                recorded: format!("an export of {} bytes", overlay.size()),
                wanted: format!("an export of {} bytes", image.virtual_size()),
            });
        }
        if name.len() > 4096 || name.contains('\0') {
            return Err(Error::InvalidName { name });
        }
        let info = ExportInfo {
            name,
            size: image.virtual_size(),
            max_request: max_request.max(4096),
            writable: overlay.is_some(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                export: Export { image, overlay },
                info,
                max_clients,
                clients: AtomicUsize::new(0),
            }),
        })
    }

    /// The export name.
    pub fn export_name(&self) -> &str {
        &self.inner.info.name
    }

    /// Accepts connections on `listener` forever, each served on its own thread. A client's
    /// errors end only its own connection; only a failing listener ends this call.
    pub fn serve(&self, listener: &TcpListener) -> Result<()> {
        loop {
            let (stream, _) = listener.accept().map_err(Error::io("accepting a client"))?;
            let server = self.clone();
            std::thread::Builder::new()
                .name("strata-nbd-client".into())
                .spawn(move || {
                    // A failed connection concerns only that client.
                    let _ = server.serve_connection(stream);
                })
                .map_err(Error::io("starting a client thread"))?;
        }
    }

    /// Serves one connection to its end: `Ok` when the client disconnected cleanly, the
    /// reason otherwise. The handshake must be over within 30 s of the call, however the
    /// client spreads its bytes; transmission may then idle for as long as it likes.
    pub fn serve_connection(&self, stream: TcpStream) -> Result<()> {
        self.serve_connection_within(stream, HANDSHAKE_DEADLINE)
    }

    fn serve_connection_within(&self, stream: TcpStream, handshake: Duration) -> Result<()> {
        let inner = &self.inner;
        let previous = inner.clients.fetch_add(1, Ordering::SeqCst);
        let _slot = ClientSlot(&inner.clients);
        if previous >= inner.max_clients {
            return Err(Error::TooManyClients {
                limit: inner.max_clients,
            });
        }
        stream
            .set_nodelay(true)
            .map_err(Error::io("configuring the socket"))?;
        let deadline = Instant::now() + handshake;
        let reader = BufReader::new(ClientStream {
            stream: stream
                .try_clone()
                .map_err(Error::io("configuring the socket"))?,
            deadline: Some(deadline),
        });
        let handshaking = AtomicBool::new(true);
        let writer = ReplyStream {
            stream: &stream,
            deadline,
            handshaking: &handshaking,
        };
        self.serve_session(reader, writer, |client| {
            client.deadline = None;
            handshaking.store(false, Ordering::SeqCst);
            client
                .stream
                .set_read_timeout(None)
                .and_then(|()| client.stream.set_write_timeout(None))
                .map_err(Error::io("configuring the socket"))
        })
    }

    /// Serves one connection whose client bytes come from `reader` and whose replies go to
    /// `writer` (a Unix socket, a pipe pair, an in-memory stream): the handshake, then
    /// transmission, to its end, as [`serve_connection`](Self::serve_connection) does. Unlike
    /// that, it sets no timeout (the caller owns the streams) and does not count against the
    /// client limit. `Ok` when the client disconnected cleanly, the reason otherwise.
    pub fn serve_stream<R: Read + Send, W: Write + Send>(
        &self,
        reader: R,
        writer: W,
    ) -> Result<()> {
        self.serve_session(BufReader::new(reader), writer, |_| Ok(()))
    }

    /// The handshake on `reader` and `writer`, then `between` on the reader's stream, then
    /// transmission.
    fn serve_session<R: Read + Send, W: Write + Send>(
        &self,
        mut reader: BufReader<R>,
        mut writer: W,
        between: impl FnOnce(&mut R) -> Result<()>,
    ) -> Result<()> {
        let inner = &self.inner;
        let negotiated = {
            let mut buffered = BufWriter::new(&mut writer);
            handshake::handshake(&mut reader, &mut buffered, &inner.info)?
        };
        let Some(session) = negotiated else {
            return Ok(());
        };
        // The handshake flushed its replies; transmission replies go out whole with
        // vectored writes, so they need no buffer.
        between(reader.get_mut())?;
        Transmission {
            export: &inner.export,
            session,
            max_request: inner.info.max_request,
        }
        .run(reader, writer)
    }
}

/// A client's socket, read against a deadline while it has one: each read waits at most for
/// the time left, so a client trickling a byte now and then cannot keep its handshake alive
/// past the deadline, as a per-read timeout would let it.
struct ClientStream {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the handshake took longer than its deadline",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// The replies to a client, written against the handshake's deadline until it is over: each
/// write waits at most for the time left, so a client that asks for many replies and never
/// reads them cannot hold its thread and client slot past the deadline either.
struct ReplyStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    handshaking: &'a AtomicBool,
}

impl Write for ReplyStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.handshaking.load(Ordering::SeqCst) {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the handshake took longer than its deadline",
                ));
            }
            self.stream.set_write_timeout(Some(left))?;
        }
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        if self.handshaking.load(Ordering::SeqCst) {
            return self.write(bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b));
        }
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Gives a client's slot back when its connection ends.
struct ClientSlot<'a>(&'a AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC, cmd, opt, rep};

    /// A server of a 1 MiB image of zeros.
    fn server(dir: &tempfile::TempDir) -> Server {
        let path = dir.path().join("disk.qcow2");
        let sink = strata_qcow2::FileSink::create(&path).unwrap();
        let writer =
            strata_qcow2::Writer::new(sink, &strata_qcow2::WriterOptions::default(), 1 << 20)
                .unwrap();
        writer.finish().unwrap();
        Server::new("disk", Image::open(&path).unwrap()).unwrap()
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_stream_gets_the_handshake_and_transmission() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(&dir);
        // No-zeroes client flags, NBD_OPT_EXPORT_NAME, one read of 16 bytes, NBD_CMD_DISC.
        let mut client = 3u32.to_be_bytes().to_vec();
        client.extend_from_slice(&option(opt::EXPORT_NAME, b"disk"));
        for (kind, length) in [(cmd::READ, 16u32), (cmd::DISC, 0)] {
            client.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            client.extend_from_slice(&0u16.to_be_bytes());
            client.extend_from_slice(&kind.to_be_bytes());
            client.extend_from_slice(&7u64.to_be_bytes());
            client.extend_from_slice(&0u64.to_be_bytes());
            client.extend_from_slice(&length.to_be_bytes());
        }
        let mut out = Vec::new();
        server.serve_stream(client.as_slice(), &mut out).unwrap();
        assert_eq!(out[..8], NBD_MAGIC.to_be_bytes());
        // Greeting (18), size and flags (10), a simple reply (16) and its 16 bytes of data.
        assert_eq!(out.len(), 18 + 10 + 16 + 16);
        assert_eq!(out[18..26], (1u64 << 20).to_be_bytes());
        assert_eq!(out[28..32], crate::proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(out[44..], [0u8; 16]);
    }

    /// Serves `stream` with a handshake deadline of 1 s and asserts it ends timed out, in time.
    fn ends_at_a_deadline_of_one_second(server: &Server, stream: TcpStream) {
        let started = Instant::now();
        let err = server
            .serve_connection_within(stream, Duration::from_secs(1))
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, Error::Io { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{err:?}"
        );
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn a_handshake_trickled_a_byte_at_a_time_ends_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Client flags, then an NBD_OPT_INFO of 1000 bytes, one byte every 100 ms (each read
        // well inside the deadline), then silence with the socket held open.
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut bytes = 1u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&option(opt::INFO, &[0; 1000]));
            for byte in bytes.iter().take(30) {
                if s.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(2));
        });
        let (stream, _) = listener.accept().unwrap();
        // A per-read timeout of 1 s would last the 3 s of trickling and 1 s more.
        ends_at_a_deadline_of_one_second(&server, stream);
        client.join().unwrap();
    }

    #[test]
    fn a_client_that_never_reads_its_handshake_replies_ends_at_the_deadline() {
        use rustix::net::sockopt;
        let dir = tempfile::tempdir().unwrap();
        let server = server(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Client flags and NBD_OPT_INFO of export `disk`, each asking for its name 7000 times
        // (180 KB of replies for 14 KB), into a socket whose receive buffer is tiny and never
        // read; the client gives up writing after 3 s and leaves 3 s later.
        let client = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            sockopt::set_socket_recv_buffer_size(&s, 1).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut data = b"\0\0\0\x04disk".to_vec();
            data.extend_from_slice(&7000u16.to_be_bytes());
            for _ in 0..7000 {
                data.extend_from_slice(&1u16.to_be_bytes());
            }
            let mut bytes = 1u32.to_be_bytes().to_vec();
            for _ in 0..8 {
                bytes.extend_from_slice(&option(opt::INFO, &data));
            }
            let _ = (&s).write_all(&bytes);
            std::thread::sleep(Duration::from_secs(3));
        });
        let (stream, _) = listener.accept().unwrap();
        sockopt::set_socket_send_buffer_size(&stream, 1).unwrap();
        // Without a write deadline the thread waits for the client to go, after 3 s.
        ends_at_a_deadline_of_one_second(&server, stream);
        client.join().unwrap();
    }

    #[test]
    fn a_stream_that_aborts_ends_cleanly_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(&dir);
        let mut client = 1u32.to_be_bytes().to_vec();
        client.extend_from_slice(&option(opt::ABORT, &[]));
        let mut out = Vec::new();
        server.serve_stream(client.as_slice(), &mut out).unwrap();
        assert_eq!(out[18..26], OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(out[30..34], rep::ACK.to_be_bytes());
        let err = server
            .serve_stream(&[0u8, 0, 0, 1, 1, 2, 3][..], std::io::sink())
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }
}
