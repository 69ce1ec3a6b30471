//! The writer's compact record of what it wrote: guest-to-host mappings as runs, and the
//! refcounts of the data area as runs.
//!
//! There is at most one run a written cluster (one for each compressed cluster), usually far
//! fewer, since guest clusters written in order land contiguously on the host. The runs are
//! kept in [`SpillLog`]s, so memory holds only the newest few thousand and the rest waits in a
//! temporary file; the L2 tables and refcount blocks are rebuilt from them, read back in
//! order, at the end.

use std::collections::VecDeque;
use std::io;

use super::spill::{Iter, Record, SpillLog, put_word, word};

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

impl Record for Run {
    const LEN: usize = 32;
    fn encode(&self, out: &mut [u8]) {
        let (tag, value) = match self.kind {
            Kind::Data { first } => (0, first.0),
            Kind::Zero => (1, 0),
            Kind::Compressed { entry } => (2, entry),
        };
        put_word(out, 0, self.guest.0);
        put_word(out, 8, self.count);
        put_word(out, 16, tag);
        put_word(out, 24, value);
    }
    fn decode(bytes: &[u8]) -> Self {
        let value = word(bytes, 24);
        Self {
            guest: GuestCluster(word(bytes, 0)),
            count: word(bytes, 8),
            kind: match word(bytes, 16) {
                0 => Kind::Data {
                    first: HostCluster(value),
                },
                1 => Kind::Zero,
                _ => Kind::Compressed { entry: value },
            },
        }
    }
}

/// Guest clusters with an L2 entry, in ascending guest order.
#[derive(Debug)]
pub(crate) struct GuestMap {
    runs: SpillLog<Run>,
    /// Slots of compressed clusters whose entry is not set yet, ascending (they stay in
    /// memory until set).
    unset: VecDeque<usize>,
    /// L1 indices that need an L2 table, ascending.
    l2_tables: SpillLog<u64>,
    /// log2 of the number of entries in one L2 table.
    l2_bits: u32,
    cluster_bits: u32,
}

impl GuestMap {
    pub(crate) fn new(cluster_bits: u32) -> Self {
        Self {
            runs: SpillLog::new(),
            unset: VecDeque::new(),
            l2_tables: SpillLog::new(),
            l2_bits: cluster_bits - 3,
            cluster_bits,
        }
    }

    pub(crate) fn push_data(&mut self, guest: GuestCluster, host: HostCluster) -> io::Result<()> {
        self.note_table(guest)?;
        if let Some(last) = self.runs.last_mut()
            && let Kind::Data { first } = last.kind
            && last.guest.0 + last.count == guest.0
            && first.0 + last.count == host.0
        {
            last.count += 1;
            return Ok(());
        }
        self.push(Run {
            guest,
            count: 1,
            kind: Kind::Data { first: host },
        })
    }

    pub(crate) fn push_zero(&mut self, guest: GuestCluster) -> io::Result<()> {
        self.note_table(guest)?;
        if let Some(last) = self.runs.last_mut()
            && matches!(last.kind, Kind::Zero)
            && last.guest.0 + last.count == guest.0
        {
            last.count += 1;
            return Ok(());
        }
        self.push(Run {
            guest,
            count: 1,
            kind: Kind::Zero,
        })
    }

    /// Adds a run, spilling older ones that are complete.
    fn push(&mut self, run: Run) -> io::Result<()> {
        self.runs.push(run);
        let keep_from = self.unset.front().copied().unwrap_or(usize::MAX);
        self.runs.spill_before(keep_from)
    }

    /// Maps one compressed cluster, its entry to be set with [`Self::set_compressed`] through
    /// the returned slot.
    pub(crate) fn push_compressed(&mut self, guest: GuestCluster) -> io::Result<usize> {
        self.note_table(guest)?;
        let slot = self.runs.len();
        self.unset.push_back(slot);
        self.push(Run {
            guest,
            count: 1,
            kind: Kind::Compressed { entry: 0 },
        })?;
        Ok(slot)
    }

