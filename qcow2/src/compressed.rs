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

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut decoder = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
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
    fn garbage_is_an_error() {
        let mut out = vec![0; 4096];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let err = decompress(kind, &[0xff; 64], &mut out).expect_err("garbage");
            assert!(err.contains("invalid") || err.contains("ended"), "{err}");
        }
    }
}
