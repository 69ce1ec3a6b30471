//! [`ImageSink`]s: a seekable file and a buffer in memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ImageSink;
use crate::io::WriteBehind;

/// Appends are gathered into writes of this size.
const WRITE_BUFFER: usize = 1 << 20;

/// Writes an image into a local file or block device.
///
/// The header area is left empty while the rest is appended after it, then written in place by
/// `finish`, followed by an fsync. A `FileSink` dropped before `finish` succeeded removes the
/// file it created (or, for one handed over with [`FileSink::from_file`], truncates a regular
/// file to nothing), so an interrupted conversion never leaves a file with a QCOW2 magic.
#[derive(Debug)]
pub struct FileSink {
    file: File,
    /// Appended bytes not yet written; discarded (never flushed) when the sink is abandoned.
    buffer: Vec<u8>,
    /// File offset where the next write lands.
    position: u64,
    /// Flushes what is written as it goes, so the final flush waits for the tail only.
    behind: Option<WriteBehind>,
    /// Set when this sink created the file and must remove it on failure.
    created: Option<PathBuf>,
    finished: bool,
}

impl FileSink {
    /// Creates (or truncates) the file at `path`; a device at `path` is written in place and
    /// never removed.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let regular = file.metadata()?.file_type().is_file();
        Ok(Self {
            created: regular.then(|| path.to_owned()),
            behind: Some(WriteBehind::start(&file)),
            file,
            buffer: Vec::with_capacity(WRITE_BUFFER),
            position: 0,
            finished: false,
        })
    }

    /// Writes into an open file or block device, which it never removes.
    pub fn from_file(file: File) -> Self {
        Self {
            behind: Some(WriteBehind::start(&file)),
            file,
            buffer: Vec::with_capacity(WRITE_BUFFER),
            position: 0,
            created: None,
            finished: false,
        }
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        let buffer = std::mem::take(&mut self.buffer);
        let result = self.write_through(&buffer);
        self.buffer = buffer;
        self.buffer.clear();
        result
    }

    fn write_through(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(crate::io::WRITE_CHUNK) {
            self.file.write_all(chunk)?;
        }
        self.position += data.len() as u64;
        if let Some(behind) = &self.behind {
            behind.wrote(data.len() as u64);
        }
        Ok(())
    }

    fn is_regular(&self) -> io::Result<bool> {
        Ok(self.file.metadata()?.file_type().is_file())
    }
}

impl ImageSink for FileSink {
    fn begin(&mut self, header_len: u64) -> io::Result<()> {
        if self.is_regular()? {
            // Whatever the file held before (a previous, longer image) goes.
            self.file.set_len(0)?;
            self.position = self.file.seek(SeekFrom::Start(header_len))?;
        } else {
            // A device keeps old bytes: blank the header area so no old magic survives.
            self.file.seek(SeekFrom::Start(0))?;
            let zeros = vec![0u8; WRITE_BUFFER];
            let mut left = header_len;
            while left > 0 {
                let len = left.min(WRITE_BUFFER as u64) as usize;
                self.write_through(&zeros[..len])?;
                left -= len as u64;
            }
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.buffer.len() + data.len() > WRITE_BUFFER {
            self.flush_buffer()?;
        }
        if data.len() >= WRITE_BUFFER {
            self.write_through(data)
        } else {
            self.buffer.extend_from_slice(data);
            Ok(())
        }
    }

    fn finish(&mut self, header: &[u8]) -> io::Result<()> {
        self.flush_buffer()?;
        let file = &self.file;
        file.write_all_at(header, 0)?;
        if let Some(behind) = self.behind.take() {
            behind.finish()?;
        }
        file.sync_data()?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Best effort: the write already failed, and the error that made it fail is reported.
        match &self.created {
            Some(path) => {
                let _ = std::fs::remove_file(path);
            }
            None => {
                if self.is_regular().unwrap_or(false) {
                    let _ = self.file.set_len(0);
                }
            }
        }
    }
}

/// Collects an image in memory (tests, small images, staging before an upload).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    bytes: Vec<u8>,
    min_header_len: u64,
    finished: bool,
}

impl MemorySink {
    /// An empty sink asking for no more than one cluster of header area.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink asking for a header area of at least `len` bytes, as a multipart upload would.
    pub fn with_min_header_len(len: u64) -> Self {
        Self {
            min_header_len: len,
            ..Self::default()
        }
    }

    /// The complete image, once [`ImageSink::finish`] has run.
    pub fn image(&self) -> Option<&[u8]> {
        self.finished.then_some(self.bytes.as_slice())
    }

    /// The complete image, once [`ImageSink::finish`] has run.
    pub fn into_image(self) -> Option<Vec<u8>> {
        self.finished.then_some(self.bytes)
    }
}

impl ImageSink for MemorySink {
    fn min_header_len(&self) -> u64 {
        self.min_header_len
    }

    fn begin(&mut self, header_len: u64) -> io::Result<()> {
        let len = usize::try_from(header_len).map_err(io::Error::other)?;
        self.bytes = vec![0; len];
        Ok(())
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    fn finish(&mut self, header: &[u8]) -> io::Result<()> {
        let area = self.bytes.get_mut(..header.len()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "header area longer than announced",
            )
        })?;
        area.copy_from_slice(header);
        self.finished = true;
        Ok(())
    }
}
