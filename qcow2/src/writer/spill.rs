//! An append-only log of fixed-size records that keeps only its newest records in memory: the
//! older ones go to an unnamed temporary file (in `TMPDIR`), and the whole log is read back
//! once, in order, when the writer encodes its metadata.
//!
//! The writer's mapping and refcount runs use it, so that an image of compressed clusters
//! (one run each) costs the writer a fixed amount of memory however many clusters it stores:
//! at most [`KEEP`] records in memory, plus a read-back buffer of [`READ_BYTES`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Records a log keeps in memory before it spills the older ones.
pub(crate) const KEEP: usize = 2048;
/// Bytes read back at a time.
const READ_BYTES: usize = 64 << 10;

/// A record of `LEN` bytes.
pub(crate) trait Record: Copy {
    /// Bytes of one record.
    const LEN: usize;
    /// Writes the record into `out` (`LEN` bytes).
    fn encode(&self, out: &mut [u8]);
    /// Reads a record from `bytes` (`LEN` bytes).
    fn decode(bytes: &[u8]) -> Self;
}

/// Records in order: `spilled` of them in the file, then `tail`.
#[derive(Debug)]
pub(crate) struct SpillLog<T> {
    file: Option<File>,
    spilled: usize,
    tail: Vec<T>,
}

impl<T: Record> SpillLog<T> {
    pub(crate) fn new() -> Self {
        Self {
            file: None,
            spilled: 0,
            tail: Vec::new(),
        }
    }

    /// Number of records.
    pub(crate) fn len(&self) -> usize {
        self.spilled + self.tail.len()
    }

    /// Records held in memory.
    #[cfg(test)]
    pub(crate) fn in_memory(&self) -> usize {
        self.tail.len()
    }

    pub(crate) fn push(&mut self, record: T) {
        self.tail.push(record);
    }

    pub(crate) fn last(&self) -> Option<&T> {
        self.tail.last()
    }

    pub(crate) fn last_mut(&mut self) -> Option<&mut T> {
        self.tail.last_mut()
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        self.tail.pop()
    }

    /// Record `index`, while it is still in memory.
    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.tail.get_mut(index.checked_sub(self.spilled)?)
    }

    /// Spills the records before `keep_from` (and before the last, which callers extend)
    /// once [`KEEP`] are in memory.
    pub(crate) fn spill_before(&mut self, keep_from: usize) -> io::Result<()> {
        if self.tail.len() < KEEP {
            return Ok(());
        }
        let end = keep_from.min(self.len() - 1);
        let count = end.saturating_sub(self.spilled);
        if count == 0 {
            return Ok(());
        }
        let mut bytes = vec![0u8; count * T::LEN];
        for (record, out) in self.tail.iter().zip(bytes.chunks_exact_mut(T::LEN)) {
            record.encode(out);
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(tempfile_in_tmpdir()?),
        };
        file.write_all_at(&bytes, (self.spilled * T::LEN) as u64)?;
        self.tail.drain(..count);
        self.spilled += count;
        Ok(())
    }

    /// Every record in order.
    pub(crate) fn iter(&self) -> Iter<'_, T> {
        Iter {
            log: self,
            buf: Vec::new(),
            at: 0,
            next: 0,
        }
    }
}

/// An unnamed temporary file: `O_TMPFILE` in `TMPDIR` where the kernel has it.
fn tempfile_in_tmpdir() -> io::Result<File> {
    tempfile::tempfile()
}

/// Reads a [`SpillLog`] back in order.
pub(crate) struct Iter<'a, T> {
    log: &'a SpillLog<T>,
    buf: Vec<u8>,
    /// Offset in `buf` of the next spilled record.
    at: usize,
    /// Position of the next record not yet read.
    next: usize,
}

impl<T: Record> Iterator for Iter<'_, T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<io::Result<T>> {
        let log = self.log;
        if self.next >= log.spilled && self.at >= self.buf.len() {
            let record = log.tail.get(self.next - log.spilled).copied()?;
            self.next += 1;
            return Some(Ok(record));
        }
        if self.at >= self.buf.len() {
            let count = (log.spilled - self.next).min(READ_BYTES / T::LEN);
            self.buf.resize(count * T::LEN, 0);
            self.at = 0;
            let file = log.file.as_ref()?;
            if let Err(e) = file.read_exact_at(&mut self.buf, (self.next * T::LEN) as u64) {
                self.next = log.len();
                self.buf.clear();
                return Some(Err(e));
            }
            self.next += count;
        }
        let record = T::decode(self.buf.get(self.at..self.at + T::LEN)?);
        self.at += T::LEN;
        Some(Ok(record))
    }
}

/// The big-endian u64 at `at` of `bytes` (zero where missing).
pub(crate) fn word(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_be_bytes(b)
}

/// Writes `value` big-endian at `at` of `out`.
pub(crate) fn put_word(out: &mut [u8], at: usize, value: u64) {
    if let Some(dst) = out.get_mut(at..at + 8) {
        dst.copy_from_slice(&value.to_be_bytes());
    }
}

impl Record for u64 {
    const LEN: usize = 8;
    fn encode(&self, out: &mut [u8]) {
        put_word(out, 0, *self);
    }
    fn decode(bytes: &[u8]) -> Self {
        word(bytes, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_log_keeps_a_bounded_tail_and_reads_back_in_order() {
        let mut log = SpillLog::<u64>::new();
        for i in 0..100_000u64 {
            log.push(i * 3);
            log.spill_before(usize::MAX).unwrap();
            assert!(log.tail.len() <= KEEP);
        }
        assert!(log.spilled > 90_000);
        let back: Vec<u64> = log.iter().map(Result::unwrap).collect();
        assert_eq!(back.len(), 100_000);
        assert!(back.iter().enumerate().all(|(i, &v)| v == i as u64 * 3));
    }

    #[test]
    fn records_still_to_be_set_stay_in_memory() {
        let mut log = SpillLog::<u64>::new();
        for i in 0..(3 * KEEP) as u64 {
            log.push(i);
            log.spill_before(10).unwrap();
        }
        assert_eq!(log.spilled, 10);
        assert!(log.get_mut(9).is_none());
        *log.get_mut(10).unwrap() = 7;
        assert_eq!(log.iter().nth(10).unwrap().unwrap(), 7);
    }
}
