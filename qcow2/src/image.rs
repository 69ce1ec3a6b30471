//! An image with its resolved backing chain: open, inspect, map and read.

use std::collections::HashSet;
use std::sync::Arc;

use crate::backing::{self, BackingPolicy};
use crate::check::{CheckFailure, ClusterCheck};
use crate::error::{Error, Result, corrupt, io_err};
use crate::header::{Header, MAGIC, incompat};
use crate::io::{LocalStorage, ReadAt, Storage};
use crate::layer::{ChainBudget, Qcow2Layer};
use crate::map::{Extent, ExtentKind};
use crate::offset::{GuestOffset, HostOffset};

mod source_read;
pub use source_read::SourceRead;

/// The default limit on the length of a backing chain.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// QCOW2.
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }

    /// Parses `qcow2` or `raw`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "qcow2" => Some(Self::Qcow2),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }
}

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Which backing and data file names may be followed.
    pub policy: BackingPolicy,
    /// The longest chain accepted.
    pub max_depth: usize,
    /// The top image's format; `None` probes the magic.
    pub format: Option<Format>,
    /// Checks every stored cluster any reader of the image returns (see [`ClusterCheck`]);
    /// `None` reads unchecked.
    pub cluster_check: Option<Arc<dyn ClusterCheck>>,
    /// Whether backing files are opened. When not (qemu's `backing: null`), the top image is
    /// opened alone and what it does not store reads as zeros: enough to check what one image
    /// stores without opening the chain under it. Default true.
    pub follow_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            policy: BackingPolicy::Confined,
            max_depth: DEFAULT_MAX_DEPTH,
            format: None,
            cluster_check: None,
            follow_backing: true,
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("policy", &self.policy)
            .field("max_depth", &self.max_depth)
            .field("format", &self.format)
            .field("cluster_check", &self.cluster_check.is_some())
            .field("follow_backing", &self.follow_backing)
            .finish()
    }
}

enum Layer {
    Qcow2(Box<Qcow2Layer>),
    Raw {
        name: String,
        source: Arc<dyn ReadAt>,
        len: u64,
    },
}

impl Layer {
    fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.size(),
            Layer::Raw { len, .. } => *len,
        }
    }

    fn name(&self) -> &str {
        match self {
            Layer::Qcow2(q) => &q.name,
            Layer::Raw { name, .. } => name,
        }
    }
}

/// What one image of a chain is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The name it was opened by.
    pub name: String,
    /// Its format.
    pub format: Format,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Its file's length.
    pub file_length: u64,
    /// QCOW2 details (none for a raw image).
    pub qcow2: Option<Qcow2Info>,
}

/// QCOW2 details of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The backing file name as stored.
    pub backing_file: Option<String>,
    /// The backing format as stored.
    pub backing_format: Option<String>,
    /// The external data file, resolved.
    pub data_file: Option<String>,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// The dirty bit (refcounts may be stale; reading is unaffected).
    pub dirty: bool,
    /// The corrupt bit: the image must not be written; it is read as it is.
    pub corrupt: bool,
    /// The lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Internal snapshots (ignored: the active layer is read).
    pub snapshots: u32,
    /// Whether a bitmaps extension is present (bitmaps are ignored).
    pub bitmaps: bool,
}

