//! Raw volumes a backup or conversion reads: files, block devices, network block devices.
//!
//! A volume is read through [`VolumeRead`], which besides positional reads tells where data
//! may be, so holes are never read and a sparse volume costs in proportion to its data. Files
//! and block devices answer with `SEEK_DATA`/`SEEK_HOLE` (lseek(2)); an NBD client answers
//! from the export's `base:allocation` block status.

use std::fs::File;
use std::io;
use std::ops::Range;

use rustix::fs::{SeekFrom, seek};
use rustix::io::Errno;

use crate::ReadAt;
use crate::offset::GuestRange;

/// A raw volume read by a backup: its size, positional reads, and where data may be.
pub trait VolumeRead: Send + Sync {
    /// The volume's size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` with the bytes at `offset` (`offset + buf.len() <= size()`).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The first range at or after `offset` that may hold data (`start..end`, with
    /// `offset <= start < end <= size()`), or `None` when only holes remain. A volume that
    /// cannot tell answers `offset..size()`.
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>>;
}

/// A file or block device. Where the file system cannot report holes (or for a block
/// device), everything from `offset` on is one data range.
impl VolumeRead for File {
    fn size(&self) -> io::Result<u64> {
        ReadAt::len(self)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ReadAt::read_exact_at(self, buf, offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = VolumeRead::size(self)?;
        if offset >= size {
            return Ok(None);
        }
        let start = match seek(self, SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(Errno::NXIO) => return Ok(None),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => offset,
            Err(errno) => return Err(errno.into()),
        };
        if start >= size {
            return Ok(None);
        }
        let end = match seek(self, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => size,
            Err(errno) => return Err(errno.into()),
        };
        // A hole reported at `start` itself would stall the caller; call the rest data.
        let end = if end <= start { size } else { end };
        Ok(Some(start..end))
    }
}

impl<T: VolumeRead + ?Sized> VolumeRead for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        (**self).next_data(offset)
    }
}

/// Clusters mapped by the first look of [`Image::next_data`](VolumeRead::next_data); each
/// look past a stretch of zeros maps twice as many, up to [`MAP_WINDOW_MAX`] bytes.
const MAP_WINDOW_CLUSTERS: u64 = 16;
/// The most guest bytes one look maps (the extents held: at most one per cluster of it).
const MAP_WINDOW_MAX: u64 = 1 << 30;

/// A chain read as a raw volume (`strata convert -O qcow2` of a QCOW2 source, as
/// `qemu-img convert` reads any format): its guest bytes, and as holes every range the chain
/// says reads as zeros without storing data (unallocated down to the base, zero clusters, past
/// a shorter layer's end), so those are never read.
///
/// Mapping costs in proportion to the clusters mapped, and the caller asks once per data
/// range: each answer maps from a small window, doubled while only zeros are found, so an
/// image of alternating clusters costs a few clusters' mapping a range (not a whole window's)
/// and a long run of zeros a logarithmic number of looks.
impl VolumeRead for crate::Image {
    fn size(&self) -> io::Result<u64> {
        Ok(self.virtual_size())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset).map_err(io::Error::other)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.virtual_size();
        let mut window = self.cluster_size().saturating_mul(MAP_WINDOW_CLUSTERS);
        let mut at = offset;
        while at < size {
            let len = window.min(size - at);
            let extents = self.map(at, len).map_err(io::Error::other)?;
            let mut data: Option<Range<u64>> = None;
            for extent in extents {
                let range = extent.start.0..extent.end().0;
                match (&mut data, extent.kind.is_zero()) {
                    (None, false) => data = Some(range),
                    (Some(found), false) if found.end == range.start => found.end = range.end,
                    (Some(_), _) => break,
                    (None, true) => {}
                }
            }
            if data.is_some() {
                return Ok(data);
            }
            at += len;
            window = window.saturating_mul(2).min(MAP_WINDOW_MAX);
        }
        Ok(None)
    }
}

/// Any [`ReadAt`] source (a buffer, an object) as a volume with no holes.
#[derive(Debug, Clone)]
pub struct DenseVolume<R>(pub R);

impl<R: ReadAt> VolumeRead for DenseVolume<R> {
    fn size(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.0.len()?;
        Ok((offset < size).then_some(offset..size))
    }
}

/// The data ranges of a volume below a given size, in ascending order.
#[derive(Debug)]
pub struct DataRanges<'a, V: ?Sized> {
    volume: &'a V,
    size: u64,
    pos: u64,
}

impl<'a, V: VolumeRead + ?Sized> DataRanges<'a, V> {
    /// Ranges of `volume` below `size`.
    pub fn new(volume: &'a V, size: u64) -> Self {
        Self {
            volume,
            size,
            pos: 0,
        }
    }

    /// The size the ranges stop at.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next data range `(start, end)`, in ascending order; an answer from the volume
    /// that goes backwards or past the size is an error, not a loop.
    pub fn next_range(&mut self) -> io::Result<Option<(u64, u64)>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let Some(range) = self.volume.next_data(self.pos)? else {
            self.pos = self.size;
            return Ok(None);
        };
        if range.start < self.pos || range.end <= range.start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the volume reported data at {}..{} when asked from {}",
                    range.start, range.end, self.pos
                ),
            ));
        }
        if range.start >= self.size {
            self.pos = self.size;
            return Ok(None);
        }
        let end = range.end.min(self.size);
        self.pos = end;
        Ok(Some((range.start, end)))
    }
}

