//! CRC-32 checksums of every cluster a backup stored, to verify an image without restoring it.
//!
//! Encoding (big-endian): the magic `STRCRC01`, the cluster size (u64), the entry count (u64),
//! then per stored cluster in ascending order its index (u64) and the CRC-32 (IEEE, u32) of its
//! guest bytes (after decompression).

use crate::error::{Result, malformed};

const MAGIC: &[u8; 8] = b"STRCRC01";
const HEADER: usize = 24;
const ENTRY: usize = 12;

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

    /// Encodes the list.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.entries.len() * ENTRY);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.cluster_size.to_be_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        for (index, crc) in &self.entries {
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(&crc.to_be_bytes());
        }
        out
    }

    /// Decodes a list read back from a target (untrusted: every field is checked).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "checksum list";
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(malformed(WHAT, "bad magic or truncated header"));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[8..16]);
        let cluster_size = u64::from_be_bytes(word);
        word.copy_from_slice(&bytes[16..24]);
        let count = u64::from_be_bytes(word);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(malformed(WHAT, format!("cluster size {cluster_size}")));
        }
        let body = &bytes[HEADER..];
        if Some(body.len() as u64) != count.checked_mul(ENTRY as u64) {
            return Err(malformed(
                WHAT,
                format!("{count} entries do not fit {} bytes", body.len()),
            ));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for chunk in body.chunks_exact(ENTRY) {
            word.copy_from_slice(&chunk[..8]);
            let index = u64::from_be_bytes(word);
            let mut crc = [0u8; 4];
            crc.copy_from_slice(&chunk[8..]);
            if entries.last().is_some_and(|(last, _)| *last >= index) {
                return Err(malformed(WHAT, format!("cluster {index} out of order")));
            }
            entries.push((index, u32::from_be_bytes(crc)));
        }
        Ok(Self {
            cluster_size,
            entries,
        })
    }
}
