//! The one-pass QCOW2 writer.
//!
//! Guest clusters arrive in ascending order and are appended to the sink as they come; compressed
//! clusters are packed byte-adjacent in segments of their own (see `packing`), so raw clusters
//! between them cost no padding. Nothing is stored for clusters that read as
//! zeros, except zero-flagged L2 entries where an overlay must hide its backing file. At the end
//! the L2 tables, the L1 table, the refcount blocks and the refcount table are appended, and the
//! header area goes to the sink last, through [`ImageSink::finish`]. The mapping of
//! written clusters is kept as runs, of which only the newest few thousand stay in memory (the
//! rest wait in a temporary file until `finish` reads them back), so memory is fixed whatever
//! the virtual size or the number of clusters written.

mod allocation;
mod compress;
mod header;
mod layout;
pub(crate) mod options;
mod packing;
mod spill;

use crate::error::Error;
use allocation::{COMPRESSED, DataRefcounts, GuestCluster, GuestMap, HostCluster};
pub use compress::ClusterCompressor;
use header::HeaderFields;
use layout::Layout;
use options::{Compat, WriterOptions};
use packing::CompressedTail;

use std::sync::Arc;

use crate::ImageSink;

/// What a finished image holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteSummary {
    /// Length of the image file in bytes.
    pub file_size: u64,
    /// Guest clusters stored uncompressed.
    pub data_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters marked as reading zeros (version 3 overlays).
    pub zero_clusters: u64,
    /// Host clusters of metadata (header area excluded).
    pub metadata_clusters: u64,
}

/// Writes one QCOW2 image into an [`ImageSink`] in a single pass.
///
/// ```
/// use strata_qcow2::{MemorySink, Writer, WriterOptions};
///
/// let options = WriterOptions::default();
/// let mut writer = Writer::new(MemorySink::new(), &options, 1 << 20)?;
/// writer.write_data(0, &[0xaa; 65536])?;
/// writer.write_data(65536, &[0; 65536])?; // all zeros: nothing stored
/// let (sink, summary) = writer.finish()?;
/// assert_eq!(summary.data_clusters, 1);
/// assert_eq!(&sink.image().unwrap()[..4], b"QFI\xfb");
/// # Ok::<(), strata_qcow2::Error>(())
/// ```
pub struct Writer<S: ImageSink> {
    sink: S,
    options: WriterOptions,
    cluster_bits: u32,
    virtual_size: u64,
    header_clusters: u64,
    /// Host byte offset of the next appended byte.
    host_end: u64,
    /// Lowest guest cluster still allowed.
    next_guest: u64,
    map: GuestMap,
    refcounts: DataRefcounts,
    compressor: Option<ClusterCompressor>,
    /// Compressed clusters not yet appended.
    tail: CompressedTail,
    /// One cluster of zeros, for padding and for zero clusters of version 2.
    zeros: Arc<[u8]>,
    summary: WriteSummary,
    poisoned: bool,
}

