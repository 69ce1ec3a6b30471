//! Memory bounded by a budget, not by the volume (issue 14, item 5): the CLI backs up (full,
//! then an incremental comparing digests), verifies and restores a volume of 2^20 clusters of
//! 512 bytes, and the peak resident set (`VmHWM`, polled from `/proc` while it runs) stays
//! under [`BUDGET_MIB`], and the full backup's peak barely moves from an eighth of the
//! clusters to all of them. Held whole, the digest manifests (the previous and the new, decoded and
//! encoded), the checksum list and the writer's runs of that many clusters take about 100 MiB
//! on top of the read-ahead buffers; streamed, they take a fixed few hundred KiB.
//!
//! `benches/rss.sh` measures the same against qemu-img at 1 and 16 GiB (release build).

mod strata_bin;
use strata_bin::{s, strata_command};

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Peak RSS allowed (the default buffers: six 4 MiB read-ahead chunks with their compressed
/// halves, the upload part, the reader's caches).
const BUDGET_MIB: u64 = 64;
/// Clusters of the volume.
const CLUSTERS: u64 = 1 << 20;
/// Growth of the full backup's peak allowed from an eighth of the clusters to all of them
/// (held whole, the tables would grow by about 40 MiB).
const GROWTH_MIB: u64 = 8;
const CLUSTER: u64 = 512;

/// Runs `strata ARGS` to success and returns its peak RSS in KiB, read from `/proc` every few
/// milliseconds while it runs (`VmHWM` only grows, so the last reading is the peak so far).
fn peak_kib(args: &[&str]) -> u64 {
    let mut child = strata_command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak = peak.max(hwm.unwrap_or(0));
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = child.wait_with_output().expect("strata output");
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(peak > 0, "no VmHWM read for strata {args:?}");
    peak
}

/// A volume of `CLUSTERS` non-zero clusters: text, compressible, so every cluster also has a
/// compressed L2 entry of its own.
fn write_volume(path: &Path, clusters: u64, generation: u8) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("volume"));
    let mut cluster = [0u8; CLUSTER as usize];
    for index in 0..clusters {
        // The incremental changes one cluster in 64.
        let generation = if index % 64 == 0 { generation } else { 0 };
        let line = format!("cluster {index} generation {generation} of the memory test\n");
        for (i, b) in cluster.iter_mut().enumerate() {
            *b = line.as_bytes()[i % line.len()];
        }
        file.write_all(&cluster).expect("write volume");
    }
    file.flush().expect("flush volume");
}

#[test]
fn backup_incremental_verify_and_restore_of_a_million_clusters_stay_under_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (volume, target, restored) = (
        dir.path().join("volume.raw"),
        dir.path().join("target"),
        dir.path().join("restored.raw"),
    );
    let cluster = CLUSTER.to_string();
    let backup = |volume_name: &str, extra: &[&str]| {
        let mut args = vec![
            "backup",
            "-q",
            "--target",
            s(&target),
            "--volume",
            volume_name,
        ];
        args.extend_from_slice(extra);
        args.push(s(&volume));
        peak_kib(&args)
    };
    write_volume(&volume, CLUSTERS / 8, 0);
    let small = backup("small", &["--cluster-size", &cluster]);
    write_volume(&volume, CLUSTERS, 0);
    let full = backup("v", &["--cluster-size", &cluster]);
    eprintln!(
        "full backup: peak RSS {} MiB at {} clusters, {} MiB at {CLUSTERS}",
        small / 1024,
        CLUSTERS / 8,
        full / 1024
    );
    assert!(
        full < small + GROWTH_MIB * 1024,
        "the full backup's peak grew from {small} KiB at {} clusters to {full} KiB at {CLUSTERS}",
        CLUSTERS / 8
    );
    write_volume(&volume, CLUSTERS, 1);
    let incremental = backup("v", &[]);
    let verify = peak_kib(&["verify", "--target", s(&target), "--volume", "v"]);
    let restore = peak_kib(&[
        "restore",
        "-q",
        "--target",
        s(&target),
        "--volume",
        "v",
        s(&restored),
    ]);
    assert!(
        std::fs::read(&restored).expect("restored") == std::fs::read(&volume).expect("volume"),
        "the restore differs from the volume"
    );
    for (what, kib) in [
        ("full backup", full),
        ("incremental", incremental),
        ("verify", verify),
        ("restore", restore),
    ] {
        eprintln!("{what}: peak RSS {} MiB", kib / 1024);
        assert!(
            kib < BUDGET_MIB * 1024,
            "{what} of {CLUSTERS} clusters peaked at {kib} KiB, over the {BUDGET_MIB} MiB budget"
        );
    }
}
