//! Digest manifests: a 128-bit digest of every non-zero cluster of a volume at one backup.
//!
//! The next backup reads the volume, digests each cluster and writes only the clusters whose
//! digest differs, so an incremental needs neither the previous volume nor changed-block
//! tracking. Digests are BLAKE3 truncated to 128 bits: cryptographic, so a tenant cannot craft
//! data whose change goes unnoticed, and fast (several GB/s per core with SIMD).
//!
//! Encoding (all integers big-endian): the magic `STRDGST1`, the cluster size (u64), the
//! virtual size (u64), the entry count (u64), then per non-zero cluster in ascending order its
//! index (u64) and digest (16 bytes). All-zero clusters have no entry. Memory and size are 24
//! bytes per non-zero cluster (384 MiB for a full 1 TiB volume at 64 KiB clusters).

use crate::codec::{Format, check_index};
use crate::error::Result;

const FORMAT: Format = Format {
    what: "digest manifest",
    magic: b"STRDGST1",
    words: 2,
    value: 16,
};

/// A 128-bit cluster digest.
pub type Digest = [u8; 16];

/// Digests the bytes of one cluster.
pub fn digest(cluster: &[u8]) -> Digest {
    let full = blake3::hash(cluster);
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_bytes()[..16]);
    out
}

/// The digests of one backup point.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DigestManifest {
    /// Cluster size the digests cover.
    pub cluster_size: u64,
    /// Virtual size of the volume.
    pub virtual_size: u64,
    entries: Vec<(u64, Digest)>,
}

impl DigestManifest {
    /// An empty manifest (every cluster zero).
    pub fn new(cluster_size: u64, virtual_size: u64) -> Self {
        Self {
            cluster_size,
            virtual_size,
            entries: Vec::new(),
        }
    }

    /// Appends the digest of cluster `index`; indexes must ascend.
    pub(crate) fn push(&mut self, index: u64, digest: Digest) {
        debug_assert!(self.entries.last().is_none_or(|(i, _)| *i < index));
        self.entries.push((index, digest));
    }

    /// The non-zero clusters and their digests, ascending.
    pub fn entries(&self) -> &[(u64, Digest)] {
        &self.entries
    }

    /// The digest of cluster `index`, `None` when it was all zeros.
    pub fn get(&self, index: u64) -> Option<&Digest> {
        self.entries
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .and_then(|at| self.entries.get(at).map(|(_, d)| d))
    }

    /// Encodes the manifest.
    pub fn encode(&self) -> Vec<u8> {
        FORMAT.encode(
            &[self.cluster_size, self.virtual_size],
            self.entries.iter().map(|(i, d)| (*i, &d[..])),
        )
    }

    /// Decodes a manifest read back from a target (untrusted: every field is checked).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (words, raw) = FORMAT.decode(bytes)?;
        let (cluster_size, virtual_size) = (words[0], words[1]);
        let clusters = virtual_size.div_ceil(cluster_size);
        let mut entries = Vec::with_capacity(raw.len());
        for entry in raw {
            let (index, value) = entry?;
            check_index(FORMAT.what, index, clusters)?;
            let mut digest = [0u8; 16];
            digest.copy_from_slice(value);
            entries.push((index, digest));
        }
        Ok(Self {
            cluster_size,
            virtual_size,
            entries,
        })
    }
}

/// Walks a manifest in ascending cluster order, as a backup scans the volume.
pub(crate) struct Cursor<'a> {
    entries: &'a [(u64, Digest)],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(manifest: Option<&'a DigestManifest>) -> Self {
        Self {
            entries: manifest.map_or(&[], |m| m.entries()),
            at: 0,
        }
    }

    /// The digest of `index` (which must not go backwards between calls).
    pub fn get(&mut self, index: u64) -> Option<Digest> {
        while let Some((i, _)) = self.entries.get(self.at) {
            if *i >= index {
                break;
            }
            self.at += 1;
        }
        match self.entries.get(self.at) {
            Some((i, d)) if *i == index => Some(*d),
            _ => None,
        }
    }

    /// Entries with an index in `from..to`, advancing past them.
    pub fn take_until(&mut self, from: u64, to: u64) -> &'a [(u64, Digest)] {
        while self.entries.get(self.at).is_some_and(|(i, _)| *i < from) {
            self.at += 1;
        }
        let start = self.at;
        while self.entries.get(self.at).is_some_and(|(i, _)| *i < to) {
            self.at += 1;
        }
        &self.entries[start..self.at]
    }

    /// Whether any entry lies in `from..to` (without advancing).
    pub fn any_in(&self, from: u64, to: u64) -> bool {
        let rest = &self.entries[self.at.min(self.entries.len())..];
        let first = rest.partition_point(|(i, _)| *i < from);
        rest.get(first).is_some_and(|(i, _)| *i < to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: usize = 32;
    const ENTRY: usize = 24;

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut m = DigestManifest::new(65536, 10 << 20);
        m.push(3, digest(&[1; 65536]));
        m.push(100, digest(&[2; 65536]));
        let bytes = m.encode();
        assert_eq!(DigestManifest::decode(&bytes).ok(), Some(m.clone()));
        assert!(DigestManifest::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut out_of_range = bytes.clone();
        out_of_range[HEADER + ENTRY..HEADER + ENTRY + 8].copy_from_slice(&1000u64.to_be_bytes());
        assert!(DigestManifest::decode(&out_of_range).is_err());
        assert_eq!(m.get(3), Some(&digest(&[1; 65536])));
        assert_eq!(m.get(4), None);
    }
}
