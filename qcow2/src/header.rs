//! The image header and its extensions (qcow2.rst, "Header", "Additional fields",
//! "Header extensions", "Feature name table").
//!
//! Every field is checked here, once, before anything else in the image is trusted.

use crate::error::{Error, Result, corrupt};

/// The QCOW magic, "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Smallest and largest cluster_bits accepted (512 B to 2 MiB, QEMU's limit).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits accepted.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's cap on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table: 8 MiB.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU's cap on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits (qcow2.rst, `incompatible_features`).
pub mod incompat {
    /// Refcounts may be inconsistent.
    pub const DIRTY: u64 = 1 << 0;
    /// Any structure may be corrupt; the image must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not deflate.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// All bits this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are compressed (qcow2.rst, `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), without a zlib header; QEMU calls it "zlib".
    #[default]
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// A feature name table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// The bit number.
    pub bit: u8,
    /// The name.
    pub name: String,
}

/// A parsed and validated header with its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// The backing file name as stored.
    pub backing_file: Option<String>,
    /// The backing format from its extension.
    pub backing_format: Option<String>,
    /// The external data file name from its extension.
    pub data_file: Option<String>,
    /// The feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps: bool,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128 bits with subcluster bitmaps).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// The L1 entries needed to map `size` bytes.
    pub fn required_l1_entries(&self) -> u64 {
        let bytes_per_l2 = self.cluster_size() * self.l2_entries();
        self.size.div_ceil(bytes_per_l2)
    }

    /// Parses the first cluster of an image (or as much of it as the file holds).
    ///
    /// `first` must hold at least the first cluster (`min(file_len, cluster size)` bytes, as
    /// its `cluster_bits` give); `file_len` is the image's length, against which table
    /// offsets are checked.
    pub fn parse(image: &str, first: &[u8], file_len: u64) -> Result<Self> {
        let fixed = Fields {
            image,
            bytes: first,
        };
        if first.len() < 4 || first[..4] != MAGIC {
            return Err(Error::NotQcow2 {
                image: image.to_owned(),
            });
        }
        let version = fixed.u32(4)?;
        if version != 2 && version != 3 {
            return Err(Error::Unsupported {
                image: image.to_owned(),
                feature: format!("QCOW2 version {version} (only 2 and 3 exist)"),
            });
        }
        let backing_file_offset = fixed.u64(8)?;
        let backing_file_size = fixed.u32(16)?;
        let cluster_bits = fixed.u32(20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(
                image,
                format!("cluster_bits {cluster_bits} outside 9..=21 (512 B to 2 MiB)"),
                20,
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        // The disk is whole 512-byte sectors: QEMU keeps `size / 512` of them and reads an
        // image whose `size` is not a multiple of 512 as that many (qemu-img info, convert
        // and compare all see the shorter disk), so the same bytes are read here.
        let size = fixed.u64(24)? & !511;
        let crypt_method = fixed.u32(32)?;
        match crypt_method {
            0 => {}
            1 => {
                return Err(Error::Encrypted {
                    image: image.to_owned(),
                    method: "AES",
                });
            }
            2 => {
                return Err(Error::Encrypted {
                    image: image.to_owned(),
                    method: "LUKS",
                });
            }
            other => {
                return Err(corrupt(image, format!("unknown crypt_method {other}"), 32));
            }
        }
        let mut header = Header {
            version,
            cluster_bits,
            size,
            l1_size: fixed.u32(36)?,
            l1_table_offset: fixed.u64(40)?,
            refcount_table_offset: fixed.u64(48)?,
            refcount_table_clusters: fixed.u32(56)?,
            nb_snapshots: fixed.u32(60)?,
            snapshots_offset: fixed.u64(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
        };
        if version == 3 {
            header.incompatible_features = fixed.u64(72)?;
            header.compatible_features = fixed.u64(80)?;
            header.autoclear_features = fixed.u64(88)?;
            header.refcount_order = fixed.u32(96)?;
            header.header_length = fixed.u32(100)?;
            let len = u64::from(header.header_length);
            if len < u64::from(V3_MIN_HEADER_LEN) || len % 8 != 0 || len > cluster_size {
                return Err(corrupt(
                    image,
                    format!(
                        "header_length {len} must be a multiple of 8 between 104 and the cluster size"
                    ),
                    100,
                ));
            }
            if header.refcount_order > 6 {
                return Err(corrupt(
                    image,
                    format!("refcount_order {} exceeds 6", header.refcount_order),
                    96,
                ));
            }
            if len > 104 {
                header.compression_type = match fixed.u8(104)? {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(Error::Unsupported {
                            image: image.to_owned(),
                            feature: format!("compression type {other}"),
                        });
                    }
                };
            }
        }
        if first.len() < header.header_length as usize {
            return Err(corrupt(image, "header truncated", 0));
        }
        header.parse_extensions(image, first, cluster_size)?;
        header.check_features(image)?;
        header.parse_backing_name(image, first, backing_file_offset, backing_file_size)?;
        header.check_tables(image, file_len)?;
        Ok(header)
    }

    fn check_features(&self, image: &str) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| {
                    self.feature_names
                        .iter()
                        .find(|f| f.kind == 0 && u32::from(f.bit) == bit)
                        .map_or_else(|| format!("bit {bit}"), |f| format!("'{}'", f.name))
                })
                .collect();
            return Err(Error::UnknownIncompatibleFeatures {
                image: image.to_owned(),
                bits: unknown,
                names: names.join(", "),
            });
        }
        let typed = self.incompatible_features & incompat::COMPRESSION_TYPE != 0;
        if typed != (self.compression_type != CompressionType::Deflate) {
            return Err(corrupt(
                image,
                "compression type bit and compression_type field disagree",
                72,
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(corrupt(
                image,
                "extended L2 entries need clusters of at least 16 KiB",
                20,
            ));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, image: &str, first: &[u8], cluster_size: u64) -> Result<()> {
        let end = first.len().min(cluster_size as usize);
        let mut pos = self.header_length as usize;
        let fields = Fields {
            image,
            bytes: first,
        };
        while pos + 8 <= end {
            let kind = fields.u32(pos)?;
            let len = fields.u32(pos + 4)? as usize;
            if kind == ext::END {
                return Ok(());
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| {
                    corrupt(
                        image,
                        format!(
                            "header extension {kind:#x} of {len} bytes runs past the first cluster"
                        ),
                        pos as u64,
                    )
                })?;
            let data = &first[data_start..data_end];
            match kind {
                ext::BACKING_FORMAT => self.backing_format = Some(ext_string(image, data, pos)?),
                ext::DATA_FILE => self.data_file = Some(ext_string(image, data, pos)?),
                ext::FEATURE_NAMES => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|entry| FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&entry[2..])
                                .trim_end_matches('\0')
                                .to_owned(),
                        })
                        .collect();
                }
                ext::BITMAPS => {
                    if len < 24 {
                        return Err(corrupt(image, "bitmaps extension too short", pos as u64));
                    }
                    self.has_bitmaps = true;
                }
                _ => {}
            }
            pos = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn parse_backing_name(
        &mut self,
        image: &str,
        first: &[u8],
        offset: u64,
        size: u32,
    ) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        if size > MAX_BACKING_NAME {
            return Err(corrupt(
                image,
                format!("backing file name of {size} bytes is longer than 1023"),
                16,
            ));
        }
        // An offset near 2^64 must not wrap around to a small end.
        let end = offset.saturating_add(u64::from(size));
        if end > self.cluster_size() || end > first.len() as u64 {
            return Err(corrupt(
                image,
                "backing file name lies outside the first cluster",
                8,
            ));
        }
        let bytes = &first[offset as usize..end as usize];
        let name = std::str::from_utf8(bytes)
            .map_err(|_| corrupt(image, "backing file name is not UTF-8", offset))?;
        if !name.is_empty() {
            self.backing_file = Some(name.to_owned());
        }
        Ok(())
    }

    fn check_tables(&self, image: &str, file_len: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(
                image,
                format!(
                    "L1 table of {} entries exceeds the 32 MiB cap",
                    self.l1_size
                ),
                36,
            ));
        }
        let required = self.required_l1_entries();
        if required > u64::from(self.l1_size) {
            return Err(corrupt(
                image,
                format!(
                    "L1 table of {} entries is too small for the virtual size {} (needs {required})",
                    self.l1_size, self.size
                ),
                36,
            ));
        }
        if self.l1_size > 0 {
            check_table(
                image,
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
                40,
            )?;
        }
        let refcount_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if refcount_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(
                image,
                format!(
                    "refcount table of {} clusters exceeds the 8 MiB cap",
                    self.refcount_table_clusters
                ),
                56,
            ));
        }
        if self.refcount_table_offset % cluster_size != 0 {
            return Err(corrupt(
                image,
                "refcount table offset is not cluster-aligned",
                48,
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(
                image,
                format!("{} snapshots exceed the cap of 65536", self.nb_snapshots),
                60,
            ));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset % cluster_size != 0 {
            return Err(corrupt(
                image,
                "snapshot table offset is not cluster-aligned",
                64,
            ));
        }
        Ok(())
    }
}

