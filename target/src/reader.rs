//! [`ObjectReader`]: positional reads of one object over range GETs, with a small block cache,
//! coalesced requests and read-ahead on sequential access.
//!
//! The object is read in blocks of
//! [`TargetOptions::read_block_size`](crate::TargetOptions::read_block_size). A read asks for the
//! blocks it covers that are neither cached nor already on their way; runs of adjacent missing
//! blocks become one range GET (split at `max_request` so big runs are fetched in parallel).
//! When a read starts where the previous one ended, the blocks after it are requested too, in
//! a window that doubles up to `max_readahead`; after a few sequential reads one streaming GET
//! to the end of the object replaces the range GETs (one request instead of thousands, paced to
//! stay within `max_readahead` of the reader, stopped on the next random read). Blocks land in
//! the target's [`BlockCache`], shared by all its readers within `read_cache_budget` bytes, each
//! reader holding at most `read_cache_blocks` of them, the least recently used evicted first;
//! a block evicted before a read got to it is fetched again. A short or failed GET is retried; a block that keeps
//! failing fails the reads that need it, and is fetched afresh by the next read.
//!
//! A planned restore ([`crate::PartStorage`]) fetches large parts of the object itself and
//! pins them in the reader while it reads from them: a read that lies inside a pinned part
//! copies from it and touches neither the cache nor the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};
use strata_qcow2::ReadAt;

use crate::cache::{BlockCache, ReaderId};
use crate::error::Error;
use crate::target::Inner;

/// Reads one object of the target; implements [`ReadAt`]. Obtained from
/// [`Target::open_image`](crate::Target::open_image) or through
/// [`VolumeStorage`](crate::VolumeStorage).
#[derive(Debug)]
pub struct ObjectReader {
    inner: Arc<Inner>,
    path: Path,
    len: u64,
    block: u64,
    /// This reader's key in the target's cache.
    id: ReaderId,
    /// Blocks of the cache this reader may hold: `read_cache_blocks` of the target's block size.
    share: usize,
    state: Arc<Shared>,
    /// Parts fetched for a planned restore, by (start, serial), while their holders keep them.
    pinned: Mutex<Pinned>,
    /// Whether sequential reads fetch ahead (off where a fetch plan reads the data and only
    /// metadata goes through the cache).
    read_ahead: bool,
}

#[derive(Debug, Default)]
struct Pinned {
    parts: BTreeMap<(u64, u64), Bytes>,
    serial: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    landed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_flight: HashSet<u64>,
    failed: HashMap<u64, String>,
    /// The reader is dropped: what lands now is not cached.
    closed: bool,
    last_end: u64,
    window: u64,
    /// The next block the sequential stream delivers, while one runs.
    stream: Option<u64>,
    /// Bumped to stop the running stream.
    generation: u64,
}

impl ObjectReader {
    pub(crate) fn new(inner: Arc<Inner>, path: Path, len: u64) -> Self {
        let block = inner.options.read_block_size as u64;
        let id = inner.cache.register();
        let share = inner.options.read_cache_blocks;
        Self {
            inner,
            path,
            len,
            block,
            id,
            share,
            state: Arc::new(Shared::default()),
            pinned: Mutex::new(Pinned::default()),
            read_ahead: true,
        }
    }

    /// The reader with read-ahead off, for metadata only: every read fetches just the blocks
    /// it covers, blocks of at most [`METADATA_BLOCK`] bytes (a header or an L2 table is one
    /// cluster; a 1 MiB block would fetch and cache 16 times what a 64 KiB one needs), its
    /// share of the cache the same in bytes.
    pub(crate) fn without_read_ahead(mut self) -> Self {
        let bytes = self.block as usize * self.share;
        self.read_ahead = false;
        self.block = self.block.min(METADATA_BLOCK);
        self.share = (bytes / self.block as usize).max(2);
        self
    }

    /// Starts the GETs of blocks `first..=last` (clamped to the object) that are neither cached
    /// nor on their way, in the background: reads that need them then wait for them as for any
    /// block in flight. Opening a chain asks for each image's header and table blocks this way,
    /// so the images' first reads do not go to the store one after another.
    pub(crate) fn prefetch_blocks(&self, first: u64, last: u64) {
        let Some(last_block) = self.len.checked_sub(1).map(|end| end / self.block) else {
            return;
        };
        if let Ok(mut state) = self.lock() {
            // A hint never holds more than half the reader's share of the cache in flight, nor
            // (over all readers) half the budget: a hostile image's tables (or a wrong cluster
            // size) cannot make it fetch the whole object at once, and what hints fetch lands
            // before the cache must evict it.
            let room = (self.share as u64 / 2)
                .saturating_sub(state.in_flight.len() as u64)
                .min(self.inner.cache.hint_room(self.block as usize) as u64);
            let last = last
                .min(last_block)
                .min(first.saturating_add(room).saturating_sub(1));
            if room == 0 || first > last {
                return;
            }
            self.request(&mut state, first, last);
        }
    }