impl<S: ImageSink> Writer<S> {
    /// Starts an image of `virtual_size` bytes, rounded up to a multiple of 512 (QEMU counts
    /// the size in 512-byte sectors and would cut a partial one off); checks the options and
    /// reserves the header area.
    pub fn new(mut sink: S, options: &WriterOptions, virtual_size: u64) -> Result<Self, Error> {
        options.validate()?;
        let virtual_size =
            virtual_size
                .checked_next_multiple_of(SECTOR)
                .ok_or(Error::CannotWrite {
                    feature: "a virtual size this large",
                })?;
        let cluster_bits = options.cluster_bits();
        let cluster_size = options.cluster_size;
        layout::l1_size(virtual_size, cluster_bits)?;
        header::encode(
            options,
            &HeaderFields {
                virtual_size,
                l1_size: 0,
                l1_table_offset: 0,
                refcount_table_offset: 0,
                refcount_table_clusters: 0,
            },
        )?;
        let header_clusters = sink.min_header_len().div_ceil(cluster_size).max(1);
        let header_len = header_clusters * cluster_size;
        sink.begin(header_len)
            .map_err(Error::write_io("starting the sink", 0))?;
        let compressor = options
            .compression
            .map(|method| ClusterCompressor::new(method, options.compression_level, cluster_size))
            .transpose()?;
        Ok(Self {
            sink,
            options: options.clone(),
            cluster_bits,
            virtual_size,
            header_clusters,
            host_end: header_len,
            next_guest: 0,
            map: GuestMap::new(cluster_bits),
            refcounts: DataRefcounts::default(),
            compressor,
            tail: CompressedTail::new(cluster_bits),
            zeros: vec![0; cluster_size as usize].into(),
            summary: WriteSummary::default(),
            poisoned: false,
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Writes guest data at `offset`, a cluster boundary past everything written so far.
    /// `data` covers whole clusters, except that it may end anywhere inside the last cluster. Clusters that
    /// are all zeros are not stored and read as zeros (or as the backing file: see
    /// [`Self::write_data_over_backing`]).
    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.write(offset, data, false)
    }

    /// Like [`Self::write_data`] for clusters where the backing chain has data: all-zero
    /// clusters become zero clusters (version 3) or stored zeros (version 2), so the backing
    /// data does not show through.
    pub fn write_data_over_backing(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.write(offset, data, true)
    }

    /// Marks `len` bytes from `offset` as reading zeros whatever the backing chain holds: zero
    /// clusters in version 3, stored zeros in version 2. Same alignment rules as
    /// [`Self::write_data`].
    pub fn write_zeros(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let (first, count) = self.claim(offset, len)?;
        for guest in first..first + count {
            self.zero_cluster(GuestCluster(guest))?;
        }
        Ok(())
    }

    /// Stores the cluster at `offset` (a cluster boundary past everything written so far) as
    /// `packed`, its compressed form made by a [`ClusterCompressor`] with the image's
    /// compression type (the header's: [`WriterOptions::compression`], else
    /// [`WriterOptions::compression_type`]), so callers can compress on their own threads.
    /// `packed` must be shorter than a cluster; the writer does not decompress it to check.
    pub fn write_compressed(&mut self, offset: u64, packed: &[u8]) -> Result<(), Error> {
        let cluster = self.cluster_size();
        if packed.is_empty() || packed.len() as u64 >= cluster {
            return Err(Error::CannotWrite {
                feature: "a compressed cluster that is empty or not smaller than a cluster",
            });
        }
        let len = self.virtual_size.saturating_sub(offset).clamp(1, cluster);
        let (first, _) = self.claim(offset, len)?;
        self.store_compressed(GuestCluster(first), packed)?;
        self.flush_due()
    }

    /// Writes a run of clusters from `offset` whose compressed forms were made on other
    /// threads: cluster `i` of `data` is stored as `packed[compressed[i]]` where that is
    /// `Some`, the others as [`Self::write_data`] (or, `over_backing`,
    /// [`Self::write_data_over_backing`]) stores them, in runs. An empty `compressed` stores
    /// everything uncompressed.
    pub fn write_clusters(
        &mut self,
        offset: u64,
        data: &[u8],
        packed: &[u8],
        compressed: &[Option<std::ops::Range<usize>>],
        over_backing: bool,
    ) -> Result<(), Error> {
        let cluster = self.cluster_size() as usize;
        let mut raw_from = 0;
        for (i, range) in compressed.iter().enumerate() {
            let Some(packed) = range.clone().and_then(|range| packed.get(range)) else {
                continue;
            };
            if let Some(raw) = data
                .get(raw_from * cluster..i * cluster)
                .filter(|r| !r.is_empty())
            {
                self.write(offset + (raw_from * cluster) as u64, raw, over_backing)?;
            }
            self.write_compressed(offset + (i * cluster) as u64, packed)?;
            raw_from = i + 1;
        }
        match data.get(raw_from * cluster..) {
            Some(raw) if !raw.is_empty() => {
                self.write(offset + (raw_from * cluster) as u64, raw, over_backing)
            }
            _ => Ok(()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], over_backing: bool) -> Result<(), Error> {
        let (first, _) = self.claim(offset, data.len() as u64)?;
        let cluster = self.cluster_size() as usize;
        // Consecutive non-zero clusters go to the sink in one append when uncompressed.
        let mut run_start: Option<usize> = None;
        for (i, chunk) in data.chunks(cluster).enumerate() {
            let zero = is_zero(chunk);
            if zero || self.compressor.is_some() {
                if let Some(start) = run_start.take() {
                    self.store_run(first + start as u64, &data[start * cluster..i * cluster])?;
                }
            }
            let guest = GuestCluster(first + i as u64);
            if zero {
                if over_backing {
                    self.zero_cluster(guest)?;
                }
            } else if self.compressor.is_some() {
                self.store_compressible(guest, chunk)?;
            } else if run_start.is_none() {
                run_start = Some(i);
            }
        }
        if let Some(start) = run_start {
            self.store_run(first + start as u64, &data[start * cluster..])?;
        }
        self.flush_due()
    }

    /// Checks that `offset..offset + len` may be written next and claims it; returns its first
    /// guest cluster and cluster count.
    fn claim(&mut self, offset: u64, len: u64) -> Result<(u64, u64), Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let cluster = self.cluster_size();
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.virtual_size);
        // Only the image's last cluster may be given short.
        let last_cluster = self.virtual_size.div_ceil(cluster);
        let aligned = offset % cluster == 0
            && (len % cluster == 0 || end.is_some_and(|end| end.div_ceil(cluster) == last_cluster));
        let Some(end) = end.filter(|_| aligned) else {
            return Err(Error::BadRange {
                offset,
                len,
                virtual_size: self.virtual_size,
            });
        };
        if offset < self.next_guest << self.cluster_bits {
            return Err(Error::OutOfOrder {
                offset,
                next: self.next_guest << self.cluster_bits,
            });
        }
        let first = offset >> self.cluster_bits;
        let count = end.div_ceil(cluster) - first;
        self.next_guest = first + count;
        Ok((first, count))
    }

    fn zero_cluster(&mut self, guest: GuestCluster) -> Result<(), Error> {
        match self.options.compat {
            Compat::V3 => {
                self.map.push_zero(guest).map_err(spilling)?;
                self.summary.zero_clusters += 1;
                Ok(())
            }
            Compat::V2 => {
                let zeros = Arc::clone(&self.zeros);
                if self.compressor.is_some() {
                    self.store_compressible(guest, &zeros)
                } else {
                    self.store_run(guest.0, &zeros)
                }
            }
        }
    }

    /// Stores consecutive guest clusters from `first` uncompressed, cluster-aligned (the end
    /// of the file always is: compressed data goes to the tail).
    fn store_run(&mut self, first: u64, bytes: &[u8]) -> Result<(), Error> {
        let cluster = self.cluster_size();
        let host = HostCluster(self.host_end >> self.cluster_bits);
        self.append(bytes)?;
        let tail = (bytes.len() as u64) % cluster;
        if tail != 0 {
            self.append_zeros(cluster - tail)?;
        }
        let count = (bytes.len() as u64).div_ceil(cluster);
        for i in 0..count {
            self.map
                .push_data(GuestCluster(first + i), HostCluster(host.0 + i))
                .map_err(spilling)?;
        }
        self.refcounts.add_new(host, count).map_err(spilling)?;
        self.summary.data_clusters += count;
        Ok(())
    }

    /// Stores one cluster compressed when that saves space, else uncompressed.
    fn store_compressible(&mut self, guest: GuestCluster, chunk: &[u8]) -> Result<(), Error> {
        let Some(mut compressor) = self.compressor.take() else {
            return self.store_run(guest.0, chunk);
        };
        let result = match compressor.compress(chunk) {
            Some(packed) => self.store_compressed(guest, packed),
            None => self.store_run(guest.0, chunk),
        };
        self.compressor = Some(compressor);
        result
    }

    /// Maps `guest` to compressed bytes in the tail; the L2 entry is known once the tail's
    /// segment holding them is placed ([`Self::flush_compressed`]).
    fn store_compressed(&mut self, guest: GuestCluster, packed: &[u8]) -> Result<(), Error> {
        let slot = self.map.push_compressed(guest).map_err(spilling)?;
        self.tail.push(slot, packed);
        self.summary.compressed_clusters += 1;
        Ok(())
    }

    fn flush_due(&mut self) -> Result<(), Error> {
        if self.tail.is_due() {
            self.flush_compressed(false)?;
        }
        Ok(())
    }

    /// Appends a segment of the compressed tail (all of it when `all`) at the end of the
    /// file, a cluster boundary, and fills in the L2 entries of its clusters: byte offset and
    /// count of additional 512-byte sectors (qcow2.rst, "Compressed Clusters Descriptor",
    /// `x = 62 - (cluster_bits - 8)`).
    fn flush_compressed(&mut self, all: bool) -> Result<(), Error> {
        let cluster = self.cluster_size();
        let offset_bits = 62 - (self.cluster_bits - 8);
        while !self.tail.is_empty() {
            let (placed, len) = self.tail.plan(all);
            let base = self.host_end;
            debug_assert_eq!(base % cluster, 0);
            for p in &placed {
                let offset = base + p.start;
                if offset + p.len > 1 << offset_bits.min(56) {
                    return Err(Error::CannotWrite {
                        feature: "compressed clusters this far into the image file",
                    });
                }
                let last_byte = offset + p.len - 1;
                let extra_sectors = (last_byte >> 9) - (offset >> 9);
                self.map
                    .set_compressed(p.slot, COMPRESSED | (extra_sectors << offset_bits) | offset);
                for host in (offset >> self.cluster_bits)..=(last_byte >> self.cluster_bits) {
                    self.refcounts
                        .add_reference(HostCluster(host))
                        .map_err(spilling)?;
                }
            }
            let tail = std::mem::replace(&mut self.tail, CompressedTail::new(self.cluster_bits));
            let appended = self.append(tail.segment(len));
            self.tail = tail;
            appended?;
            self.tail.take(placed.len(), len);
            let partial = (len as u64) % cluster;
            if partial != 0 {
                self.append_zeros(cluster - partial)?;
            }
            if !all {
                break;
            }
        }
        Ok(())
    }

    fn append_zeros(&mut self, len: u64) -> Result<(), Error> {
        let zeros = Arc::clone(&self.zeros);
        self.append(&zeros[..len as usize])
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if let Err(source) = self.sink.append(bytes) {
            self.poisoned = true;
            return Err(Error::WriteIo {
                operation: "appending to the image sink",
                offset: self.host_end,
                source,
            });
        }
        self.host_end += bytes.len() as u64;
        Ok(())
    }

    /// Appends the metadata, hands the header area to the sink and returns the sink.
    pub fn finish(mut self) -> Result<(S, WriteSummary), Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        self.flush_compressed(true)?;
        let l1_size = layout::l1_size(self.virtual_size, self.cluster_bits)?;
        let layout = Layout::plan(
            self.cluster_bits,
            self.header_clusters,
            self.host_end >> self.cluster_bits,
            self.map.l2_count() as u64,
            l1_size,
        )?;
        let mut host_end = self.host_end;
        let sink = &mut self.sink;
        layout.encode(&self.map, &self.refcounts, |cluster| {
            sink.append(cluster).map_err(Error::write_io(
                "appending metadata to the image sink",
                host_end,
            ))?;
            host_end += cluster.len() as u64;
            Ok(())
        })?;
        let fields = HeaderFields {
            virtual_size: self.virtual_size,
            l1_size: l1_size as u32,
            l1_table_offset: layout.l1_offset(),
            refcount_table_offset: layout.refcount_table_offset(),
            refcount_table_clusters: layout.refcount_table_clusters() as u32,
        };
        let mut area = header::encode(&self.options, &fields)?;
        area.resize((self.header_clusters << self.cluster_bits) as usize, 0);
        self.sink
            .finish(&area)
            .map_err(Error::write_io("finishing the image sink", 0))?;
        self.summary.file_size = layout.end() << self.cluster_bits;
        self.summary.metadata_clusters = layout.metadata_clusters();
        Ok((self.sink, self.summary))
    }
}

/// A failure to spill the writer's runs to their temporary file.
fn spilling(source: std::io::Error) -> Error {
    Error::WriteIo {
        operation: "spilling the writer's tables to a temporary file",
        offset: 0,
        source,
    }
}

/// QEMU's unit of virtual size.
const SECTOR: u64 = 512;

/// Whether every byte is zero; checks 4 KiB at a time so the compiler can vectorise the OR.
/// Whether `bytes` are all zeros (checked 4 KiB at a time, which vectorizes well).
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
