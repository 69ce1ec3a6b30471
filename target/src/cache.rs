//! The read cache every [`ObjectReader`](crate::ObjectReader) of one target shares: blocks of
//! every open image within one budget ([`TargetOptions::read_cache_budget`]), each image also
//! within its own share ([`TargetOptions::read_cache_blocks`]), the least recently used block
//! leaving first.
//!
//! A chain is opened one reader per image, and each image's header and tables are fetched
//! ahead when it is opened: without a budget across them, a 64-deep chain kept 64 readers'
//! blocks (about 4 MiB each, so a restore peaked near 290 MiB where one image needs 31). The
//! budget is what bounds memory; the share keeps one image that reads a great deal from taking
//! all of it.
//!
//! Lock order: a reader's own state, then this cache; nothing here takes a reader's lock, so
//! a block of any reader can be evicted from any thread.
//!
//! [`TargetOptions::read_cache_budget`]: crate::TargetOptions::read_cache_budget
//! [`TargetOptions::read_cache_blocks`]: crate::TargetOptions::read_cache_blocks

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

/// A reader's key in the cache.
pub(crate) type ReaderId = u64;

/// The blocks of every reader of a target, within a budget of bytes (readers' blocks may
/// differ in size: a planned restore's metadata readers use smaller ones).
#[derive(Debug)]
pub(crate) struct BlockCache {
    state: Mutex<CacheState>,
    /// Bytes the budget allows.
    budget: usize,
    /// Bytes requested from the store and not landed yet, over all readers.
    in_flight: AtomicUsize,
}

#[derive(Debug, Default)]
struct CacheState {
    blocks: HashMap<(ReaderId, u64), Cached>,
    /// Blocks each reader holds.
    held: HashMap<ReaderId, usize>,
    bytes: usize,
    peak: usize,
    tick: u64,
    next_reader: ReaderId,
}

#[derive(Debug)]
struct Cached {
    bytes: Bytes,
    tick: u64,
}

impl BlockCache {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            state: Mutex::new(CacheState::default()),
            budget,
            in_flight: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // The state is consistent after every statement that changes it: a panic elsewhere
        // while it was held leaves nothing half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A key for a new reader.
    pub(crate) fn register(&self) -> ReaderId {
        let mut state = self.lock();
        state.next_reader += 1;
        state.next_reader
    }

    /// Whether `reader`'s block `index` is cached.
    pub(crate) fn contains(&self, reader: ReaderId, index: u64) -> bool {
        self.lock().blocks.contains_key(&(reader, index))
    }

    /// `reader`'s block `index`, marked as just used.
    pub(crate) fn get(&self, reader: ReaderId, index: u64) -> Option<Bytes> {
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let cached = state.blocks.get_mut(&(reader, index))?;
        cached.tick = tick;
        Some(cached.bytes.clone())
    }

    /// Caches `reader`'s block `index`, then evicts the least recently used blocks: `reader`'s
    /// while it holds more than `share` blocks, anyone's while the cache holds more than the
    /// budget. The block just cached leaves last.
    pub(crate) fn insert(&self, reader: ReaderId, index: u64, bytes: Bytes, share: usize) {
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let len = bytes.len();
        if let Some(old) = state.blocks.insert((reader, index), Cached { bytes, tick }) {
            state.bytes -= old.bytes.len();
        } else {
            *state.held.entry(reader).or_default() += 1;
        }
        state.bytes += len;
        state.peak = state.peak.max(state.bytes);
        while state.held.get(&reader).copied().unwrap_or(0) > share.max(1) {
            let Some(oldest) = state.oldest(|(owner, _)| *owner == reader) else {
                break;
            };
            state.evict(Some(oldest));
        }
        while state.bytes > self.budget && state.blocks.len() > 1 {
            let Some(oldest) = state.oldest(|_| true) else {
                break;
            };
            state.evict(Some(oldest));
        }
    }