/// An opened image and its backing chain, read as one virtual disk.
///
/// All reads take `&self`: share an `Image` between threads to read it in parallel.
pub struct Image {
    layers: Vec<Layer>,
    check: Option<Arc<dyn ClusterCheck>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field(
                "chain",
                &self.layers.iter().map(Layer::name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Image {
    /// Opens a local image and its chain with the default (confined) policy.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::open_with_options(path, &OpenOptions::default())
    }

    /// Opens a local image with `options`.
    pub fn open_with_options(
        path: impl AsRef<std::path::Path>,
        options: &OpenOptions,
    ) -> Result<Self> {
        let name = path.as_ref().to_string_lossy().into_owned();
        Self::open_with(&LocalStorage::new(), &name, options)
    }

    /// Opens the image called `name` in `storage`, following its chain through the same storage.
    pub fn open_with(storage: &dyn Storage, name: &str, options: &OpenOptions) -> Result<Self> {
        let top_dir = backing::parent(name).to_owned();
        let mut layers = Vec::new();
        let mut budget = ChainBudget::default();
        let mut seen = HashSet::new();
        let mut next = Some((name.to_owned(), options.format));
        seen.insert(backing::normalize(name));
        while let Some((current, format)) = next.take() {
            if layers.len() >= options.max_depth {
                return Err(Error::ChainTooDeep {
                    image: current,
                    limit: options.max_depth,
                });
            }
            // A name found in an image (any layer but the top) is opened inside the top's
            // folder under the confined policy.
            let opened = if layers.is_empty() || options.policy == BackingPolicy::Permissive {
                storage.open(&current)
            } else {
                storage.open_inside(&current, &top_dir)
            };
            let source = match opened {
                Ok(source) => source,
                Err(e) if crate::io::is_outside_folder(&e) => {
                    let named_by = layers.last().map_or("", Layer::name);
                    return Err(Error::PathRefused {
                        image: named_by.to_owned(),
                        role: "backing file",
                        name: current,
                        reason: "a symbolic link leads out of the top image's folder",
                    });
                }
                Err(e) => return Err(io_err(&current, "opening", e)),
            };
            let len = source
                .len()
                .map_err(|e| io_err(&current, "reading the length", e))?;
            let format = match format {
                Some(f) => f,
                None => probe(&current, source.as_ref(), len)?,
            };
            if format == Format::Raw {
                if options.cluster_check.is_some() {
                    return Err(Error::Unsupported {
                        image: current,
                        feature: "cluster checks of a raw image".into(),
                    });
                }
                layers.push(Layer::Raw {
                    name: current,
                    source,
                    len,
                });
                break;
            }
            let layer = open_qcow2(
                storage,
                options.policy,
                &top_dir,
                current,
                source,
                len,
                &mut budget,
            )?;
            if options.cluster_check.is_some() && layer.header.extended_l2() {
                return Err(Error::Unsupported {
                    image: layer.name.clone(),
                    feature: "cluster checks of an image with extended L2 entries".into(),
                });
            }
            if let Some(backing_name) = &layer.header.backing_file
                && options.follow_backing
            {
                let resolved = backing::resolve(
                    options.policy,
                    &top_dir,
                    &layer.name,
                    "backing file",
                    backing_name,
                )?;
                if !seen.insert(resolved.clone()) {
                    return Err(Error::BackingLoop {
                        image: layer.name.clone(),
                        name: resolved,
                    });
                }
                let format = match layer.header.backing_format.as_deref() {
                    None => None,
                    Some(f) => Some(Format::parse(f).ok_or_else(|| Error::Unsupported {
                        image: layer.name.clone(),
                        feature: format!("backing format {f:?}"),
                    })?),
                };
                next = Some((resolved, format));
            }
            layers.push(Layer::Qcow2(Box::new(layer)));
        }
        let depth = layers.len();
        for layer in &mut layers {
            if let Layer::Qcow2(q) = layer {
                q.share_cache(depth);
            }
        }
        Ok(Self {
            layers,
            check: options.cluster_check.clone(),
        })
    }

    /// The virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, Layer::size)
    }

    /// The top image's cluster size (512 for a raw image).
    pub fn cluster_size(&self) -> u64 {
        match self.layers.first() {
            Some(Layer::Qcow2(q)) => q.header.cluster_size(),
            _ => 512,
        }
    }

    /// The top image's format.
    pub fn format(&self) -> Format {
        match self.layers.first() {
            Some(Layer::Qcow2(_)) => Format::Qcow2,
            _ => Format::Raw,
        }
    }

    /// The number of images in the chain.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Describes every image of the chain, top first.
    pub fn chain(&self) -> Vec<LayerInfo> {
        self.layers
            .iter()
            .map(|layer| match layer {
                Layer::Raw { name, len, .. } => LayerInfo {
                    name: name.clone(),
                    format: Format::Raw,
                    virtual_size: *len,
                    file_length: *len,
                    qcow2: None,
                },
                Layer::Qcow2(q) => {
                    let h = &q.header;
                    LayerInfo {
                        name: q.name.clone(),
                        format: Format::Qcow2,
                        virtual_size: h.size,
                        file_length: q.file_len(),
                        qcow2: Some(Qcow2Info {
                            version: h.version,
                            cluster_size: h.cluster_size(),
                            refcount_bits: 1 << h.refcount_order,
                            backing_file: h.backing_file.clone(),
                            backing_format: h.backing_format.clone(),
                            data_file: q.data_file_name().map(str::to_owned),
                            compression_type: h.compression_type.name(),
                            dirty: h.incompatible_features & incompat::DIRTY != 0,
                            corrupt: h.incompatible_features & incompat::CORRUPT != 0,
                            lazy_refcounts: h.compatible_features
                                & crate::header::compat::LAZY_REFCOUNTS
                                != 0,
                            extended_l2: h.extended_l2(),
                            snapshots: h.nb_snapshots,
                            bitmaps: h.has_bitmaps,
                        }),
                    }
                }
            })
            .collect()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Calls `f` with the extents covering `offset..offset + len`, in order, adjacent extents of
    /// the same kind merged. The chain is resolved as it goes: memory stays constant.
    pub fn for_each_extent(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Extent) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let mut pending: Option<Extent> = None;
        self.resolve(0, offset, len, &mut |extent| {
            if let Some(p) = pending.as_mut() {
                if p.try_merge(&extent) {
                    return Ok(());
                }
                let done = *p;
                *p = extent;
                return f(done);
            }
            pending = Some(extent);
            Ok(())
        })?;
        match pending {
            Some(p) => f(p),
            None => Ok(()),
        }
    }

    /// Hints every layer's source to fetch the tables that map guest bytes
    /// `offset..offset + len` (see [`ReadAt::prefetch`]): from object storage, a walk of a
    /// chain's window then waits for one round trip, not one per layer.
    pub fn prefetch_tables(&self, offset: u64, len: u64) {
        for layer in &self.layers {
            if let Layer::Qcow2(q) = layer {
                q.prefetch_tables(offset, len);
            }
        }
    }

    /// The extents covering `offset..offset + len` (like `qemu-img map`).
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        self.for_each_extent(offset, len, |e| {
            out.push(e);
            Ok(())
        })?;
        Ok(out)
    }

