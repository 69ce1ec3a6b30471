//! Compressing one data cluster (qcow2.rst, "Compressed Clusters Descriptor" and
//! `compression_type`).

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::CompressionType;

/// Window QEMU inflates deflate clusters with (2^12 bytes, no zlib header); a wider window could
/// produce back-references it refuses.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// Compresses clusters one at a time, reusing its state and output buffer.
pub(crate) struct Compressor {
    method: CompressionType,
    deflate: Option<Compress>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    output: Vec<u8>,
}

impl Compressor {
    pub(crate) fn new(method: CompressionType, cluster_size: usize) -> std::io::Result<Self> {
        let (deflate, zstd) = match method {
            CompressionType::Deflate => (
                Some(Compress::new_with_window_bits(
                    Compression::default(),
                    false,
                    DEFLATE_WINDOW_BITS,
                )),
                None,
            ),
            CompressionType::Zstd => (
                None,
                Some(zstd::bulk::Compressor::new(
                    zstd::DEFAULT_COMPRESSION_LEVEL,
                )?),
            ),
        };
        Ok(Self {
            method,
            deflate,
            zstd,
            output: Vec::with_capacity(cluster_size),
        })
    }

    /// The compressed form of `cluster`, or `None` when it would not be smaller than the
    /// cluster itself (the caller then stores the cluster uncompressed, as QEMU does).
    pub(crate) fn compress(&mut self, cluster: &[u8]) -> Option<&[u8]> {
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
        (self.output.len() < limit).then_some(self.output.as_slice())
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
        let mut compressor = Compressor::new(CompressionType::Deflate, cluster.len()).unwrap();
        let packed = compressor.compress(&cluster).unwrap().to_vec();
        assert!(packed.len() < cluster.len() / 4);
        assert_eq!(inflate_like_qemu(&packed, cluster.len()), cluster);
    }

    #[test]
    fn zstd_round_trips() {
        let cluster = vec![7u8; 4096];
        let mut compressor = Compressor::new(CompressionType::Zstd, cluster.len()).unwrap();
        let packed = compressor.compress(&cluster).unwrap().to_vec();
        assert_eq!(
            zstd::bulk::decompress(&packed, cluster.len()).unwrap(),
            cluster
        );
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
            let mut compressor = Compressor::new(method, cluster.len()).unwrap();
            assert!(compressor.compress(&cluster).is_none(), "{}", method.name());
        }
    }
}
