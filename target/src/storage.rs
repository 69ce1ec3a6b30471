//! [`VolumeStorage`]: the QCOW2 reader's [`Storage`] over one volume's image folder, so a chain
//! is opened by name straight from the target and follows its relative backing names.
//!
//! A backing name `<id>.qcow2` of a committed backup resolves through that backup's manifest
//! to its current image object: after a fold the manifest names the merged image
//! (`<id>.<token>.qcow2`) while the overlays built on it still carry the name `<id>.qcow2`.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use strata_qcow2::{ReadAt, Storage};

use crate::error::{Error, Result};
use crate::layout::{IMAGE_EXTENSION, image_name};
use crate::manifest::{BackupManifest, Crc32, SideFile};
use crate::name::{BackupId, FileName, VolumeName};
use crate::reader::ObjectReader;
use crate::target::Target;

/// Opens images of one volume by name (`<id>.qcow2`, as backing names say).
///
/// On filesystem targets the files are opened directly; on object stores each image is an
/// [`ObjectReader`]. Names are confined to the volume's image folder: empty, absolute, `.` and
/// `..` segments are refused with [`io::ErrorKind::InvalidInput`].
#[derive(Debug, Clone)]
pub struct VolumeStorage {
    target: Target,
    volume: VolumeName,
}

impl Target {
    /// The [`Storage`] for `volume`'s images, for `Image::open_with(storage, "<id>.qcow2", ..)`.
    pub fn storage(&self, volume: &VolumeName) -> VolumeStorage {
        VolumeStorage {
            target: self.clone(),
            volume: volume.clone(),
        }
    }

    /// Opens the image of a committed backup for positional reads.
    pub fn open_image(&self, volume: &VolumeName, id: &BackupId) -> Result<Arc<dyn ReadAt>> {
        let manifest = self.backup(volume, id)?;
        self.storage(volume).open_named(&manifest.image.object)
    }

    /// Reads a side file of a committed backup, checking its size and CRC against the manifest.
    /// It is held whole: large side files are better read with
    /// [`download_file`](Self::download_file).
    pub fn read_file(&self, volume: &VolumeName, id: &BackupId, name: &FileName) -> Result<Bytes> {
        let (entry, path) = self.side_file_entry(volume, id, name)?;
        let key = path.clone();
        let bytes = self.block("read side file", move |inner| async move {
            inner.get_bytes(&key).await
        })?;
        let found = crate::manifest::crc32(&bytes);
        if bytes.len() as u64 != entry.size || found != entry.checksums {
            return Err(Error::Corrupt {
                what: "side file",
                path: path.to_string(),
                reason: format!(
                    "{} bytes with CRC {:08x}, the manifest says {} bytes with CRC {:08x}",
                    bytes.len(),
                    found.crc32.0,
                    entry.size,
                    entry.checksums.crc32.0
                ),
            });
        }
        Ok(bytes)
    }

    /// The manifest's entry of a side file and its object's path.
    pub(crate) fn side_file_entry(
        &self,
        volume: &VolumeName,
        id: &BackupId,
        name: &FileName,
    ) -> Result<(SideFile, object_store::path::Path)> {
        let manifest = self.backup(volume, id)?;
        let entry = manifest
            .files
            .iter()
            .find(|f| &f.name == name)
            .ok_or_else(|| Error::NotFound {
                what: "side file",
                name: format!("{volume}/{id}/{name}"),
            })?
            .clone();
        let path = self.inner.layout.side_file(volume, id, &entry)?;
        Ok((entry, path))
    }

    /// Streams the image of a committed backup and checks its size and CRC-32 against the
    /// manifest; [`Error::Corrupt`] names what differs.
    pub fn verify_image(&self, volume: &VolumeName, id: &BackupId) -> Result<BackupManifest> {
        self.download_image(volume, id, &mut io::sink())
    }

    /// Copies the image of a committed backup into `dest` with one streaming GET, checking its
    /// size and CRC-32 against the manifest on the way ([`Error::Corrupt`] at the end when they
    /// differ: discard what was written then). Memory: one chunk of the HTTP body at a time.
    pub fn download_image(
        &self,
        volume: &VolumeName,
        id: &BackupId,
        dest: &mut dyn io::Write,
    ) -> Result<BackupManifest> {
        let manifest = self.backup(volume, id)?;
        let path = self.inner.layout.image(volume, &manifest.image.object);
        let (size, crc) = self.stream_object(&path, dest)?;
        check_image(manifest, &path, size, crc)
    }

