//! Placing and encoding the metadata appended after the data: L2 tables, the L1 table, the
//! refcount blocks and the refcount table, in that order (qcow2.rst, "Host cluster management",
//! "Cluster mapping").
//!
//! The refcount structures count themselves, so their size is found by iterating to a fixed
//! point. Every table is encoded one cluster at a time, so memory stays at one cluster no
//! matter how large the virtual size is.

use super::allocation::{COPIED, DataRefcounts, GuestMap};
use crate::error::Error;

/// Largest L1 table QEMU opens, 32 MiB (qcow2.rst, note under `size`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens, 8 MiB (its `QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Host offsets must stay below 2^56 (bits 9-55 of an L2 entry).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Number of L1 entries for a virtual size, refused when QEMU could not open the image.
pub(crate) fn l1_size(virtual_size: u64, cluster_bits: u32) -> Result<u64, Error> {
    let guest_clusters = virtual_size.div_ceil(1 << cluster_bits);
    let entries = guest_clusters.div_ceil(1 << (cluster_bits - 3));
    if entries * 8 > MAX_L1_BYTES {
        return Err(Error::CannotWrite {
            feature: "a virtual size needing an L1 table over 32 MiB (choose a larger cluster size)",
        });
    }
    Ok(entries)
}

/// Where every metadata structure goes, in host clusters.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    cluster_bits: u32,
    header_clusters: u64,
    /// First cluster after the data area; the L2 tables start here.
    data_end: u64,
    l2_count: u64,
    pub(crate) l1_size: u64,
    l1_clusters: u64,
    /// Refcount blocks the table has entries for (allocated or not).
    block_slots: u64,
    /// Leading block slots inside the header padding, which stay unallocated.
    skipped: std::ops::Range<u64>,
    table_clusters: u64,
}

