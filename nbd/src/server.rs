//! [`Server`]: accepts connections and serves each on its own thread.

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
/// How long a client may take for each handshake step.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// reason otherwise.
    pub fn serve_connection(&self, stream: TcpStream) -> Result<()> {
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
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(Error::io("configuring the socket"))?;
        let mut reader = BufReader::new(
            stream
                .try_clone()
                .map_err(Error::io("configuring the socket"))?,
        );
        let mut writer = BufWriter::new(&stream);
        let Some(session) = handshake::handshake(&mut reader, &mut writer, &inner.info)? else {
            return Ok(());
        };
        // The handshake flushed its replies; transmission replies go out whole with
        // vectored writes, so they need no buffer.
        drop(writer);
        stream
            .set_read_timeout(None)
            .map_err(Error::io("configuring the socket"))?;
        Transmission {
            export: &inner.export,
            session,
            max_request: inner.info.max_request,
        }
        .run(reader, &stream)
    }
}

/// Gives a client's slot back when its connection ends.
struct ClientSlot<'a>(&'a AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
