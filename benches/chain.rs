//! Change detection: BLAKE3-128 and XXH3-128 cluster digests, and a digest-delta backup scan of
//! a cached volume into a sink that discards (so only scanning and digesting are measured),
//! with either digest.

use std::io::Write;

use criterion::{BatchSize, Criterion, Throughput};
use strata::chain::{ChangeSource, DigestAlgorithm, backup};
use strata::qcow2::{ImageSink, WriterOptions};

const VOLUME: u64 = 256 << 20;

/// Keeps nothing.
struct Discard;

impl ImageSink for Discard {
    fn append(&mut self, _data: &[u8]) -> std::io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, _header: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Digest throughput, and a whole digest-delta scan of an unchanged volume (every cluster read
/// and digested, none written).
pub fn benches(c: &mut Criterion) {
    let cluster = vec![0x5au8; 65536];
    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Bytes(cluster.len() as u64));
    let xxh3 = DigestAlgorithm::Xxh3 { seed: 0x5eed };
    group.bench_function("blake3_128 digest of a 64 KiB cluster", |b| {
        b.iter(|| DigestAlgorithm::Blake3.digest(&cluster))
    });
    group.bench_function("xxh3_128 digest of a 64 KiB cluster", |b| {
        b.iter(|| xxh3.digest(&cluster))
    });

    let mut file = tempfile::NamedTempFile::new().expect("volume");
    let mut block = vec![0u8; 1 << 20];
    for (i, chunk) in block.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    for _ in 0..VOLUME >> 20 {
        file.write_all(&block).expect("fill");
    }
    file.flush().expect("flush");
    let volume = std::fs::File::open(file.path()).expect("open");
    let options = WriterOptions::default();
    let mut overlay = options.clone();
    overlay.backing_file = Some("base.qcow2".into());
    group.throughput(Throughput::Bytes(VOLUME));
    group.sample_size(10);
    for algorithm in [DigestAlgorithm::Blake3, xxh3] {
        let name = algorithm.name();
        let (_, base) = backup(
            &volume,
            Discard,
            &options,
            ChangeSource::Full,
            algorithm,
            &mut |_| {},
        )
        .expect("base scan");
        let scan = || {
            backup(
                &volume,
                Discard,
                &overlay,
                ChangeSource::Digests {
                    previous: &base.digests,
                },
                algorithm,
                &mut |_| {},
            )
            .expect("scan")
        };
        group.bench_function(
            format!("{name} digest-delta scan of a cached 256 MiB volume"),
            |b| b.iter_batched(|| (), |()| scan(), BatchSize::PerIteration),
        );
        // The same scan measured in CPU time (all threads): bytes per CPU-second is the rate
        // per core, which a busy shared machine disturbs far less than wall time.
        group.bench_function(format!("{name} digest-delta scan, per CPU-second"), |b| {
            b.iter_custom(|iters| {
                let start = cpu_time();
                for _ in 0..iters {
                    scan();
                }
                cpu_time().saturating_sub(start)
            })
        });
    }
    group.finish();
}

/// CPU time of this process, every thread included (finished ones too): `utime` and `stime` of
/// `/proc/self/stat` (fields 14 and 15, in USER_HZ ticks of 10 ms on Linux).
fn cpu_time() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses, start with field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("tick count"))
        .collect();
    std::time::Duration::from_millis(10 * fields.iter().sum::<u64>())
}
