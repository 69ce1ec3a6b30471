//! Parallel fetches of a chain's data for a restore: a plan of large parts, each a coalesced
//! range of one source, and range GETs of them whose bytes the source's reader serves while
//! they are held.
//!
//! A restore walks the chain's map once; every data extent names the source range its read
//! takes ([`strata_qcow2::Image::source_read`]). [`FetchPlanner`] coalesces those ranges, per
//! source, into parts of at most [`TargetOptions::fetch_part_size`] bytes, merging gaps of up to
//! [`TargetOptions::fetch_gap`] bytes (fetching a small gap is cheaper than another request),
//! and never fetches a range no extent reads. [`PartStorage`] opens the chain like
//! [`VolumeStorage`] and issues one range GET per part ([`PartStorage::fetch`]); the caller
//! keeps at most [`TargetOptions::fetch_concurrency`] parts in flight or in hand, so a restore
//! holds at most [`TargetOptions::fetch_memory_bound`] bytes of fetched data. While a
//! [`Fetched`] part is held, reads of its range from its source's reader copy from it instead
//! of issuing GETs, so the QCOW2 reader (and its cluster checks) reads the extents from what
//! arrived, in any order; dropping the part releases its bytes. Dropping an [`InFlight`]
//! cancels its GET, so the first failure stops the rest.
//!
//! [`TargetOptions::fetch_part_size`]: crate::TargetOptions::fetch_part_size
//! [`TargetOptions::fetch_gap`]: crate::TargetOptions::fetch_gap
//! [`TargetOptions::fetch_concurrency`]: crate::TargetOptions::fetch_concurrency
//! [`TargetOptions::fetch_memory_bound`]: crate::TargetOptions::fetch_memory_bound

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use strata_qcow2::{ReadAt, Storage};

use crate::error::{Error, Result};
use crate::reader::ObjectReader;
use crate::storage::{OpenAhead, Opened, Preopen, VolumeStorage};

/// A range of one source to fetch with one GET, and what needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<T> {
    /// The source's name, as the chain opened it.
    pub source: String,
    /// First byte.
    pub start: u64,
    /// Just past the last byte.
    pub end: u64,
    /// What reads from this part (the restore's extents), in the order added.
    pub items: Vec<T>,
}

impl<T> Part<T> {
    /// The part's length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the part holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Coalesces the source ranges a restore reads into parts (see the module docs).
///
/// Ranges arrive in the order the reader needs them (guest order); each source has one open
/// part, which grows while the next range of that source starts within `gap` bytes after its
/// end (or inside it: compressed clusters' ranges are upper bounds that overlap) and the part
/// stays within `part_size`; otherwise the open part is closed and returned. A single range
/// longer than `part_size` makes a part of its own: callers cut extents into pieces of at most
/// `part_size` first. Memory: one open part per source.
#[derive(Debug)]
pub struct FetchPlanner<T> {
    part_size: u64,
    gap: u64,
    open: Vec<Part<T>>,
}

impl<T> FetchPlanner<T> {
    /// A planner of parts of at most `part_size` bytes, merging gaps of at most `gap`.
    pub fn new(part_size: u64, gap: u64) -> Self {
        Self {
            part_size: part_size.max(1),
            gap,
            open: Vec::new(),
        }
    }

    /// Adds range `start..end` of `source`, read by `item`; returns the part this closed.
    pub fn add(&mut self, source: &str, start: u64, end: u64, item: T) -> Option<Part<T>> {
        let end = end.max(start);
        let fresh = Part {
            source: source.to_owned(),
            start,
            end,
            items: Vec::new(),
        };
        let Some(index) = self.open.iter().position(|p| p.source == source) else {
            self.open.push(fresh);
            self.open.last_mut()?.items.push(item);
            return None;
        };
        let part = self.open.get_mut(index)?;
        let joins = start >= part.start
            && start <= part.end.saturating_add(self.gap)
            && end.max(part.end) - part.start <= self.part_size;
        if joins {
            part.end = part.end.max(end);
            part.items.push(item);
            return None;
        }
        let mut closed = std::mem::replace(part, fresh);
        part.items.push(item);
        closed.items.shrink_to_fit();
        Some(closed)
    }