    /// Sets the L2 entry of the compressed cluster at `slot`.
    pub(crate) fn set_compressed(&mut self, slot: usize, entry: u64) {
        if let Some(at) = self.unset.iter().position(|&s| s == slot) {
            self.unset.remove(at);
        }
        if let Some(run) = self.runs.get_mut(slot) {
            debug_assert!(matches!(run.kind, Kind::Compressed { .. }));
            run.kind = Kind::Compressed { entry };
        }
    }

    fn note_table(&mut self, guest: GuestCluster) -> io::Result<()> {
        let l1_index = guest.0 >> self.l2_bits;
        if self.l2_tables.last() != Some(&l1_index) {
            self.l2_tables.push(l1_index);
            self.l2_tables.spill_before(usize::MAX)?;
        }
        Ok(())
    }

    /// Number of L2 tables needed.
    pub(crate) fn l2_count(&self) -> usize {
        self.l2_tables.len()
    }

    /// L1 indices that need an L2 table, ascending.
    pub(crate) fn l2_tables(&self) -> Iter<'_, u64> {
        self.l2_tables.iter()
    }

    /// Every mapped guest cluster with its L2 entry, ascending.
    pub(crate) fn entries(&self) -> impl Iterator<Item = io::Result<(GuestCluster, u64)>> + '_ {
        let cluster_bits = self.cluster_bits;
        self.runs.iter().flat_map(move |run| {
            let (run, failed) = match run {
                Ok(run) => (run, None),
                Err(e) => (
                    Run {
                        guest: GuestCluster(0),
                        count: 0,
                        kind: Kind::Zero,
                    },
                    Some(e),
                ),
            };
            let entries = (0..run.count).map(move |i| {
                let entry = match run.kind {
                    Kind::Data { first } => ((first.0 + i) << cluster_bits) | COPIED,
                    Kind::Zero => ZERO,
                    Kind::Compressed { entry } => entry,
                };
                Ok((GuestCluster(run.guest.0 + i), entry))
            });
            failed.map(Err).into_iter().chain(entries)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CountRun {
    start: u64,
    len: u64,
    count: u16,
}

impl Record for CountRun {
    const LEN: usize = 24;
    fn encode(&self, out: &mut [u8]) {
        put_word(out, 0, self.start);
        put_word(out, 8, self.len);
        put_word(out, 16, u64::from(self.count));
    }
    fn decode(bytes: &[u8]) -> Self {
        Self {
            start: word(bytes, 0),
            len: word(bytes, 8),
            count: word(bytes, 16) as u16,
        }
    }
}

/// Refcounts of the data area, as runs of equal counts over consecutive host clusters.
///
/// Uncompressed clusters each count one; a host cluster holding (parts of) several
/// compressed clusters counts one for each of them.
#[derive(Debug)]
pub(crate) struct DataRefcounts {
    runs: SpillLog<CountRun>,
}

impl Default for DataRefcounts {
    fn default() -> Self {
        Self {
            runs: SpillLog::new(),
        }
    }
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
    pub(crate) fn add_reference(&mut self, cluster: HostCluster) -> io::Result<()> {
        let count = self.count_of_last(cluster);
        if count > 0 {
            if let Some(last) = self.runs.last_mut() {
                last.len -= 1;
                if last.len == 0 {
                    self.runs.pop();
                }
            }
        }
        self.push(cluster.0, 1, count + 1)
    }

    /// Counts `len` new clusters from `first` once each.
    pub(crate) fn add_new(&mut self, first: HostCluster, len: u64) -> io::Result<()> {
        self.push(first.0, len, 1)
    }

    fn push(&mut self, start: u64, len: u64, count: u16) -> io::Result<()> {
        if let Some(last) = self.runs.last_mut()
            && last.count == count
            && last.start + last.len == start
        {
            last.len += len;
            return Ok(());
        }
        debug_assert!(self.end().is_none_or(|end| end <= start));
        self.runs.push(CountRun { start, len, count });
        self.runs.spill_before(usize::MAX)
    }

    /// The counts in ascending host order, for [`RefcountCursor::fill`].
    pub(crate) fn cursor(&self) -> RefcountCursor<'_> {
        RefcountCursor {
            runs: self.runs.iter(),
            current: None,
        }
    }
}

/// Reads the refcount runs back in ascending host order.
pub(crate) struct RefcountCursor<'a> {
    runs: Iter<'a, CountRun>,
    current: Option<CountRun>,
}

