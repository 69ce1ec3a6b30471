//! Backing up a volume into a base image or an overlay, in one pass.
//!
//! The volume is scanned in ascending order, a chunk at a time; holes the volume reports
//! ([`VolumeRead::next_data`]) are never read. Helper threads read and hash the chunks ahead
//! (see `read_ahead`); this thread classifies each cluster by the [`ChangeSource`] and hands
//! changed clusters to the QCOW2 writer, which streams them into the sink. With compression on,
//! the helper threads compress the clusters to be stored as well, and this thread hands the
//! writer compressed clusters and raw ones (those that did not shrink) alike. Along the way the
//! backup records the digest of every non-zero cluster (for the next digest delta) and the
//! CRC-32 of the guest bytes of every cluster it stores, compressed or not (for verify).

use strata_qcow2::{BackingRead, ImageSink, VolumeRead, WriteSummary, Writer, WriterOptions};

use crate::checksum::ClusterChecksums;
use crate::digest::{Cursor, DigestAlgorithm, DigestManifest};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::ranges::{ByteRange, to_clusters};
use crate::read_ahead::{self, Chunk, Plan};

/// Bytes scanned at a time (rounded up to whole clusters).
const CHUNK: u64 = 4 << 20;

/// How a backup decides which clusters changed.
#[derive(Clone, Copy)]
pub enum ChangeSource<'a> {
    /// Every allocated, non-zero cluster: a full base image.
    Full,
    /// The clusters overlapping ranges given from outside (changed-block tracking); the
    /// previous backup's digests are carried over for the clusters not read.
    ChangedRanges {
        /// The changed byte ranges.
        ranges: &'a [ByteRange],
        /// The previous backup's digests.
        previous: Option<&'a DigestManifest>,
    },
    /// Clusters whose digest differs from the previous backup's.
    Digests {
        /// The previous backup's digests.
        previous: &'a DigestManifest,
    },
    /// Clusters whose content differs from the previous point (the previous snapshot's volume,
    /// or the previous backup's chain).
    Compare {
        /// What the previous point reads.
        previous: &'a (dyn BackingRead + Sync),
    },
}

impl std::fmt::Debug for ChangeSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "Full",
            Self::ChangedRanges { .. } => "ChangedRanges",
            Self::Digests { .. } => "Digests",
            Self::Compare { .. } => "Compare",
        })
    }
}

/// What a backup produced besides the image.
#[derive(Debug)]
pub struct BackupOutcome {
    /// The image written.
    pub summary: WriteSummary,
    /// Digests of every non-zero cluster of the volume at this point (spilled to a temporary
    /// file: stream it out with [`DigestManifest::into_reader`]).
    pub digests: DigestManifest,
    /// CRC-32 of every cluster stored in the image (spilled likewise).
    pub checksums: ClusterChecksums,
    /// Counters at the end.
    pub progress: Progress,
}