/// A volume cut into chunks of one size, each with the volume's data ranges inside it: what a
/// scan of every chunk (an overlay, a backup) plans from. Holes between the data read as
/// zeros; [`read_chunk`] fills a chunk that way.
pub struct VolumeChunks<'a, V: ?Sized> {
    ranges: DataRanges<'a, V>,
    pending: Option<GuestRange>,
    chunk: u64,
    at: u64,
}

impl<'a, V: VolumeRead + ?Sized> VolumeChunks<'a, V> {
    /// `volume` below `size`, in chunks of `chunk` bytes (the last one shorter).
    pub fn new(volume: &'a V, size: u64, chunk: u64) -> Self {
        Self {
            ranges: DataRanges::new(volume, size),
            pending: None,
            chunk: chunk.max(1),
            at: 0,
        }
    }

    /// The next chunk and the data ranges within it (ascending), or `None` past the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<(GuestRange, Vec<GuestRange>)>> {
        let size = self.ranges.size();
        if self.at >= size {
            return Ok(None);
        }
        if self.at == 0 && self.pending.is_none() {
            self.pending = self.next_range()?;
        }
        let range = GuestRange::new(self.at, (self.at + self.chunk).min(size));
        let mut data = Vec::new();
        while let Some(pending) = self.pending {
            if pending.start >= range.end {
                break;
            }
            data.extend(pending.intersect(&range));
            if pending.end > range.end {
                break;
            }
            self.pending = self.next_range()?;
        }
        self.at = range.end.get();
        Ok(Some((range, data)))
    }

    fn next_range(&mut self) -> io::Result<Option<GuestRange>> {
        let next = self.ranges.next_range()?;
        Ok(next.map(|(start, end)| GuestRange::new(start, end)))
    }
}

/// Fills `bytes` (the chunk `range` of `volume`) with the volume's `data` ranges within it
/// (ascending, as [`VolumeChunks`] gives them), zeroing only the holes between them.
pub fn read_chunk(
    volume: &(impl VolumeRead + ?Sized),
    range: GuestRange,
    data: &[GuestRange],
    bytes: &mut [u8],
) -> io::Result<()> {
    let mut filled = 0;
    for piece in data {
        let (from, to) = (range.index_of(piece.start), range.index_of(piece.end));
        let part = bytes
            .get_mut(from..to)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "data outside its chunk"))?;
        volume.read_exact_at(part, piece.start.get())?;
        if let Some(hole) = bytes.get_mut(filled..from) {
            hole.fill(0);
        }
        filled = filled.max(to);
    }
    if let Some(tail) = bytes.get_mut(filled..) {
        tail.fill(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_reports_its_data_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1; 4096], 8 << 20).unwrap();
        let file = File::open(&path).unwrap();
        let mut ranges = DataRanges::new(&file, 64 << 20);
        let first = ranges.next_range().unwrap().unwrap();
        assert!(
            first.0 <= 8 << 20 && first.1 >= (8 << 20) + 4096,
            "{first:?}"
        );
        assert!(
            first.1 - first.0 < 32 << 20,
            "the hole was reported as data: {first:?}"
        );
    }

    #[test]
    fn chunks_carry_the_data_ranges_inside_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1; 4096], (8 << 20) - 1024).unwrap();
        let file = File::open(&path).unwrap();
        let mut chunks = VolumeChunks::new(&file, 64 << 20, 4 << 20);
        let mut found = Vec::new();
        while let Some((range, data)) = chunks.next_chunk().unwrap() {
            let mut bytes = vec![9u8; range.len() as usize];
            read_chunk(&file, range, &data, &mut bytes).unwrap();
            let ones = bytes.iter().filter(|&&b| b == 1).count();
            assert!(
                bytes.iter().all(|&b| b <= 1),
                "holes read as zeros in {range}"
            );
            found.push((range.start.get() >> 20, ones));
            for piece in &data {
                assert!(range.intersect(piece) == Some(*piece), "{piece} in {range}");
            }
        }
        // The write spans the boundary of the second and third chunks.
        let expect: Vec<(u64, usize)> = (0..16)
            .map(|i| {
                (
                    i * 4,
                    [0, 1024, 3072][(i as usize).min(2)] * usize::from(i < 3),
                )
            })
            .collect();
        assert_eq!(found, expect);
    }

    #[test]
    fn dense_volume_is_one_range() {
        let volume = DenseVolume(vec![7u8; 1000]);
        let mut ranges = DataRanges::new(&volume, 1000);
        assert_eq!(ranges.next_range().unwrap(), Some((0, 1000)));
        assert_eq!(ranges.next_range().unwrap(), None);
    }

    struct Backwards;
    impl VolumeRead for Backwards {
        fn size(&self) -> io::Result<u64> {
            Ok(100)
        }
        fn read_exact_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn next_data(&self, _: u64) -> io::Result<Option<Range<u64>>> {
            Ok(Some(0..10))
        }
    }

    #[test]
    fn a_volume_answering_backwards_is_an_error() {
        let mut ranges = DataRanges::new(&Backwards, 100);
        assert_eq!(ranges.next_range().unwrap(), Some((0, 10)));
        let err = ranges.next_range().unwrap_err();
        assert!(err.to_string().contains("when asked from 10"), "{err}");
    }
}
