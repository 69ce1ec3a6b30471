//! Hydrating a 12-deep chain: strata's `hydrate` beside `qemu-img convert -O raw`.

use criterion::{BatchSize, Criterion, Throughput};

use strata::qcow2::{Image, hydrate};

use crate::fixture::{DEPTH, build_chain, tool};

const VIRTUAL: u64 = 512 << 20;

/// The 12-deep chain, hydrated by strata and by qemu-img.
pub fn chain_12_deep(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    // 32 runs of 256 KiB a layer: 8 MiB a layer, 96 MiB of data in the chain.
    build_chain(dir.path(), VIRTUAL, 32);
    let top = dir.path().join(format!("{}.qcow2", DEPTH - 1));
    let image = Image::open(&top).expect("open chain");
    let data: u64 = image
        .map(0, VIRTUAL)
        .expect("map")
        .iter()
        .filter(|e| !e.kind.is_zero())
        .map(|e| e.length)
        .sum();
    let mut group = c.benchmark_group("hydrate_12_deep");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data));
    let out = dir.path().join("out.raw");
    // Each run writes a new file: truncating the previous output would wait for its
    // writeback, which measures the disk rather than the tool.
    let remove_output = || {
        let _ = std::fs::remove_file(&out);
    };
    group.bench_function("strata", |b| {
        b.iter_batched(
            remove_output,
            |()| {
                let image = Image::open(&top).expect("open chain");
                let dest = std::fs::File::create(&out).expect("create");
                hydrate(&image, &dest, "out.raw").expect("hydrate")
            },
            BatchSize::PerIteration,
        );
    });
    let top_name = format!("{}.qcow2", DEPTH - 1);
    // The same volume as one image: hydrating the chain should cost about the same.
    tool(
        dir.path(),
        "qemu-img",
        &["convert", "-O", "qcow2", &top_name, "flat.qcow2"],
    );
    let flat = dir.path().join("flat.qcow2");
    group.bench_function("strata, same volume as one image", |b| {
        b.iter_batched(
            remove_output,
            |()| {
                let image = Image::open(&flat).expect("open flat image");
                let dest = std::fs::File::create(&out).expect("create");
                hydrate(&image, &dest, "out.raw").expect("hydrate")
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("qemu-img convert", |b| {
        b.iter(|| {
            tool(
                dir.path(),
                "qemu-img",
                &["convert", "-O", "raw", &top_name, "out.raw"],
            )
        });
    });
    group.finish();
}
