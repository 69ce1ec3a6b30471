//! Reading and classifying the volume ahead of the backup, on helper threads.
//!
//! It runs on the workspace's one engine, [`strata_qcow2::pipeline`]: one planner thread walks the volume's data ranges once, in ascending order, and cuts the
//! volume into chunks. Reader threads fill the chunks (holes as zeros), read the previous point
//! where a comparison needs it, and classify every wanted cluster in parallel: zero or not, its
//! 128-bit digest, whether it differs from the previous point. With compression on they also
//! compress every cluster the backup will store (non-zero and changed by the comparison or the
//! previous digests). The backup's own thread takes the chunks back in order and only decides
//! and writes, so reading, hashing, compressing and writing the image overlap, and hashing and
//! compressing spread over the cores.
//!
//! Memory is bounded: [`BUFFERS`] chunk buffers hold data (so at most that many chunks are read
//! and not yet consumed, and as many more wait planned), and each reader owns one more for the
//! previous point in comparison mode.

use std::ops::Range;

use strata_qcow2::pipeline::Pipeline;
use strata_qcow2::{
    BackingRead, ClusterCompressor, CompressionType, GuestRange, VolumeChunks, VolumeRead, is_zero,
    read_chunk as read_volume_chunk,
};

pub(crate) use strata_qcow2::pipeline::Buffer;

use crate::digest::{Digest, DigestAlgorithm, DigestManifest};
use crate::error::{Error, Result};

/// Reader threads. Parallel reads from the page cache or a device queue go faster than one,
/// and each reader also hashes what it read.
const READERS: usize = 3;
/// Chunk buffers (being read, waiting to be consumed in order, or consumed): at most this many
/// chunks are read and not yet consumed.
pub(crate) const BUFFERS: usize = READERS + 3;

/// What to read and how to classify it.
pub(crate) struct Plan<'a> {
    /// The volume.
    pub volume: &'a dyn VolumeRead,
    /// How clusters are digested.
    pub algorithm: DigestAlgorithm,
    /// Bytes of the volume to scan.
    pub size: u64,
    /// Cluster size of the image.
    pub cluster: u64,
    /// Chunk size, a multiple of `cluster`.
    pub chunk: u64,
    /// Runs of clusters `(first, end)` to read, ascending; `None` reads everything.
    pub changed: Option<&'a [(u64, u64)]>,
    /// The previous point, for a comparison.
    pub previous: Option<&'a (dyn BackingRead + Sync)>,
    /// The previous backup's digests, when clusters whose digest did not change are not
    /// stored (only to spare compressing them).
    pub previous_digests: Option<&'a DigestManifest>,
    /// Compress the clusters to be stored with this method and level.
    pub compression: Option<(CompressionType, Option<i32>)>,
}

/// A chunk read and classified.
pub(crate) struct Chunk<'b> {
    /// Guest offset of the chunk.
    pub offset: u64,
    /// Length of the chunk in bytes.
    pub len: usize,
    /// Runs of clusters `(first, end)` of this chunk that were considered.
    pub wanted: Vec<(u64, u64)>,
    /// The chunk's bytes, holes as zeros, and its compressed clusters in
    /// [`Buffer::packed`]; `None` when no data was read.
    pub data: Option<&'b Buffer>,
    /// One entry per cluster of the chunk: the digest of a considered non-zero cluster.
    pub digests: Vec<Option<Digest>>,
    /// One entry per cluster of the chunk (comparison mode only): whether it differs from the
    /// previous point.
    pub differs: Vec<bool>,
    /// Whether the previous point held anything in this chunk (comparison mode only).
    pub previous_data: bool,
    /// One entry per cluster of the chunk (compression on): where its compressed form lies
    /// in the buffer's [`Buffer::packed`], for a cluster to be stored that shrank.
    pub compressed: Vec<Option<Range<usize>>>,
}

/// A chunk to read: the chunk, its considered cluster runs and the volume's data pieces
/// within it.
struct Task {
    range: GuestRange,
    wanted: Vec<(u64, u64)>,
    pieces: Vec<GuestRange>,
}

/// A chunk classified by a reader: a [`Chunk`] without its buffer.
struct Classified {
    range: GuestRange,
    wanted: Vec<(u64, u64)>,
    read: bool,
    digests: Vec<Option<Digest>>,
    differs: Vec<bool>,
    previous_data: bool,
    compressed: Vec<Option<Range<usize>>>,
}

/// A reader thread's state: its compressor, and a buffer for the previous point's bytes in
/// comparison mode.
struct Reader {
    compressor: Option<ClusterCompressor>,
    old: Option<Buffer>,
}

