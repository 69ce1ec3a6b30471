//! Reading and classifying the volume ahead of the backup, on helper threads.
//!
//! One planner thread walks the volume's data ranges once, in ascending order, and cuts the
//! volume into chunks. Reader threads fill the chunks (holes as zeros), read the previous point
//! where a comparison needs it, and classify every wanted cluster in parallel: zero or not, its
//! 128-bit digest, whether it differs from the previous point. With compression on they also
//! compress every cluster the backup will store (non-zero and changed by the comparison or the
//! previous digests). The backup's own thread takes the chunks back in order and only decides
//! and writes, so reading, hashing, compressing and writing the image overlap, and hashing and
//! compressing spread over the cores.
//!
//! Memory is bounded: [`BUFFERS`] chunk buffers hold data, each reader owns one more for the
//! previous point in comparison mode, and at most [`IN_FLIGHT`] chunks are planned but not yet
//! consumed.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, mpsc};

use strata_qcow2::{
    BackingRead, ClusterCompressor, CompressionType, DataRanges, VolumeRead, is_zero,
};

use crate::digest::{Digest, DigestAlgorithm, DigestManifest};
use crate::error::{Error, Result};

/// Reader threads. Parallel reads from the page cache or a device queue go faster than one,
/// and each reader also hashes what it read.
const READERS: usize = 3;
/// Chunk buffers holding data (being read, waiting to be consumed in order, or consumed).
pub(crate) const BUFFERS: usize = READERS + 3;
/// Chunks planned but not yet consumed, with or without data.
pub(crate) const IN_FLIGHT: usize = 4 * BUFFERS;
/// Page size the buffers are aligned to: the kernel copies out of the page cache markedly
/// faster into page-aligned memory.
const PAGE: usize = 4096;

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
pub(crate) struct Chunk {
    /// Guest offset of the chunk.
    pub offset: u64,
    /// Length of the chunk in bytes.
    pub len: usize,
    /// Runs of clusters `(first, end)` of this chunk that were considered.
    pub wanted: Vec<(u64, u64)>,
    /// The chunk's bytes, holes as zeros; `None` when no data was read.
    pub data: Option<Buffer>,
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

/// A page-aligned chunk buffer, with room for the chunk's compressed clusters.
pub(crate) struct Buffer {
    bytes: Vec<u8>,
    range: Range<usize>,
    packed: Vec<u8>,
}

impl Buffer {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity + PAGE),
            range: 0..0,
            packed: Vec::new(),
        }
    }

    /// Makes the buffer `len` bytes long, starting on a page boundary.
    fn resize(&mut self, len: usize) -> &mut [u8] {
        self.bytes.resize(len + PAGE, 0);
        let start = self.bytes.as_ptr().align_offset(PAGE).min(PAGE);
        self.range = start..start + len;
        &mut self.bytes[self.range.clone()]
    }

    /// The bytes of the chunk.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }

    /// The chunk's compressed clusters, back to back (see [`Chunk::compressed`]).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
}

/// A chunk to read: its order, offset, length, considered cluster runs and the volume's data
/// pieces within it.
struct Task {
    seq: u64,
    offset: u64,
    len: usize,
    wanted: Vec<(u64, u64)>,
    pieces: Vec<(u64, u64)>,
}