    /// Closes and returns the open parts.
    pub fn finish(self) -> Vec<Part<T>> {
        self.open
    }
}

/// The [`Storage`] of a volume's images for a planned restore: opens the chain as
/// [`VolumeStorage`] does, and fetches parts of the objects it opened.
#[derive(Debug)]
pub struct PartStorage {
    storage: VolumeStorage,
    readers: Mutex<HashMap<String, Arc<ObjectReader>>>,
    /// The images [`preopen`](Self::preopen) fetches ahead as the ones before them are opened.
    ahead: Mutex<OpenAhead>,
    next_id: AtomicU64,
}

impl PartStorage {
    /// Part storage over `storage`, for a target on object storage.
    pub fn new(storage: VolumeStorage) -> Self {
        Self {
            storage,
            readers: Mutex::new(HashMap::new()),
            ahead: Mutex::new(OpenAhead::default()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Starts the GET of `part` (a range of a source this storage opened); the part arrives on
    /// `done`, held and served by its source's reader until dropped, or the error that ended
    /// it (after retries), naming the object and the byte range. Dropping the returned
    /// [`InFlight`] cancels the GET.
    pub fn fetch<T: Send + 'static>(
        &self,
        part: Part<T>,
        done: &mpsc::Sender<Result<Fetched<T>>>,
    ) -> Result<InFlight> {
        let reader = self
            .readers
            .lock()
            .map_err(|_| Error::Runtime {
                operation: "fetch a part",
            })?
            .get(&part.source)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: "opened image",
                name: part.source.clone(),
            })?;
        let done = done.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let task = reader
            .clone()
            .fetch_part(part.start, part.end, move |result| {
                let fetched = result.map(|bytes| Fetched {
                    key: reader.pin(part.start, bytes),
                    reader,
                    part,
                    id,
                });
                // The receiver is gone when the restore stopped; nothing to report then.
                let _ = done.send(fetched);
            });
        Ok(InFlight { task, id })
    }
}

impl PartStorage {
    /// Opens a chain's images before the QCOW2 reader asks for them. The HEADs go out
    /// together, then, per image, the GETs of its first cluster (the header) and of its last
    /// [`PREOPEN_TAIL`](crate::PREOPEN_TAIL) bytes (where strata's writer puts the L2, L1 and
    /// refcount tables; at most a quarter of the reader's share of the cache): at once for as
    /// many images as half the cache's budget holds, the others as the ones before them are
    /// opened. Opened one image at a time, a chain costs
    /// four or five round trips per image, each waiting for the one before: 64 images at
    /// 20 ms a round trip would be six seconds before the first data GET.
    ///
    /// A name later opened that is not among `layers` is opened as [`Storage::open`] always
    /// does; on a folder target this does nothing.
    pub fn preopen(&self, layers: &[Preopen]) -> Result<()> {
        // Only metadata is read through the cache: no read-ahead, no streams.
        let (opened, ahead) = self
            .storage
            .open_ahead(layers, ObjectReader::without_read_ahead)?;
        let mut readers = self.readers.lock().map_err(|_| Error::Runtime {
            operation: "open images",
        })?;
        for (layer, opened) in layers.iter().zip(opened) {
            if let Opened::Object(reader) = opened {
                readers.insert(layer.name.clone(), reader);
            }
        }
        *self.ahead.lock().map_err(|_| Error::Runtime {
            operation: "open images",
        })? = ahead;
        Ok(())
    }
}

impl Storage for PartStorage {
    fn open(&self, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        let readers = || {
            self.readers
                .lock()
                .map_err(|_| io::Error::other("part storage lock poisoned"))
        };
        if let Ok(ahead) = self.ahead.lock() {
            ahead.opened(path);
        }
        if let Some(reader) = readers()?.get(path) {
            return Ok(Arc::clone(reader) as Arc<dyn ReadAt>);
        }
        match self.storage.open_source(path).map_err(io::Error::from)? {
            Opened::File(file) => Ok(Arc::new(file)),
            Opened::Object(reader) => {
                // Only metadata is read through the cache: no read-ahead, no streams.
                let reader = Arc::new(reader.without_read_ahead());
                readers()?.insert(path.to_owned(), Arc::clone(&reader));
                Ok(reader)
            }
        }
    }
}

/// A part's GET in flight; dropping it cancels the GET.
#[derive(Debug)]
pub struct InFlight {
    task: tokio::task::AbortHandle,
    id: u64,
}

impl InFlight {
    /// The [`Fetched::id`] its part arrives with.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fetched part: while it is held, its source's reader serves reads inside its range from
/// its bytes.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The part.
    pub part: Part<T>,
    /// The [`InFlight::id`] of its GET.
    pub id: u64,
    reader: Arc<ObjectReader>,
    key: u64,
}

impl<T> Drop for Fetched<T> {
    fn drop(&mut self) {
        self.reader.unpin(self.part.start, self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Planned = Vec<(String, u64, u64, Vec<usize>)>;

    fn plan(part_size: u64, gap: u64, ranges: &[(&str, u64, u64)]) -> Planned {
        let mut planner = FetchPlanner::new(part_size, gap);
        let mut parts = Vec::new();
        for (i, &(source, start, end)) in ranges.iter().enumerate() {
            parts.extend(planner.add(source, start, end, i));
        }
        parts.extend(planner.finish());
        parts
            .into_iter()
            .map(|p| (p.source, p.start, p.end, p.items))
            .collect()
    }

    #[test]
    fn adjacent_ranges_coalesce_up_to_the_part_size() {
        let ranges: Vec<_> = (0..10).map(|i| ("a", i * 100, (i + 1) * 100)).collect();
        assert_eq!(
            plan(400, 0, &ranges),
            vec![
                ("a".into(), 0, 400, vec![0, 1, 2, 3]),
                ("a".into(), 400, 800, vec![4, 5, 6, 7]),
                ("a".into(), 800, 1000, vec![8, 9]),
            ]
        );
    }

    #[test]
    fn gaps_up_to_the_threshold_are_fetched_wider_ones_are_not() {
        let ranges = [
            ("a", 0, 100),
            ("a", 150, 200),
            ("a", 251, 300),
            ("a", 300, 310),
        ];
        // A 50-byte gap is merged; a 51-byte gap starts a new part: bytes 200..251 are never
        // fetched.
        assert_eq!(
            plan(1000, 50, &ranges),
            vec![
                ("a".into(), 0, 200, vec![0, 1]),
                ("a".into(), 251, 310, vec![2, 3]),
            ]
        );
        assert_eq!(plan(1000, 0, &ranges).len(), 3);
    }

    #[test]
    fn sources_are_planned_apart_and_only_their_ranges_are_fetched() {
        let ranges = [
            ("top", 4096, 8192),
            ("base", 0, 65536),
            ("top", 8192, 12288),
            ("base", 65536, 131072),
            ("top", 1 << 20, (1 << 20) + 4096),
        ];
        assert_eq!(
            plan(1 << 20, 4096, &ranges),
            vec![
                ("top".into(), 4096, 12288, vec![0, 2]),
                ("top".into(), 1 << 20, (1 << 20) + 4096, vec![4]),
                ("base".into(), 0, 131072, vec![1, 3]),
            ]
        );
    }

    #[test]
    fn overlapping_and_backward_ranges() {
        // Compressed clusters: each range is an upper bound reaching into the next.
        let ranges = [
            ("a", 0, 700),
            ("a", 500, 1200),
            ("a", 1100, 1500),
            ("a", 100, 200),
        ];
        assert_eq!(
            plan(1400, 0, &ranges),
            vec![
                ("a".into(), 0, 1200, vec![0, 1]),
                ("a".into(), 1100, 1500, vec![2]),
                ("a".into(), 100, 200, vec![3]),
            ]
        );
    }

    #[test]
    fn a_range_longer_than_the_part_size_is_one_part() {
        assert_eq!(
            plan(100, 10, &[("a", 0, 50), ("a", 50, 300), ("a", 300, 320)]),
            vec![
                ("a".into(), 0, 50, vec![0]),
                ("a".into(), 50, 300, vec![1]),
                ("a".into(), 300, 320, vec![2]),
            ]
        );
    }
}