/// Backs up `volume` (a file, block device or any [`VolumeRead`]) into `sink`.
///
/// With `options.backing_file` set the image is an overlay: changed clusters that became zero
/// are zero clusters, unchanged ones stay unallocated. Without it the image is a full base
/// image whatever `source` says. `progress` is called after every chunk.
///
/// With `options.compression` set, stored clusters are compressed (at
/// `options.compression_level`) on the reader threads; a cluster that does not shrink is
/// stored raw. Compression never changes which clusters are stored.
///
/// `digests` is the algorithm of the new digest manifest when `source` carries no previous
/// digests (a full backup, a comparison). With previous digests their algorithm carries over,
/// whatever `digests` says: the new digests are compared with, or copied from, the old.
pub fn backup<S: ImageSink>(
    volume: &dyn VolumeRead,
    sink: S,
    options: &WriterOptions,
    source: ChangeSource<'_>,
    digests: DigestAlgorithm,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(S, BackupOutcome)> {
    let size = volume.size().map_err(|source| Error::Io {
        what: "reading the volume size",
        offset: 0,
        source,
    })?;
    let overlay = options.backing_file.is_some();
    let source = if overlay { source } else { ChangeSource::Full };
    // The readers compress; the writer stores what they give it and only names the method in
    // the header.
    let compression = options
        .compression
        .map(|method| (method, options.compression_level));
    let mut writer_options = options.clone();
    if let Some(method) = writer_options.compression.take() {
        writer_options.compression_type = method;
    }
    let mut writer = Writer::new(sink, &writer_options, size)?;
    let cluster = writer.cluster_size();
    let (previous_digests, changed) = match source {
        ChangeSource::ChangedRanges { ranges, previous } => {
            (previous, Some(to_clusters(ranges, cluster, size)?))
        }
        ChangeSource::Digests { previous } => (Some(previous), None),
        ChangeSource::Full | ChangeSource::Compare { .. } => (None, None),
    };
    if let Some(previous) = previous_digests {
        if previous.cluster_size != cluster {
            return Err(Error::Mismatch(format!(
                "previous digests cover {} byte clusters, the image uses {cluster}",
                previous.cluster_size
            )));
        }
    }
    let algorithm = previous_digests.map_or(digests, |previous| previous.algorithm);
    let plan = Plan {
        volume,
        algorithm,
        size,
        cluster,
        chunk: CHUNK.next_multiple_of(cluster),
        changed: changed.as_deref(),
        previous: match source {
            ChangeSource::Compare { previous } => Some(previous),
            _ => None,
        },
        previous_digests: match source {
            ChangeSource::Digests { previous } => Some(previous),
            _ => None,
        },
        compression,
    };
    let mut state = State {
        source,
        overlay,
        cluster,
        ranges_given: changed.is_some(),
        cursor: Cursor::new(previous_digests),
        digests: DigestManifest::new(algorithm, cluster, size),
        checksums: ClusterChecksums::new(cluster),
        progress: Progress {
            total_bytes: size,
            ..Progress::default()
        },
        zeros: Vec::new(),
    };
    read_ahead::scan(&plan, &mut |chunk| {
        state.consume(&mut writer, chunk)?;
        progress(&state.progress);
        Ok(())
    })?;
    let (sink, summary) = writer.finish()?;
    Ok((
        sink,
        BackupOutcome {
            summary,
            digests: state.digests,
            checksums: state.checksums,
            progress: state.progress,
        },
    ))
}

/// What the backup's own thread keeps while it takes the chunks in order.
struct State<'a> {
    source: ChangeSource<'a>,
    overlay: bool,
    cluster: u64,
    ranges_given: bool,
    cursor: Cursor<'a>,
    digests: DigestManifest,
    checksums: ClusterChecksums,
    progress: Progress,
    /// A chunk of zeros, for zero runs of chunks with no data read.
    zeros: Vec<u8>,
}