/// Runs the plan and hands every chunk, in ascending order, to `consume`, which gives the
/// chunk's data buffer back (if any) once done with it.
pub(crate) fn scan(
    plan: &Plan<'_>,
    consume: &mut dyn FnMut(Chunk) -> Result<Option<Buffer>>,
) -> Result<()> {
    let (task_tx, task_rx) = mpsc::sync_channel::<Task>(READERS);
    let task_rx = Mutex::new(task_rx);
    let (done_tx, done_rx) = mpsc::channel::<Result<(u64, Chunk)>>();
    let (pool_tx, pool_rx) = mpsc::channel::<Buffer>();
    let pool_rx = Mutex::new(pool_rx);
    let (credit_tx, credit_rx) = mpsc::channel::<()>();
    for _ in 0..BUFFERS {
        // The receivers are alive: they are ours.
        let _ = pool_tx.send(Buffer::new(plan.chunk as usize));
    }
    for _ in 0..IN_FLIGHT {
        let _ = credit_tx.send(());
    }
    std::thread::scope(|scope| {
        let planner_done = done_tx.clone();
        scope.spawn(move || {
            if let Err(err) = plan_chunks(plan, &task_tx, &credit_rx) {
                let _ = planner_done.send(Err(err));
            }
        });
        for _ in 0..READERS {
            let (task_rx, pool_rx, done_tx) = (&task_rx, &pool_rx, done_tx.clone());
            scope.spawn(move || {
                let compressor = plan
                    .compression
                    .map(|(method, level)| ClusterCompressor::new(method, level, plan.cluster))
                    .transpose();
                let mut compressor = match compressor {
                    Ok(compressor) => compressor,
                    Err(err) => {
                        let _ = done_tx.send(Err(err.into()));
                        return;
                    }
                };
                let mut old = plan.previous.map(|_| Buffer::new(plan.chunk as usize));
                // A buffer first, then the next task: the lowest unfinished chunk always holds
                // a buffer, so reassembly in order always makes progress.
                let mut buf = lock_recv(pool_rx);
                while let Some(task) = buf.as_ref().and_then(|_| lock_recv(task_rx)) {
                    let seq = task.seq;
                    let result =
                        read_chunk(plan, task, &mut buf, old.as_mut(), compressor.as_mut());
                    if done_tx.send(result.map(|chunk| (seq, chunk))).is_err() {
                        return;
                    }
                    if buf.is_none() {
                        buf = lock_recv(pool_rx);
                    }
                }
            });
        }
        drop(done_tx);
        // Returning (on an error too) drops the channels' ends held here, which stops the
        // helper threads at their next wait.
        let (pool_tx, credit_tx, done_rx) = (pool_tx, credit_tx, done_rx);
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        for message in done_rx.iter() {
            let (seq, chunk) = message?;
            waiting.insert(seq, chunk);
            while let Some(chunk) = waiting.remove(&next) {
                if let Some(buf) = consume(chunk)? {
                    let _ = pool_tx.send(buf);
                }
                let _ = credit_tx.send(());
                next += 1;
            }
        }
        Ok(())
    })
}

fn lock_recv<T>(receiver: &Mutex<mpsc::Receiver<T>>) -> Option<T> {
    receiver.lock().ok()?.recv().ok()
}

/// Cuts the volume into chunks, noting the considered cluster runs and the volume's data
/// pieces of each; stops early when the consumer has gone.
fn plan_chunks(
    plan: &Plan<'_>,
    tasks: &mpsc::SyncSender<Task>,
    credits: &mpsc::Receiver<()>,
) -> Result<()> {
    let mut ranges = DataRanges::new(plan.volume, plan.size);
    let mut pending = next_range(&mut ranges, 0)?;
    let mut changed_at = 0usize;
    let mut offset = 0;
    let mut seq = 0;
    while offset < plan.size {
        let end = (offset + plan.chunk).min(plan.size);
        let (c0, c1) = (offset / plan.cluster, end.div_ceil(plan.cluster));
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
        // The volume's data within the chunk.
        let mut data = Vec::new();
        while let Some((start, stop)) = pending {
            if start >= end {
                break;
            }
            data.push((start.max(offset), stop.min(end)));
            if stop > end {
                break;
            }
            pending = next_range(&mut ranges, stop)?;
        }
        // Only the considered clusters are read.
        let pieces = match plan.changed {
            None => data,
            Some(_) => intersect(&data, &wanted, plan.cluster),
        };
        if credits.recv().is_err() {
            return Ok(());
        }
        let task = Task {
            seq,
            offset,
            len: (end - offset) as usize,
            wanted,
            pieces,
        };
        if tasks.send(task).is_err() {
            return Ok(());
        }
        seq += 1;
        offset = end;
    }
    Ok(())
}

fn next_range(
    ranges: &mut DataRanges<'_, dyn VolumeRead + '_>,
    at: u64,
) -> Result<Option<(u64, u64)>> {
    ranges.next_range().map_err(|source| Error::Io {
        what: "looking for data in the volume",
        offset: at,
        source,
    })
}

