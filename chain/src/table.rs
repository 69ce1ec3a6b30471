//! A side file's entries without holding them: appended in ascending cluster order, spilled
//! to an unnamed temporary file (in `TMPDIR`) past [`SPILL`] bytes, read back either as a
//! [`Cursor`] in ascending order or by cluster index through a small page cache.
//!
//! Memory per table is fixed: at most [`SPILL`] bytes not yet spilled and [`PAGES`] cached
//! pages of [`PAGE_BYTES`], whatever the count. A lookup that misses the cache binary-searches
//! the pages by their first index (one 8-byte `pread` a step), then reads one page, so a scan
//! in ascending order costs a few system calls per page of entries.
//!
//! The file holds the body of the encoding (the entries); the header, which carries the
//! count, is written in front when the table is streamed out ([`Table::reader`]), so a table
//! is never rewritten. A table opened from a downloaded side file ([`Table::open`]) reads the
//! body in place after the header.

use std::borrow::Borrow;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::codec::{Format, word};
use crate::error::{Error, Result, malformed};

/// Bytes of entries kept in memory before a table spills them to its file.
pub(crate) const SPILL: usize = 64 << 10;
/// Bytes of one cached page of entries (rounded down to whole entries).
pub(crate) const PAGE_BYTES: usize = 16 << 10;
/// Pages a table caches.
pub(crate) const PAGES: usize = 4;
/// Bytes a cursor reads at a time.
const CURSOR_BYTES: usize = 64 << 10;

/// The bound on a table's indexes given its header words (`None`: unbounded).
pub(crate) type MaxIndex = fn(&[u64]) -> Option<u64>;

/// Entries of `8 + V` bytes: a cluster index and a value of `V` bytes.
pub(crate) struct Table<const V: usize> {
    format: &'static Format,
    words: Vec<u64>,
    body: Body,
    count: u64,
    last: Option<u64>,
    cache: Mutex<Cache>,
}

/// The entries' bytes: `file[base..base + spilled]`, then `pending`.
struct Body {
    file: Option<File>,
    base: u64,
    spilled: u64,
    pending: Vec<u8>,
}

