//! Hydrating a 12-deep chain: strata's `hydrate` beside `qemu-img convert -O raw`.

use std::path::Path;
use std::process::Command;

use criterion::{BatchSize, Criterion, Throughput};
use strata::qcow2::{Image, hydrate};

const VIRTUAL: u64 = 512 << 20;
const DEPTH: usize = 12;

fn tool(dir: &Path, program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.status.success(), "{program} {args:?} failed");
}

/// Builds `0.qcow2` .. `11.qcow2`, each writing 8 MiB in scattered 256 KiB runs.
fn build_chain(dir: &Path) {
    for layer in 0..DEPTH {
        let name = format!("{layer}.qcow2");
        let mut args = vec![
            "create".to_owned(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        if layer > 0 {
            args.extend([
                "-b".into(),
                format!("{}.qcow2", layer - 1),
                "-F".into(),
                "qcow2".into(),
            ]);
        }
        args.extend([name.clone(), VIRTUAL.to_string()]);
        tool(
            dir,
            "qemu-img",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut io = vec![];
        for run in 0..32u64 {
            let offset =
                ((run * 7919 + layer as u64 * 104_729) % (VIRTUAL / (256 << 10))) * (256 << 10);
            io.push("-c".to_owned());
            io.push(format!(
                "write -P {} {offset} 256k",
                (layer as u64 * 31 + run) % 251 + 1
            ));
        }
        io.push(name);
        tool(
            dir,
            "qemu-io",
            &io.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
}

/// The 12-deep chain, hydrated by strata and by qemu-img.
pub fn chain_12_deep(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    build_chain(dir.path());
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