    fn resolve(
        &self,
        depth: usize,
        offset: u64,
        len: u64,
        emit: &mut dyn FnMut(Extent) -> Result<()>,
    ) -> Result<()> {
        let Some(layer) = self.layers.get(depth) else {
            return emit(Extent {
                start: GuestOffset(offset),
                length: len,
                kind: ExtentKind::Unallocated,
            });
        };
        let end = offset + len;
        let layer_size = layer.size();
        let mut pos = offset;
        while pos < end {
            if pos >= layer_size {
                return emit(Extent {
                    start: GuestOffset(pos),
                    length: end - pos,
                    kind: ExtentKind::Beyond { depth },
                });
            }
            let limit = end.min(layer_size) - pos;
            let (kind, run) = match layer {
                Layer::Raw { .. } => (
                    ExtentKind::Data {
                        depth,
                        host_offset: HostOffset(pos),
                    },
                    limit,
                ),
                Layer::Qcow2(q) => {
                    let (mapping, run) = q.lookup(pos, limit)?;
                    let kind = match mapping {
                        crate::l2::Mapping::Data { host } => ExtentKind::Data {
                            depth,
                            host_offset: HostOffset(host),
                        },
                        crate::l2::Mapping::Compressed { host, len } => ExtentKind::Compressed {
                            depth,
                            host_offset: HostOffset(host),
                            compressed_len: len,
                        },
                        crate::l2::Mapping::Zero => ExtentKind::Zero { depth },
                        crate::l2::Mapping::Unallocated => ExtentKind::Unallocated,
                    };
                    (kind, run.min(limit))
                }
            };
            if kind == ExtentKind::Unallocated {
                self.resolve(depth + 1, pos, run, emit)?;
            } else {
                emit(Extent {
                    start: GuestOffset(pos),
                    length: run,
                    kind,
                })?;
            }
            pos += run;
        }
        Ok(())
    }