impl Body {
    fn read_at(&self, mut buf: &mut [u8], mut at: u64) -> io::Result<()> {
        if at < self.spilled {
            let n = (self.spilled - at).min(buf.len() as u64) as usize;
            let (head, rest) = buf.split_at_mut(n);
            let file = self
                .file
                .as_ref()
                .ok_or_else(|| io::Error::other("no table file"))?;
            file.read_exact_at(head, self.base + at)?;
            buf = rest;
            at += n as u64;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let from = (at - self.spilled) as usize;
        let src = self
            .pending
            .get(from..from + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the table's end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= SPILL {
            let file = match &mut self.file {
                Some(file) => file,
                None => self.file.insert(tempfile::tempfile()?),
            };
            file.write_all_at(&self.pending, self.base + self.spilled)?;
            self.spilled += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }
}

/// Cached pages, the least recently used replaced first.
#[derive(Default)]
struct Cache {
    pages: Vec<Page>,
    clock: u64,
}

/// Entries `number * per_page ..` of a table.
struct Page {
    number: u64,
    bytes: Vec<u8>,
    /// Index of the next page's first entry, `None` on the last page.
    next_first: Option<u64>,
    used: u64,
}

impl<const V: usize> Table<V> {
    /// An empty table of `format` with header `words`.
    pub fn new(format: &'static Format, words: Vec<u64>) -> Self {
        debug_assert_eq!(format.value, V);
        Self::with_body(
            format,
            words,
            Body {
                file: None,
                base: 0,
                spilled: 0,
                pending: Vec::new(),
            },
            0,
        )
    }

    fn with_body(format: &'static Format, words: Vec<u64>, body: Body, count: u64) -> Self {
        Self {
            format,
            words,
            body,
            count,
            last: None,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Decodes an encoding held in memory (untrusted: see [`Self::check`]).
    pub fn decode(format: &'static Format, bytes: &[u8], max_index: MaxIndex) -> Result<Self> {
        let header = bytes.get(..format.header_len()).unwrap_or(bytes);
        let body = bytes.get(format.header_len()..).unwrap_or_default();
        let (words, count) = format.decode_header(header, body.len() as u64)?;
        let body = Body {
            file: None,
            base: 0,
            spilled: 0,
            pending: body.to_vec(),
        };
        let mut table = Self::with_body(format, words, body, count);
        table.check(max_index)?;
        Ok(table)
    }

    /// Opens an encoding in `file` (a downloaded side file; untrusted: see [`Self::check`]).
    pub fn open(format: &'static Format, file: File, max_index: MaxIndex) -> Result<Self> {
        let io = |source| Error::Io {
            what: format.what,
            offset: 0,
            source,
        };
        let len = file.metadata().map_err(io)?.len();
        let mut header = vec![0u8; format.header_len().min(len as usize)];
        file.read_exact_at(&mut header, 0).map_err(io)?;
        let base = format.header_len() as u64;
        let (words, count) = format.decode_header(&header, len.saturating_sub(base))?;
        let body = Body {
            file: Some(file),
            base,
            spilled: len - base,
            pending: Vec::new(),
        };
        let mut table = Self::with_body(format, words, body, count);
        table.check(max_index)?;
        Ok(table)
    }

    /// Reads every entry once: indexes must ascend strictly and stay below `max_index` of the
    /// header words.
    fn check(&mut self, max_index: MaxIndex) -> Result<()> {
        let max_index = max_index(&self.words);
        let mut last = None;
        let mut cursor = self.cursor();
        while let Some((index, _)) = cursor.next()? {
            if last.is_some_and(|last| last >= index) {
                return Err(malformed(
                    self.format.what,
                    format!("cluster {index} out of order"),
                ));
            }
            if let Some(max) = max_index {
                crate::codec::check_index(self.format.what, index, max)?;
            }
            last = Some(index);
        }
        self.last = last;
        Ok(())
    }

    /// The header words (the count excluded).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Appends the entry of cluster `index`, which must be past every entry so far.
    pub fn push(&mut self, index: u64, value: &[u8; V]) -> Result<()> {
        if self.last.is_some_and(|last| last >= index) {
            return Err(Error::Mismatch(format!(
                "{}: cluster {index} pushed out of order",
                self.format.what
            )));
        }
        let mut entry = [0u8; 24];
        let entry = entry
            .get_mut(..8 + V)
            .ok_or_else(|| Error::Mismatch(format!("{}: entries too large", self.format.what)))?;
        entry[..8].copy_from_slice(&index.to_be_bytes());
        entry[8..].copy_from_slice(value);
        self.body.append(entry).map_err(|source| Error::Io {
            what: "spilling a side file to a temporary file",
            offset: self.count * (8 + V as u64),
            source,
        })?;
        self.count += 1;
        self.last = Some(index);
        let cache = self.cache.get_mut().unwrap_or_else(|p| p.into_inner());
        cache.pages.clear();
        Ok(())
    }

    /// The entries in ascending order.
    pub fn cursor(&self) -> Cursor<'_, V> {
        Cursor {
            table: self,
            buf: Vec::new(),
            at: 0,
            next: 0,
        }
    }

    /// The whole encoding in memory.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.reader()
            .read_to_end(&mut out)
            .map_err(|source| Error::Io {
                what: "encoding a side file",
                offset: 0,
                source,
            })?;
        Ok(out)
    }

    /// The entries in ascending order; ends after the first error.
    pub fn iter(&self) -> impl Iterator<Item = Result<(u64, [u8; V])>> + '_ {
        let mut cursor = self.cursor();
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = cursor.next().transpose();
            failed = matches!(next, Some(Err(_)));
            next
        })
    }

    /// The whole encoding (header, then entries), streamed.
    pub fn reader(&self) -> TableReader<&Self, V> {
        TableReader::new(self)
    }

    /// [`Self::reader`] owning the table.
    pub fn into_reader(self) -> TableReader<Self, V> {
        TableReader::new(self)
    }

    fn entries_per_page() -> u64 {
        (PAGE_BYTES / (8 + V)).max(1) as u64
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            what: "reading a side file's temporary file",
            offset: 0,
            source,
        }
    }

    /// The index of entry `position`.
    fn index_at(&self, position: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.body
            .read_at(&mut b, position * (8 + V as u64))
            .map_err(|e| self.io(e))?;
        Ok(u64::from_be_bytes(b))
    }

    /// Runs `f` on the page whose entries decide `index`: the last page whose first entry is
    /// at most `index` (the first page when none is).
    fn with_page<T>(&self, index: u64, f: impl FnOnce(&Page) -> T) -> Result<Option<T>> {
        if self.count == 0 {
            return Ok(None);
        }
        let per_page = Self::entries_per_page();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.clock += 1;
        let clock = cache.clock;
        let hit = cache.pages.iter().position(|page| {
            (page.number == 0 || word(&page.bytes, 0) <= index)
                && page.next_first.is_none_or(|next| index < next)
        });
        let at = match hit {
            Some(at) => at,
            None => {
                let pages = self.count.div_ceil(per_page);
                let (mut lo, mut hi) = (0, pages);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.index_at(mid * per_page)? <= index {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                let first = lo * per_page;
                let entries = per_page.min(self.count - first);
                let mut bytes = vec![0u8; (entries * (8 + V as u64)) as usize];
                self.body
                    .read_at(&mut bytes, first * (8 + V as u64))
                    .map_err(|e| self.io(e))?;
                let next = first + entries;
                let next_first = match next < self.count {
                    true => Some(self.index_at(next)?),
                    false => None,
                };
                let page = Page {
                    number: lo,
                    bytes,
                    next_first,
                    used: clock,
                };
                if cache.pages.len() < PAGES {
                    cache.pages.push(page);
                    cache.pages.len() - 1
                } else {
                    let oldest = (0..cache.pages.len())
                        .min_by_key(|&i| cache.pages.get(i).map_or(0, |p| p.used))
                        .unwrap_or(0);
                    if let Some(slot) = cache.pages.get_mut(oldest) {
                        *slot = page;
                    }
                    oldest
                }
            }
        };
        Ok(cache.pages.get_mut(at).map(|page| {
            page.used = clock;
            f(page)
        }))
    }

    /// The value of cluster `index`, if listed.
    pub fn get(&self, index: u64) -> Result<Option<[u8; V]>> {
        Ok(self
            .with_page(index, |page| {
                let entries = page.bytes.chunks_exact(8 + V);
                let at = lower_bound(&page.bytes, 8 + V, index);
                entries
                    .clone()
                    .nth(at)
                    .filter(|entry| word(entry, 0) == index)
                    .and_then(|entry| entry.get(8..).and_then(|v| v.try_into().ok()))
            })?
            .flatten())
    }

    /// The first listed cluster at or past `index`.
    pub fn first_from(&self, index: u64) -> Result<Option<u64>> {
        Ok(self
            .with_page(index, |page| {
                let at = lower_bound(&page.bytes, 8 + V, index);
                match page.bytes.chunks_exact(8 + V).nth(at) {
                    Some(entry) => Some(word(entry, 0)),
                    None => page.next_first,
                }
            })?
            .flatten())
    }
}

