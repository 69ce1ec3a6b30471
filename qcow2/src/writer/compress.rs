//! Compressing one data cluster (qcow2.rst, "Compressed Clusters Descriptor" and
//! `compression_type`).

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::CompressionType;
use crate::error::Error;

/// Window QEMU inflates deflate clusters with (2^12 bytes, no zlib header); a wider window could
/// produce back-references it refuses.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// Compresses data clusters one at a time for a [`Writer`](crate::Writer), reusing its state
/// and buffers; one per thread, so clusters can be compressed on worker threads and handed to
/// [`Writer::write_compressed`](crate::Writer::write_compressed).
///
/// ```
/// use strata_qcow2::{ClusterCompressor, CompressionType};
///
/// let mut compressor = ClusterCompressor::new(CompressionType::Zstd, Some(1), 65536)?;
/// assert!(compressor.compress(&[b'a'; 65536]).is_some_and(|packed| packed.len() < 100));
/// # Ok::<(), strata_qcow2::Error>(())
/// ```
pub struct ClusterCompressor {
    method: CompressionType,
    deflate: Option<Compress>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    output: Vec<u8>,
    /// One cluster, for a short last cluster padded with zeros.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ClusterCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCompressor")
            .field("method", &self.method)
            .field("cluster_size", &self.scratch.len())
            .finish_non_exhaustive()
    }
}

impl ClusterCompressor {
    /// A compressor for clusters of `cluster_size` bytes with `method` at `level` (`None`:
    /// the level QEMU uses, zlib's default 6 and zstd's default 3; zlib takes 0 to 9, zstd
    /// 1 to 22 and negative "fast" levels).
    pub fn new(
        method: CompressionType,
        level: Option<i32>,
        cluster_size: u64,
    ) -> Result<Self, Error> {
        let bad_level = || Error::InvalidOption {
            option: format!("{}:{}", method.name(), level.unwrap_or_default()),
            reason: "not a compression level of this method",
        };
        let (deflate, zstd) = match method {
            CompressionType::Deflate => {
                let level = match level {
                    None => Compression::default(),
                    Some(level) => Compression::new(u32::try_from(level).map_err(|_| bad_level())?),
                };
                if level.level() > 9 {
                    return Err(bad_level());
                }
                (
                    Some(Compress::new_with_window_bits(
                        level,
                        false,
                        DEFLATE_WINDOW_BITS,
                    )),
                    None,
                )
            }
            CompressionType::Zstd => {
                let level = level.unwrap_or(zstd::DEFAULT_COMPRESSION_LEVEL);
                if !zstd::compression_level_range().contains(&level) {
                    return Err(bad_level());
                }
                let compressor = zstd::bulk::Compressor::new(level)
                    .map_err(Error::write_io("setting up compression", 0))?;
                (None, Some(compressor))
            }
        };
        let cluster_size = usize::try_from(cluster_size).map_err(|_| Error::CannotWrite {
            feature: "a cluster size this large",
        })?;
        Ok(Self {
            method,
            deflate,
            zstd,
            output: Vec::with_capacity(cluster_size),
            scratch: vec![0; cluster_size],
        })
    }

    /// The method the clusters are compressed with.
    pub fn method(&self) -> CompressionType {
        self.method
    }

    /// The compressed form of `cluster`, or `None` when it would not be smaller than the
    /// cluster itself (the caller then stores the cluster uncompressed, as QEMU does). A
    /// cluster shorter than the cluster size (the image's last) is compressed as the whole
    /// cluster it reads as, padded with zeros; a longer one is never compressed.
    pub fn compress(&mut self, cluster: &[u8]) -> Option<&[u8]> {
        if cluster.len() < self.scratch.len() {
            let mut full = std::mem::take(&mut self.scratch);
            full[..cluster.len()].copy_from_slice(cluster);
            full[cluster.len()..].fill(0);
            let packed = self.compress_whole(&full).is_some();
            self.scratch = full;
            return packed.then_some(self.output.as_slice());
        }
        if cluster.len() > self.scratch.len() {
            return None;
        }
        self.compress_whole(cluster)?;
        Some(self.output.as_slice())
    }