impl Layout {
    /// Plans the metadata after `data_end` for `l2_count` L2 tables and `l1_size` L1 entries.
    pub(crate) fn plan(
        cluster_bits: u32,
        header_clusters: u64,
        data_end: u64,
        l2_count: u64,
        l1_size: u64,
    ) -> Result<Self, Error> {
        let cluster = 1u64 << cluster_bits;
        let per_block = cluster / 2;
        // Blocks wholly inside the header padding (after cluster 0) count nothing.
        let skipped = 1..(header_clusters / per_block).max(1);
        let mut layout = Self {
            cluster_bits,
            header_clusters,
            data_end,
            l2_count,
            l1_size,
            l1_clusters: (l1_size * 8).div_ceil(cluster),
            block_slots: 0,
            skipped,
            table_clusters: 0,
        };
        loop {
            let slots = layout.end().div_ceil(per_block);
            let table = (slots * 8).div_ceil(cluster);
            if slots == layout.block_slots && table == layout.table_clusters {
                break;
            }
            layout.block_slots = slots;
            layout.table_clusters = table;
        }
        if layout.table_clusters * cluster > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::CannotWrite {
                feature: "an image needing a refcount table over 8 MiB (choose a larger cluster size)",
            });
        }
        if layout
            .end()
            .checked_shl(cluster_bits)
            .is_none_or(|end| end > MAX_HOST_OFFSET)
        {
            return Err(Error::CannotWrite {
                feature: "an image file beyond 64 PiB",
            });
        }
        Ok(layout)
    }

    fn skipped_count(&self) -> u64 {
        self.skipped.end - self.skipped.start
    }

    fn allocated_blocks(&self) -> u64 {
        self.block_slots - self.skipped_count().min(self.block_slots)
    }

    fn l1_first(&self) -> u64 {
        self.data_end + self.l2_count
    }

    fn blocks_first(&self) -> u64 {
        self.l1_first() + self.l1_clusters
    }

    fn table_first(&self) -> u64 {
        self.blocks_first() + self.allocated_blocks()
    }

    /// One past the last cluster of the image.
    pub(crate) fn end(&self) -> u64 {
        self.table_first() + self.table_clusters
    }

    pub(crate) fn l1_offset(&self) -> u64 {
        if self.l1_size == 0 {
            0
        } else {
            self.l1_first() << self.cluster_bits
        }
    }

    pub(crate) fn refcount_table_offset(&self) -> u64 {
        self.table_first() << self.cluster_bits
    }

    pub(crate) fn refcount_table_clusters(&self) -> u64 {
        self.table_clusters
    }

    pub(crate) fn metadata_clusters(&self) -> u64 {
        self.end() - self.data_end
    }

    /// Encodes every metadata cluster in file order and hands each to `emit`.
    pub(crate) fn encode(
        &self,
        map: &GuestMap,
        refcounts: &DataRefcounts,
        mut emit: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let cluster = 1usize << self.cluster_bits;
        let mut buf = vec![0u8; cluster];
        let l2_bits = self.cluster_bits - 3;

        let spill = |e| Error::WriteIo {
            operation: "reading back the writer's spilled tables",
            offset: 0,
            source: e,
        };
        // L2 tables, one per L1 index that has entries.
        let mut current: Option<u64> = None;
        for mapped in map.entries() {
            let (guest, entry) = mapped.map_err(spill)?;
            let l1_index = guest.0 >> l2_bits;
            if current != Some(l1_index) {
                if current.is_some() {
                    emit(&buf)?;
                    buf.fill(0);
                }
                current = Some(l1_index);
            }
            let slot = ((guest.0 & ((1 << l2_bits) - 1)) * 8) as usize;
            buf[slot..slot + 8].copy_from_slice(&entry.to_be_bytes());
        }
        if current.is_some() {
            emit(&buf)?;
        }

        // The L1 table.
        let per_cluster = (cluster / 8) as u64;
        let mut tables = map.l2_tables().enumerate().peekable();
        for chunk in 0..self.l1_clusters {
            buf.fill(0);
            let first = chunk * per_cluster;
            while let Some((k, l1_index)) = tables.peek() {
                let (k, l1_index) =
                    match l1_index {
                        Ok(l1_index) => (*k, *l1_index),
                        Err(_) => {
                            let failed = tables.next().map(|(_, r)| r);
                            return Err(spill(failed.and_then(Result::err).unwrap_or_else(|| {
                                std::io::Error::other("spilled L2 table list")
                            })));
                        }
                    };
                if l1_index >= first + per_cluster {
                    break;
                }
                let offset = (self.data_end + k as u64) << self.cluster_bits;
                let slot = ((l1_index - first) * 8) as usize;
                buf[slot..slot + 8].copy_from_slice(&(offset | COPIED).to_be_bytes());
                tables.next();
            }
            emit(&buf)?;
        }

        // Refcount blocks, 16-bit big-endian counts.
        let per_block = (cluster / 2) as u64;
        let mut counts = vec![0u16; cluster / 2];
        let mut cursor = refcounts.cursor();
        for slot in 0..self.block_slots {
            if self.skipped.contains(&slot) {
                continue;
            }
            cursor.fill(slot * per_block, &mut counts).map_err(spill)?;
            self.fill_metadata_counts(slot * per_block, &mut counts);
            for (bytes, count) in buf.chunks_exact_mut(2).zip(&counts) {
                bytes.copy_from_slice(&count.to_be_bytes());
            }
            emit(&buf)?;
        }

        // The refcount table.
        let mut allocated = 0;
        for chunk in 0..self.table_clusters {
            buf.fill(0);
            let first = chunk * per_cluster;
            for slot in first..(first + per_cluster).min(self.block_slots) {
                if self.skipped.contains(&slot) {
                    continue;
                }
                let offset = (self.blocks_first() + allocated) << self.cluster_bits;
                allocated += 1;
                let at = ((slot - first) * 8) as usize;
                buf[at..at + 8].copy_from_slice(&offset.to_be_bytes());
            }
            emit(&buf)?;
        }
        Ok(())
    }

    /// Sets the refcounts of host clusters `first..first + out.len()` that hold the header
    /// cluster or metadata to one (the data area's are filled in from the writer's runs; the
    /// header padding and the space past the end stay zero).
    fn fill_metadata_counts(&self, first: u64, out: &mut [u16]) {
        let stop = first + out.len() as u64;
        for range in [0..1, self.data_end..self.end()] {
            let lo = range.start.max(first);
            let hi = range.end.min(stop);
            for count in out
                .iter_mut()
                .take(hi.saturating_sub(first) as usize)
                .skip(lo.saturating_sub(first) as usize)
            {
                *count = 1;
            }
        }
        debug_assert!(self.header_clusters >= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_structures_cover_themselves() {
        // 512-byte clusters: one block counts 256 clusters, so 1000 data clusters need 4+ blocks.
        let layout = Layout::plan(9, 1, 1001, 16, 16).unwrap();
        let per_block = 256;
        assert!(layout.block_slots * per_block >= layout.end());
        assert!(layout.table_clusters * 64 >= layout.block_slots);
        assert_eq!(
            layout.end(),
            1001 + 16 + 1 + layout.allocated_blocks() + layout.table_clusters
        );
    }

    #[test]
    fn header_padding_blocks_are_skipped() {
        // 10240 header clusters of 512 bytes (a 5 MiB multipart header) span 40 blocks; block 0
        // holds the header cluster itself, blocks 1..40 are all padding.
        let layout = Layout::plan(9, 10240, 10240, 0, 0).unwrap();
        assert_eq!(layout.skipped, 1..40);
        assert_eq!(layout.allocated_blocks(), layout.block_slots - 39);
    }

    #[test]
    fn oversized_l1_is_refused() {
        assert!(l1_size(1 << 40, 9).is_err());
        assert_eq!(l1_size(1 << 40, 16).unwrap(), 2048);
        assert_eq!(l1_size(0, 16).unwrap(), 0);
    }
}
