//! [`VolumeStorage`]: the QCOW2 reader's [`Storage`] over one volume's image folder, so a chain
//! is opened by name straight from the target and follows its relative backing names.
//!
//! A backing name `<id>.qcow2` of a committed backup resolves through that backup's manifest
//! to its current image object: after a fold the manifest names the merged image
//! (`<id>.<token>.qcow2`) while the overlays built on it still carry the name `<id>.qcow2`.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use strata_qcow2::{ReadAt, Storage};

use crate::error::{Error, Result};
use crate::layout::{IMAGE_EXTENSION, image_name};
use crate::manifest::{BackupManifest, Crc32, SideFile};
use crate::name::{BackupId, FileName, VolumeName};
use crate::reader::ObjectReader;
use crate::target::Target;

/// HEADs in flight at once when a chain's images are opened together.
const PARALLEL_OPENS: usize = 16;

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
        let (key, size) = (path.clone(), entry.size);
        let bytes = self.block("read side file", move |inner| async move {
            inner.get_bytes_limited(&key, size).await
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
        self.side_file_entry_of(&self.backup(volume, id)?, name)
    }

    /// [`side_file_entry`](Self::side_file_entry) from a manifest the caller holds.
    pub(crate) fn side_file_entry_of(
        &self,
        manifest: &BackupManifest,
        name: &FileName,
    ) -> Result<(SideFile, object_store::path::Path)> {
        let (volume, id) = (&manifest.volume, &manifest.id);
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
        self.download_image_of(&manifest, dest)?;
        Ok(manifest)
    }

    /// [`verify_image`](Self::verify_image) of the backup `manifest` describes, checked
    /// against that manifest (not read again), as [`download_file_of`](Self::download_file_of)
    /// does: `verify` holds the listed manifests and so spares a round trip for each.
    pub fn verify_image_of(&self, manifest: &BackupManifest) -> Result<()> {
        self.download_image_of(manifest, &mut io::sink())
    }

    /// Checks that the image of every backup of `manifests` is stored and has the size its
    /// manifest gives: a HEAD each (16 at once) on an object store, a `stat` on
    /// a folder. A missing image is [`Error::NotFound`], one of another size [`Error::Corrupt`].
    /// Only presence is checked, not content ([`verify_image_of`](Self::verify_image_of) reads
    /// it): a backup that extends a chain checks this first, so that an image an expiry rule
    /// deleted is noticed before a new point is built on it.
    pub fn check_images(&self, manifests: &[BackupManifest]) -> Result<()> {
        let mut objects = Vec::with_capacity(manifests.len());
        for manifest in manifests {
            let path = self
                .storage(&manifest.volume)
                .object_path(&manifest.image.object)?;
            objects.push((path, manifest.image.size));
        }
        let wrong = |path: String, size: u64, expected: u64| Error::Corrupt {
            what: "image",
            path,
            reason: format!("{size} bytes, its manifest says {expected}"),
        };
        if let Some(root) = &self.inner.local_root {
            for (path, expected) in objects {
                let file = crate::url::local_path(root, &path);
                let size = match std::fs::metadata(&file) {
                    Ok(meta) => meta.len(),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        return Err(Error::NotFound {
                            what: "image",
                            name: file.display().to_string(),
                        });
                    }
                    Err(err) => return Err(Error::io("stat", file.display(), err)),
                };
                if size != expected {
                    return Err(wrong(file.display().to_string(), size, expected));
                }
            }
            return Ok(());
        }
        self.block("check images", move |inner| async move {
            let inner = &inner;
            futures::stream::iter(objects)
                .map(|(path, expected)| async move {
                    let size = image_size(inner, &path).await?;
                    match size == expected {
                        true => Ok(()),
                        false => Err(wrong(path.to_string(), size, expected)),
                    }
                })
                .buffer_unordered(PARALLEL_OPENS)
                .try_collect::<()>()
                .await
        })
    }

    fn download_image_of(&self, manifest: &BackupManifest, dest: &mut dyn io::Write) -> Result<()> {
        let path = self
            .inner
            .layout
            .image(&manifest.volume, &manifest.image.object);
        let (size, crc) = self.stream_object("image", &path, manifest.image.size, dest)?;
        check_image(manifest, &path, size, crc)
    }

    ///
    /// An object longer than `expected` bytes (its manifest's size) is refused as corrupt
    /// `what` before it is streamed, and so is one that grows past it while streaming: what a
    /// tampered store holds must not fill `TMPDIR`. A missing object is [`Error::NotFound`] on
    /// every kind of target.
    pub(crate) fn stream_object(
        &self,
        what: &'static str,
        path: &object_store::path::Path,
        expected: u64,
        dest: &mut dyn io::Write,
    ) -> Result<(u64, Crc32)> {
        let too_long = |size: u64| Error::Corrupt {
            what,
            path: path.to_string(),
            reason: format!("{size} bytes or more, more than the {expected} its manifest says"),
        };
        if let Some(root) = &self.inner.local_root {
            let file_path = crate::url::local_path(root, path);
            let file = std::fs::File::open(&file_path).map_err(|err| match err.kind() {
                io::ErrorKind::NotFound => Error::NotFound {
                    what: "object",
                    name: path.to_string(),
                },
                _ => Error::io("open", file_path.display(), err),
            })?;
            let len = file
                .metadata()
                .map_err(|err| Error::io("open", file_path.display(), err))?
                .len();
            if len > expected {
                return Err(too_long(len));
            }
            // One byte past what is expected shows a file that grew meanwhile.
            let mut reader = io::Read::take(
                io::BufReader::with_capacity(1 << 20, file),
                expected.saturating_add(1),
            );
            let mut check = Checked {
                dest,
                crc: crc32fast::Hasher::new(),
                size: 0,
                dest_failed: false,
            };
            // A write that fails is the local copy's (TMPDIR full), not the target's.
            io::copy(&mut reader, &mut check).map_err(|err| match check.dest_failed {
                true => Error::io("write download of", path, err),
                false => Error::io("download", file_path.display(), err),
            })?;
            if check.size > expected {
                return Err(too_long(check.size));
            }
            return Ok((check.size, Crc32(check.crc.finalize())));
        }
        let p = path.clone();
        let chunks = self.block("download image", move |inner| async move {
            let result = inner
                .store
                .get(&p)
                .await
                .map_err(|err| Error::store("get", &p, err))?;
            if result.meta.size > expected {
                return Err(Error::Corrupt {
                    what,
                    path: p.to_string(),
                    reason: format!(
                        "{} bytes, more than the {expected} its manifest says",
                        result.meta.size
                    ),
                });
            }
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
            if size > expected {
                return Err(too_long(size));
            }
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
    /// Whether an error came from `dest` (the local copy) rather than the object read.
    dest_failed: bool,
}

impl io::Write for Checked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .dest
            .write(buf)
            .inspect_err(|_| self.dest_failed = true)?;
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
    manifest: &BackupManifest,
    path: &object_store::path::Path,
    size: u64,
    crc: Crc32,
) -> Result<()> {
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
    Ok(())
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

    /// Opens the objects `names` name, as [`open_source`](Self::open_source) opens one but
    /// without resolving them through manifests (the caller holds those), their HEADs sent
    /// [`PARALLEL_OPENS`] at a time: a chain of 64 images costs 4 round trips, not 64.
    pub(crate) fn open_objects(&self, names: &[String]) -> Result<Vec<Opened>> {
        if self.target.inner.local_root.is_some() {
            return names.iter().map(|name| self.open_object(name)).collect();
        }
        let paths = names
            .iter()
            .map(|name| self.object_path(name))
            .collect::<Result<Vec<_>>>()?;
        let sizes = self.target.block("open images", move |inner| async move {
            let inner = &inner;
            futures::stream::iter(paths)
                .map(|p| async move {
                    let size = image_size(inner, &p).await?;
                    Ok::<_, Error>((p, size))
                })
                .buffered(PARALLEL_OPENS)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(sizes
            .into_iter()
            .map(|(path, size)| {
                Opened::Object(ObjectReader::new(self.target.inner.clone(), path, size))
            })
            .collect())
    }

    /// The path of image object `name` in the volume's image folder, which it may not leave.
    fn object_path(&self, name: &str) -> Result<object_store::path::Path> {
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
        let mut path = self.target.inner.layout.volume_dir(&self.volume, "images");
        for seg in name.split('/') {
            path = path.clone().join(seg);
        }
        Ok(path)
    }

    fn open_object(&self, name: &str) -> Result<Opened> {
        let path = self.object_path(name)?;
        let inner = &self.target.inner;
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
        let size = self.target.block("open image", move |inner| async move {
            image_size(&inner, &p).await
        })?;
        Ok(Opened::Object(ObjectReader::new(inner.clone(), path, size)))
    }
}

/// The size of image object `path`, by a HEAD (retried); a missing object is `NotFound`.
async fn image_size(inner: &crate::target::Inner, path: &object_store::path::Path) -> Result<u64> {
    let meta = inner
        .options
        .retry
        .run(|| inner.store.head(path))
        .await
        .map_err(|err| match err {
            object_store::Error::NotFound { .. } => Error::NotFound {
                what: "image",
                name: path.to_string(),
            },
            err => Error::store("head", path, err),
        })?;
    Ok(meta.size)
}

/// An image opened ahead ([`VolumeStorage::open_chain`], [`crate::PartStorage::preopen`]): the name the QCOW2 reader will open it by,
/// the object that name stands for, and its cluster size (from its manifest), which is how
/// much of its start holds its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// The name it will be opened by.
    pub name: String,
    /// The object of the volume's image folder it stands for.
    pub object: String,
    /// The image's cluster size in bytes.
    pub cluster_size: u64,
}

/// The most of an image's end fetched when it is opened ahead: L2 tables covering 1 GiB of a
/// 64 KiB-cluster volume, its L1 and refcount tables.
pub const PREOPEN_TAIL: u64 = 2 << 20;

impl VolumeStorage {
    /// Opens `layers` together: their HEADs in parallel, then the GETs of each object's first
    /// cluster (the header) and of its last [`PREOPEN_TAIL`] bytes (where strata's writer puts
    /// the L2, L1 and refcount tables; at most a quarter of the reader's share of the cache),
    /// which land in the cache: at once for as many images as half the target's cache budget
    /// holds, the others as the ones before them are opened ([`OpenAhead`]). Files of a folder
    /// target are just opened.
    pub(crate) fn open_ahead(
        &self,
        layers: &[Preopen],
        wrap: impl Fn(ObjectReader) -> ObjectReader,
    ) -> Result<(Vec<Opened<Arc<ObjectReader>>>, OpenAhead)> {
        let objects: Vec<String> = layers.iter().map(|layer| layer.object.clone()).collect();
        let mut opened = Vec::with_capacity(layers.len());
        let mut waiting = std::collections::VecDeque::new();
        for (layer, object) in layers.iter().zip(self.open_objects(&objects)?) {
            match object {
                Opened::File(file) => opened.push(Opened::File(file)),
                Opened::Object(reader) => {
                    let reader = Arc::new(wrap(reader));
                    let blocks = ahead_blocks(layer, &reader);
                    waiting.push_back(Waiting {
                        name: layer.name.clone(),
                        reader: Arc::clone(&reader),
                        blocks,
                    });
                    opened.push(Opened::Object(reader));
                }
            }
        }
        let room = (self.target.inner.options.read_cache_budget / 2) as u64;
        Ok((opened, OpenAhead::new(waiting, room)))
    }

    /// The [`Storage`] of one chain, its images opened ahead ([`Preopen`]): the QCOW2 reader's
    /// open of a chain then waits for no manifest, HEAD or header read one image after
    /// another (four or five round trips an image, so 64 images at 20 ms a round trip would
    /// take six seconds). When opening ahead fails (a missing image, say), nothing is kept, and
    /// the reader's own open meets the failure and reports it as [`Storage::open`] does.
    pub fn open_chain(&self, layers: &[Preopen]) -> ChainStorage {
        let (opened, ahead) = match self.open_ahead(layers, |reader| reader) {
            Ok((opened, ahead)) => {
                let opened = layers
                    .iter()
                    .zip(opened)
                    .map(|(layer, opened)| {
                        let reader: Arc<dyn ReadAt> = match opened {
                            Opened::File(file) => Arc::new(file),
                            Opened::Object(reader) => reader,
                        };
                        (layer.name.clone(), reader)
                    })
                    .collect();
                (opened, ahead)
            }
            Err(_) => Default::default(),
        };
        ChainStorage {
            storage: self.clone(),
            opened: std::sync::Mutex::new(opened),
            ahead,
        }
    }
}

/// The block ranges of `reader` that opening `layer` ahead fetches: its header, and its tail.
fn ahead_blocks(layer: &Preopen, reader: &ObjectReader) -> Vec<(u64, u64)> {
    let (len, block) = (reader.object_len(), reader.block_size());
    let share = block.saturating_mul(reader.cache_blocks() as u64);
    // The manifest's cluster size, within QCOW2's 512 B to 2 MiB (it is checked against the
    // image only after the open).
    let head = layer.cluster_size.clamp(512, 2 << 20).min(len.max(1));
    let mut blocks = vec![(0, (head - 1) / block)];
    let tail = PREOPEN_TAIL.min(share / 4).min(len);
    if tail > 0 {
        blocks.push(((len - tail) / block, (len - 1) / block));
    }
    blocks
}

/// The images of a chain still to be fetched ahead, and those fetched but not yet opened.
/// Opening ahead fetches each image's header and tables into the target's cache before the
/// QCOW2 reader asks for them; a deep chain's would not all fit the cache's budget, and what
/// was fetched first would be evicted before its open. So images are fetched ahead while the
/// bytes of those not yet opened stay within `room` (half the budget), and each open lets the
/// next ones go.
#[derive(Debug, Default)]
pub(crate) struct OpenAhead {
    state: std::sync::Mutex<AheadState>,
    room: u64,
}

/// An image to fetch ahead: the name it will be opened by, its reader, the block ranges.
#[derive(Debug)]
struct Waiting {
    name: String,
    reader: Arc<ObjectReader>,
    blocks: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct AheadState {
    /// Images whose blocks are not requested yet, in the order the reader opens them.
    waiting: std::collections::VecDeque<Waiting>,
    /// Images whose blocks are requested and which are not opened yet, with those blocks' bytes.
    fetched: Vec<(String, u64)>,
}

impl OpenAhead {
    fn new(waiting: std::collections::VecDeque<Waiting>, room: u64) -> Self {
        let ahead = Self {
            state: std::sync::Mutex::new(AheadState {
                waiting,
                fetched: Vec::new(),
            }),
            room,
        };
        ahead.fill(None);
        ahead
    }

    /// `name` is being opened: the images after it may be fetched ahead.
    pub(crate) fn opened(&self, name: &str) {
        self.fill(Some(name));
    }

    fn fill(&self, opened: Option<&str>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = opened {
            state.fetched.retain(|(fetched, _)| fetched != name);
            // Opened before its turn (the reader asked for a later image first): it fetches
            // its own blocks as it reads them.
            state.waiting.retain(|waiting| waiting.name != name);
        }
        loop {
            let held: u64 = state.fetched.iter().map(|(_, bytes)| bytes).sum();
            let Some(next) = state.waiting.front() else {
                break;
            };
            let blocks: u64 = next
                .blocks
                .iter()
                .map(|(first, last)| last - first + 1)
                .sum();
            let bytes = blocks * next.reader.block_size();
            if !state.fetched.is_empty() && held + bytes > self.room {
                break;
            }
            let Some(next) = state.waiting.pop_front() else {
                break;
            };
            for (first, last) in next.blocks {
                next.reader.prefetch_blocks(first, last);
            }
            state.fetched.push((next.name, bytes));
        }
    }
}

/// A volume's [`Storage`] with one chain's images opened ahead ([`VolumeStorage::open_chain`]):
/// each is handed out once, by the name it was opened for; any other name is opened as
/// [`VolumeStorage`] opens it.
pub struct ChainStorage {
    storage: VolumeStorage,
    opened: std::sync::Mutex<std::collections::HashMap<String, Arc<dyn ReadAt>>>,
    ahead: OpenAhead,
}

impl std::fmt::Debug for ChainStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainStorage")
            .field("storage", &self.storage)
            .finish_non_exhaustive()
    }
}

impl Storage for ChainStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        let ahead = self
            .opened
            .lock()
            .map_err(|_| io::Error::other("chain storage lock poisoned"))?
            .remove(path);
        self.ahead.opened(path);
        match ahead {
            Some(reader) => Ok(reader),
            None => self.storage.open(path),
        }
    }
}

/// An opened image: a file of a folder target, or an object.
pub(crate) enum Opened<R = ObjectReader> {
    File(std::fs::File),
    Object(R),
}

impl Storage for VolumeStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        self.current_object(path)
            .and_then(|object| self.open_named(&object))
            .map_err(io::Error::from)
    }
}
