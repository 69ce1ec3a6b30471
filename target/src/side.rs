//! Side files streamed both ways, so that one as large as a backup's digest manifest (24 bytes
//! per cluster of the volume) never sits whole in memory: uploaded from a [`SideBody`] one
//! part at a time ([`TargetOptions::min_part_size`](crate::TargetOptions::min_part_size),
//! 5 MiB by default, on object stores; 1 MiB on a folder), downloaded into an unnamed temporary file with its size and CRC-32
//! checked against the manifest before the file is handed out.

use std::fs::File;
use std::io::{self, Read};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::manifest::{BackupManifest, Checksums, Crc32};
use crate::name::{BackupId, FileName, VolumeName};
use crate::target::Target;

/// Bytes of a part on a folder target.
const LOCAL_PART: usize = 1 << 20;

/// The bytes of a side file to store: in memory, or read as they are uploaded.
pub struct SideBody {
    reader: Box<dyn Read + Send>,
}

impl SideBody {
    /// A side file read from `reader` as it is uploaded (a few MiB at a time).
    pub fn from_reader(reader: impl Read + Send + 'static) -> Self {
        Self {
            reader: Box::new(reader),
        }
    }
}

impl From<Bytes> for SideBody {
    fn from(bytes: Bytes) -> Self {
        Self::from_reader(io::Cursor::new(bytes))
    }
}

impl std::fmt::Debug for SideBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SideBody")
    }
}

impl Target {
    /// Stores `body` as object `path`, one part at a time; returns its size and checksums.
    pub(crate) fn put_streamed(&self, path: &Path, mut body: SideBody) -> Result<(u64, Checksums)> {
        // A folder has no minimum part size: 1 MiB parts keep the buffer small there.
        let part_size = match self.inner.local_root {
            Some(_) => LOCAL_PART,
            None => self.inner.options.min_part_size.max(LOCAL_PART),
        };
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        let mut next_part = |crc: &mut crc32fast::Hasher, size: &mut u64| -> Result<Bytes> {
            let mut part = Vec::with_capacity(part_size);
            (&mut body.reader)
                .take(part_size as u64)
                .read_to_end(&mut part)
                .map_err(|err| Error::io("read side file for", path, err))?;
            crc.update(&part);
            *size += part.len() as u64;
            Ok(Bytes::from(part))
        };
        let first = next_part(&mut crc, &mut size)?;
        if first.len() < part_size {
            let p = path.clone();
            self.block("put side file", move |inner| async move {
                inner.put(&p, first).await
            })?;
        } else {
            let p = path.clone();
            let mut upload = self.block("start side file upload", move |inner| async move {
                inner
                    .store
                    .put_multipart(&p)
                    .await
                    .map_err(|err| Error::store("create multipart upload", &p, err))
            })?;
            let mut part = first;
            let sent = loop {
                let put = upload.put_part(PutPayload::from(part));
                let p = path.clone();
                if let Err(err) = self.block("put side file part", move |_| async move {
                    put.await.map_err(|err| Error::store("put part", &p, err))
                }) {
                    break Err(err);
                }
                match next_part(&mut crc, &mut size) {
                    Ok(next) if next.is_empty() => break Ok(()),
                    Ok(next) => part = next,
                    Err(err) => break Err(err),
                }
            };
            let p = path.clone();
            self.block("finish side file upload", move |_| async move {
                match sent {
                    Ok(()) => upload
                        .complete()
                        .await
                        .map(|_| ())
                        .map_err(|err| Error::store("complete multipart upload", &p, err)),
                    Err(err) => {
                        // The upload's parts are garbage either way; the error is the one to tell.
                        let _ = upload.abort().await;
                        Err(err)
                    }
                }
            })?;
        }
        Ok((
            size,
            Checksums {
                crc32: Crc32(crc.finalize()),
            },
        ))
    }

    /// Downloads a side file of a committed backup into an unnamed temporary file (in
    /// `TMPDIR`), checking its size and CRC against the manifest ([`Error::Corrupt`] names
    /// what differs) before handing it out. Memory: one chunk of the body at a time.
    pub fn download_file(
        &self,
        volume: &VolumeName,
        id: &BackupId,
        name: &FileName,
    ) -> Result<File> {
        let manifest = self.backup(volume, id)?;
        self.download_file_of(&manifest, name)
    }

    /// [`download_file`](Self::download_file) of the backup `manifest` describes, checked
    /// against that manifest (not read again): a caller that holds a chain's manifests
    /// downloads their side files without a round trip each for the manifest.
    pub fn download_file_of(&self, manifest: &BackupManifest, name: &FileName) -> Result<File> {
        let (entry, path) = self.side_file_entry_of(manifest, name)?;
        let mut file = tempfile::tempfile()
            .map_err(|err| Error::io("create a temporary file for", &path, err))?;
        let (size, crc) = self.stream_object("side file", &path, entry.size, &mut file)?;
        if size != entry.size || crc != entry.checksums.crc32 {
            return Err(Error::Corrupt {
                what: "side file",
                path: path.to_string(),
                reason: format!(
                    "{size} bytes with CRC {:08x}, the manifest says {} bytes with CRC {:08x}",
                    crc.0, entry.size, entry.checksums.crc32.0
                ),
            });
        }
        Ok(file)
    }
}
