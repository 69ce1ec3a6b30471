//! The image sink of filesystem targets: written in place, published by a create-only link.
//!
//! The body is written into `<id>.qcow2.<token>.partial` right after a reserved header area
//! ([`TargetOptions::local_header_len`](crate::TargetOptions::local_header_len), which the
//! sink reports as its `min_header_len`, so the writer's header area normally has exactly that
//! length). Should the writer hand over a longer (or shorter) header area, the body is moved in
//! place in bounded chunks before the header is written. The file is synced, hard-linked to
//! `<id>.qcow2` (failing if that name exists) and the staging name removed, so the final name
//! only ever shows a complete image.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_qcow2::{ChunkedWriter, WriteBehind};

use crate::error::{Error, Result};
use crate::manifest::ImageInfo;
use crate::sink::image_info;

const MOVE_CHUNK: usize = 1 << 20;
const ZERO_CHECK: usize = 64 << 10;

#[derive(Debug)]
pub(crate) struct LocalSink {
    staging: PathBuf,
    path: PathBuf,
    object: String,
    reserved: u64,
    file: Option<BufWriter<ChunkedWriter<File>>>,
    body_len: u64,
    body_crc: crc32fast::Hasher,
    /// Flushes the body as it is written, so the sync before the link waits for the tail.
    behind: Option<WriteBehind>,
    /// Set once the image is published under its final name and the staging name is gone.
    published: bool,
    result: Arc<Mutex<Option<ImageInfo>>>,
}

impl LocalSink {
    pub(crate) fn create(
        path: PathBuf,
        object: String,
        writer: &str,
        reserved: usize,
        result: Arc<Mutex<Option<ImageInfo>>>,
    ) -> Result<Self> {
        let mut staging = path.clone().into_os_string();
        staging.push(format!(".{writer}.partial"));
        let staging = PathBuf::from(staging);
        if let Some(dir) = staging.parent() {
            std::fs::create_dir_all(dir).map_err(|err| Error::io("create", dir.display(), err))?;
        }
        let mut file = File::create_new(&staging)
            .map_err(|err| Error::io("create", staging.display(), err))?;
        let reserved = reserved as u64;
        file.seek(SeekFrom::Start(reserved))
            .map_err(|err| Error::io("seek", staging.display(), err))?;
        Ok(Self {
            staging,
            path,
            object,
            reserved,
            behind: Some(WriteBehind::start(&file)),
            file: Some(BufWriter::with_capacity(1 << 20, ChunkedWriter(file))),
            body_len: 0,
            body_crc: crc32fast::Hasher::new(),
            published: false,
            result,
        })
    }

    pub(crate) fn reserved_header_len(&self) -> u64 {
        self.reserved
    }

    fn closed(&self) -> Error {
        Error::Upload {
            path: self.path.display().to_string(),
            reason: "the image was already finished or failed".into(),
        }
    }

    pub(crate) fn append(&mut self, data: &[u8]) -> Result<()> {
        let closed = self.closed();
        let file = self.file.as_mut().ok_or(closed)?;
        file.write_all(data)
            .map_err(|err| Error::io("write", self.staging.display(), err))?;
        self.body_crc.update(data);
        self.body_len += data.len() as u64;
        if let Some(behind) = &self.behind {
            behind.wrote(data.len() as u64);
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self, header: &[u8]) -> Result<()> {
        let writer = self.file.take().ok_or_else(|| self.closed())?;
        let staging = self.staging.display().to_string();
        let io = |operation| {
            let staging = staging.clone();
            move |err| Error::io(operation, staging, err)
        };
        let ChunkedWriter(file) = writer
            .into_inner()
            .map_err(|err| io("write")(err.into_error()))?;
        let header_len = header.len() as u64;
        if header_len != self.reserved {
            move_range(&file, self.reserved, header_len, self.body_len)
                .map_err(io("move body of"))?;
        }
        for (index, chunk) in header.chunks(ZERO_CHECK).enumerate() {
            // A fresh file reads as zeros where nothing was written: keep those parts sparse.
            let untouched = header_len <= self.reserved;
            if untouched && chunk.iter().all(|&b| b == 0) {
                continue;
            }
            file.write_all_at(chunk, (index * ZERO_CHECK) as u64)
                .map_err(io("write header of"))?;
        }
        file.set_len(header_len + self.body_len)
            .map_err(io("truncate"))?;
        if let Some(behind) = self.behind.take() {
            behind.finish().map_err(io("sync"))?;
        }
        file.sync_all().map_err(io("sync"))?;
        std::fs::hard_link(&self.staging, &self.path)
            .map_err(|err| Error::io("publish", self.path.display(), err))?;
        std::fs::remove_file(&self.staging).map_err(io("remove"))?;
        self.published = true;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|err| Error::io("sync", dir.display(), err))?;
        }
        let info = image_info(&self.object, header, self.body_len, &self.body_crc);
        let mut slot = self.result.lock().map_err(|_| self.closed())?;
        *slot = Some(info);
        Ok(())
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if !self.published {
            // A sink dropped or failed before its link (a full disk at the header, say) frees
            // its space now. Best effort: an orphan staging file is removed by `gc` after the
            // grace period.
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// Moves `len` bytes at `from` to `to` within `file`, chunk by chunk, safe when they overlap.
fn move_range(file: &File, from: u64, to: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; MOVE_CHUNK];
    let chunk = MOVE_CHUNK as u64;
    let chunks = len.div_ceil(chunk);
    for step in 0..chunks {
        // Moving up: last chunk first; moving down: first chunk first.
        let i = if to > from { chunks - 1 - step } else { step };
        let start = i * chunk;
        let n = chunk.min(len - start) as usize;
        let part = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(part, from + start)?;
        file.write_all_at(part, to + start)?;
    }
    Ok(())
}
