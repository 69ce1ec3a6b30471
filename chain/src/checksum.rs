//! CRC-32 checksums of every cluster a backup stored, to verify an image without restoring it.
//!
//! Encoding (big-endian): the magic `STRCRC01`, the cluster size (u64), the entry count (u64),
//! then per stored cluster in ascending order its index (u64) and the CRC-32 (IEEE, u32) of its
//! guest bytes (after decompression). The file is 12 bytes per stored cluster; memory is not:
//! a list is written and read as a stream (see [`ClusterChecksums`]).

use crate::codec::Format;
use crate::error::Result;
use crate::table::{Cursor, Table};

const FORMAT: Format = Format {
    what: "checksum list",
    magic: b"STRCRC01",
    words: 1,
    value: 4,
};

/// The CRC-32 of every stored cluster of one image, in ascending cluster order.
///
/// Never held whole: past 64 KiB the entries spill to an unnamed temporary file (in
/// `TMPDIR`, 12 bytes per stored cluster), and lookups read them back through a cache of a
/// few pages.
#[derive(Debug, PartialEq)]
pub struct ClusterChecksums {
    /// Cluster size of the image.
    pub cluster_size: u64,
    table: Table<4>,
}

impl ClusterChecksums {
    /// An empty list.
    pub fn new(cluster_size: u64) -> Self {
        Self {
            cluster_size,
            table: Table::new(&FORMAT, vec![cluster_size]),
        }
    }

    /// Records cluster `index` (ascending) with the bytes stored for it.
    pub(crate) fn push(&mut self, index: u64, data: &[u8]) -> Result<()> {
        self.table.push(index, &crc32fast::hash(data).to_be_bytes())
    }

    /// Number of listed clusters.
    pub fn len(&self) -> u64 {
        self.table.len()
    }

    /// Whether no cluster is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The checksum of cluster `index`, if the list has it.
    pub fn get(&self, index: u64) -> Result<Option<u32>> {
        Ok(self.table.get(index)?.map(u32::from_be_bytes))
    }

    /// The first listed cluster in `clusters`, if any.
    pub fn first_in(&self, clusters: std::ops::Range<u64>) -> Result<Option<u64>> {
        Ok(self
            .table
            .first_from(clusters.start)?
            .filter(|&i| i < clusters.end))
    }

    /// The listed clusters and their checksums, ascending, as a cursor.
    pub(crate) fn cursor(&self) -> Cursor<'_, 4> {
        self.table.cursor()
    }

    /// The entries in ascending cluster order, read back a block at a time.
    pub fn iter(&self) -> impl Iterator<Item = Result<(u64, u32)>> + '_ {
        self.table
            .iter()
            .map(|entry| entry.map(|(i, v)| (i, u32::from_be_bytes(v))))
    }

    /// The encoding, streamed (owning the list, so an upload can outlive the borrow).
    pub fn into_reader(self) -> impl std::io::Read + Send + 'static {
        self.table.into_reader()
    }

    /// The encoding, whole in memory (12 bytes per entry: for small lists and tests; stream
    /// large ones with [`Self::into_reader`]).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.table.encode()
    }

    /// Decodes a list read back from a target (untrusted: every field is checked).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(Self::from_table(Table::decode(&FORMAT, bytes, clusters)?))
    }

    /// Opens a list stored in `file` (a side file downloaded from a target; untrusted: every
    /// field is checked, in one pass that holds no more than a page).
    pub fn open(file: std::fs::File) -> Result<Self> {
        Ok(Self::from_table(Table::open(&FORMAT, file, clusters)?))
    }

    fn from_table(table: Table<4>) -> Self {
        Self {
            cluster_size: table.words().first().copied().unwrap_or(0),
            table,
        }
    }
}

/// The clusters a list with header `words` (the cluster size) may name: those whose guest
/// offset `index * cluster size`, and the end of the cluster, fit in 64 bits. The list has no
/// virtual size to bound it further; readers multiply indexes by the cluster size.
fn clusters(words: &[u64]) -> Option<u64> {
    Some(u64::MAX / words.first().copied().unwrap_or(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterChecksums {
        let mut list = ClusterChecksums::new(65536);
        list.push(3, b"abc").unwrap();
        list.push(9, &[0u8; 100]).unwrap();
        list
    }

    #[test]
    fn looks_up_clusters_and_ranges() {
        let list = sample();
        assert_eq!(list.get(3).unwrap(), Some(crc32fast::hash(b"abc")));
        assert_eq!(list.get(4).unwrap(), None);
        assert_eq!(list.first_in(0..3).unwrap(), None);
        assert_eq!(list.first_in(0..4).unwrap(), Some(3));
        assert_eq!(list.first_in(4..10).unwrap(), Some(9));
        assert_eq!(list.first_in(10..u64::MAX).unwrap(), None);
    }

    #[test]
    fn round_trips() {
        let list = sample();
        let bytes = list.encode().unwrap();
        assert_eq!(ClusterChecksums::decode(&bytes).unwrap(), list);
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        assert_eq!(ClusterChecksums::open(file).unwrap(), list);
    }

    #[test]
    fn rejects_damage_with_a_named_reason() {
        let good = sample().encode().unwrap();
        let cases: [(&str, Vec<u8>); 5] = [
            ("bad magic", [b"STRCRC02", &good[8..]].concat()),
            ("truncated header", good[..20].to_vec()),
            ("entries do not fit", good[..good.len() - 1].to_vec()),
            ("cluster size 1000", {
                let mut b = good.clone();
                b[8..16].copy_from_slice(&1000u64.to_be_bytes());
                b
            }),
            ("cluster 3 out of order", {
                let mut b = good.clone();
                // The second entry's index becomes 3, equal to the first.
                b[36..44].copy_from_slice(&3u64.to_be_bytes());
                b
            }),
        ];
        for (reason, bytes) in cases {
            let err = ClusterChecksums::decode(&bytes).unwrap_err().to_string();
            assert!(err.contains("checksum list"), "{err}");
            assert!(err.contains(reason), "expected {reason:?} in {err:?}");
        }
    }

    #[test]
    fn an_index_without_a_guest_offset_is_refused() {
        let mut bytes = sample().encode().unwrap();
        // The second entry's index becomes one whose offset (index * 64 KiB) overflows u64.
        let index = u64::MAX / 65536;
        bytes[36..44].copy_from_slice(&index.to_be_bytes());
        let err = ClusterChecksums::decode(&bytes).unwrap_err().to_string();
        assert!(
            err.contains(&format!("cluster {index} out of range")),
            "{err}"
        );
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let err = ClusterChecksums::open(file).unwrap_err().to_string();
        assert!(
            err.contains(&format!("cluster {index} out of range")),
            "{err}"
        );
        // The last cluster that ends within 2^64 bytes is still accepted.
        bytes[36..44].copy_from_slice(&(index - 1).to_be_bytes());
        assert!(ClusterChecksums::decode(&bytes).is_ok());
    }

    #[test]
    fn an_absurd_count_is_refused_before_allocating() {
        let mut bytes = sample().encode().unwrap();
        bytes[16..24].copy_from_slice(&(u64::MAX / 2).to_be_bytes());
        let err = ClusterChecksums::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("entries do not fit"), "{err}");
    }
}