    /// Reads the bytes of one extent (as produced by [`map`](Self::map)) into `buf`, whose
    /// length must not exceed the extent's.
    ///
    /// An image opened with a [`ClusterCheck`] reads every stored cluster the extent touches
    /// whole and checks it (and checks zeros as zeros) before filling `buf`.
    pub fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        let start = extent.start.get();
        match extent.kind {
            ExtentKind::Zero { .. } | ExtentKind::Unallocated | ExtentKind::Beyond { .. } => {
                self.check_zeros(extent.kind, start, buf.len() as u64)?;
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Data { depth, host_offset } => match self.layers.get(depth) {
                Some(Layer::Qcow2(q)) => match &self.check {
                    None => q.read_data(buf, host_offset.get()),
                    Some(check) => {
                        self.read_checked(check.as_ref(), depth, q, start, host_offset.get(), buf)
                    }
                },
                Some(Layer::Raw { name, source, len }) => {
                    let available = len.saturating_sub(host_offset.get()).min(buf.len() as u64);
                    let (head, tail) = buf.split_at_mut(available as usize);
                    source.read_exact_at(head, host_offset.get()).map_err(|e| {
                        io_err(name, format!("reading data at {host_offset:#x}"), e)
                    })?;
                    tail.fill(0);
                    Ok(())
                }
                None => Err(Error::InvalidArgument(format!("no image at depth {depth}"))),
            },
            ExtentKind::Compressed {
                depth,
                host_offset,
                compressed_len,
            } => {
                let Some(Layer::Qcow2(q)) = self.layers.get(depth) else {
                    return Err(Error::InvalidArgument(format!(
                        "no QCOW2 image at depth {depth}"
                    )));
                };
                let cluster_size = q.header.cluster_size();
                let mut cluster = vec![0u8; cluster_size as usize];
                q.read_compressed(&mut cluster, host_offset.get(), compressed_len)?;
                if let Some(check) = &self.check {
                    let first = start - start % cluster_size;
                    let len = cluster_size.min(q.size().saturating_sub(first)) as usize;
                    let data = cluster.get(..len).unwrap_or(&cluster);
                    check
                        .stored(depth, first, data)
                        .map_err(|failure| self.check_failed(check.as_ref(), failure))?;
                }
                let within = (start % cluster_size) as usize;
                let src = cluster
                    .get(within..within + buf.len())
                    .ok_or_else(|| corrupt(&q.name, "compressed extent spans clusters", 0))?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Reads data stored in `q` (at `depth`) for guest bytes `start..start + buf.len()` from
    /// host offset `host` on, checking every cluster it touches whole: clusters that `buf`
    /// covers are checked where they land, a cluster covered in part is read whole into a
    /// scratch buffer first. A standard cluster is stored contiguously (qcow2.rst, "Cluster
    /// mapping": the descriptor gives the host offset of its first byte), so its start is
    /// `host` less the request's distance into it.
    fn read_checked(
        &self,
        check: &dyn ClusterCheck,
        depth: usize,
        q: &Qcow2Layer,
        start: u64,
        host: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let cluster = q.header.cluster_size();
        let size = q.size();
        let end = start + buf.len() as u64;
        let outside = || Error::InvalidArgument("checked read outside its buffer".into());
        let mut pos = start;
        while pos < end {
            let first = pos - pos % cluster;
            let from = (pos - start) as usize;
            // From a cluster boundary: whole clusters up to the last one `buf` covers (the last
            // cluster of the image ends at the virtual size).
            let whole_end = if end >= size {
                end
            } else {
                end - end % cluster
            };
            if pos == first && whole_end > pos {
                let part = buf
                    .get_mut(from..(whole_end - start) as usize)
                    .ok_or_else(outside)?;
                q.read_data(part, host + (pos - start))?;
                for (i, data) in part.chunks(cluster as usize).enumerate() {
                    check
                        .stored(depth, pos + i as u64 * cluster, data)
                        .map_err(|failure| self.check_failed(check, failure))?;
                }
                pos = whole_end;
                continue;
            }
            let cluster_end = (first + cluster).min(size);
            let host_first = (host + (pos - start))
                .checked_sub(pos - first)
                .ok_or_else(|| corrupt(&q.name, "data cluster before the file's start", 0))?;
            let mut whole = vec![0u8; (cluster_end - first) as usize];
            q.read_data(&mut whole, host_first)?;
            check
                .stored(depth, first, &whole)
                .map_err(|failure| self.check_failed(check, failure))?;
            let piece_end = end.min(cluster_end);
            let dst = buf
                .get_mut(from..(piece_end - start) as usize)
                .ok_or_else(outside)?;
            let src = whole
                .get((pos - first) as usize..(piece_end - first) as usize)
                .ok_or_else(outside)?;
            dst.copy_from_slice(src);
            pos = piece_end;
        }
        Ok(())
    }

    /// Checks that `len` guest bytes from `start`, which `kind` says read as zeros, may, when
    /// the image was opened with a [`ClusterCheck`].
    pub(crate) fn check_zeros(&self, kind: ExtentKind, start: u64, len: u64) -> Result<()> {
        // Past an image's end, the images above it decide: its own list may name its partial
        // last cluster, whose tail past the end rightly reads as zeros.
        let deciding = match kind {
            ExtentKind::Beyond { depth: 0 } => return Ok(()),
            ExtentKind::Beyond { depth } => Some(depth - 1),
            kind => kind.depth(),
        };
        match &self.check {
            Some(check) => check
                .zeros(deciding, start, len)
                .map_err(|failure| self.check_failed(check.as_ref(), failure)),
            None => Ok(()),
        }
    }

    fn check_failed(&self, check: &dyn ClusterCheck, failure: CheckFailure) -> Error {
        let image = check.image_name(failure.depth).unwrap_or_else(|| {
            self.layers
                .get(failure.depth)
                .map_or_else(String::new, |layer| layer.name().to_owned())
        });
        if failure.unchecked {
            return Error::Io {
                image,
                action: format!(
                    "checking the cluster at guest offset {:#x}",
                    failure.guest_offset
                ),
                source: std::io::Error::other(failure.problem),
            };
        }
        Error::ClusterCheck {
            image,
            depth: failure.depth,
            guest_offset: failure.guest_offset,
            problem: failure.problem,
        }
    }

    /// Reads `buf.len()` guest bytes at `offset`, following the chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.for_each_extent(offset, len, |extent| {
            let from = extent.start.distance_from(GuestOffset(offset)) as usize;
            let to = from + extent.length as usize;
            let part = buf
                .get_mut(from..to)
                .ok_or_else(|| Error::InvalidArgument("extent outside the request".into()))?;
            self.read_extent(&extent, part)
        })
    }
}

