//! Byte sources and sinks under the QCOW2 layer.
//!
//! The reader pulls bytes through [`ReadAt`], a positional, shared-reference read, so several
//! threads can read one image at once and a later crate can serve bytes straight from object
//! storage. Backing files and external data files are opened by name through [`Storage`], which
//! is how a chain is followed on a local folder, an NFS mount or a bucket alike.
//!
//! The writer pushes bytes into an [`ImageSink`]: one pass, in ascending file order, with the
//! header area handed over last so an interrupted write never leaves a valid-looking image.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

/// Positional reads from an immutable byte source (a file, an object, a buffer).
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`; fails with [`io::ErrorKind::UnexpectedEof`]
    /// when the source ends before `buf` is full.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The source's length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the source holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A hint that `len` bytes at `offset` will be read soon: a source with latency (an
    /// object store) may start fetching them; the default does nothing.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report a zero length in their metadata; their size is where a seek to
        // the end lands.
        use std::io::Seek;
        let mut handle = self.try_clone()?;
        handle.seek(io::SeekFrom::End(0))
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let bytes = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn prefetch(&self, offset: u64, len: u64) {
        (**self).prefetch(offset, len);
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn prefetch(&self, offset: u64, len: u64) {
        (**self).prefetch(offset, len);
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the source",
    )
}

/// Opens byte sources by name: the top image, its backing files, external data files.
///
/// Names are `/`-separated paths as the reader resolved them (already joined with the folder of
/// the image that names them and checked against the [`BackingPolicy`](crate::BackingPolicy)).
pub trait Storage: Send + Sync {
    /// Opens the source called `path`.
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>>;

    /// Opens `path`, a name found inside an image and checked to lie in the folder `top_dir`
    /// under [`BackingPolicy::Confined`](crate::BackingPolicy::Confined), refusing a source
    /// that lies elsewhere once links are followed (with an error made by [`outside_folder`],
    /// which the reader reports as [`Error::PathRefused`](crate::Error::PathRefused)).
    ///
    /// The default opens it as [`open`](Self::open) does, which is right only for storage
    /// whose names are not links (objects of a bucket, a target's manifests): a `Storage` over
    /// a local or network filesystem must check, as [`LocalStorage`] does.
    fn open_inside(&self, path: &str, top_dir: &str) -> io::Result<Arc<dyn ReadAt>> {
        let _ = top_dir;
        self.open(path)
    }
}

/// [`Storage`] on the local filesystem; relative names are relative to `root`.
#[derive(Debug, Clone, Default)]
pub struct LocalStorage {
    root: Option<PathBuf>,
}

impl LocalStorage {
    /// Names are taken as they are (relative to the process's working directory).
    pub fn new() -> Self {
        Self::default()
    }

    /// Relative names are resolved against `root`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Some(root.into()),
        }
    }
}

impl LocalStorage {
    fn full(&self, path: &str) -> PathBuf {
        match (&self.root, path) {
            (Some(root), "") => root.clone(),
            (Some(root), path) => root.join(path),
            (None, "") => PathBuf::from("."),
            (None, path) => PathBuf::from(path),
        }
    }
}

impl Storage for LocalStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(File::open(self.full(path))?))
    }

    /// Opens the file, then asks where the opened file really is (after every symbolic link
    /// on the way, so that a link swapped in meanwhile is seen too) and refuses it unless that
    /// is inside `top_dir` with its own links followed: a name that stays in the folder as
    /// text may still lead out of it through a link stored there.
    fn open_inside(&self, path: &str, top_dir: &str) -> io::Result<Arc<dyn ReadAt>> {
        let full = self.full(path);
        let file = File::open(&full)?;
        let folder = std::fs::canonicalize(self.full(top_dir))?;
        let real = opened_path(&file, &full)?;
        if !real.starts_with(&folder) {
            return Err(outside_folder());
        }
        Ok(Arc::new(file))
    }
}

/// The error [`Storage::open_inside`] returns for a source outside the top image's folder.
pub fn outside_folder() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, OutsideFolder)
}

/// Whether `err` is [`outside_folder`]'s.
pub(crate) fn is_outside_folder(err: &io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<OutsideFolder>())
}

/// The cause of [`outside_folder`].
#[derive(Debug)]
struct OutsideFolder;

impl std::fmt::Display for OutsideFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a symbolic link leads out of the top image's folder")
    }
}

impl std::error::Error for OutsideFolder {}

/// Where the file `file`, opened by the name `full`, is: the kernel's name for the open file
/// on Linux, the name with every link resolved elsewhere.
fn opened_path(file: &File, full: &std::path::Path) -> io::Result<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            return Ok(real);
        }
    }
    let _ = file;
    std::fs::canonicalize(full)
}

/// Where a one-pass QCOW2 writer sends an image.
///
/// The writer reserves a header area at the start of the image (at least one cluster, and at
/// least [`min_header_len`](Self::min_header_len) rounded up to whole clusters), announces its
/// length with [`begin`](Self::begin), then calls [`append`](Self::append) with the rest of the image in ascending file order, starting at the
/// end of that area. Once everything else is written it calls [`finish`](Self::finish) with the
/// whole header area. Until `finish` succeeds, nothing at the destination may claim to be a
/// complete image; a sink dropped without `finish` discards (or aborts) what it received.
pub trait ImageSink {
    /// The smallest header area this sink can accept (for example the minimum part size of a
    /// multipart upload, whose first part is sent last). Zero means one cluster is enough.
    fn min_header_len(&self) -> u64 {
        0
    }

    /// Called once before the first [`append`](Self::append) with the length of the header
    /// area, so a seekable sink knows where the appended bytes start. The default ignores it
    /// (an append-only sink receives the header area separately in `finish`).
    fn begin(&mut self, header_len: u64) -> io::Result<()> {
        let _ = header_len;
        Ok(())
    }

    /// Appends the next bytes of the image after the header area.
    fn append(&mut self, data: &[u8]) -> io::Result<()>;

    /// Writes the header area (file offsets `0..header.len()`) and makes the image durable and
    /// visible.
    fn finish(&mut self, header: &[u8]) -> io::Result<()>;
}

/// The most Strata hands a file in one write call.
///
/// Linux sizes a regular file's page-cache folios by the write, so a write of 2 MiB or more
/// takes 2 MiB folios. On a VM with free page reporting (virtio-balloon, Firecracker) those come
/// from the high-order free blocks the guest has handed back to the host, and each first touch
/// of them faults into the hypervisor: on the 2-core machine here, writing 320 MiB of fresh
/// page cache with `dd bs=2M` took 2.2 to 2.6 s (most of it system time), and with `bs=1M`
/// 0.14 to 0.19 s. Folios of up to 1 MiB keep nearly all of the large-folio gain on bare metal.
pub const WRITE_CHUNK: usize = 1 << 20;

/// `FileExt::write_all_at` in calls of at most [`WRITE_CHUNK`] bytes.
pub fn write_all_at(dest: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut at = offset;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        std::os::unix::fs::FileExt::write_all_at(dest, chunk, at)?;
        at += chunk.len() as u64;
    }
    Ok(())
}

/// A [`Write`](std::io::Write) that hands its inner writer at most [`WRITE_CHUNK`] bytes a call
/// (under a `BufWriter`, whose writes of more than its capacity go straight through).
#[derive(Debug)]
pub struct ChunkedWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for ChunkedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(WRITE_CHUNK)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Bytes written between the background flushes of a [`WriteBehind`].
pub const FLUSH_EVERY: u64 = 32 << 20;

/// Flushes a file's written data (`fdatasync`) on a thread of its own every [`FLUSH_EVERY`]
/// bytes, so the device writes back while more is read and written, and the flush that ends
/// the job waits for the tail only. Writers report what they wrote with
/// [`WriteBehind::wrote`], from any thread; [`WriteBehind::finish`] stops the flusher and says
/// whether a flush failed. [`write_behind`] runs a closure with one.
///
/// A flush that fails stops the flusher and is returned by `finish`: the kernel reports a
/// writeback error to each open file once, so a later flush could succeed and hide it.
#[derive(Debug)]
pub struct WriteBehind {
    /// Asks the flusher for a flush; `None` without a flusher.
    requests: Option<mpsc::SyncSender<()>>,
    unflushed: AtomicU64,
    flusher: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl WriteBehind {
    /// Starts a flusher of `file` (through a second descriptor of it). If none can be had (no
    /// descriptor or thread left), [`wrote`](Self::wrote) asks for nothing and the caller's
    /// final flush does all.
    pub fn start(file: &File) -> Self {
        let (requests, asked) = mpsc::sync_channel::<()>(1);
        let flusher = file.try_clone().ok().and_then(|file| {
            std::thread::Builder::new()
                .name("strata-flush".into())
                .spawn(move || {
                    for () in asked {
                        file.sync_data()?;
                    }
                    Ok(())
                })
                .ok()
        });
        Self {
            requests: flusher.as_ref().map(|_| requests),
            unflushed: AtomicU64::new(0),
            flusher,
        }
    }

    /// Counts `bytes` written; past [`FLUSH_EVERY`] since the last request, asks for a flush
    /// (one asked for and not yet started covers these bytes too, so at most one waits).
    pub fn wrote(&self, bytes: u64) {
        let before = self.unflushed.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes >= FLUSH_EVERY
            && self.unflushed.swap(0, Ordering::Relaxed) >= FLUSH_EVERY
            && let Some(requests) = &self.requests
        {
            // Full: a flush is asked for already. Gone: the flusher stopped on an error, which
            // `finish` returns.
            let _ = requests.try_send(());
        }
    }

    /// Stops the flusher once the flush asked for is done; the first flush that failed, if any.
    /// The caller still flushes what came after.
    pub fn finish(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        self.requests = None;
        match self.flusher.take().map(std::thread::JoinHandle::join) {
            Some(Ok(flushed)) => flushed,
            Some(Err(_)) => Err(io::Error::other("the background flush panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs `body` with a [`WriteBehind`] flushing `file`, and returns what `body` returned and the
/// first background flush's error, if one failed. The caller still flushes at the end.
pub fn write_behind<T>(file: &File, body: impl FnOnce(&WriteBehind) -> T) -> (T, io::Result<()>) {
    let behind = WriteBehind::start(file);
    let out = body(&behind);
    (out, behind.finish())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Records the length of every write call it is given.
    #[derive(Default)]
    struct Calls {
        lens: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.lens.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_chunked_writer_hands_on_at_most_a_chunk_a_call() {
        let data = pattern(WRITE_CHUNK * 5 / 2);
        let mut writer =
            std::io::BufWriter::with_capacity(WRITE_CHUNK, ChunkedWriter(Calls::default()));
        writer.write_all(&data).unwrap();
        let ChunkedWriter(calls) = writer.into_inner().map_err(|e| e.into_error()).unwrap();
        assert_eq!(calls.lens, [WRITE_CHUNK, WRITE_CHUNK, WRITE_CHUNK / 2]);
        assert_eq!(calls.bytes, data);
    }

    #[test]
    fn write_all_at_puts_every_chunk_at_its_offset() {
        let file = tempfile::tempfile().unwrap();
        let data = pattern(WRITE_CHUNK * 5 / 2 + 7);
        write_all_at(&file, &data, 4093).unwrap();
        let mut back = vec![0xAA; data.len() + 4093];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
        assert!(back[..4093].iter().all(|&b| b == 0));
        assert_eq!(&back[4093..], &data[..]);
    }

    /// `/dev/null` refuses `fdatasync` (EINVAL), so a flush asked of it fails.
    fn unflushable() -> File {
        File::options().write(true).open("/dev/null").unwrap()
    }

    #[test]
    fn write_behind_returns_a_background_flush_that_failed() {
        let file = unflushable();
        let (out, flushed) = write_behind(&file, |behind| {
            // From several threads, in pieces that add up to the threshold.
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        for _ in 0..8 {
                            behind.wrote(FLUSH_EVERY / 32);
                        }
                    });
                }
            });
            "body's value"
        });
        assert_eq!(out, "body's value");
        let error = flushed.expect_err("the flush of /dev/null fails");
        assert_eq!(error.raw_os_error(), Some(libc_einval()));
    }

    #[test]
    fn write_behind_asks_for_no_flush_below_the_threshold() {
        let file = unflushable();
        let (out, flushed) = write_behind(&file, |behind| {
            behind.wrote(FLUSH_EVERY - 1);
            7
        });
        assert_eq!(out, 7);
        flushed.expect("nothing was flushed, so nothing failed");
    }

    #[test]
    fn a_write_behind_reports_its_failed_flush_at_finish_and_asks_no_more() {
        let file = unflushable();
        let behind = WriteBehind::start(&file);
        behind.wrote(FLUSH_EVERY);
        // More after the failure: the stopped flusher is not asked again, nothing blocks.
        for _ in 0..4 {
            behind.wrote(FLUSH_EVERY);
        }
        let error = behind.finish().expect_err("the flush of /dev/null fails");
        assert_eq!(error.raw_os_error(), Some(libc_einval()));
        // A flusher that flushed nothing finishes clean.
        WriteBehind::start(&file)
            .finish()
            .expect("no flush asked, none failed");
    }

    fn libc_einval() -> i32 {
        rustix::io::Errno::INVAL.raw_os_error()
    }
}
