//! Backing up a volume into a base image or an overlay, in one pass.
//!
//! The volume is scanned in ascending order, a chunk at a time; holes found with
//! `SEEK_DATA`/`SEEK_HOLE` are never read. Each cluster is classified by the
//! [`ChangeSource`]; changed clusters go to the QCOW2 writer, which streams them into the sink.
//! Along the way the backup records the digest of every non-zero cluster (for the next digest
//! delta) and the CRC-32 of every cluster it stores (for verify).

use std::fs::File;

use strata_qcow2::{
    BackingRead, DataRanges, ImageSink, ReadAt, WriteSummary, Writer, WriterOptions, is_zero,
};

use crate::checksum::ClusterChecksums;
use crate::digest::{Cursor, DigestManifest, digest};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::ranges::{ByteRange, to_clusters};

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
        previous: &'a dyn BackingRead,
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
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The image written.
    pub summary: WriteSummary,
    /// Digests of every non-zero cluster of the volume at this point.
    pub digests: DigestManifest,
    /// CRC-32 of every cluster stored in the image.
    pub checksums: ClusterChecksums,
    /// Counters at the end.
    pub progress: Progress,
}

/// Backs up `volume` (a raw file or block device) into `sink`.
///
/// With `options.backing_file` set the image is an overlay: changed clusters that became zero
/// are zero clusters, unchanged ones stay unallocated. Without it the image is a full base
/// image whatever `source` says. `progress` is called after every chunk.
pub fn backup<S: ImageSink>(
    volume: &File,
    sink: S,
    options: &WriterOptions,
    source: ChangeSource<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(S, BackupOutcome)> {
    let size = ReadAt::len(volume).map_err(|source| Error::Io {
        what: "reading the volume size",
        offset: 0,
        source,
    })?;
    let overlay = options.backing_file.is_some();
    let source = if overlay { source } else { ChangeSource::Full };
    let mut writer = Writer::new(sink, options, size)?;
    let cluster = writer.cluster_size();
    let mut scan = Scan {
        volume,
        size,
        cluster,
        overlay,
        data: DataRanges::new(volume, size),
        pending: None,
        digests: DigestManifest::new(cluster, size),
        checksums: ClusterChecksums::new(cluster),
        progress: Progress {
            total_bytes: size,
            ..Progress::default()
        },
    };
    scan.pending = scan.data.next_range()?;
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
    let mut cursor = Cursor::new(previous_digests);
    let chunk = CHUNK.next_multiple_of(cluster);
    let mut buf = vec![0u8; chunk as usize];
    let mut old = vec![0u8; chunk as usize];
    let mut changed_at = 0usize;
    let mut offset = 0;
    while offset < size {
        let end = (offset + chunk).min(size);
        let (c0, c1) = (offset / cluster, end.div_ceil(cluster));
        let len = (end - offset) as usize;
        let buf = &mut buf[..len];
        // Which clusters of this chunk are candidates for a change.
        let wanted: Vec<(u64, u64)> = match &changed {
            Some(runs) => {
                while runs.get(changed_at).is_some_and(|&(_, b)| b <= c0) {
                    changed_at += 1;
                }
                runs[changed_at.min(runs.len())..]
                    .iter()
                    .take_while(|&&(a, _)| a < c1)
                    .map(|&(a, b)| (a.max(c0), b.min(c1)))
                    .collect()
            }
            None => vec![(c0, c1)],
        };
        if changed.is_some() && wanted.is_empty() {
            // Nothing changed here: the previous digests carry over, nothing is read.
            for &(index, d) in cursor.take_until(c0, c1) {
                scan.digests.push(index, d);
            }
            offset = end;
            scan.progress.scanned_bytes = end;
            progress(&scan.progress);
            continue;
        }
        let volume_data = scan.read_chunk(buf, offset)?;
        let previous_data = match source {
            ChangeSource::Compare { previous } => read_previous(previous, &mut old[..len], offset)?,
            ChangeSource::Digests { .. } => cursor.any_in(c0, c1),
            _ => false,
        };
        if changed.is_none() && !volume_data && !previous_data {
            offset = end;
            scan.progress.scanned_bytes = end;
            progress(&scan.progress);
            continue;
        }
        // Buffers are only cleared when the chunk is processed: clearing every chunk of a
        // mostly sparse volume would cost as much as reading it.
        if !volume_data {
            buf.fill(0);
        }
        if matches!(source, ChangeSource::Compare { .. }) && !previous_data {
            old[..len].fill(0);
        }
        let mut pos = c0;
        for (a, b) in wanted {
            // Clusters not read keep their previous digests.
            for &(index, d) in cursor.take_until(pos, a) {
                scan.digests.push(index, d);
            }
            let mut run: Option<u64> = None;
            for index in a..b {
                let from = ((index - c0) * cluster) as usize;
                let to = (from + cluster as usize).min(len);
                let data = &buf[from..to];
                let zero = is_zero(data);
                let new_digest = (!zero).then(|| digest(data));
                if let Some(d) = new_digest {
                    scan.digests.push(index, d);
                }
                let differs = match source {
                    ChangeSource::Full => !zero,
                    ChangeSource::ChangedRanges { .. } => true,
                    ChangeSource::Digests { .. } => new_digest != cursor.get(index),
                    ChangeSource::Compare { .. } => data != &old[from..to],
                };
                if differs {
                    run.get_or_insert(index);
                    if !zero {
                        scan.checksums.push(index, data);
                        scan.progress.changed_clusters += 1;
                        scan.progress.written_bytes += data.len() as u64;
                    } else if overlay {
                        scan.progress.zeroed_clusters += 1;
                    }
                } else if let Some(first) = run.take() {
                    scan.write_run(&mut writer, buf, c0, first, index)?;
                }
            }
            if let Some(first) = run {
                scan.write_run(&mut writer, buf, c0, first, b)?;
            }
            if changed.is_some() {
                // Skip the previous digests of the clusters just read.
                cursor.take_until(a, b);
            }
            pos = b;
        }
        if changed.is_some() {
            for &(index, d) in cursor.take_until(pos, c1) {
                scan.digests.push(index, d);
            }
        }
        offset = end;
        scan.progress.scanned_bytes = end;
        progress(&scan.progress);
    }
    let (sink, summary) = writer.finish()?;
    Ok((
        sink,
        BackupOutcome {
            summary,
            digests: scan.digests,
            checksums: scan.checksums,
            progress: scan.progress,
        },
    ))
}

struct Scan<'a> {
    volume: &'a File,
    size: u64,
    cluster: u64,
    overlay: bool,
    data: DataRanges<'a>,
    pending: Option<(u64, u64)>,
    digests: DigestManifest,
    checksums: ClusterChecksums,
    progress: Progress,
}