    /// The object's length in bytes.
    pub(crate) fn object_len(&self) -> u64 {
        self.len
    }

    /// How many blocks of the cache this reader may hold.
    pub(crate) fn cache_blocks(&self) -> usize {
        self.share
    }

    /// The cache's block size in bytes.
    pub(crate) fn block_size(&self) -> u64 {
        self.block
    }

    /// Serves reads inside `start..start + bytes.len()` from `bytes` until [`unpin`](Self::unpin)
    /// is called with the returned key.
    pub(crate) fn pin(&self, start: u64, bytes: Bytes) -> u64 {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        pinned.serial += 1;
        let key = pinned.serial;
        pinned.parts.insert((start, key), bytes);
        key
    }

    /// Releases a part [`pin`](Self::pin) kept.
    pub(crate) fn unpin(&self, start: u64, key: u64) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        pinned.parts.remove(&(start, key));
    }

    /// Copies `buf.len()` bytes at `offset` from a pinned part covering them; whether one did.
    fn read_pinned(&self, buf: &mut [u8], offset: u64, end: u64) -> bool {
        let pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        // Parts starting at or before `offset`, nearest first; few are pinned at once.
        for (&(start, _), bytes) in pinned.parts.range(..(offset, u64::MAX)).rev() {
            if start + bytes.len() as u64 >= end
                && let Some(src) = bytes.get((offset - start) as usize..(end - start) as usize)
            {
                buf.copy_from_slice(src);
                return true;
            }
        }
        false
    }

    /// Fetches bytes `start..end` (clamped to the object) with one range GET on the target's
    /// runtime, retried as every read is, and hands the result to `done` there.
    pub(crate) fn fetch_part(
        self: Arc<Self>,
        start: u64,
        end: u64,
        done: impl FnOnce(crate::Result<Bytes>) + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let range = start.min(self.len)..end.min(self.len);
        let (store, path, retry) = (
            self.inner.store.clone(),
            self.path.clone(),
            self.inner.options.retry,
        );
        let task = self.inner.runtime.handle().spawn(async move {
            if range.is_empty() {
                return done(Ok(Bytes::new()));
            }
            let result = retry
                .run(|| get_exact(&*store, &path, range.clone()))
                .await
                .map_err(|err| {
                    Error::store(
                        "get",
                        format!("{path} (bytes {:#x}..{:#x})", range.start, range.end),
                        err,
                    )
                });
            done(result);
        });
        task.abort_handle()
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state
            .state
            .lock()
            .map_err(|_| io::Error::other("read cache lock poisoned"))
    }

    /// Requests the missing blocks among `first..=last`, coalesced into runs.
    fn request(&self, state: &mut State, first: u64, last: u64) {
        let max_run = (self.inner.options.max_request as u64 / self.block).max(1);
        let mut block = first;
        while block <= last {
            if state.in_flight.contains(&block) || self.cached(block) {
                block += 1;
                continue;
            }
            let start = block;
            while block <= last
                && block - start < max_run
                && !state.in_flight.contains(&block)
                && !self.cached(block)
            {
                state.in_flight.insert(block);
                state.failed.remove(&block);
                block += 1;
            }
            self.inner
                .cache
                .requested((block - start) as usize * self.block as usize);
            self.fetch(start, block);
        }
    }

    fn cached(&self, index: u64) -> bool {
        self.inner.cache.contains(self.id, index)
    }

    /// Fetches blocks `first..end` in the background.
    fn fetch(&self, first: u64, end: u64) {
        let range = first * self.block..(end * self.block).min(self.len);
        let (store, path, retry, shared, block, cache, id) = (
            self.inner.store.clone(),
            self.path.clone(),
            self.inner.options.retry,
            self.state.clone(),
            self.block,
            self.inner.cache.clone(),
            self.id,
        );
        let share = self.share;
        self.inner.runtime.handle().spawn(async move {
            let result = retry.run(|| get_exact(&*store, &path, range.clone())).await;
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            match result {
                Ok(bytes) => {
                    for (i, index) in (first..end).enumerate() {
                        let from = (i as u64 * block) as usize;
                        let to = (from + block as usize).min(bytes.len());
                        if state.in_flight.remove(&index) {
                            cache.landed(block as usize);
                        }
                        if !state.closed {
                            // A block of its own: a slice would keep the whole response alive
                            // after the cache evicted the block, and the budget would not hold.
                            let block = match end - first {
                                1 => bytes.clone(),
                                _ => Bytes::copy_from_slice(&bytes[from.min(to)..to]),
                            };
                            cache.insert(id, index, block, share);
                        }
                    }
                }
                Err(err) => {
                    let message = with_causes(&Error::store("read", &path, err));
                    for index in first..end {
                        if state.in_flight.remove(&index) {
                            cache.landed(block as usize);
                        }
                        state.failed.insert(index, message.clone());
                    }
                }
            }
            shared.landed.notify_all();
        });
    }
}

