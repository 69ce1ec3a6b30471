//! One QCOW2 file of a chain: its header, L1 table, cached L2 tables and data access
//! (qcow2.rst, "Cluster mapping").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::compressed;
use crate::error::{Error, Result, corrupt, io_err};
use crate::header::Header;
use crate::io::ReadAt;
use crate::l2::{self, Entry, Mapping};

/// Bytes of L2 tables one image keeps cached at most: 1 MiB maps 8 GiB of guest at 64 KiB
/// clusters and 512 MiB at 4 KiB, ahead of any sequential reader.
const L2_CACHE_BYTES: u64 = 1 << 20;
/// Bytes of L2 tables a whole chain keeps cached: its images share it (each at most
/// [`L2_CACHE_BYTES`], so a 64-deep chain of 64 KiB clusters keeps 16 tables an image), and
/// no image caches a table the chain has no room for.
const CHAIN_L2_CACHE_BYTES: u64 = 64 << 20;
/// Tables an image may cache however deep its chain, while the chain has room: a walk that
/// crosses from one table to the next keeps the one it leaves.
const MIN_CACHED_TABLES: u64 = 2;
/// Bytes of L1 tables a whole chain may load. An image loads the entries its virtual size
/// needs (qcow2.rst, "Cluster mapping": one entry maps an L2 table's reach), not its whole
/// `l1_size`: a 1 TiB volume needs 16 KiB at 64 KiB clusters, so 64 MiB is 4,096 such images.
const CHAIN_L1_BYTES: u64 = 64 << 20;

/// What the tables of one chain may still cost: L1 bytes for the images not yet opened, and
/// L2 cache bytes free across the chain (shared by its images' caches). Table sizes are the
/// image's to choose (up to 32 MiB of L1 and 2 MiB per L2 table, checked against a length a
/// sparse file has for free), so without a budget the chain's depth multiplies them.
pub(crate) struct ChainBudget {
    l1_left: u64,
    l2_free: Arc<AtomicU64>,
}

impl Default for ChainBudget {
    fn default() -> Self {
        Self {
            l1_left: CHAIN_L1_BYTES,
            l2_free: Arc::new(AtomicU64::new(CHAIN_L2_CACHE_BYTES)),
        }
    }
}

/// An opened QCOW2 file.
pub(crate) struct Qcow2Layer {
    pub name: String,
    pub header: Header,
    file: Arc<dyn ReadAt>,
    file_len: u64,
    /// The external data file and its name, when the image has one.
    data_file: Option<(String, Arc<dyn ReadAt>, u64)>,
    format: l2::Format,
    l1: Vec<u64>,
    cache: Mutex<HashMap<u64, Arc<[u64]>>>,
    cache_capacity: usize,
    /// The chain's free L2 cache bytes, which this image's cache takes from and gives back.
    cache_free: Arc<AtomicU64>,
}