impl Scan<'_> {
    /// Fills `buf` with the volume at `offset` (holes as zeros) and returns true, or returns
    /// false without touching `buf` when the chunk is all holes.
    fn read_chunk(&mut self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let end = offset + buf.len() as u64;
        if self.pending.is_none_or(|(start, _)| start >= end) {
            return Ok(false);
        }
        buf.fill(0);
        let mut any = false;
        while let Some((start, stop)) = self.pending {
            if start >= end {
                break;
            }
            let (lo, hi) = (start.max(offset), stop.min(end).min(self.size));
            if lo < hi {
                let part = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
                ReadAt::read_exact_at(self.volume, part, lo).map_err(|source| Error::Io {
                    what: "reading the volume",
                    offset: lo,
                    source,
                })?;
                any = true;
            }
            if stop > end {
                break;
            }
            self.pending = self.data.next_range()?;
        }
        Ok(any)
    }

    /// Hands clusters `first..end` of the chunk starting at cluster `c0` to the writer.
    fn write_run<S: ImageSink>(
        &self,
        writer: &mut Writer<S>,
        buf: &[u8],
        c0: u64,
        first: u64,
        end: u64,
    ) -> Result<()> {
        let from = ((first - c0) * self.cluster) as usize;
        let to = (((end - c0) * self.cluster) as usize).min(buf.len());
        let offset = first * self.cluster;
        if self.overlay {
            writer.write_data_over_backing(offset, &buf[from..to])?;
        } else {
            writer.write_data(offset, &buf[from..to])?;
        }
        Ok(())
    }
}

/// Reads what the previous point holds at `offset` into `old` (zeros past its end) and
/// returns true, or returns false without touching `old` where it holds nothing.
fn read_previous(previous: &dyn BackingRead, old: &mut [u8], offset: u64) -> Result<bool> {
    let end = (offset + old.len() as u64).min(previous.size());
    if offset >= end {
        return Ok(false);
    }
    let span = end - offset;
    let io = |source| Error::Io {
        what: "reading the previous point",
        offset,
        source,
    };
    if !previous.may_hold_data(offset, span).map_err(io)? {
        return Ok(false);
    }
    old.fill(0);
    previous
        .read_at(&mut old[..span as usize], offset)
        .map_err(io)?;
    Ok(true)
}