/// The largest block of a metadata reader ([`ObjectReader::without_read_ahead`]).
const METADATA_BLOCK: u64 = 64 << 10;

/// Sequential reads in a row (as a read-ahead window in blocks) before a stream replaces range
/// GETs.
const STREAM_AFTER: u64 = 1;

impl ObjectReader {
    /// Starts one streaming GET from block `start` to the end of the object; it delivers blocks
    /// into the cache, staying at most `max_readahead` ahead of the reader.
    fn start_stream(&self, state: &mut State, start: u64) {
        state.generation += 1;
        state.stream = Some(start);
        let generation = state.generation;
        let stream = Stream {
            store: self.inner.store.clone(),
            path: self.path.clone(),
            shared: self.state.clone(),
            generation,
            block: self.block,
            len: self.len,
            max_window: (self.inner.options.max_readahead as u64 / self.block).max(1),
            cache: self.inner.cache.clone(),
            id: self.id,
            share: self.share,
        };
        self.inner.runtime.handle().spawn(async move {
            // A failed stream just ends; readers waiting on its blocks fall back to range GETs.
            let _ = stream.run(start).await;
            let shared = stream.shared;
            if let Ok(mut state) = shared.state.lock()
                && state.generation == generation
            {
                state.stream = None;
            }
            shared.landed.notify_all();
        });
    }
}

struct Stream {
    store: Arc<dyn ObjectStore>,
    path: Path,
    shared: Arc<Shared>,
    generation: u64,
    block: u64,
    len: u64,
    max_window: u64,
    cache: Arc<BlockCache>,
    id: ReaderId,
    share: usize,
}

impl Stream {
    fn current(&self) -> Option<u64> {
        let state = self.shared.state.lock().ok()?;
        (state.generation == self.generation).then_some(state.last_end / self.block)
    }

