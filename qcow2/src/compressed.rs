//! Compressed clusters (qcow2.rst, "Compressed Clusters Descriptor" and `compression_type`).
//!
//! A compressed stream ends wherever its cluster is complete; the bytes after it (the rest of
//! the last sector) may belong to another cluster, so decoding stops once the output is full.

use crate::header::CompressionType;

/// Decompresses `input` into `out`, which must come out exactly full.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut state = flate2::Decompress::new(false);
    let status = state
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| format!("deflate data is invalid: {e}"))?;
    let produced = state.total_out();
    if produced != out.len() as u64 {
        return Err(format!(
            "deflate data ended after {produced} of {} bytes ({status:?})",
            out.len()
        ));
    }
    Ok(())
}

/// Decodes one zstd frame into `out` (one cluster).
///
/// A frame names the window its decoder must keep (RFC 8878, "Window_Descriptor"), and
/// libzstd allocates it before decoding a byte: left at its default limit (2^27), a 10-byte
/// frame would cost 128 MiB per cluster read. A cluster's frame never needs a window beyond
/// the cluster itself, so the limit is twice the cluster (zstd's smallest, 2^10, for tiny
/// clusters) and a frame asking more is refused.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let window_log = (out.len().next_power_of_two().trailing_zeros() + 1).max(10);
    let mut decoder = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
    decoder
        .set_parameter(DParameter::WindowLogMax(window_log))
        .map_err(|e| format!("zstd decoder: {e}"))?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    loop {
        let before = (src.pos(), dst.pos());
        let hint = decoder
            .run(&mut src, &mut dst)
            .map_err(|e| format!("zstd data is invalid: {e}"))?;
        if dst.pos() == dst.capacity() {
            return Ok(());
        }
        if hint == 0 || (src.pos(), dst.pos()) == before || src.pos() == input.len() {
            return Err(format!(
                "zstd data ended after {} of {} bytes",
                dst.pos(),
                dst.capacity()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compresses one cluster; `None` when the result would not be smaller than the input.
    fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
        let packed = match kind {
            CompressionType::Deflate => {
                let mut state = flate2::Compress::new(flate2::Compression::default(), false);
                let mut out = Vec::with_capacity(input.len());
                match state.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) => out,
                    _ => return None,
                }
            }
            CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
        };
        (packed.len() < input.len()).then_some(packed)
    }

    #[test]
    fn round_trips_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut packed = compress(kind, &data).expect("compressible");
            packed.extend_from_slice(&[0xAA; 300]);
            let mut out = vec![0; data.len()];
            decompress(kind, &packed, &mut out).expect("decodes");
            assert_eq!(out, data);
        }
    }

    #[test]
    fn a_zstd_frame_with_a_window_larger_than_twice_the_cluster_is_refused() {
        // Magic, frame header descriptor 0 (no content size), a window descriptor, then one
        // last RLE block of 65536 'A's.
        let frame = |window: u8| [0x28, 0xb5, 0x2f, 0xfd, 0x00, window, 0x03, 0x00, 0x08, 0x41];
        let mut out = vec![0; 65536];
        // Window log 27: libzstd's default limit would reserve 128 MiB for it.
        let err = decompress(CompressionType::Zstd, &frame(0x88), &mut out).expect_err("27");
        assert!(err.contains("zstd data is invalid"), "{err}");
        // Window log 17, twice the cluster, decodes.
        decompress(CompressionType::Zstd, &frame(0x38), &mut out).expect("17");
        assert!(out.iter().all(|&b| b == b'A'));
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0; 4096];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let err = decompress(kind, &[0xff; 64], &mut out).expect_err("garbage");
            assert!(err.contains("invalid") || err.contains("ended"), "{err}");
        }
    }
}