    /// Drops every block of `reader` (it is closed).
    pub(crate) fn forget(&self, reader: ReaderId) {
        let mut state = self.lock();
        let keys: Vec<_> = state
            .blocks
            .keys()
            .filter(|(owner, _)| *owner == reader)
            .copied()
            .collect();
        for key in keys {
            state.evict(Some(key));
        }
        state.held.remove(&reader);
    }

    /// Notes `bytes` more requested from the store.
    pub(crate) fn requested(&self, bytes: usize) {
        self.in_flight.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Notes `bytes` requested landed (or failed).
    pub(crate) fn landed(&self, bytes: usize) {
        // Never below zero, whatever the order of the notes.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(bytes))
            });
    }

    /// Blocks of `block` bytes a prefetch hint may still start: hints never hold more than
    /// half the budget in flight over all readers, so what they fetch lands before the cache
    /// must evict it.
    pub(crate) fn hint_room(&self, block: usize) -> usize {
        (self.budget / 2).saturating_sub(self.in_flight.load(Ordering::Relaxed)) / block.max(1)
    }

    /// Bytes cached now.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The most bytes cached at once since the target was opened.
    pub(crate) fn peak(&self) -> usize {
        self.lock().peak
    }
}

impl CacheState {
    /// The least recently used key among those `keep` selects.
    fn oldest(&self, keep: impl Fn(&(ReaderId, u64)) -> bool) -> Option<(ReaderId, u64)> {
        self.blocks
            .iter()
            .filter(|(key, _)| keep(key))
            .min_by_key(|(_, cached)| cached.tick)
            .map(|(key, _)| *key)
    }

    fn evict(&mut self, key: Option<(ReaderId, u64)>) {
        let Some(key) = key else {
            return;
        };
        if let Some(cached) = self.blocks.remove(&key) {
            self.bytes -= cached.bytes.len();
            if let Some(held) = self.held.get_mut(&key.0) {
                *held = held.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> Bytes {
        Bytes::from(vec![byte; 4])
    }

    #[test]
    fn the_budget_holds_over_all_readers_the_oldest_block_leaving_first() {
        let cache = BlockCache::new(12);
        let (a, b) = (cache.register(), cache.register());
        cache.insert(a, 0, block(1), 8);
        cache.insert(b, 0, block(2), 8);
        cache.insert(a, 1, block(3), 8);
        assert!(cache.get(a, 0).is_some(), "a's block 0 used again");
        cache.insert(b, 1, block(4), 8);
        assert_eq!(cache.bytes(), 12);
        assert!(
            !cache.contains(b, 0),
            "b's block 0 was the least recently used"
        );
        assert_eq!(cache.get(a, 0).as_deref(), Some(&[1u8; 4][..]));
        assert!(cache.contains(a, 1) && cache.contains(b, 1));
        assert_eq!(
            cache.peak(),
            16,
            "the insert over budget, before its eviction"
        );
    }

    #[test]
    fn a_reader_over_its_share_loses_its_own_blocks_not_others() {
        let cache = BlockCache::new(1 << 20);
        let (a, b) = (cache.register(), cache.register());
        cache.insert(b, 0, block(9), 2);
        for index in 0..5 {
            cache.insert(a, index, block(index as u8), 2);
        }
        assert!(cache.contains(b, 0));
        assert!(cache.contains(a, 3) && cache.contains(a, 4));
        assert!(!cache.contains(a, 2));
        cache.forget(a);
        assert_eq!(cache.bytes(), 4, "only b's block is left");
    }

    #[test]
    fn hints_keep_to_half_the_budget_in_flight() {
        let cache = BlockCache::new(64);
        assert_eq!(cache.hint_room(4), 8);
        cache.requested(24);
        assert_eq!(cache.hint_room(4), 2);
        assert_eq!(cache.hint_room(16), 0);
        cache.landed(40);
        assert_eq!(cache.hint_room(4), 8);
    }
}