    async fn run(&self, start: u64) -> object_store::Result<()> {
        let options = GetOptions::new().with_range(Some(start * self.block..self.len));
        let mut body = self
            .store
            .get_opts(&self.path, options)
            .await?
            .into_stream();
        let mut pending = BytesMut::new();
        let mut index = start;
        while index * self.block < self.len {
            // Stay within the read-ahead window of the reader; stop when replaced or dropped.
            loop {
                let Some(reader_at) = self.current() else {
                    return Ok(());
                };
                if index <= reader_at + self.max_window {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let want = self.block.min(self.len - index * self.block) as usize;
            while pending.len() < want {
                match body.next().await {
                    Some(chunk) => pending.extend_from_slice(&chunk?),
                    None => {
                        return Err(object_store::Error::Generic {
                            store: "strata-target",
                            source: format!("stream of {} ended early", self.path).into(),
                        });
                    }
                }
            }
            // A block of its own, not a view of the stream's buffer (see `fetch`).
            let bytes = Bytes::copy_from_slice(&pending.split_to(want));
            {
                let Ok(mut state) = self.shared.state.lock() else {
                    return Ok(());
                };
                if state.generation != self.generation || state.closed {
                    return Ok(());
                }
                if state.in_flight.remove(&index) {
                    self.cache.landed(self.block as usize);
                }
                state.failed.remove(&index);
                self.cache.insert(self.id, index, bytes, self.share);
                state.stream = Some(index + 1);
            }
            self.shared.landed.notify_all();
            index += 1;
        }
        Ok(())
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.state.lock() {
            state.generation += 1;
            state.stream = None;
            state.closed = true;
        }
        self.inner.cache.forget(self.id);
    }
}

/// A range GET that fails (transiently, so it is retried) when the store returns fewer bytes.
async fn get_exact(
    store: &dyn ObjectStore,
    path: &Path,
    range: std::ops::Range<u64>,
) -> object_store::Result<Bytes> {
    let bytes = store.get_range(path, range.clone()).await?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(object_store::Error::Generic {
            store: "strata-target",
            source: format!(
                "short read of {path}: {} bytes for range {}..{}",
                bytes.len(),
                range.start,
                range.end
            )
            .into(),
        });
    }
    Ok(bytes)
}

/// The error and its causes on one line (the cached failure outlives the error value).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl ReadAt for ObjectReader {
    /// Starts the GETs of the blocks covering `len` bytes at `offset` that are neither cached
    /// nor on their way, at most half the cache in flight.
    fn prefetch(&self, offset: u64, len: u64) {
        if len > 0 {
            let last = offset.saturating_add(len - 1) / self.block;
            self.prefetch_blocks(offset / self.block, last);
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read past the end of {}", self.path),
                )
            })?;
        if self.read_pinned(buf, offset, end) {
            return Ok(());
        }
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        let last_block = (self.len - 1) / self.block;
        let mut state = self.lock()?;
        let max_window = (self.inner.options.max_readahead as u64 / self.block).max(1);
        // Sequential, or near it: several readers working through neighbouring ranges (a
        // restore's parallel workers) land a little ahead of or behind one another. Only a
        // jump farther than the read-ahead window counts as random access and stops a stream.
        let near = self.read_ahead
            && state.last_end != 0
            && offset.abs_diff(state.last_end) <= max_window * self.block;
        if near {
            state.window = (state.window * 2).clamp(1, max_window);
            state.last_end = state.last_end.max(end);
        } else {
            state.window = 0;
            state.last_end = end;
        }
        let ahead = (last + state.window).min(last_block);
        if state.window >= STREAM_AFTER {
            let here = matches!(state.stream, Some(next) if next >= first && next <= ahead + 1);
            if !here {
                let start =
                    (first..=ahead).find(|&b| !state.in_flight.contains(&b) && !self.cached(b));
                if let Some(start) = start {
                    self.start_stream(&mut state, start);
                }
            }
            let stream_from = state.stream.unwrap_or(u64::MAX);
            if first < stream_from {
                self.request(&mut state, first, ahead.min(stream_from - 1));
            }
        } else {
            if state.stream.is_some() {
                // Random access again: stop the stream.
                state.generation += 1;
                state.stream = None;
            }
            self.request(&mut state, first, ahead);
        }
        let mut pending: Vec<u64> = (first..=last).collect();
        loop {
            let mut still = Vec::new();
            for index in pending {
                if let Some(bytes) = self.inner.cache.get(self.id, index) {
                    state_copy(buf, offset, index * self.block, &bytes);
                } else if let Some(message) = state.failed.remove(&index) {
                    return Err(io::Error::other(message));
                } else {
                    still.push(index);
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            // Evicted before this read got to it, or beyond where the stream will go: ask
            // again. The stream delivers only within the read-ahead window of the readers'
            // position, and another read may have moved that position back and started a new
            // stream there: waiting on it for a block past its window would wait forever.
            let reach = state.last_end / self.block + max_window;
            for &index in &still {
                let streamed = state
                    .stream
                    .is_some_and(|next| index >= next && index <= reach);
                if !state.in_flight.contains(&index) && !streamed {
                    self.request(&mut state, index, index);
                }
            }
            pending = still;
            state = self
                .state
                .landed
                .wait(state)
                .map_err(|_| io::Error::other("read cache lock poisoned"))?;
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

/// Copies the overlap of block bytes (at object offset `block_start`) into `buf` (at `offset`).
fn state_copy(buf: &mut [u8], offset: u64, block_start: u64, bytes: &Bytes) {
    let start = offset.max(block_start);
    let end = (offset + buf.len() as u64).min(block_start + bytes.len() as u64);
    if start >= end {
        return;
    }
    let dst = buf.get_mut((start - offset) as usize..(end - offset) as usize);
    let src = bytes.get((start - block_start) as usize..(end - block_start) as usize);
    if let (Some(dst), Some(src)) = (dst, src) {
        dst.copy_from_slice(src);
    }
}
