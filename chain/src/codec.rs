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
    fn header_len(&self) -> usize {
        8 + 8 * (self.words + 1)
    }

    /// Encodes `words` (as many as the format has) and `entries` (ascending).
    pub fn encode<'a>(
        &self,
        words: &[u64],
        entries: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len() + entries.len() * (8 + self.value));
        out.extend_from_slice(self.magic);
        for word in words {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&(entries.len() as u64).to_be_bytes());
        for (index, value) in entries {
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    /// Checks the header of untrusted `bytes` and returns its words (the cluster size, checked
    /// to be a power of two from 512 B to 2 MiB, first) and the entries' bytes.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<(Vec<u64>, Entries<'a>)> {
        let header = self.header_len();
        if bytes.len() < header || bytes.get(..8) != Some(&self.magic[..]) {
            return Err(malformed(self.what, "bad magic or truncated header"));
        }
        let words: Vec<u64> = (0..=self.words).map(|i| word(bytes, 8 + 8 * i)).collect();
        let (count, words) = match words.split_last() {
            Some((count, words)) => (*count, words.to_vec()),
            None => return Err(malformed(self.what, "no header words")),
        };
        let cluster_size = words.first().copied().unwrap_or(0);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(malformed(self.what, format!("cluster size {cluster_size}")));
        }
        let body = &bytes[header..];
        let entry = 8 + self.value;
        if Some(body.len() as u64) != count.checked_mul(entry as u64) {
            return Err(malformed(
                self.what,
                format!("{count} entries do not fit {} bytes", body.len()),
            ));
        }
        Ok((
            words,
            Entries {
                what: self.what,
                chunks: body.chunks_exact(entry),
                last: None,
            },
        ))
    }
}

/// The entries of a decoded side file: `(index, value)`, checked to ascend as they are read.
pub(crate) struct Entries<'a> {
    what: &'static str,
    chunks: std::slice::ChunksExact<'a, u8>,
    last: Option<u64>,
}

impl Entries<'_> {
    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(u64, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        let chunk = self.chunks.next()?;
        let index = word(chunk, 0);
        if self.last.is_some_and(|last| last >= index) {
            return Some(Err(malformed(
                self.what,
                format!("cluster {index} out of order"),
            )));
        }
        self.last = Some(index);
        Some(Ok((index, &chunk[8..])))
    }
}

/// The big-endian u64 at `at` (the caller checked that 8 bytes are there).
fn word(bytes: &[u8], at: usize) -> u64 {
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