impl State<'_> {
    /// Decides which clusters of the chunk changed, writes them, records digests and
    /// checksums.
    fn consume<S: ImageSink>(&mut self, writer: &mut Writer<S>, chunk: Chunk<'_>) -> Result<()> {
        let cluster = self.cluster;
        let end = chunk.offset + chunk.len as u64;
        let (c0, c1) = (chunk.offset / cluster, end.div_ceil(cluster));
        self.progress.scanned_bytes = end;
        if self.ranges_given && chunk.wanted.is_empty() {
            // Nothing changed here: the previous digests carry over, nothing was read.
            let digests = &mut self.digests;
            self.cursor
                .take_until(c0, c1, |index, d| digests.push(index, d))?;
            return Ok(());
        }
        let previous_data = match self.source {
            ChangeSource::Compare { .. } => chunk.previous_data,
            ChangeSource::Digests { .. } => self.cursor.any_in(c0, c1)?,
            _ => false,
        };
        if !self.ranges_given && chunk.data.is_none() && !previous_data {
            return Ok(());
        }
        let (bytes, packed) = match &chunk.data {
            Some(buf) => (buf.bytes(), buf.packed()),
            None => {
                if self.zeros.len() < chunk.len {
                    self.zeros = vec![0; chunk.len];
                }
                (&self.zeros[..chunk.len], &[][..])
            }
        };
        let clusters = Clusters {
            bytes,
            offset: chunk.offset,
            packed,
            compressed: &chunk.compressed,
        };
        let mut pos = c0;
        for &(a, b) in &chunk.wanted {
            // Clusters not read keep their previous digests.
            let digests = &mut self.digests;
            self.cursor
                .take_until(pos, a, |index, d| digests.push(index, d))?;
            let mut run: Option<u64> = None;
            for index in a..b {
                let i = (index - c0) as usize;
                let new_digest = chunk.digests.get(i).copied().flatten();
                let zero = new_digest.is_none();
                if let Some(d) = new_digest {
                    self.digests.push(index, d)?;
                }
                let differs = match self.source {
                    ChangeSource::Full => !zero,
                    // The ranges say where to look (changed-block tracking reports in coarse
                    // blocks, and may list what was written with the same bytes): with the
                    // previous digests, a cluster read is stored only if it differs, so an
                    // overlay holds the changed clusters whatever the ranges' grain.
                    ChangeSource::ChangedRanges {
                        previous: Some(_), ..
                    } => new_digest != self.cursor.get(index)?,
                    ChangeSource::ChangedRanges { previous: None, .. } => true,
                    ChangeSource::Digests { .. } => new_digest != self.cursor.get(index)?,
                    ChangeSource::Compare { .. } => chunk.differs.get(i).copied().unwrap_or(true),
                };
                if differs {
                    run.get_or_insert(index);
                    if !zero {
                        let data = cluster_bytes(bytes, c0, index, cluster);
                        self.checksums.push(index, data)?;
                        self.progress.changed_clusters += 1;
                        self.progress.written_bytes += data.len() as u64;
                    } else if self.overlay {
                        self.progress.zeroed_clusters += 1;
                    }
                } else if let Some(first) = run.take() {
                    self.write_run(writer, &clusters, first, index)?;
                }
            }
            if let Some(first) = run {
                self.write_run(writer, &clusters, first, b)?;
            }
            if self.ranges_given {
                // Skip the previous digests of the clusters just read.
                self.cursor.take_until(a, b, |_, _| Ok(()))?;
            }
            pos = b;
        }
        if self.ranges_given {
            let digests = &mut self.digests;
            self.cursor
                .take_until(pos, c1, |index, d| digests.push(index, d))?;
        }
        Ok(())
    }

    /// Hands clusters `first..end` of the chunk to the writer: compressed ones one at a
    /// time, the others in runs.
    fn write_run<S: ImageSink>(
        &self,
        writer: &mut Writer<S>,
        clusters: &Clusters<'_>,
        first: u64,
        end: u64,
    ) -> Result<()> {
        let c0 = clusters.offset / self.cluster;
        let mut raw_from = first;
        for index in first..end {
            let packed = clusters
                .compressed
                .get((index - c0) as usize)
                .cloned()
                .flatten()
                .and_then(|range| clusters.packed.get(range));
            if let Some(packed) = packed {
                self.write_raw(writer, clusters, raw_from, index)?;
                writer.write_compressed(index * self.cluster, packed)?;
                raw_from = index + 1;
            }
        }
        self.write_raw(writer, clusters, raw_from, end)
    }

    /// Hands clusters `first..end` of the chunk to the writer as they are (nothing when empty).
    fn write_raw<S: ImageSink>(
        &self,
        writer: &mut Writer<S>,
        clusters: &Clusters<'_>,
        first: u64,
        end: u64,
    ) -> Result<()> {
        if first >= end {
            return Ok(());
        }
        let at = first * self.cluster;
        let from = (at - clusters.offset) as usize;
        let to = ((end * self.cluster - clusters.offset) as usize).min(clusters.bytes.len());
        let data = &clusters.bytes[from..to];
        if self.overlay {
            writer.write_data_over_backing(at, data)?;
        } else {
            writer.write_data(at, data)?;
        }
        Ok(())
    }
}

/// A chunk's clusters as the writer takes them.
struct Clusters<'a> {
    /// The chunk's bytes, holes as zeros.
    bytes: &'a [u8],
    /// Guest offset of the chunk.
    offset: u64,
    /// The compressed clusters, back to back.
    packed: &'a [u8],
    /// Per cluster of the chunk, its compressed form in `packed` (empty without compression).
    compressed: &'a [Option<std::ops::Range<usize>>],
}

/// The bytes of cluster `index` in a chunk starting at cluster `c0`.
fn cluster_bytes(bytes: &[u8], c0: u64, index: u64, cluster: u64) -> &[u8] {
    let from = ((index - c0) * cluster) as usize;
    let to = (from + cluster as usize).min(bytes.len());
    &bytes[from..to]
}
