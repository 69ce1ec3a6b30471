//! CRC-32 checksums of every cluster a backup stored, to verify an image without restoring it.
//!
//! Encoding (big-endian): the magic `STRCRC01`, the cluster size (u64), the entry count (u64),
//! then per stored cluster in ascending order its index (u64) and the CRC-32 (IEEE, u32) of its
//! guest bytes (after decompression).

use crate::codec::Format;
use crate::error::Result;

const FORMAT: Format = Format {
    what: "checksum list",
    magic: b"STRCRC01",
    words: 1,
    value: 4,
};

/// The CRC-32 of every stored cluster of one image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterChecksums {
    /// Cluster size of the image.
    pub cluster_size: u64,
    entries: Vec<(u64, u32)>,
}

impl ClusterChecksums {
    /// An empty list.
    pub fn new(cluster_size: u64) -> Self {
        Self {
            cluster_size,
            entries: Vec::new(),
        }
    }

    /// Records cluster `index` (ascending) with the bytes stored for it.
    pub(crate) fn push(&mut self, index: u64, data: &[u8]) {
        self.entries.push((index, crc32fast::hash(data)));
    }

    /// The stored clusters and their checksums, ascending.
    pub fn entries(&self) -> &[(u64, u32)] {
        &self.entries
    }

    /// The checksum of cluster `index`, if the list has it.
    pub fn get(&self, index: u64) -> Option<u32> {
        let at = self
            .entries
            .binary_search_by_key(&index, |&(i, _)| i)
            .ok()?;
        self.entries.get(at).map(|&(_, crc)| crc)
    }

    /// The first listed cluster in `clusters`, if any.
    pub fn first_in(&self, clusters: std::ops::Range<u64>) -> Option<u64> {
        let at = self.entries.partition_point(|&(i, _)| i < clusters.start);
        self.entries
            .get(at)
            .map(|&(i, _)| i)
            .filter(|&i| i < clusters.end)
    }

    /// Encodes the list.
    pub fn encode(&self) -> Vec<u8> {
        let values: Vec<[u8; 4]> = self.entries.iter().map(|(_, c)| c.to_be_bytes()).collect();
        FORMAT.encode(
            &[self.cluster_size],
            self.entries
                .iter()
                .zip(&values)
                .map(|((i, _), v)| (*i, &v[..])),
        )
    }

    /// Decodes a list read back from a target (untrusted: every field is checked).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (words, raw) = FORMAT.decode(bytes)?;
        let mut entries = Vec::with_capacity(raw.len());
        for entry in raw {
            let (index, value) = entry?;
            let mut crc = [0u8; 4];
            crc.copy_from_slice(value);
            entries.push((index, u32::from_be_bytes(crc)));
        }
        Ok(Self {
            cluster_size: words[0],
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterChecksums {
        let mut list = ClusterChecksums::new(65536);
        list.push(3, b"abc");
        list.push(9, &[0u8; 100]);
        list
    }

    #[test]
    fn looks_up_clusters_and_ranges() {
        let list = sample();
        assert_eq!(list.get(3), Some(crc32fast::hash(b"abc")));
        assert_eq!(list.get(4), None);
        assert_eq!(list.first_in(0..3), None);
        assert_eq!(list.first_in(0..4), Some(3));
        assert_eq!(list.first_in(4..10), Some(9));
        assert_eq!(list.first_in(10..u64::MAX), None);
    }

    #[test]
    fn round_trips() {
        let list = sample();
        assert_eq!(ClusterChecksums::decode(&list.encode()).unwrap(), list);
    }

    #[test]
    fn rejects_damage_with_a_named_reason() {
        let good = sample().encode();
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
    fn an_absurd_count_is_refused_before_allocating() {
        let mut bytes = sample().encode();
        bytes[16..24].copy_from_slice(&(u64::MAX / 2).to_be_bytes());
        let err = ClusterChecksums::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("entries do not fit"), "{err}");
    }
}
