//! `strata demo`: makes a small chain with qemu-img in a temporary folder, then inspects,
//! maps and hydrates it with Strata and checks the result against `qemu-img convert`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use strata::qcow2::{ExtentKind, Image, hydrate};

/// Arguments of `strata demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Keep the demo folder here instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn tool(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run {program} (install qemu-utils)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `strata demo`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.as_path()
        }
        None => temp.path(),
    };
    println!("demo folder: {}", dir.display());
    tool(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"],
    )?;
    tool(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 512M 4M",
            "base.qcow2",
        ],
    )?;
    tool(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    )?;
    tool(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 4M 8M",
            "-c",
            "write -z 512M 1M",
            "top.qcow2",
        ],
    )?;
    let image = Image::open(dir.join("top.qcow2"))?;
    println!(
        "chain of {} images, virtual size {} bytes",
        image.depth(),
        image.virtual_size()
    );
    for layer in image.chain() {
        println!(
            "  {} ({}, {} bytes on disk)",
            layer.name,
            layer.format.name(),
            layer.file_length
        );
    }
    let extents = image.map(0, image.virtual_size())?;
    let data: u64 = extents
        .iter()
        .filter(|e| matches!(e.kind, ExtentKind::Data { .. }))
        .map(|e| e.length)
        .sum();
    println!("{} extents, {data} bytes of stored data", extents.len());
    let out_path = dir.join("top.raw");
    let out = std::fs::File::create(&out_path)?;
    let started = Instant::now();
    let stats = hydrate(&image, &out, "top.raw")?;
    let strata_time = started.elapsed();
    let started = Instant::now();
    tool(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "qemu.raw"],
    )?;
    let qemu_time = started.elapsed();
    let same = std::fs::read(&out_path)? == std::fs::read(dir.join("qemu.raw"))?;
    println!(
        "hydrated {} data bytes in {strata_time:?} (qemu-img convert: {qemu_time:?}); identical to qemu-img: {same}",
        stats.data_bytes
    );
    if !same {
        bail!("strata's hydration differs from qemu-img's");
    }
    Ok(())
}
