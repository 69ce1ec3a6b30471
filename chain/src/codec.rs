//! The binary shape the side files share (digest manifests and checksum lists), big-endian:
//! an 8-byte magic, header words (the first is the cluster size), the entry count, then
//! fixed-size entries, each a cluster index (strictly ascending) and a value.

use crate::error::{Error, Result, malformed};

/// One side file format.
pub(crate) struct Format {
    /// What the file is called in errors.
    pub what: &'static str,
    /// The magic.
    pub magic: &'static [u8; 8],
    /// Header words after the magic, before the count (the first is the cluster size).
    pub words: usize,
    /// Bytes of an entry's value.
    pub value: usize,
}

impl Format {
    /// Bytes of the header: magic, words and count.
    pub fn header_len(&self) -> usize {
        8 + 8 * (self.words + 1)
    }

    /// Bytes of one entry.
    pub fn entry_len(&self) -> usize {
        8 + self.value
    }

    /// The header for `words` (as many as the format has) and `count` entries.
    pub fn encode_header(&self, words: &[u64], count: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len());
        out.extend_from_slice(self.magic);
        for word in words {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&count.to_be_bytes());
        out
    }

    /// Checks an untrusted `header` (at least [`Self::header_len`] bytes, else it is
    /// truncated) for a body of `body_len` bytes; returns its words (the cluster size, checked
    /// to be a power of two from 512 B to 2 MiB, first) and the entry count.
    pub fn decode_header(&self, header: &[u8], body_len: u64) -> Result<(Vec<u64>, u64)> {
        if header.len() < self.header_len() || header.get(..8) != Some(&self.magic[..]) {
            return Err(malformed(self.what, "bad magic or truncated header"));
        }
        let words: Vec<u64> = (0..=self.words).map(|i| word(header, 8 + 8 * i)).collect();
        let (count, words) = match words.split_last() {
            Some((count, words)) => (*count, words.to_vec()),
            None => return Err(malformed(self.what, "no header words")),
        };
        let cluster_size = words.first().copied().unwrap_or(0);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(malformed(self.what, format!("cluster size {cluster_size}")));
        }
        if Some(body_len) != count.checked_mul(self.entry_len() as u64) {
            return Err(malformed(
                self.what,
                format!("{count} entries do not fit {body_len} bytes"),
            ));
        }
        Ok((words, count))
    }
}

/// The big-endian u64 at `at` (zero where the bytes are missing; callers checked the length).
pub(crate) fn word(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_be_bytes(b)
}

/// Fails for an entry index past the clusters of the volume.
pub(crate) fn check_index(what: &'static str, index: u64, clusters: u64) -> Result<()> {
    if index >= clusters {
        return Err(Error::Malformed {
            what,
            reason: format!("cluster {index} out of range"),
        });
    }
    Ok(())
}