    /// Compresses one whole cluster into `output`; `None` when that saved no space.
    fn compress_whole(&mut self, cluster: &[u8]) -> Option<()> {
        // Anything not smaller than `limit` is stored uncompressed.
        let limit = cluster.len().saturating_sub(1);
        self.output.clear();
        match self.method {
            CompressionType::Deflate => {
                let deflate = self.deflate.as_mut()?;
                deflate.reset();
                // Room for a stored block: zlib-rs 0.6 panics when a stored block meets a
                // full output buffer, so the size limit is applied afterwards.
                self.output
                    .resize(cluster.len() + cluster.len() / 8 + 64, 0);
                match deflate.compress(cluster, &mut self.output, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => {}
                    _ => return None,
                }
                let written = usize::try_from(deflate.total_out()).ok()?;
                self.output.truncate(written);
            }
            CompressionType::Zstd => {
                let zstd = self.zstd.as_mut()?;
                self.output.resize(limit, 0);
                let written = zstd.compress_to_buffer(cluster, &mut self.output).ok()?;
                self.output.truncate(written);
            }
        }
        (self.output.len() < limit).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate_like_qemu(data: &[u8], size: usize) -> Vec<u8> {
        let mut inflate = Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
        let mut out = Vec::with_capacity(size);
        inflate
            .decompress_vec(data, &mut out, FlushDecompress::Finish)
            .unwrap();
        out
    }

    #[test]
    fn deflate_round_trips_through_a_4k_window() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i % 5000 % 251) as u8).collect();
        let mut compressor =
            ClusterCompressor::new(CompressionType::Deflate, None, cluster.len() as u64).unwrap();
        let packed = compressor.compress(&cluster).unwrap().to_vec();
        assert!(packed.len() < cluster.len() / 4);
        assert_eq!(inflate_like_qemu(&packed, cluster.len()), cluster);
    }

    #[test]
    fn zstd_round_trips() {
        let cluster = vec![7u8; 4096];
        let mut compressor =
            ClusterCompressor::new(CompressionType::Zstd, None, cluster.len() as u64).unwrap();
        let packed = compressor.compress(&cluster).unwrap().to_vec();
        assert_eq!(
            zstd::bulk::decompress(&packed, cluster.len()).unwrap(),
            cluster
        );
    }

    #[test]
    fn a_short_last_cluster_is_compressed_as_the_zero_padded_cluster() {
        let mut compressor = ClusterCompressor::new(CompressionType::Zstd, Some(1), 4096).unwrap();
        let packed = compressor.compress(&[9u8; 1000]).unwrap().to_vec();
        let mut expected = vec![9u8; 1000];
        expected.resize(4096, 0);
        assert_eq!(zstd::bulk::decompress(&packed, 4096).unwrap(), expected);
        assert!(compressor.compress(&[9u8; 4097]).is_none());
    }

    #[test]
    fn levels_outside_the_method_range_are_refused() {
        for (method, level) in [
            (CompressionType::Deflate, 10),
            (CompressionType::Deflate, -1),
            (CompressionType::Zstd, 23),
        ] {
            assert!(matches!(
                ClusterCompressor::new(method, Some(level), 4096),
                Err(Error::InvalidOption { .. })
            ));
        }
        assert!(ClusterCompressor::new(CompressionType::Deflate, Some(1), 4096).is_ok());
        assert!(ClusterCompressor::new(CompressionType::Zstd, Some(19), 4096).is_ok());
    }

    #[test]
    fn incompressible_clusters_are_refused() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let cluster: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for method in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut compressor =
                ClusterCompressor::new(method, None, cluster.len() as u64).unwrap();
            assert!(compressor.compress(&cluster).is_none(), "{}", method.name());
        }
    }
}