impl RefcountCursor<'_> {
    /// Writes the counts of host clusters `first..first + out.len()` into `out` (zero where
    /// nothing is counted); `first` must not go backwards between calls.
    pub(crate) fn fill(&mut self, first: u64, out: &mut [u16]) -> io::Result<()> {
        out.fill(0);
        let stop = first + out.len() as u64;
        loop {
            let run = match self.current {
                Some(run) => run,
                None => match self.runs.next().transpose()? {
                    Some(run) => *self.current.insert(run),
                    None => return Ok(()),
                },
            };
            if run.start + run.len <= first {
                self.current = None;
                continue;
            }
            if run.start >= stop {
                return Ok(());
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
            if run.start + run.len > stop {
                return Ok(());
            }
            self.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_of_compressed_clusters_keeps_a_bounded_tail() {
        // One run per compressed cluster; entries set a little later, as the tail is placed.
        let mut map = GuestMap::new(12);
        let mut pending = VecDeque::new();
        for guest in 0..100_000u64 {
            pending.push_back(map.push_compressed(GuestCluster(guest)).unwrap());
            if pending.len() > 100 {
                let slot = pending.pop_front().unwrap();
                map.set_compressed(slot, COMPRESSED | slot as u64);
            }
            assert!(map.runs.in_memory() <= super::super::spill::KEEP + 101);
        }
        while let Some(slot) = pending.pop_front() {
            map.set_compressed(slot, COMPRESSED | slot as u64);
        }
        let entries: Vec<_> = map.entries().map(Result::unwrap).collect();
        assert_eq!(entries.len(), 100_000);
        assert!(
            entries
                .iter()
                .enumerate()
                .all(|(i, &(g, e))| g.0 == i as u64 && e == COMPRESSED | i as u64)
        );
        assert_eq!(map.l2_count(), 100_000 / 512 + 1);
    }

    #[test]
    fn contiguous_data_collapses_into_one_run() {
        let mut map = GuestMap::new(16);
        for i in 0..10 {
            map.push_data(GuestCluster(100 + i), HostCluster(1 + i))
                .unwrap();
        }
        map.push_zero(GuestCluster(8192)).unwrap();
        map.push_zero(GuestCluster(8193)).unwrap();
        assert_eq!(map.runs.len(), 2);
        let tables: Vec<u64> = map.l2_tables().map(Result::unwrap).collect();
        assert_eq!(tables, [0, 1]);
        let entries: Vec<_> = map.entries().map(Result::unwrap).collect();
        assert_eq!(entries.len(), 12);
        assert_eq!(entries[0], (GuestCluster(100), (1 << 16) | COPIED));
        assert_eq!(entries[11], (GuestCluster(8193), ZERO));
    }

    #[test]
    fn shared_host_clusters_count_every_reference() {
        let mut counts = DataRefcounts::default();
        counts.add_new(HostCluster(1), 3).unwrap();
        counts.add_reference(HostCluster(4)).unwrap();
        counts.add_reference(HostCluster(4)).unwrap();
        counts.add_reference(HostCluster(5)).unwrap();
        counts.add_new(HostCluster(6), 2).unwrap();
        assert_eq!(counts.count_of_last(HostCluster(7)), 1);
        let mut out = [9u16; 9];
        counts.cursor().fill(0, &mut out).unwrap();
        assert_eq!(out, [0, 1, 1, 1, 2, 1, 1, 1, 0]);
        let mut cursor = counts.cursor();
        let mut head = [9u16; 4];
        cursor.fill(0, &mut head).unwrap();
        assert_eq!(head, [0, 1, 1, 1]);
        let mut tail = [9u16; 2];
        cursor.fill(4, &mut tail).unwrap();
        assert_eq!(tail, [2, 1]);
    }
}
