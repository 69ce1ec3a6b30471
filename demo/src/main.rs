//! The main job on an embedded default: back up a sample volume into a local folder target,
//! a full backup then three incrementals while its data changes, restore every point and check
//! it byte for byte (by BLAKE3 of the whole volume, so the demo holds no volume in memory).
//!
//! `cargo run --release -p strata-demo [-- --size-mib N --keep DIR]`

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use strata::target::{Target, VolumeName};

/// Options of the demo.
#[derive(Parser)]
struct Args {
    /// Size of the sample volume in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Keep the target and volume in this folder instead of a temporary one.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

/// A deterministic pseudo-random generator (xorshift), so runs are reproducible.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `count` runs of `len` random bytes at spread-out offsets; returns the bytes changed.
fn change(
    volume: &File,
    size: u64,
    noise: &mut Noise,
    count: u64,
    len: u64,
    salt: u64,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; len as usize];
    for i in 0..count {
        let slot = (i * 7919 + salt * 104_729) % (size / len);
        noise.fill(&mut buf);
        volume.write_all_at(&buf, slot * len)?;
    }
    Ok(count * len)
}

/// BLAKE3 of a file's bytes, read a chunk at a time (the demo keeps no volume in memory).
fn hash_file(path: &std::path::Path) -> anyhow::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => temp.path().to_owned(),
    };
    let size = args.size_mib << 20;
    let volume_path = dir.join("volume.raw");
    let volume = File::create(&volume_path)?;
    volume.set_len(size)?;
    let target_dir = dir.join("target");
    let target = Target::open(target_dir.to_str().context("non-UTF-8 folder")?)?;
    let name = VolumeName::new("demo-volume")?;
    println!(
        "volume: {} MiB sparse file; target: {}",
        args.size_mib,
        target_dir.display()
    );

    let mut noise = Noise(0x5eed_1234_abcd_ef01);
    let mut points = Vec::new();
    let mut rows = Vec::new();
    // A quarter of the volume first, then small scattered changes.
    let steps: [(u64, u64); 4] = [
        (size / 4 / (1 << 20), 1 << 20),
        (64, 64 << 10),
        (200, 4096),
        (16, 1 << 20),
    ];
    for (step, &(count, len)) in steps.iter().enumerate() {
        let changed = change(&volume, size, &mut noise, count, len, step as u64)?;
        volume.sync_data()?;
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template("  backup {pos:>12}/{len} bytes [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let started = Instant::now();
        let source = strata::open_volume(&volume_path)?;
        let manifest =
            strata::backup_volume(&target, &name, &source, &Default::default(), &mut |p| {
                bar.set_position(p.scanned_bytes);
                bar.set_message(format!("{} clusters changed", p.changed_clusters));
            })?;
        let took = started.elapsed();
        bar.finish_and_clear();
        points.push((manifest.id.clone(), hash_file(&volume_path)?));
        rows.push((manifest, changed, took));
    }

    println!();
    println!(
        "{:<28} {:<11} {:>14} {:>14} {:>10} {:>12} {:>12}",
        "backup", "kind", "changed bytes", "image bytes", "time", "throughput", "restore"
    );
    for ((manifest, changed, took), (id, expected)) in rows.iter().zip(&points) {
        let restored = dir.join("restored.raw");
        let started = Instant::now();
        strata::restore_volume(&target, &name, Some(id), &restored, &mut |_| {})?;
        let restore_time = started.elapsed();
        if hash_file(&restored)? != *expected {
            bail!("backup {id} does not restore byte for byte");
        }
        let throughput = size as f64 / took.as_secs_f64() / (1 << 20) as f64;
        println!(
            "{:<28} {:<11} {:>14} {:>14} {:>9.2}s {:>8.0} MiB/s {:>11.2}s",
            manifest.id.to_string(),
            if manifest.parent.is_some() {
                "incremental"
            } else {
                "full"
            },
            changed,
            manifest.image.size,
            took.as_secs_f64(),
            throughput,
            restore_time.as_secs_f64()
        );
    }
    let reports = strata::verify(&target, Some(&name), None)?;
    let damaged: usize = reports.iter().map(|r| r.damage.len()).sum();
    writeln!(
        std::io::stdout(),
        "\nall {} points restored byte for byte; verify: {} backups, {damaged} problems",
        points.len(),
        reports.len()
    )?;
    if damaged > 0 {
        bail!("verify found damage");
    }
    Ok(())
}
