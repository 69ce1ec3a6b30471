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
/// How long a reply may wait, once transmission started, for the client to take any of its
/// bytes. A client may idle between requests for as long as it likes, but one that asks and
/// never reads would otherwise hold its requests' buffers (up to four of the maximum block
/// size) and its threads for as long as it keeps the socket open.
const REPLY_DEADLINE: Duration = Duration::from_secs(120);
/// The first pause after an `accept` that failed for a reason that passes (the process out of
/// file descriptors, a connection reset while it waited); each further failure doubles it.
const ACCEPT_PAUSE_FIRST: Duration = Duration::from_millis(5);
/// The longest pause between two tries of a failing `accept`.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

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
    /// errors end only its own connection. An `accept` that fails for a reason that passes
    /// (no file descriptor or memory left for now, a connection aborted or reset while it
    /// waited, the network errors Linux hands on from a pending connection: accept(2)) is
    /// tried again after a pause that doubles up to a second, and a client thread that cannot
    /// be started drops that connection only; only a listener that cannot accept at all (not
    /// a listening socket) ends this call.
    ///
    /// Memory: each connection holds at most four requests' buffers (of up to the maximum
    /// block size) while they are served, and a reply the client does not take within two
    /// minutes ends its connection.
    pub fn serve(&self, listener: &TcpListener) -> Result<()> {
        let mut pause = Duration::ZERO;
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if accept_passes(&err) => {
                    pause = (pause * 2).clamp(ACCEPT_PAUSE_FIRST, ACCEPT_PAUSE_MAX);
                    std::thread::sleep(pause);
                    continue;
                }
                Err(err) => return Err(Error::io("accepting a client")(err)),
            };
            let server = self.clone();
            let started = std::thread::Builder::new()
                .name("strata-nbd-client".into())
                .spawn(move || {
                    // A failed connection concerns only that client.
                    let _ = server.serve_connection(stream);
                });
            // A thread that cannot be started (the process is out of threads or memory)
            // drops that connection, closed with the closure that held it.
            if started.is_err() {
                pause = (pause * 2).clamp(ACCEPT_PAUSE_FIRST, ACCEPT_PAUSE_MAX);
                std::thread::sleep(pause);
            } else {
                pause = Duration::ZERO;
            }
        }
    }

    /// Serves one connection to its end: `Ok` when the client disconnected cleanly, the
    /// reason otherwise. The handshake must be over within 30 s of the call, however the
    /// client spreads its bytes; transmission may then idle for as long as it likes.
    pub fn serve_connection(&self, stream: TcpStream) -> Result<()> {
        self.serve_connection_within(stream, HANDSHAKE_DEADLINE, REPLY_DEADLINE)
    }

    fn serve_connection_within(
        &self,
        stream: TcpStream,
        handshake: Duration,
        reply: Duration,
    ) -> Result<()> {
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
            reply,
            reply_deadline: None,
        };
        self.serve_session(reader, writer, |client| {
            client.deadline = None;
            handshaking.store(false, Ordering::SeqCst);
            client
                .stream
                .set_read_timeout(None)
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
/// reads them cannot hold its thread and client slot past the deadline either. In
/// transmission each reply (its writes up to the flush that ends it, [`Reply::send`]) must be
/// taken within `reply` of its first byte, however the client trickles its reads.
///
/// A write that fails shuts the socket down both ways, so the connection's other threads
/// (waiting to send their replies, or for the next request) end at once rather than each
/// waiting out its own deadline.
///
/// [`Reply::send`]: crate::reply::Reply::send
struct ReplyStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
    handshaking: &'a AtomicBool,
    reply: Duration,
    /// When the reply being written must be out (none between replies).
    reply_deadline: Option<Instant>,
}

impl ReplyStream<'_> {
    /// Sets the socket's write timeout to what is left of the current deadline.
    fn arm(&mut self) -> std::io::Result<()> {
        let deadline = if self.handshaking.load(Ordering::SeqCst) {
            self.deadline
        } else {
            *self
                .reply_deadline
                .get_or_insert_with(|| Instant::now() + self.reply)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not take its reply in time",
            ));
        }
        self.stream.set_write_timeout(Some(left))
    }

    /// `result`, with the socket shut down when it failed.
    fn ending<T>(&self, result: std::io::Result<T>) -> std::io::Result<T> {
        if result.is_err() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        result
    }
}