impl<const V: usize> PartialEq for Table<V> {
    fn eq(&self, other: &Self) -> bool {
        let (mut a, mut b) = (self.cursor(), other.cursor());
        if self.words != other.words || self.count != other.count {
            return false;
        }
        loop {
            match (a.next(), b.next()) {
                (Ok(Some(x)), Ok(Some(y))) if x == y => {}
                (Ok(None), Ok(None)) => return true,
                _ => return false,
            }
        }
    }
}

impl<const V: usize> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("what", &self.format.what)
            .field("words", &self.words)
            .field("count", &self.count)
            .field("spilled", &self.body.file.is_some())
            .finish()
    }
}

/// Position of the first entry of `bytes` (entries of `len` bytes) whose index is at least
/// `index`.
fn lower_bound(bytes: &[u8], len: usize, index: u64) -> usize {
    let n = bytes.len() / len;
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if word(bytes, mid * len) < index {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// A table's entries in ascending order, read [`CURSOR_BYTES`] at a time.
pub(crate) struct Cursor<'a, const V: usize> {
    table: &'a Table<V>,
    buf: Vec<u8>,
    /// Offset in `buf` of the next entry.
    at: usize,
    /// Position of the first entry not yet in `buf`.
    next: u64,
}

impl<const V: usize> Cursor<'_, V> {
    fn fill(&mut self) -> Result<bool> {
        if self.at < self.buf.len() {
            return Ok(true);
        }
        let left = self.table.count - self.next;
        if left == 0 {
            return Ok(false);
        }
        let per_read = (CURSOR_BYTES / (8 + V)) as u64;
        let entries = left.min(per_read);
        self.buf.resize((entries * (8 + V as u64)) as usize, 0);
        self.table
            .body
            .read_at(&mut self.buf, self.next * (8 + V as u64))
            .map_err(|e| self.table.io(e))?;
        self.next += entries;
        self.at = 0;
        Ok(true)
    }

    /// The index of the next entry, without taking it.
    pub fn peek(&mut self) -> Result<Option<u64>> {
        Ok(self.fill()?.then(|| word(&self.buf, self.at)))
    }

    /// Takes the next entry.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(u64, [u8; V])>> {
        if !self.fill()? {
            return Ok(None);
        }
        let entry = self.buf.get(self.at..self.at + 8 + V).unwrap_or_default();
        let mut value = [0u8; V];
        value.copy_from_slice(entry.get(8..).unwrap_or(&[0u8; V][..]));
        self.at += 8 + V;
        Ok(Some((word(entry, 0), value)))
    }
}

