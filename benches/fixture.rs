//! What the chain benches share: running the QEMU tools, and building a 12-deep chain with them.

use std::path::Path;
use std::process::Command;

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