impl Qcow2Layer {
    /// Loads the L1 entries the virtual size needs, from the chain's `budget`; `data_file` is
    /// the opened external data file.
    pub fn open(
        name: String,
        file: Arc<dyn ReadAt>,
        file_len: u64,
        header: Header,
        data_file: Option<(String, Arc<dyn ReadAt>)>,
        budget: &mut ChainBudget,
    ) -> Result<Self> {
        let data_file = match data_file {
            Some((data_name, source)) => {
                let len = source.len().map_err(|e| {
                    io_err(&data_name, "reading the external data file's length", e)
                })?;
                Some((data_name, source, len))
            }
            None => None,
        };
        // Entries past the virtual size are never looked up (the header checked that
        // `l1_size` covers it).
        let l1_bytes = header.required_l1_entries().min(u64::from(header.l1_size)) * 8;
        budget.l1_left = budget.l1_left.checked_sub(l1_bytes).ok_or_else(|| {
            Error::Unsupported {
                image: name.clone(),
                feature: format!(
                    "an L1 table of {l1_bytes} bytes, past the chain's limit of {} MiB of L1 tables",
                    CHAIN_L1_BYTES >> 20
                ),
            }
        })?;
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| {
                io_err(
                    &name,
                    format!("reading the L1 table at {:#x}", header.l1_table_offset),
                    e,
                )
            })?;
        let l1 = raw
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        let format = l2::Format {
            cluster_bits: header.cluster_bits,
            v3: header.version >= 3,
            extended: header.extended_l2(),
            data_file: data_file.is_some(),
        };
        let cache_capacity = (L2_CACHE_BYTES / header.cluster_size()).max(MIN_CACHED_TABLES);
        Ok(Self {
            name,
            header,
            file,
            file_len,
            data_file,
            format,
            l1,
            cache: Mutex::new(HashMap::new()),
            cache_capacity: cache_capacity as usize,
            cache_free: Arc::clone(&budget.l2_free),
        })
    }

    /// Limits this image's L2 cache to its share of the chain's, `depth` images deep: at most
    /// [`L2_CACHE_BYTES`], at least [`MIN_CACHED_TABLES`] tables.
    pub fn share_cache(&mut self, depth: usize) {
        let share = (CHAIN_L2_CACHE_BYTES / depth.max(1) as u64).min(L2_CACHE_BYTES);
        let tables = (share / self.header.cluster_size()).max(MIN_CACHED_TABLES);
        self.cache_capacity = tables as usize;
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// What the image says about guest offset `guest`, and for how many bytes from there the
    /// answer holds (at least 1, at most to the end of the L2 table's reach): a run of
    /// clusters that are all unallocated, all zero, or data at consecutive host offsets. The
    /// run is not followed further than `want` bytes (the caller's interest) past `guest`.
    pub fn lookup(&self, guest: u64, want: u64) -> Result<(Mapping, u64)> {
        let cluster_size = self.header.cluster_size();
        let cluster = guest >> self.header.cluster_bits;
        let l2_entries = self.header.l2_entries();
        let l1_index = cluster / l2_entries;
        let l2_index = (cluster % l2_entries) as usize;
        let in_cluster = guest & (cluster_size - 1);
        let to_cluster_end = cluster_size - in_cluster;
        let Some(&l1_entry) = self.l1.get(l1_index as usize) else {
            return Ok((Mapping::Unallocated, to_cluster_end));
        };
        let l1_offset = self.header.l1_table_offset + l1_index * 8;
        if l1_entry & l2::L1_RESERVED != 0 {
            return Err(corrupt(
                &self.name,
                format!("reserved bits set in L1 entry {l1_index}"),
                l1_offset,
            ));
        }
        let table_offset = l1_entry & l2::OFFSET_MASK;
        if table_offset == 0 {
            let table_reach = l2_entries * cluster_size;
            return Ok((Mapping::Unallocated, table_reach - guest % table_reach));
        }
        let table = self.l2_table(table_offset, l1_offset)?;
        let per_entry = self.header.l2_entry_size() as usize / 8;
        let word = table[l2_index * per_entry];
        let bitmap = if per_entry == 2 {
            table[l2_index * 2 + 1]
        } else {
            0
        };
        let entry_offset = table_offset + (l2_index * per_entry * 8) as u64;
        let entry = self
            .format
            .decode(word, bitmap)
            .map_err(|e| corrupt(&self.name, e.to_string(), entry_offset))?;
        match entry {
            Entry::Whole(mapping) => {
                if let Mapping::Data { host } = mapping {
                    self.check_data_offset(host, entry_offset)?;
                }
                let most = want.saturating_sub(to_cluster_end).div_ceil(cluster_size) + 1;
                let clusters = self.same_run(&table, l2_index, per_entry, mapping, most);
                let mapping = match mapping {
                    Mapping::Data { host } => Mapping::Data {
                        host: host + in_cluster,
                    },
                    other => other,
                };
                Ok((mapping, to_cluster_end + (clusters - 1) * cluster_size))
            }
            Entry::Subclusters { host, .. } => {
                let sub_size = cluster_size / u64::from(l2::SUBCLUSTERS);
                let index = (in_cluster / sub_size) as u32;
                let mapping = entry.subcluster(index, sub_size);
                if let Some(h) = host {
                    if matches!(mapping, Mapping::Data { .. }) {
                        self.check_data_offset(h, entry_offset)?;
                    }
                }
                // Extend the run over following subclusters that map the same way.
                let mut end = index + 1;
                while end < l2::SUBCLUSTERS {
                    let next = entry.subcluster(end, sub_size);
                    let same = match (mapping, next) {
                        (Mapping::Data { host: a }, Mapping::Data { host: b }) => {
                            b == a + u64::from(end - index) * sub_size
                        }
                        (a, b) => a == b,
                    };
                    if !same {
                        break;
                    }
                    end += 1;
                }
                let run = u64::from(end) * sub_size - in_cluster;
                let mapping = match mapping {
                    Mapping::Data { host } => Mapping::Data {
                        host: host + in_cluster % sub_size,
                    },
                    other => other,
                };
                Ok((mapping, run))
            }
        }
    }

    /// How many entries from `index` on map the way `first` does: all unallocated, all zero,
    /// or data at consecutive host clusters. One lookup then answers for a whole run, so
    /// resolving a chain costs per run of like clusters, not per cluster and layer. The run
    /// stops before an entry that does not decode (its lookup reports the damage).
    fn same_run(
        &self,
        table: &[u64],
        index: usize,
        per_entry: usize,
        first: Mapping,
        most: u64,
    ) -> u64 {
        let cluster_size = self.header.cluster_size();
        let mut clusters = 1u64;
        while clusters < most {
            let at = (index + clusters as usize) * per_entry;
            let Some(&word) = table.get(at) else { break };
            let bitmap = if per_entry == 2 {
                table.get(at + 1).copied().unwrap_or(0)
            } else {
                0
            };
            let Ok(Entry::Whole(next)) = self.format.decode(word, bitmap) else {
                break;
            };
            let same = match (first, next) {
                (Mapping::Data { host: a }, Mapping::Data { host: b }) => {
                    b == a + clusters * cluster_size && self.check_data_offset(b, 0).is_ok()
                }
                (Mapping::Unallocated, Mapping::Unallocated) | (Mapping::Zero, Mapping::Zero) => {
                    true
                }
                _ => false,
            };
            if !same {
                break;
            }
            clusters += 1;
        }
        clusters
    }

    fn check_data_offset(&self, host: u64, entry_offset: u64) -> Result<()> {
        let (len, what) = match &self.data_file {
            Some((_, _, len)) => (*len, "external data file"),
            None => (self.file_len, "image file"),
        };
        if host >= len {
            return Err(corrupt(
                &self.name,
                format!("data cluster at {host:#x} lies past the end of the {what} ({len} bytes)"),
                entry_offset,
            ));
        }
        Ok(())
    }

    /// Hints the image's source to fetch the L2 tables that map guest bytes
    /// `offset..offset + len` and are not cached, so a walk that then looks them up in every
    /// layer of a chain does not wait for each layer's table in turn.
    pub fn prefetch_tables(&self, offset: u64, len: u64) {
        let cluster_size = self.header.cluster_size();
        let reach = self.header.l2_entries() * cluster_size;
        let (first, end) = (offset / reach, offset.saturating_add(len).div_ceil(reach));
        let mut tables: Vec<u64> = {
            let cache = self.lock_cache();
            self.l1
                .iter()
                .take(end as usize)
                .skip(first as usize)
                .map(|entry| entry & l2::OFFSET_MASK)
                // Only what `l2_table` would read: aligned, inside the file, not cached.
                .filter(|&table| {
                    table != 0
                        && table % cluster_size == 0
                        && table.saturating_add(cluster_size) <= self.file_len
                        && !cache.contains_key(&table)
                })
                .collect()
        };
        // Adjacent tables (strata's writer puts them side by side) are asked for as one range.
        tables.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        for table in tables {
            run = match run {
                Some((start, end)) if table == end => Some((start, end + cluster_size)),
                Some((start, end)) if table < end => Some((start, end)),
                other => {
                    if let Some((start, end)) = other {
                        self.file.prefetch(start, end - start);
                    }
                    Some((table, table.saturating_add(cluster_size)))
                }
            };
        }
        if let Some((start, end)) = run {
            self.file.prefetch(start, end - start);
        }
    }

    fn l2_table(&self, offset: u64, l1_offset: u64) -> Result<Arc<[u64]>> {
        if let Some(table) = self.lock_cache().get(&offset) {
            return Ok(Arc::clone(table));
        }
        let cluster_size = self.header.cluster_size();
        if offset % cluster_size != 0 {
            return Err(corrupt(
                &self.name,
                format!("L2 table offset {offset:#x} is not cluster-aligned"),
                l1_offset,
            ));
        }
        if offset.saturating_add(cluster_size) > self.file_len {
            return Err(corrupt(
                &self.name,
                format!("L2 table at {offset:#x} lies past the end of the file"),
                l1_offset,
            ));
        }
        let mut raw = vec![0u8; cluster_size as usize];
        self.file.read_exact_at(&mut raw, offset).map_err(|e| {
            io_err(
                &self.name,
                format!("reading the L2 table at {offset:#x}"),
                e,
            )
        })?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        let mut cache = self.lock_cache();
        if !cache.contains_key(&offset) {
            // Full, or the chain has no room: start over, giving this cache's bytes back, and
            // cache the table only if the chain then has room for it.
            if cache.len() >= self.cache_capacity || !self.take_cache_bytes(cluster_size) {
                let held = cache.len() as u64 * cluster_size;
                cache.clear();
                self.cache_free.fetch_add(held, Ordering::Relaxed);
                if !self.take_cache_bytes(cluster_size) {
                    return Ok(table);
                }
            }
            cache.insert(offset, Arc::clone(&table));
        }
        Ok(table)
    }

    /// Takes `bytes` from the chain's free L2 cache bytes, if it has them.
    fn take_cache_bytes(&self, bytes: u64) -> bool {
        self.cache_free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                free.checked_sub(bytes)
            })
            .is_ok()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<[u64]>>> {
        // A panic while holding the lock cannot leave the map inconsistent: take it anyway.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads guest data stored at `host`; bytes past the end of the file read as zeros
    /// (the cluster's start was checked to lie inside it).
    pub fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let (name, source, len) = match &self.data_file {
            Some((name, source, len)) => (name.as_str(), source, *len),
            None => (self.name.as_str(), &self.file, self.file_len),
        };
        let available = len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(available);
        source
            .read_exact_at(head, host)
            .map_err(|e| io_err(name, format!("reading data at {host:#x}"), e))?;
        tail.fill(0);
        Ok(())
    }

    /// Decompresses the compressed cluster at `host` into `out` (one cluster).
    pub fn read_compressed(&self, out: &mut [u8], host: u64, len: u64) -> Result<()> {
        if host >= self.file_len {
            return Err(corrupt(
                &self.name,
                format!("compressed cluster at {host:#x} lies past the end of the file"),
                host,
            ));
        }
        let len = len.min(self.file_len - host) as usize;
        let mut packed = vec![0u8; len];
        self.file.read_exact_at(&mut packed, host).map_err(|e| {
            io_err(
                &self.name,
                format!("reading compressed data at {host:#x}"),
                e,
            )
        })?;
        compressed::decompress(self.header.compression_type, &packed, out)
            .map_err(|what| corrupt(&self.name, format!("compressed cluster: {what}"), host))
    }

    /// The external data file's name, if any.
    pub fn data_file_name(&self) -> Option<&str> {
        self.data_file.as_ref().map(|(n, _, _)| n.as_str())
    }

    /// The image file's length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}