/// Runs the plan on the [`Pipeline`] and hands every chunk, in ascending order, to `consume`.
///
/// Memory: [`BUFFERS`] chunk buffers, and one more a reader in comparison mode.
pub(crate) fn scan(
    plan: &Plan<'_>,
    consume: &mut dyn FnMut(Chunk<'_>) -> Result<()>,
) -> Result<()> {
    Pipeline::new(READERS, plan.chunk as usize)
        .with_buffers(BUFFERS)
        .run(
            |tasks| plan_chunks(plan, &mut |task| tasks.submit(task)),
            || {
                Ok(Reader {
                    compressor: plan
                        .compression
                        .map(|(method, level)| ClusterCompressor::new(method, level, plan.cluster))
                        .transpose()?,
                    old: plan.previous.map(|_| Buffer::new(plan.chunk as usize)),
                })
            },
            |reader, task, buf| read_chunk(plan, task, buf, reader),
            |classified, buf| {
                consume(Chunk {
                    offset: classified.range.start.get(),
                    len: classified.range.len() as usize,
                    wanted: classified.wanted,
                    data: classified.read.then_some(buf),
                    digests: classified.digests,
                    differs: classified.differs,
                    previous_data: classified.previous_data,
                    compressed: classified.compressed,
                })
            },
        )
}

/// Cuts the volume into chunks, noting the considered cluster runs and the volume's data
/// pieces of each; stops early when `submit` says the pipeline has stopped.
fn plan_chunks(plan: &Plan<'_>, submit: &mut dyn FnMut(Task) -> bool) -> Result<()> {
    let mut chunks = VolumeChunks::new(plan.volume, plan.size, plan.chunk);
    let mut changed_at = 0usize;
    while let Some((range, data)) = chunks.next_chunk().map_err(|source| Error::Io {
        what: "looking for data in the volume",
        offset: 0,
        source,
    })? {
        let clusters = range.clusters(plan.cluster);
        let (c0, c1) = (clusters.start, clusters.end);
        let wanted: Vec<(u64, u64)> = match plan.changed {
            Some(runs) => {
                while runs.get(changed_at).is_some_and(|&(_, b)| b <= c0) {
                    changed_at += 1;
                }
                runs.get(changed_at..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(|&&(a, _)| a < c1)
                    .map(|&(a, b)| (a.max(c0), b.min(c1)))
                    .collect()
            }
            None => vec![(c0, c1)],
        };
        // Only the considered clusters are read.
        let pieces = match plan.changed {
            None => data,
            Some(_) => intersect(&data, &wanted, plan.cluster),
        };
        if !submit(Task {
            range,
            wanted,
            pieces,
        }) {
            return Ok(());
        }
    }
    Ok(())
}

/// The parts of byte ranges `data` inside cluster runs `wanted` (both ascending).
fn intersect(data: &[GuestRange], wanted: &[(u64, u64)], cluster: u64) -> Vec<GuestRange> {
    let mut out = Vec::new();
    for &(a, b) in wanted {
        let run = GuestRange::new(a * cluster, b * cluster);
        out.extend(data.iter().filter_map(|piece| piece.intersect(&run)));
    }
    out
}

/// Reads one chunk into `buf` (where it has data) and classifies its clusters.
fn read_chunk(
    plan: &Plan<'_>,
    task: Task,
    buf: &mut Buffer,
    reader: &mut Reader,
) -> Result<Classified> {
    let (offset, len) = (task.range.start.get(), task.range.len() as usize);
    let cluster = plan.cluster as usize;
    let clusters = len.div_ceil(cluster);
    let read = !task.pieces.is_empty();
    if read {
        let bytes = buf.resize(len);
        read_volume_chunk(plan.volume, task.range, &task.pieces, bytes).map_err(|source| {
            Error::Io {
                what: "reading the volume",
                offset,
                source,
            }
        })?;
    }
    let previous = match (plan.previous, reader.old.as_mut()) {
        (Some(previous), Some(old)) => read_previous(previous, old, offset, len)?,
        _ => None,
    };
    let mut digests = vec![None; clusters];
    let mut differs = match plan.previous {
        Some(_) => vec![false; clusters],
        None => Vec::new(),
    };
    let mut compressed = Vec::new();
    if reader.compressor.is_some() {
        compressed = vec![None; clusters];
    }
    let (bytes, packed) = buf.split_mut();
    packed.clear();
    let data = read.then_some(&*bytes);
    let c0 = offset / plan.cluster;
    for &(a, b) in &task.wanted {
        for index in a..b {
            let i = (index - c0) as usize;
            let range = i * cluster..((i + 1) * cluster).min(len);
            let now = data.map(|d| &d[range.clone()]);
            let now = now.filter(|bytes| !is_zero(bytes));
            let digest = now.map(|bytes| plan.algorithm.digest(bytes));
            digests[i] = digest;
            if plan.previous.is_some() {
                let before = previous.map(|p| &p[range]);
                differs[i] = match (now, before) {
                    (None, None) => false,
                    (Some(_), None) => true,
                    (None, Some(before)) => !is_zero(before),
                    (Some(now), Some(before)) => now != before,
                };
            }
            // Only clusters the backup stores are worth compressing.
            let stored = plan.previous.is_none() || differs[i];
            let changed = plan
                .previous_digests
                .is_none_or(|manifest| manifest.get(index).ok().flatten() != digest);
            if let (Some(bytes), Some(compressor), true) =
                (now, reader.compressor.as_mut(), stored && changed)
            {
                if let Some(shrunk) = compressor.compress(bytes) {
                    let start = packed.len();
                    packed.extend_from_slice(shrunk);
                    compressed[i] = Some(start..packed.len());
                }
            }
        }
    }
    Ok(Classified {
        range: task.range,
        wanted: task.wanted,
        read,
        digests,
        differs,
        previous_data: previous.is_some(),
        compressed,
    })
}

/// Reads what the previous point holds in the chunk into `old` (zeros past its end), or
/// `None` where it holds nothing.
fn read_previous<'b>(
    previous: &(dyn BackingRead + Sync),
    old: &'b mut Buffer,
    offset: u64,
    len: usize,
) -> Result<Option<&'b [u8]>> {
    let end = (offset + len as u64).min(previous.size());
    if offset >= end {
        return Ok(None);
    }
    let span = end - offset;
    let io = |source| Error::Io {
        what: "reading the previous point",
        offset,
        source,
    };
    if !previous.may_hold_data(offset, span).map_err(io)? {
        return Ok(None);
    }
    let bytes = old.resize(len);
    bytes.fill(0);
    previous
        .read_at(&mut bytes[..span as usize], offset)
        .map_err(io)?;
    Ok(Some(old.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_keeps_only_wanted_clusters() {
        let data = [GuestRange::new(0, 100), GuestRange::new(300, 1000)];
        let wanted = [(0, 1), (5, 7)];
        assert_eq!(
            intersect(&data, &wanted, 64),
            vec![GuestRange::new(0, 64), GuestRange::new(320, 448)]
        );
    }

    #[test]
    fn only_clusters_to_be_stored_are_compressed() {
        // Four clusters of text and one random: with the previous digests of clusters 0 and
        // 1 unchanged, only 2 and 3 are compressed; 4 does not shrink.
        let cluster = 4096u64;
        let mut bytes: Vec<u8> = (0..4 * cluster)
            .map(|i| b"strata compresses text\n"[(i % 23) as usize])
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        bytes.extend((0..cluster).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        }));
        let algorithm = DigestAlgorithm::Blake3;
        let mut previous = DigestManifest::new(algorithm, cluster, bytes.len() as u64);
        for index in 0..2u64 {
            let at = (index * cluster) as usize;
            previous
                .push(index, algorithm.digest(&bytes[at..at + cluster as usize]))
                .unwrap();
        }
        let volume = strata_qcow2::DenseVolume(bytes.clone());
        let plan = Plan {
            volume: &volume,
            algorithm,
            size: bytes.len() as u64,
            cluster,
            chunk: 8 * cluster,
            changed: None,
            previous: None,
            previous_digests: Some(&previous),
            compression: Some((CompressionType::Zstd, Some(1))),
        };
        let mut compressed = Vec::new();
        scan(&plan, &mut |chunk| {
            let packed = chunk.data.as_ref().map(|buf| buf.packed().to_vec());
            for range in &chunk.compressed {
                compressed.push(
                    range
                        .clone()
                        .map(|r| packed.as_ref().map(|p| p[r].to_vec())),
                );
            }
            Ok(())
        })
        .unwrap();
        let shape: Vec<bool> = compressed.iter().map(Option::is_some).collect();
        assert_eq!(shape, [false, false, true, true, false]);
        let packed = compressed[2].clone().flatten().unwrap();
        assert_eq!(&packed[..4], b"\x28\xb5\x2f\xfd", "a zstd frame");
        assert!(packed.len() < cluster as usize / 10, "{}", packed.len());
    }
}