/// The parts of byte ranges `data` inside cluster runs `wanted` (both ascending).
fn intersect(data: &[(u64, u64)], wanted: &[(u64, u64)], cluster: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in wanted {
        let (lo, hi) = (a * cluster, b * cluster);
        for &(start, stop) in data {
            let (s, e) = (start.max(lo), stop.min(hi));
            if s < e {
                out.push((s, e));
            }
        }
    }
    out
}

/// Reads one chunk into `buf` (taking it when data was read) and classifies its clusters.
fn read_chunk(
    plan: &Plan<'_>,
    task: Task,
    buf: &mut Option<Buffer>,
    old: Option<&mut Buffer>,
    mut compressor: Option<&mut ClusterCompressor>,
) -> Result<Chunk> {
    let (offset, len) = (task.offset, task.len);
    let cluster = plan.cluster as usize;
    let clusters = len.div_ceil(cluster);
    let mut data = None;
    if !task.pieces.is_empty() {
        if let Some(mut taken) = buf.take() {
            let bytes = taken.resize(len);
            // Zero only the holes between the pieces: the pieces are read over anyway.
            let mut filled = 0;
            for &(start, stop) in &task.pieces {
                let (from, to) = ((start - offset) as usize, (stop - offset) as usize);
                if let Some(hole) = bytes.get_mut(filled..from) {
                    hole.fill(0);
                }
                filled = filled.max(to);
                let part = &mut bytes[from..to];
                plan.volume
                    .read_exact_at(part, start)
                    .map_err(|source| Error::Io {
                        what: "reading the volume",
                        offset: start,
                        source,
                    })?;
            }
            if let Some(tail) = bytes.get_mut(filled..) {
                tail.fill(0);
            }
            data = Some(taken);
        }
    }
    let previous = match (plan.previous, old) {
        (Some(previous), Some(old)) => read_previous(previous, old, offset, len)?,
        _ => None,
    };
    let mut digests = vec![None; clusters];
    let mut differs = match plan.previous {
        Some(_) => vec![false; clusters],
        None => Vec::new(),
    };
    let mut compressed = Vec::new();
    let mut packed = Vec::new();
    if compressor.is_some() {
        compressed = vec![None; clusters];
        if let Some(buf) = &mut data {
            packed = std::mem::take(&mut buf.packed);
            packed.clear();
        }
    }
    let c0 = offset / plan.cluster;
    for &(a, b) in &task.wanted {
        for index in a..b {
            let i = (index - c0) as usize;
            let range = i * cluster..((i + 1) * cluster).min(len);
            let now = data.as_ref().map(|d| &d.bytes()[range.clone()]);
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
                (now, compressor.as_deref_mut(), stored && changed)
            {
                if let Some(shrunk) = compressor.compress(bytes) {
                    let start = packed.len();
                    packed.extend_from_slice(shrunk);
                    compressed[i] = Some(start..packed.len());
                }
            }
        }
    }
    if let Some(buf) = &mut data {
        buf.packed = packed;
    }
    Ok(Chunk {
        offset,
        len,
        wanted: task.wanted,
        data,
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
        let data = [(0, 100), (300, 1000)];
        let wanted = [(0, 1), (5, 7)];
        assert_eq!(intersect(&data, &wanted, 64), vec![(0, 64), (320, 448)]);
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
            Ok(chunk.data)
        })
        .unwrap();
        let shape: Vec<bool> = compressed.iter().map(Option::is_some).collect();
        assert_eq!(shape, [false, false, true, true, false]);
        let packed = compressed[2].clone().flatten().unwrap();
        assert_eq!(&packed[..4], b"\x28\xb5\x2f\xfd", "a zstd frame");
        assert!(packed.len() < cluster as usize / 10, "{}", packed.len());
    }

    #[test]
    fn buffers_are_page_aligned() {
        let mut buf = Buffer::new(10_000);
        let len = buf.resize(10_000).len();
        assert_eq!(len, 10_000);
        assert_eq!(buf.bytes().as_ptr() as usize % PAGE, 0);
    }
}
