//! Hydrating the 12-deep chain verified (every stored cluster checked against its layer's
//! checksum list, as `strata restore` reads) beside the same hydration unverified, in the same
//! run, the two interleaved; the medians of the pairs and of their ratio are printed after the
//! group. The check must cost little: a CRC-32 of each cluster (crc32fast runs at several GB/s)
//! and a few binary searches.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use strata::chain::{ChainChecksums, stored_checksums};
use strata::qcow2::{Image, OpenOptions, hydrate};

use crate::fixture::{DEPTH, build_chain, report_pairs};

const VIRTUAL: u64 = 512 << 20;

/// Hydrates `top` opened with `options` into a new `out`, returning the time it took.
fn hydrate_once(top: &Path, out: &Path, options: &OpenOptions) -> Duration {
    // A new output file each time, so no run waits for the previous one's writeback.
    let _ = std::fs::remove_file(out);
    let start = Instant::now();
    let image = Image::open_with_options(top, options).expect("open chain");
    let dest = std::fs::File::create(out).expect("create");
    hydrate(&image, &dest, "out.raw").expect("hydrate");
    start.elapsed()
}

/// The 12-deep chain (512 MiB virtual, 96 MiB of data) hydrated verified and unverified.
pub fn hydrate_verified(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    build_chain(dir.path(), VIRTUAL, 32);
    // Each layer's checksum list, as its backup records it; top first, as the chain opens.
    let lists = (0..DEPTH)
        .rev()
        .map(|layer| {
            let image = Image::open(dir.path().join(format!("{layer}.qcow2"))).expect("layer");
            let list = stored_checksums(&image).expect("checksums");
            (format!("layer {layer}"), list)
        })
        .collect();
    let verified = OpenOptions {
        cluster_check: Some(Arc::new(ChainChecksums::new(lists))),
        ..OpenOptions::default()
    };
    let unverified = OpenOptions::default();
    let top = dir.path().join(format!("{}.qcow2", DEPTH - 1));
    let out = dir.path().join("out.raw");
    let image = Image::open(&top).expect("open chain");
    let data: u64 = image
        .map(0, VIRTUAL)
        .expect("map")
        .iter()
        .filter(|e| !e.kind.is_zero())
        .map(|e| e.length)
        .sum();
    // Both read the same volume.
    hydrate_once(&top, &out, &unverified);
    let plain = std::fs::read(&out).expect("read");
    hydrate_once(&top, &out, &verified);
    assert!(
        std::fs::read(&out).expect("read") == plain,
        "verified hydration differs"
    );
    drop(plain);

    let mut group = c.benchmark_group("hydrate_verified_12_deep");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data));
    // Each verified hydration is paired with an unverified one right before or after it, so
    // both see the same machine load; each benchmark times its own kind.
    let pairs: RefCell<Vec<(Duration, Duration)>> = RefCell::default();
    for (name, verified_first) in [("verified", true), ("unverified", false)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut own = Duration::ZERO;
                for _ in 0..iters {
                    let (checked, plain) = if verified_first {
                        let checked = hydrate_once(&top, &out, &verified);
                        (checked, hydrate_once(&top, &out, &unverified))
                    } else {
                        let plain = hydrate_once(&top, &out, &unverified);
                        (hydrate_once(&top, &out, &verified), plain)
                    };
                    pairs.borrow_mut().push((checked, plain));
                    own += if verified_first { checked } else { plain };
                }
                own
            });
        });
    }
    group.finish();
    report_pairs(
        "hydrate_verified_12_deep",
        ("verified", "unverified"),
        &pairs.into_inner(),
    );
}
