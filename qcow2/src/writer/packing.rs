//! Packing compressed clusters byte-adjacent, as QEMU packs them (qcow2.rst, "Compressed
//! Clusters Descriptor").
//!
//! Raw clusters are appended whole as they come. Compressed clusters gather here instead, in
//! the "compressed tail", and go to the file in segments: consecutive compressed clusters,
//! byte-adjacent, a segment starting on a host cluster boundary and padded only at its end.
//! So a raw cluster between two compressed ones costs no padding (QEMU keeps a partly filled
//! host cluster for compressed data apart from its cluster allocation for the same reason).
//! A compressed cluster may run on into the next host cluster: the descriptor counts
//! "additional 512-byte sectors", of which "some ... may reside in the next contiguous host
//! cluster", and a segment is contiguous in the file.
//!
//! A segment is cut at the end of the compressed cluster, among those in the second half of
//! the tail, that leaves the least padding, so a segment wastes a small fraction of one host
//! cluster and memory stays bounded by [`FLUSH_BYTES`] (or a few clusters, if larger).

/// Tail length at which a segment is cut.
const FLUSH_BYTES: usize = 4 << 20;
/// Host clusters the tail holds at least before a segment is cut (for 2 MiB clusters).
const FLUSH_CLUSTERS: usize = 4;
/// Highest refcount a host cluster may reach (16-bit refcounts); each compressed cluster
/// counts one for every host cluster it touches.
const MAX_REFCOUNT: u32 = u16::MAX as u32;

/// A compressed cluster waiting in the tail.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The writer's handle for its L2 entry.
    slot: usize,
    /// Its bytes in the tail.
    start: usize,
    len: usize,
}

/// A compressed cluster placed in a segment: its slot and its bytes, relative to the segment's
/// first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) slot: usize,
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// Compressed clusters not yet in the file.
#[derive(Debug)]
pub(crate) struct CompressedTail {
    bytes: Vec<u8>,
    pending: Vec<Pending>,
    cluster_bits: u32,
}

impl CompressedTail {
    pub(crate) fn new(cluster_bits: u32) -> Self {
        Self {
            bytes: Vec::new(),
            pending: Vec::new(),
            cluster_bits,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds one compressed cluster (non-empty, shorter than a cluster).
    pub(crate) fn push(&mut self, slot: usize, packed: &[u8]) {
        self.pending.push(Pending {
            slot,
            start: self.bytes.len(),
            len: packed.len(),
        });
        self.bytes.extend_from_slice(packed);
    }

    /// Whether the tail is long enough to cut a segment.
    pub(crate) fn is_due(&self) -> bool {
        self.bytes.len() >= FLUSH_BYTES.max(FLUSH_CLUSTERS << self.cluster_bits)
    }

    /// Picks the next segment: every pending cluster when `all` (as far as refcounts allow),
    /// else the prefix reaching past half the tail that leaves the least padding. Returns the
    /// segment's placements and its length before padding; [`Self::take`] removes it.
    pub(crate) fn plan(&self, all: bool) -> (Vec<Placed>, usize) {
        let cluster = 1usize << self.cluster_bits;
        let half = if all {
            self.bytes.len()
        } else {
            self.bytes.len() / 2
        };
        let padding = |end: usize| (cluster - end % cluster) % cluster;
        let mut best: Option<(usize, usize)> = None; // (count, end)
        let mut current = (usize::MAX, 0u32); // (host cluster, references)
        let mut scanned = 0;
        for (i, p) in self.pending.iter().enumerate() {
            let (first, last) = (p.start / cluster, (p.start + p.len - 1) / cluster);
            if first == current.0 && current.1 >= MAX_REFCOUNT {
                break;
            }
            current = match (first == current.0, first == last) {
                (true, true) => (first, current.1 + 1),
                _ => (last, 1),
            };
            scanned = i + 1;
            let end = p.start + p.len;
            if end >= half && best.is_none_or(|(_, b)| padding(end) <= padding(b)) {
                best = Some((scanned, end));
            }
        }
        let (count, end) = best.unwrap_or_else(|| {
            let end = self
                .pending
                .get(scanned.wrapping_sub(1))
                .map_or(0, |p| p.start + p.len);
            (scanned, end)
        });
        let placed = self.pending[..count]
            .iter()
            .map(|p| Placed {
                slot: p.slot,
                start: p.start as u64,
                len: p.len as u64,
            })
            .collect();
        (placed, end)
    }

    /// The tail's first `len` bytes, the segment [`Self::plan`] chose.
    pub(crate) fn segment(&self, len: usize) -> &[u8] {
        &self.bytes[..len]
    }

    /// Removes the first `count` clusters, whose bytes end at `len`.
    pub(crate) fn take(&mut self, count: usize, len: usize) {
        self.pending.drain(..count);
        self.bytes.drain(..len);
        for p in &mut self.pending {
            p.start -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_cut_where_the_padding_is_least() {
        // 512-byte clusters: ends at 300, 700, 1020, 1300; past half (650) the end at 1020
        // leaves 4 bytes of padding, the others more.
        let mut tail = CompressedTail::new(9);
        for (slot, len) in [300, 400, 320, 280].into_iter().enumerate() {
            tail.push(slot, &vec![slot as u8; len]);
        }
        let (placed, end) = tail.plan(false);
        assert_eq!(end, 1020);
        assert_eq!(
            placed.iter().map(|p| (p.start, p.len)).collect::<Vec<_>>(),
            [(0, 300), (300, 400), (700, 320)]
        );
        tail.take(placed.len(), end);
        let (placed, end) = tail.plan(true);
        assert_eq!(end, 280);
        assert_eq!(
            placed,
            [Placed {
                slot: 3,
                start: 0,
                len: 280
            }]
        );
        assert_eq!(tail.segment(end), &[3u8; 280][..]);
    }

    #[test]
    fn no_host_cluster_counts_more_than_the_refcount_limit() {
        let mut tail = CompressedTail::new(21);
        for slot in 0..MAX_REFCOUNT as usize + 10 {
            tail.push(slot, &[1]);
        }
        let (placed, end) = tail.plan(true);
        assert_eq!(placed.len(), MAX_REFCOUNT as usize);
        assert_eq!(end, MAX_REFCOUNT as usize);
    }
}