/// Reads the magic: QCOW2 when it matches, raw otherwise.
fn probe(name: &str, source: &dyn ReadAt, len: u64) -> Result<Format> {
    if len < 4 {
        return Ok(Format::Raw);
    }
    let mut magic = [0u8; 4];
    source
        .read_exact_at(&mut magic, 0)
        .map_err(|e| io_err(name, "reading the magic", e))?;
    Ok(if magic == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

fn open_qcow2(
    storage: &dyn Storage,
    policy: BackingPolicy,
    top_dir: &str,
    name: String,
    source: Arc<dyn ReadAt>,
    len: u64,
    budget: &mut ChainBudget,
) -> Result<Qcow2Layer> {
    // The header, its extensions and the backing file name all lie in the first cluster
    // (qcow2.rst, "Header" and "Header extensions"): read 64 KiB (the default cluster size),
    // then the rest of the cluster its `cluster_bits` give where it is larger, so an image on
    // object storage costs one 64 KiB read, not the largest cluster's 2 MiB (and a reader with
    // read-ahead sees no sequential second read to start a stream on). A bad `cluster_bits`
    // is left to `Header::parse`.
    let mut first = vec![0u8; len.min(64 << 10) as usize];
    source
        .read_exact_at(&mut first, 0)
        .map_err(|e| io_err(&name, "reading the header", e))?;
    let bits = first
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .filter(|bits| {
            (crate::header::MIN_CLUSTER_BITS..=crate::header::MAX_CLUSTER_BITS).contains(bits)
        });
    if let Some(bits) = bits {
        let cluster = len.min(1 << bits) as usize;
        if cluster > first.len() {
            let read = first.len();
            first.resize(cluster, 0);
            source
                .read_exact_at(&mut first[read..], read as u64)
                .map_err(|e| io_err(&name, "reading the header", e))?;
        }
    }
    let header = Header::parse(&name, &first, len)?;
    let data_file = if header.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0 {
        let stored = header
            .data_file
            .as_deref()
            .ok_or_else(|| Error::Unsupported {
                image: name.clone(),
                feature: "external data file without a data file name extension".into(),
            })?;
        let resolved = backing::resolve(policy, top_dir, &name, "external data file", stored)?;
        let opened = match policy {
            BackingPolicy::Confined => storage.open_inside(&resolved, top_dir),
            BackingPolicy::Permissive => storage.open(&resolved),
        }
        .map_err(|e| {
            if crate::io::is_outside_folder(&e) {
                Error::PathRefused {
                    image: name.clone(),
                    role: "external data file",
                    name: stored.to_owned(),
                    reason: "a symbolic link leads out of the top image's folder",
                }
            } else {
                io_err(&resolved, "opening the external data file", e)
            }
        })?;
        Some((resolved, opened))
    } else {
        None
    };
    Qcow2Layer::open(name, source, len, header, data_file, budget)
}
