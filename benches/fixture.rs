//! What the chain benches share: running the QEMU tools, and building a 12-deep chain with them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Layers of the benches' chains.
pub const DEPTH: usize = 12;

/// Runs `program args` in `dir` and panics when it fails (a bench cannot go on without it).
pub fn tool<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, program: &str, args: &[S]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed");
}

/// Builds `0.qcow2` .. `11.qcow2` in `dir` with `qemu-img create` and `qemu-io`, each layer
/// writing `runs` scattered 256 KiB runs of its own pattern over a `virtual`-byte volume.
pub fn build_chain(dir: &Path, virtual_size: u64, runs: u64) {
    for layer in 0..DEPTH {
        let name = format!("{layer}.qcow2");
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if layer > 0 {
            args.extend([
                "-b".into(),
                format!("{}.qcow2", layer - 1),
                "-F".into(),
                "qcow2".into(),
            ]);
        }
        args.extend([name.clone(), virtual_size.to_string()]);
        tool(dir, "qemu-img", &args);
        let mut io = vec![];
        for run in 0..runs {
            let offset = ((run * 7919 + layer as u64 * 104_729) % (virtual_size / (256 << 10)))
                * (256 << 10);
            io.push("-c".to_owned());
            io.push(format!(
                "write -P {} {offset} 256k",
                (layer as u64 * 31 + run) % 251 + 1
            ));
        }
        io.push(name);
        tool(dir, "qemu-io", &io);
    }
}

/// Prints the medians of paired timings (`names` says which is which) and of their ratios,
/// with the machine's load, after `group`.
pub fn report_pairs(group: &str, names: (&str, &str), pairs: &[(Duration, Duration)]) {
    if pairs.is_empty() {
        return;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let first = median(pairs.iter().map(|p| ms(p.0)).collect());
    let second = median(pairs.iter().map(|p| ms(p.1)).collect());
    let ratio = median(pairs.iter().map(|p| ms(p.0) / ms(p.1)).collect());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{group}: {} interleaved pairs, median {} {first:.1} ms, {} {second:.1} ms, \
         median {}/{} ratio {ratio:.3} (load average {})",
        pairs.len(),
        names.0,
        names.1,
        names.0,
        names.1,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
