//! What kind of image the writer produces: version, cluster size, compression, backing file.

use crate::CompressionType;
use crate::error::Error;

/// Smallest cluster size, 512 bytes (qcow2.rst, "Header", `cluster_bits` must be at least 9).
pub const MIN_CLUSTER_SIZE: u64 = 1 << 9;
/// Largest cluster size, 2 MiB (QEMU's implementation limit noted under `cluster_bits`).
pub const MAX_CLUSTER_SIZE: u64 = 1 << 21;
/// Cluster size used unless the caller picks another, 64 KiB (QEMU's default too).
pub const DEFAULT_CLUSTER_SIZE: u64 = 1 << 16;

/// The on-disk format version, spelled as QEMU's `compat` option spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`compat=0.10`): no zero flag, so zero clusters over a backing file are stored
    /// as data; no compression type field, so only deflate.
    V2,
    /// Version 3 (`compat=1.1`), the default.
    #[default]
    V3,
}

impl Compat {
    /// The header's `version` field.
    pub fn version(self) -> u32 {
        match self {
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }
}

/// Everything about the image being written, except its content and virtual size.
///
/// Parse QEMU's `-o` syntax with [`WriterOptions::parse_qemu_options`]:
///
/// ```
/// use strata_qcow2::{Compat, WriterOptions};
///
/// let mut options = WriterOptions::default();
/// options.parse_qemu_options("cluster_size=1M,compat=0.10")?;
/// assert_eq!(options.cluster_size, 1 << 20);
/// assert_eq!(options.compat, Compat::V2);
/// assert_eq!(options.compression, None);
/// # Ok::<(), strata_qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterOptions {
    /// Format version.
    pub compat: Compat,
    /// Cluster size in bytes: a power of two from [`MIN_CLUSTER_SIZE`] to [`MAX_CLUSTER_SIZE`].
    pub cluster_size: u64,
    /// Compress data clusters with this method (`-c`); `None` stores them as they are.
    pub compression: Option<CompressionType>,
    /// Compression level for [`Self::compression`] (`None`: the level QEMU uses); see
    /// [`ClusterCompressor::new`](crate::ClusterCompressor::new).
    pub compression_level: Option<i32>,
    /// Compression method named by `-o compression_type=`; it takes effect only with `-c`
    /// (as in `qemu-img`), but a zstd choice still marks the header.
    pub compression_type: CompressionType,
    /// Backing file name stored in the header exactly as given (usually relative to the
    /// image's folder); `None` for a standalone image.
    pub backing_file: Option<String>,
    /// Format name of the backing file, stored in the backing-format header extension.
    pub backing_format: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            compat: Compat::V3,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            compression: None,
            compression_level: None,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: "qcow2".to_owned(),
        }
    }
}

impl WriterOptions {
    /// For compressing on reader threads: these options with the writer's own compression
    /// off (the header still names the method), and the method and level the readers use.
    pub fn compress_on_readers(&self) -> (WriterOptions, Option<(CompressionType, Option<i32>)>) {
        let mut writer_options = self.clone();
        let compression = self.compression.map(|method| {
            writer_options.compression = None;
            writer_options.compression_type = method;
            (method, self.compression_level)
        });
        (writer_options, compression)
    }

