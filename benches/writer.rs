//! QCOW2 writer throughput: zero detection and appends, compression, and the raw converter.

use std::io::{self, Write};

use criterion::{BenchmarkId, Criterion, Throughput};
use strata_qcow2::{CompressionType, ImageSink, Writer, WriterOptions, convert_raw};

/// Counts bytes and drops them, so the bench measures the writer, not a disk.
#[derive(Default)]
struct Discard(u64);

impl ImageSink for Discard {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.0 += data.len() as u64;
        Ok(())
    }

    fn finish(&mut self, header: &[u8]) -> io::Result<()> {
        self.0 += header.len() as u64;
        Ok(())
    }
}

/// `len` bytes where one 64 KiB cluster in four holds pseudo-random bytes, the rest zeros.
fn quarter_random(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut volume = vec![0u8; len];
    for (i, cluster) in volume.chunks_mut(65536).enumerate() {
        if i % 4 == 1 {
            for word in cluster.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
            }
        }
    }
    volume
}

fn write_volume(volume: &[u8], options: &WriterOptions) -> u64 {
    let mut writer = Writer::new(Discard::default(), options, volume.len() as u64).unwrap();
    for (i, chunk) in volume.chunks(4 << 20).enumerate() {
        writer.write_data((i as u64) << 22, chunk).unwrap();
    }
    writer.finish().unwrap().0.0
}

pub fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("qcow2_writer");
    group.sample_size(10);

    let volume = quarter_random(64 << 20);
    group.throughput(Throughput::Bytes(volume.len() as u64));
    for cluster_size in [4096u64, 65536, 1 << 21] {
        let mut options = WriterOptions::default();
        options.cluster_size = cluster_size;
        group.bench_with_input(
            BenchmarkId::new("plain", cluster_size),
            &options,
            |b, options| b.iter(|| write_volume(&volume, options)),
        );
    }

    let small = quarter_random(8 << 20);
    group.throughput(Throughput::Bytes(small.len() as u64));
    for method in [CompressionType::Deflate, CompressionType::Zstd] {
        let mut options = WriterOptions::default();
        options.compression_type = method;
        options.compress();
        group.bench_with_input(
            BenchmarkId::new("compressed", method.name()),
            &options,
            |b, options| b.iter(|| write_volume(&small, options)),
        );
    }

    // The converter over a sparse file in the page cache: SEEK_DATA, read-ahead, zero checks.
    let mut source = tempfile::tempfile().unwrap();
    source.write_all(&volume).unwrap();
    group.throughput(Throughput::Bytes(volume.len() as u64));
    group.bench_function("convert_raw", |b| {
        b.iter(|| {
            convert_raw(&source, Discard::default(), &WriterOptions::default(), None)
                .unwrap()
                .1
        })
    });
    group.finish();
}