/// Checks that a table is cluster-aligned and lies inside the file.
fn check_table(
    image: &str,
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
    field: u64,
) -> Result<()> {
    if offset == 0 || offset % cluster_size != 0 {
        return Err(corrupt(
            image,
            format!("{what} offset {offset:#x} is not cluster-aligned"),
            field,
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(corrupt(
            image,
            format!(
                "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
            ),
            field,
        )),
    }
}

fn ext_string(image: &str, data: &[u8], pos: usize) -> Result<String> {
    std::str::from_utf8(data)
        .map(|s| s.trim_end_matches('\0').to_owned())
        .map_err(|_| corrupt(image, "header extension string is not UTF-8", pos as u64))
}

/// Big-endian field access with bounds checks.
struct Fields<'a> {
    image: &'a str,
    bytes: &'a [u8],
}

impl Fields<'_> {
    fn get<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        self.bytes
            .get(at..at + N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| corrupt(self.image, "header truncated", at as u64))
    }

    fn u8(&self, at: usize) -> Result<u8> {
        Ok(self.get::<1>(at)?[0])
    }

    fn u32(&self, at: usize) -> Result<u32> {
        Ok(u32::from_be_bytes(self.get(at)?))
    }

    fn u64(&self, at: usize) -> Result<u64> {
        Ok(u64::from_be_bytes(self.get(at)?))
    }
}