impl Write for ReplyStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.arm().and_then(|()| self.stream.write(buf));
        self.ending(written)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let written = self.arm().and_then(|()| self.stream.write_vectored(bufs));
        self.ending(written)
    }

    /// Ends a reply: the next write starts the next reply's deadline.
    fn flush(&mut self) -> std::io::Result<()> {
        self.reply_deadline = None;
        let flushed = self.stream.flush();
        self.ending(flushed)
    }
}

/// Whether a failed `accept` concerns that one try (or one pending connection) only, so the
/// listener is tried again.
fn accept_passes(err: &std::io::Error) -> bool {
    use rustix::io::Errno;
    use std::io::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::OutOfMemory
    ) {
        return true;
    }
    let Some(code) = err.raw_os_error() else {
        return false;
    };
    [
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOBUFS,
        Errno::NOMEM,
        Errno::PROTO,
        Errno::PERM,
        Errno::NETDOWN,
        Errno::NOPROTOOPT,
        Errno::HOSTDOWN,
        Errno::NONET,
        Errno::HOSTUNREACH,
        Errno::OPNOTSUPP,
        Errno::NETUNREACH,
    ]
    .iter()
    .any(|errno| errno.raw_os_error() == code)
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
            .serve_connection_within(stream, Duration::from_secs(1), REPLY_DEADLINE)
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

    /// A whole handshake (NBD_OPT_EXPORT_NAME of `disk`), then `reads` reads of the whole
    /// 1 MiB export.
    fn export_then_reads(reads: u64) -> Vec<u8> {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option(opt::EXPORT_NAME, b"disk"));
        for handle in 0..reads {
            bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            bytes.extend_from_slice(&0u16.to_be_bytes());
            bytes.extend_from_slice(&cmd::READ.to_be_bytes());
            bytes.extend_from_slice(&handle.to_be_bytes());
            bytes.extend_from_slice(&0u64.to_be_bytes());
            bytes.extend_from_slice(&(1u32 << 20).to_be_bytes());
        }
        bytes
    }

    /// Serves a client that sends `export_then_reads(reads)` into a socket whose receive
    /// buffer is tiny, then runs `then` on it, with a reply deadline of 1 s; asserts the
    /// connection ends in an I/O error within 3 s.
    fn ends_at_a_reply_deadline_of_one_second(
        reads: u64,
        then: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) {
        use rustix::net::sockopt;
        let dir = tempfile::tempdir().unwrap();
        let server = server(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            sockopt::set_socket_recv_buffer_size(&s, 1).unwrap();
            s.write_all(&export_then_reads(reads)).unwrap();
            then(&mut s);
        });
        let (stream, _) = listener.accept().unwrap();
        sockopt::set_socket_send_buffer_size(&stream, 1).unwrap();
        let started = Instant::now();
        let err = server
            .serve_connection_within(stream, Duration::from_secs(30), Duration::from_secs(1))
            .unwrap_err();
        let took = started.elapsed();
        // The reply that timed out, or another thread's once the socket was shut down.
        assert!(matches!(&err, Error::Io { .. }), "{err:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        client.join().unwrap();
    }

    #[test]
    fn a_client_that_never_reads_its_replies_ends_at_the_reply_deadline() {
        // 64 reads, none of the replies read, the socket held 6 s: without a reply deadline
        // the server waits for the client to go; without the shutdown each of the four
        // serving threads waits out its own deadline.
        ends_at_a_reply_deadline_of_one_second(64, |_| {
            std::thread::sleep(Duration::from_secs(6));
        });
    }

    #[test]
    fn a_client_trickling_its_reads_ends_at_the_reply_deadline() {
        use std::io::Read as _;
        // One read, then 100 bytes of the reply every 100 ms: each write of the server makes
        // progress well within a per-write timeout, for 6 s.
        ends_at_a_reply_deadline_of_one_second(1, |s| {
            let mut chunk = [0u8; 100];
            for _ in 0..60 {
                if matches!(s.read(&mut chunk), Ok(0) | Err(_)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }

    #[test]
    fn accept_failures_that_pass_are_told_from_a_broken_listener() {
        use rustix::io::Errno;
        for passing in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::CONNABORTED,
        ] {
            let err = std::io::Error::from_raw_os_error(passing.raw_os_error());
            assert!(accept_passes(&err), "{err}");
        }
        for broken in [Errno::BADF, Errno::NOTSOCK, Errno::INVAL] {
            let err = std::io::Error::from_raw_os_error(broken.raw_os_error());
            assert!(!accept_passes(&err), "{err}");
        }
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