    /// Applies a comma-separated `key=value` list as `qemu-img create/convert -o` takes it:
    /// `cluster_size` (bytes, or with a `k`/`K`, `M` suffix), `compat` (`0.10`, `v2`, `1.1`,
    /// `v3`), `compression_type` (`zlib`, `zstd`), `backing_file`, `backing_fmt`.
    pub fn parse_qemu_options(&mut self, list: &str) -> Result<(), Error> {
        for item in list.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| invalid(item, "expected key=value"))?;
            match key {
                "cluster_size" => {
                    self.cluster_size =
                        parse_size(value).ok_or_else(|| invalid(item, "not a size"))?
                }
                "compat" => {
                    self.compat = match value {
                        "0.10" | "v2" => Compat::V2,
                        "1.1" | "v3" => Compat::V3,
                        _ => return Err(invalid(item, "expected 0.10 or 1.1")),
                    }
                }
                "compression_type" => {
                    self.compression_type = match value {
                        "zlib" | "deflate" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(invalid(item, "expected zlib or zstd")),
                    }
                }
                "backing_file" => self.backing_file = Some(value.to_owned()),
                "backing_fmt" => self.backing_format = value.to_owned(),
                _ => return Err(invalid(item, "unknown option")),
            }
        }
        if let Some(method) = &mut self.compression {
            *method = self.compression_type;
        }
        Ok(())
    }

    /// Turns compression of data clusters on (`-c`), with [`Self::compression_type`].
    pub fn compress(&mut self) {
        self.compression = Some(self.compression_type);
    }

    /// Checks the combination before any byte is written.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&self.cluster_size)
        {
            return Err(Error::InvalidOption {
                option: format!("cluster_size={}", self.cluster_size),
                reason: "must be a power of two from 512 to 2097152",
            });
        }
        let zstd = self.compression == Some(CompressionType::Zstd)
            || self.compression_type == CompressionType::Zstd;
        if zstd && self.compat == Compat::V2 {
            return Err(Error::CannotWrite {
                feature: "zstd compression in a version 2 (compat=0.10) image",
            });
        }
        if self.backing_format.is_empty() && self.backing_file.is_some() {
            return Err(Error::InvalidOption {
                option: "backing_fmt=".to_owned(),
                reason: "the backing format must not be empty",
            });
        }
        Ok(())
    }

    /// `log2(cluster_size)`; only meaningful after [`Self::validate`].
    pub(crate) fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }

    /// The method written into the header: zstd marks it even when no cluster is compressed.
    pub(crate) fn header_compression(&self) -> CompressionType {
        self.compression.unwrap_or(self.compression_type)
    }
}

fn invalid(option: &str, reason: &'static str) -> Error {
    Error::InvalidOption {
        option: option.to_owned(),
        reason,
    }
}

/// Parses `65536`, `64k`, `64K`, `1M`, `2m` (powers of 1024, as qemu-img reads sizes).
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'b' | b'B' => (&text[..text.len() - 1], 0),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option_qemu_spells() {
        let mut options = WriterOptions::default();
        options
            .parse_qemu_options("cluster_size=512,compat=1.1,compression_type=zstd,backing_file=../a.qcow2,backing_fmt=raw")
            .unwrap();
        options.compress();
        assert_eq!(options.cluster_size, 512);
        assert_eq!(options.compression, Some(CompressionType::Zstd));
        assert_eq!(options.backing_file.as_deref(), Some("../a.qcow2"));
        assert_eq!(options.backing_format, "raw");
        options.validate().unwrap();
    }

    #[test]
    fn rejects_bad_cluster_sizes_and_zstd_in_v2() {
        for list in ["cluster_size=256", "cluster_size=4M", "cluster_size=3000"] {
            let mut options = WriterOptions::default();
            options.parse_qemu_options(list).unwrap();
            assert!(
                matches!(options.validate(), Err(Error::InvalidOption { .. })),
                "{list}"
            );
        }
        let mut options = WriterOptions::default();
        options
            .parse_qemu_options("compat=0.10,compression_type=zstd")
            .unwrap();
        assert!(matches!(options.validate(), Err(Error::CannotWrite { .. })));
    }

    #[test]
    fn rejects_unknown_keys_and_values() {
        let mut options = WriterOptions::default();
        assert!(matches!(
            options.parse_qemu_options("preallocation=full"),
            Err(Error::InvalidOption { .. })
        ));
        assert!(options.parse_qemu_options("compat=0.9").is_err());
        assert!(options.parse_qemu_options("cluster_size").is_err());
        assert!(
            options
                .parse_qemu_options("cluster_size=99999999999999999999")
                .is_err()
        );
    }
}
