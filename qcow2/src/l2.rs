//! L1 and L2 entries (qcow2.rst, "Cluster mapping" and "Extended L2 Entries").

/// Bits 9-55 of an L1 entry or standard cluster descriptor: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor: the cluster reads as zeros (version 3).
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry (1-8 and 56-62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Reserved bits of a standard L2 entry (1-8 and 56-61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What one L2 entry says about a guest cluster (or subcluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Data at this host offset (in the image, or in its external data file).
    Data {
        /// The host offset of the guest range's first byte.
        host: u64,
    },
    /// A compressed cluster.
    Compressed {
        /// Host offset of the compressed stream (not aligned).
        host: u64,
        /// Upper bound of the compressed stream's length.
        len: u64,
    },
    /// Reads as zeros; the backing file is not consulted.
    Zero,
    /// Not allocated here: the backing file (or zeros) shows through.
    Unallocated,
}

/// The decoded form of one L2 entry: either one mapping for the whole cluster, or one per
/// subcluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Every byte of the cluster maps the same way (a standard or compressed entry).
    Whole(Mapping),
    /// Extended L2 entry of a standard cluster: a host offset and the subcluster bitmaps.
    Subclusters {
        /// Host offset of the cluster (may be unset when no subcluster is allocated).
        host: Option<u64>,
        /// Allocation bits, one per subcluster.
        alloc: u32,
        /// Reads-as-zero bits, one per subcluster.
        zero: u32,
    },
}

impl Entry {
    /// The mapping of subcluster `index` (0..32) — or of any byte when the entry is whole.
    pub fn subcluster(self, index: u32, subcluster_size: u64) -> Mapping {
        match self {
            Entry::Whole(m) => m,
            Entry::Subclusters { host, alloc, zero } => {
                let bit = 1u32 << index;
                if alloc & bit != 0 {
                    // Decoding guarantees `host` is set when any allocation bit is.
                    match host {
                        Some(h) => Mapping::Data {
                            host: h + u64::from(index) * subcluster_size,
                        },
                        None => Mapping::Unallocated,
                    }
                } else if zero & bit != 0 {
                    Mapping::Zero
                } else {
                    Mapping::Unallocated
                }
            }
        }
    }
}

/// Why an L2 entry is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    /// Reserved bits set.
    Reserved(u64),
    /// A data cluster offset not aligned to the cluster size.
    Unaligned(u64),
    /// The zero flag in a version 2 image.
    ZeroInV2,
    /// Both the allocation and zero bit of a subcluster are set.
    AllocAndZero(u32),
    /// Allocated subclusters without a host offset.
    AllocWithoutOffset,
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile,
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reserved(bits) => write!(f, "reserved bits {bits:#x} set in L2 entry"),
            Self::Unaligned(host) => {
                write!(f, "L2 entry points to unaligned data cluster {host:#x}")
            }
            Self::ZeroInV2 => f.write_str("zero flag in an L2 entry of a version 2 image"),
            Self::AllocAndZero(bits) => write!(
                f,
                "subclusters {bits:#x} are marked both allocated and zero"
            ),
            Self::AllocWithoutOffset => {
                f.write_str("allocated subclusters without a host cluster offset")
            }
            Self::CompressedWithDataFile => {
                f.write_str("compressed cluster in an image with an external data file")
            }
        }
    }
}

/// Parameters that decide how entries decode.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Version 3 (has the zero flag).
    pub v3: bool,
    /// Extended L2 entries.
    pub extended: bool,
    /// An external data file is used (host offset 0 is valid with the copied bit).
    pub data_file: bool,
}

impl Format {
    /// Decodes an L2 entry (`bitmap` is the second word of an extended entry, 0 otherwise).
    pub fn decode(self, word: u64, bitmap: u64) -> Result<Entry, EntryError> {
        let cluster_size = 1u64 << self.cluster_bits;
        if word & COMPRESSED != 0 {
            if self.data_file {
                return Err(EntryError::CompressedWithDataFile);
            }
            // Compressed cluster descriptor, x = 62 - (cluster_bits - 8).
            let x = 62 - (self.cluster_bits - 8);
            let host = word & ((1u64 << x) - 1);
            let sectors = (word & !COPIED & !COMPRESSED) >> x;
            let len = (sectors + 1) * 512 - (host & 511);
            return Ok(Entry::Whole(Mapping::Compressed { host, len }));
        }
        let reserved = word & L2_RESERVED;
        if reserved != 0 {
            return Err(EntryError::Reserved(reserved));
        }
        let offset = word & OFFSET_MASK;
        let has_host = offset != 0 || (self.data_file && word & COPIED != 0);
        if has_host && offset % cluster_size != 0 {
            return Err(EntryError::Unaligned(offset));
        }
        let host = has_host.then_some(offset);
        if self.extended {
            if word & ZERO != 0 {
                return Err(EntryError::Reserved(ZERO));
            }
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(EntryError::AllocAndZero(alloc & zero));
            }
            if alloc != 0 && host.is_none() {
                return Err(EntryError::AllocWithoutOffset);
            }
            return Ok(Entry::Subclusters { host, alloc, zero });
        }
        if word & ZERO != 0 {
            if !self.v3 {
                return Err(EntryError::ZeroInV2);
            }
            return Ok(Entry::Whole(Mapping::Zero));
        }
        Ok(Entry::Whole(match host {
            Some(host) => Mapping::Data { host },
            None => Mapping::Unallocated,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: Format = Format {
        cluster_bits: 16,
        v3: true,
        extended: false,
        data_file: false,
    };

    #[test]
    fn standard_entries_decode() {
        assert_eq!(V3.decode(0, 0), Ok(Entry::Whole(Mapping::Unallocated)));
        assert_eq!(
            V3.decode(COPIED | 0x5_0000, 0),
            Ok(Entry::Whole(Mapping::Data { host: 0x5_0000 }))
        );
        assert_eq!(V3.decode(ZERO, 0), Ok(Entry::Whole(Mapping::Zero)));
        assert_eq!(
            V3.decode(0x5_0000 | ZERO, 0),
            Ok(Entry::Whole(Mapping::Zero))
        );
        assert_eq!(V3.decode(0x5_0200, 0), Err(EntryError::Unaligned(0x5_0200)));
        assert_eq!(V3.decode(1 << 57, 0), Err(EntryError::Reserved(1 << 57)));
        let v2 = Format { v3: false, ..V3 };
        assert_eq!(v2.decode(ZERO, 0), Err(EntryError::ZeroInV2));
    }

    #[test]
    fn compressed_descriptor_splits_offset_and_sectors() {
        // 64 KiB clusters: x = 54; offset 0x12345, two additional sectors.
        let word = COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            V3.decode(word, 0),
            Ok(Entry::Whole(Mapping::Compressed {
                host: 0x12345,
                len: 3 * 512 - 0x145,
            }))
        );
    }

    #[test]
    fn extended_entries_map_each_subcluster() {
        let ext = Format {
            extended: true,
            ..V3
        };
        let entry = ext
            .decode(0x10_0000, 0b10 << 32 | 0b01)
            .expect("valid entry");
        let sub = 2048;
        assert_eq!(entry.subcluster(0, sub), Mapping::Data { host: 0x10_0000 });
        assert_eq!(entry.subcluster(1, sub), Mapping::Zero);
        assert_eq!(entry.subcluster(2, sub), Mapping::Unallocated);
        assert_eq!(
            ext.decode(0x10_0000, 1 << 32 | 1),
            Err(EntryError::AllocAndZero(1))
        );
        assert_eq!(ext.decode(0, 1), Err(EntryError::AllocWithoutOffset));
    }
}