/// The encoding of a table as [`Read`]: the header, then the entries.
pub(crate) struct TableReader<T, const V: usize> {
    header: Vec<u8>,
    table: T,
    /// Bytes of the encoding read so far.
    at: u64,
}

impl<T: Borrow<Table<V>>, const V: usize> TableReader<T, V> {
    fn new(table: T) -> Self {
        let t = table.borrow();
        Self {
            header: t.format.encode_header(&t.words, t.count),
            table,
            at: 0,
        }
    }
}

impl<T: Borrow<Table<V>>, const V: usize> Read for TableReader<T, V> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let table = self.table.borrow();
        let header = self.header.len() as u64;
        if self.at < header {
            let from = self.at as usize;
            let n = (self.header.len() - from).min(buf.len());
            buf[..n].copy_from_slice(&self.header[from..from + n]);
            self.at += n as u64;
            return Ok(n);
        }
        let body = table.count * (8 + V as u64);
        let at = self.at - header;
        let n = (body - at.min(body)).min(buf.len() as u64) as usize;
        table.body.read_at(&mut buf[..n], at)?;
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: Format = Format {
        what: "test table",
        magic: b"STRTEST1",
        words: 1,
        value: 4,
    };

    /// A table of `n` entries at every third cluster, spilled to its file.
    fn table(n: u64) -> Table<4> {
        let mut t = Table::<4>::new(&FORMAT, vec![4096]);
        for i in 0..n {
            t.push(3 * i, &(i as u32).to_be_bytes()).unwrap();
        }
        t
    }

    #[test]
    fn large_tables_spill_and_keep_a_fixed_memory() {
        let t = table(100_000);
        assert!(t.body.file.is_some());
        assert!(t.body.pending.len() < SPILL);
        for index in [0, 1, 2, 3, 150_000, 299_997, 299_998, 400_000] {
            let want =
                (index % 3 == 0 && index < 300_000).then(|| ((index / 3) as u32).to_be_bytes());
            assert_eq!(t.get(index).unwrap(), want, "cluster {index}");
        }
        assert_eq!(t.first_from(4).unwrap(), Some(6));
        assert_eq!(t.first_from(299_998).unwrap(), None);
        // Any access pattern keeps at most PAGES pages of PAGE_BYTES.
        for index in (0..300_000).step_by(7919) {
            t.get(index).unwrap();
        }
        let cache = t.cache.lock().unwrap();
        assert!(cache.pages.len() <= PAGES);
        assert!(cache.pages.iter().all(|p| p.bytes.len() <= PAGE_BYTES));
    }

    #[test]
    fn every_page_boundary_is_found() {
        let t = table(3000);
        let per_page = Table::<4>::entries_per_page();
        for i in [per_page - 1, per_page, per_page + 1, 2 * per_page, 2999] {
            assert_eq!(t.get(3 * i).unwrap(), Some((i as u32).to_be_bytes()));
            assert_eq!(t.get(3 * i + 1).unwrap(), None);
            assert_eq!(t.first_from(3 * i - 1).unwrap(), Some(3 * i));
        }
    }

    #[test]
    fn the_streamed_encoding_reopens_from_a_file() {
        let t = table(20_000);
        let mut bytes = Vec::new();
        t.reader().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len(), 24 + 20_000 * 12);
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let reopened = Table::<4>::open(&FORMAT, file, |_| Some(60_000)).unwrap();
        assert!(reopened == t);
        assert_eq!(reopened.get(59_997).unwrap(), Some(19_999u32.to_be_bytes()));
        let err = Table::<4>::decode(&FORMAT, &bytes, |_| Some(59_997)).unwrap_err();
        assert!(
            err.to_string().contains("cluster 59997 out of range"),
            "{err}"
        );
    }

    #[test]
    fn pushing_out_of_order_is_refused() {
        let mut t = table(2);
        assert!(t.push(3, &[0; 4]).is_err());
        assert!(t.push(4, &[0; 4]).is_ok());
    }
}