    pub(crate) fn stream_object(
        &self,
        path: &object_store::path::Path,
        dest: &mut dyn io::Write,
    ) -> Result<(u64, Crc32)> {
        if let Some(root) = &self.inner.local_root {
            let file_path = crate::url::local_path(root, path);
            let file = std::fs::File::open(&file_path)
                .map_err(|err| Error::io("open", file_path.display(), err))?;
            let mut reader = io::BufReader::with_capacity(1 << 20, file);
            let mut check = Checked {
                dest,
                crc: crc32fast::Hasher::new(),
                size: 0,
            };
            io::copy(&mut reader, &mut check)
                .map_err(|err| Error::io("download", file_path.display(), err))?;
            return Ok((check.size, Crc32(check.crc.finalize())));
        }
        let p = path.clone();
        let chunks = self.block("download image", move |inner| async move {
            let result = inner
                .store
                .get(&p)
                .await
                .map_err(|err| Error::store("get", &p, err))?;
            let (sender, receiver) = std::sync::mpsc::sync_channel(4);
            tokio::spawn(async move {
                let mut stream = result.into_stream();
                while let Some(chunk) = stream.next().await {
                    let failed = chunk.is_err();
                    if sender.send(chunk).is_err() || failed {
                        break;
                    }
                }
            });
            Ok(receiver)
        })?;
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        for chunk in chunks {
            let chunk = chunk.map_err(|err| Error::store("read", path, err))?;
            crc.update(&chunk);
            size += chunk.len() as u64;
            dest.write_all(&chunk)
                .map_err(|err| Error::io("write download of", path, err))?;
        }
        Ok((size, Crc32(crc.finalize())))
    }
}

/// Counts and checksums what it passes on.
struct Checked<'a> {
    dest: &'a mut dyn io::Write,
    crc: crc32fast::Hasher,
    size: u64,
}

impl io::Write for Checked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.dest.write(buf)?;
        let written = buf.get(..n).unwrap_or_default();
        self.crc.update(written);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.dest.flush()
    }
}

fn check_image(
    manifest: BackupManifest,
    path: &object_store::path::Path,
    size: u64,
    crc: Crc32,
) -> Result<BackupManifest> {
    if size != manifest.image.size || crc != manifest.image.checksums.crc32 {
        return Err(Error::Corrupt {
            what: "image",
            path: path.to_string(),
            reason: format!(
                "{size} bytes with CRC {:08x}, the manifest says {} bytes with CRC {:08x}",
                crc.0, manifest.image.size, manifest.image.checksums.crc32.0
            ),
        });
    }
    Ok(manifest)
}

impl VolumeStorage {
    /// The storage name of a backup's image (`<id>.qcow2`).
    pub fn image_name(id: &BackupId) -> String {
        image_name(id)
    }

    /// The object a backing name stands for: `<id>.qcow2` of a committed backup is the image
    /// its manifest names now; any other name (an image whose backup is not committed, a
    /// fold's merged image) is the object of that name.
    fn current_object(&self, name: &str) -> Result<String> {
        let Some(id) = name
            .strip_suffix(IMAGE_EXTENSION)
            .and_then(|stem| BackupId::new(stem).ok())
        else {
            return Ok(name.to_string());
        };
        match self.target.backup(&self.volume, &id) {
            Ok(manifest) => Ok(manifest.image.object),
            Err(Error::NotFound { .. }) => Ok(name.to_string()),
            Err(err) => Err(err),
        }
    }

    /// Opens the object named `name` itself, without resolving it through a manifest.
    fn open_named(&self, name: &str) -> Result<Arc<dyn ReadAt>> {
        Ok(match self.open_object(name)? {
            Opened::File(file) => Arc::new(file),
            Opened::Object(reader) => Arc::new(reader),
        })
    }

    /// Opens the image a backing name stands for, as [`Storage::open`] does.
    pub(crate) fn open_source(&self, name: &str) -> Result<Opened> {
        self.open_object(&self.current_object(name)?)
    }

    fn open_object(&self, name: &str) -> Result<Opened> {
        let bad = |reason| Error::InvalidName {
            kind: "image",
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.starts_with('/') {
            return Err(bad("must be a relative name"));
        }
        if name
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(bad("must not contain empty, '.' or '..' segments"));
        }
        let inner = &self.target.inner;
        let mut path = inner.layout.volume_dir(&self.volume, "images");
        for seg in name.split('/') {
            path = path.clone().join(seg);
        }
        if let Some(root) = &inner.local_root {
            let file_path = crate::url::local_path(root, &path);
            let file = std::fs::File::open(&file_path).map_err(|err| match err.kind() {
                io::ErrorKind::NotFound => Error::NotFound {
                    what: "image",
                    name: file_path.display().to_string(),
                },
                _ => Error::io("open", file_path.display(), err),
            })?;
            return Ok(Opened::File(file));
        }
        let p = path.clone();
        let meta = self.target.block("open image", move |inner| async move {
            inner
                .options
                .retry
                .run(|| inner.store.head(&p))
                .await
                .map_err(|err| match err {
                    object_store::Error::NotFound { .. } => Error::NotFound {
                        what: "image",
                        name: p.to_string(),
                    },
                    err => Error::store("head", &p, err),
                })
        })?;
        Ok(Opened::Object(ObjectReader::new(
            inner.clone(),
            path,
            meta.size,
        )))
    }
}

/// An opened image: a file of a folder target, or an object.
pub(crate) enum Opened {
    File(std::fs::File),
    Object(ObjectReader),
}

impl Storage for VolumeStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        self.current_object(path)
            .and_then(|object| self.open_named(&object))
            .map_err(io::Error::from)
    }
}
