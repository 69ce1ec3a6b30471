//! The writer's compact record of what it wrote: guest-to-host mappings as runs, and the
//! refcounts of the data area as runs.
//!
//! Memory grows with the number of runs (at most one a written cluster, usually far fewer,
//! since guest clusters written in order land contiguously on the host), never with the
//! virtual size. The L2 tables are rebuilt from these runs at the end.

/// L2 entry bit 63: a standard cluster whose refcount is exactly one (qcow2.rst, "L2 table entry").
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor bit 0: the cluster reads as zeros (version 3 only).
pub(crate) const ZERO: u64 = 1;

/// A guest cluster index (guest offset divided by the cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct GuestCluster(pub(crate) u64);

/// A host cluster index (file offset divided by the cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HostCluster(pub(crate) u64);

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `count` guest clusters stored at consecutive host clusters from `first`.
    Data { first: HostCluster },
    /// `count` clusters that read as zeros without storage.
    Zero,
    /// One compressed cluster with its complete L2 entry.
    Compressed { entry: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Run {
    guest: GuestCluster,
    count: u64,
    kind: Kind,
}

/// Guest clusters with an L2 entry, in ascending guest order.
#[derive(Debug)]
pub(crate) struct GuestMap {
    runs: Vec<Run>,
    /// L1 indices that need an L2 table, ascending.
    l2_tables: Vec<u64>,
    /// log2 of the number of entries in one L2 table.
    l2_bits: u32,
    cluster_bits: u32,
}

impl GuestMap {
    pub(crate) fn new(cluster_bits: u32) -> Self {
        Self {
            runs: Vec::new(),
            l2_tables: Vec::new(),
            l2_bits: cluster_bits - 3,
            cluster_bits,
        }
    }

    pub(crate) fn push_data(&mut self, guest: GuestCluster, host: HostCluster) {
        self.note_table(guest);
        if let Some(last) = self.runs.last_mut()
            && let Kind::Data { first } = last.kind
            && last.guest.0 + last.count == guest.0
            && first.0 + last.count == host.0
        {
            last.count += 1;
            return;
        }
        self.runs.push(Run {
            guest,
            count: 1,
            kind: Kind::Data { first: host },
        });
    }

    pub(crate) fn push_zero(&mut self, guest: GuestCluster) {
        self.note_table(guest);
        if let Some(last) = self.runs.last_mut()
            && matches!(last.kind, Kind::Zero)
            && last.guest.0 + last.count == guest.0
        {
            last.count += 1;
            return;
        }
        self.runs.push(Run {
            guest,
            count: 1,
            kind: Kind::Zero,
        });
    }

    /// Maps one compressed cluster, its entry to be set with [`Self::set_compressed`] through
    /// the returned slot.
    pub(crate) fn push_compressed(&mut self, guest: GuestCluster) -> usize {
        self.note_table(guest);
        self.runs.push(Run {
            guest,
            count: 1,
            kind: Kind::Compressed { entry: 0 },
        });
        self.runs.len() - 1
    }

    /// Sets the L2 entry of the compressed cluster at `slot`.
    pub(crate) fn set_compressed(&mut self, slot: usize, entry: u64) {
        if let Some(run) = self.runs.get_mut(slot) {
            debug_assert!(matches!(run.kind, Kind::Compressed { .. }));
            run.kind = Kind::Compressed { entry };
        }
    }

    fn note_table(&mut self, guest: GuestCluster) {
        let l1_index = guest.0 >> self.l2_bits;
        if self.l2_tables.last() != Some(&l1_index) {
            self.l2_tables.push(l1_index);
        }
    }

    /// L1 indices that need an L2 table, ascending.
    pub(crate) fn l2_tables(&self) -> &[u64] {
        &self.l2_tables
    }

    /// Every mapped guest cluster with its L2 entry, ascending.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (GuestCluster, u64)> + '_ {
        let cluster_bits = self.cluster_bits;
        self.runs.iter().flat_map(move |run| {
            (0..run.count).map(move |i| {
                let entry = match run.kind {
                    Kind::Data { first } => ((first.0 + i) << cluster_bits) | COPIED,
                    Kind::Zero => ZERO,
                    Kind::Compressed { entry } => entry,
                };
                (GuestCluster(run.guest.0 + i), entry)
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CountRun {
    start: u64,
    len: u64,
    count: u16,
}

/// Refcounts of the data area, as runs of equal counts over consecutive host clusters.
///
/// Uncompressed clusters each count one; a host cluster holding (parts of) several
/// compressed clusters counts one for each of them.
#[derive(Debug, Default)]
pub(crate) struct DataRefcounts {
    runs: Vec<CountRun>,
}

impl DataRefcounts {
    /// One past the last counted host cluster, or `None` if nothing was counted yet.
    fn end(&self) -> Option<u64> {
        self.runs.last().map(|run| run.start + run.len)
    }

    /// The count of `cluster` if it is the last counted one, else zero.
    fn count_of_last(&self, cluster: HostCluster) -> u16 {
        match self.runs.last() {
            Some(run) if run.start + run.len == cluster.0 + 1 => run.count,
            _ => 0,
        }
    }

    /// Adds one reference to `cluster`, which is either the last counted cluster or a later one.
    /// The caller keeps counts at most `u16::MAX` (the compressed tail plans its segments so).
    pub(crate) fn add_reference(&mut self, cluster: HostCluster) {
        let count = self.count_of_last(cluster);
        if count > 0 {
            if let Some(last) = self.runs.last_mut() {
                last.len -= 1;
                if last.len == 0 {
                    self.runs.pop();
                }
            }
        }
        self.push(cluster.0, 1, count + 1);
    }

    /// Counts `len` new clusters from `first` once each.
    pub(crate) fn add_new(&mut self, first: HostCluster, len: u64) {
        self.push(first.0, len, 1);
    }

    fn push(&mut self, start: u64, len: u64, count: u16) {
        if let Some(last) = self.runs.last_mut()
            && last.count == count
            && last.start + last.len == start
        {
            last.len += len;
            return;
        }
        debug_assert!(self.end().is_none_or(|end| end <= start));
        self.runs.push(CountRun { start, len, count });
    }

    /// Writes the counts of host clusters `first..first + out.len()` into `out` (zero where
    /// nothing is counted).
    pub(crate) fn fill(&self, first: u64, out: &mut [u16]) {
        out.fill(0);
        let stop = first + out.len() as u64;
        let from = self
            .runs
            .partition_point(|run| run.start + run.len <= first);
        for run in self.runs.get(from..).unwrap_or_default() {
            if run.start >= stop {
                break;
            }
            let lo = run.start.max(first);
            let hi = (run.start + run.len).min(stop);
            for slot in out
                .iter_mut()
                .take((hi - first) as usize)
                .skip((lo - first) as usize)
            {
                *slot = run.count;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_data_collapses_into_one_run() {
        let mut map = GuestMap::new(16);
        for i in 0..10 {
            map.push_data(GuestCluster(100 + i), HostCluster(1 + i));
        }
        map.push_zero(GuestCluster(8192));
        map.push_zero(GuestCluster(8193));
        assert_eq!(map.runs.len(), 2);
        assert_eq!(map.l2_tables(), &[0, 1]);
        let entries: Vec<_> = map.entries().collect();
        assert_eq!(entries.len(), 12);
        assert_eq!(entries[0], (GuestCluster(100), (1 << 16) | COPIED));
        assert_eq!(entries[11], (GuestCluster(8193), ZERO));
    }

    #[test]
    fn shared_host_clusters_count_every_reference() {
        let mut counts = DataRefcounts::default();
        counts.add_new(HostCluster(1), 3);
        counts.add_reference(HostCluster(4));
        counts.add_reference(HostCluster(4));
        counts.add_reference(HostCluster(5));
        counts.add_new(HostCluster(6), 2);
        assert_eq!(counts.count_of_last(HostCluster(7)), 1);
        let mut out = [9u16; 9];
        counts.fill(0, &mut out);
        assert_eq!(out, [0, 1, 1, 1, 2, 1, 1, 1, 0]);
        let mut tail = [9u16; 2];
        counts.fill(4, &mut tail);
        assert_eq!(tail, [2, 1]);
    }
}
