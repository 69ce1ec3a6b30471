//! Backup chains written by strata: a base and two overlays, each overlay holding only the
//! clusters that changed, followed through the chain by qemu-img.

mod writer_support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_qcow2::{Compat, RawBacking, WriteSummary, WriterOptions, convert_raw_file};
use writer_support::{assert_check_clean, images_equal, info, random_bytes};

const CLUSTER: usize = 65536;

/// Writes `bytes` as a sparse raw file: 4 KiB blocks of zeros become holes.
fn write_sparse(path: &Path, bytes: &[u8]) {
    let file = File::create(path).unwrap();
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            file.write_all_at(block, (i * 4096) as u64).unwrap();
        }
    }
    file.set_len(bytes.len() as u64).unwrap();
}

/// Changed clusters of `new` against `old` (zero past `old`'s end): (now data, now zero).
fn changed_clusters(old: &[u8], new: &[u8]) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    for (i, now) in new.chunks(CLUSTER).enumerate() {
        let start = i * CLUSTER;
        let mut before = vec![0u8; now.len()];
        if start < old.len() {
            let end = (start + now.len()).min(old.len());
            before[..end - start].copy_from_slice(&old[start..end]);
        }
        if now != before.as_slice() {
            if now.iter().all(|&b| b == 0) {
                zero += 1
            } else {
                data += 1
            }
        }
    }
    (data, zero)
}

fn generations() -> Vec<Vec<u8>> {
    // Generation 0: 8 MiB with data in its first and last quarter.
    let mut gen0 = vec![0u8; 8 << 20];
    gen0[..2 << 20].copy_from_slice(&random_bytes(2 << 20, 1));
    gen0[6 << 20..].fill(0x77);
    // Generation 1: a few clusters rewritten, one byte flipped, a data range zeroed.
    let mut gen1 = gen0.clone();
    gen1[3 * CLUSTER..5 * CLUSTER].copy_from_slice(&random_bytes(2 * CLUSTER, 2));
    gen1[(4 << 20) + 12345] = 1;
    gen1[(6 << 20) + 100..(6 << 20) + 3 * CLUSTER + 100].fill(0);
    // Generation 2: grown by 1 MiB and a short tail, first cluster zeroed, new data at the end.
    let mut gen2 = gen1.clone();
    gen2.resize((9 << 20) + 1000, 0);
    gen2[..CLUSTER].fill(0);
    let tail = gen2.len() - 5000;
    gen2[tail..].copy_from_slice(&random_bytes(5000, 3));
    vec![gen0, gen1, gen2]
}

fn write_chain(dir: &Path, compat: Compat) -> Vec<WriteSummary> {
    let volumes = generations();
    let mut summaries = Vec::new();
    for (generation, volume) in volumes.iter().enumerate() {
        let raw = dir.join(format!("gen{generation}.raw"));
        let image = dir.join(format!("gen{generation}.qcow2"));
        write_sparse(&raw, volume);
        let mut options = WriterOptions::default();
        options.compat = compat;
        let summary = if generation == 0 {
            convert_raw_file(&raw, &image, &options, None).unwrap()
        } else {
            options.backing_file = Some(format!("gen{}.qcow2", generation - 1));
            let backing = RawBacking(volumes[generation - 1].clone());
            convert_raw_file(&raw, &image, &options, Some(&backing)).unwrap()
        };
        assert_check_clean(&image);
        assert!(
            images_equal(&raw, "raw", &image, "qcow2"),
            "generation {generation}, {compat:?}"
        );
        summaries.push(summary);
    }
    summaries
}

#[test]
fn three_generation_chain_v3_holds_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let summaries = write_chain(dir.path(), Compat::V3);
    let volumes = generations();
    for generation in 1..3 {
        let (data, zero) = changed_clusters(&volumes[generation - 1], &volumes[generation]);
        let summary = summaries[generation];
        assert_eq!(summary.data_clusters, data, "generation {generation}");
        assert_eq!(summary.zero_clusters, zero, "generation {generation}");
        // Header, data, then one L2 table, one L1 cluster, one refcount block and table.
        assert_eq!(
            summary.file_size,
            (1 + data + 4) * CLUSTER as u64,
            "generation {generation}"
        );
    }
    let chain = info(&dir.path().join("gen2.qcow2"), true);
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0]["backing-filename"], "gen1.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[0]["virtual-size"], (9u64 << 20) + 1024);
    assert_eq!(chain[1]["backing-filename"], "gen0.qcow2");
    assert!(chain[2].get("backing-filename").is_none());
}

#[test]
fn three_generation_chain_v2_stores_zeroed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let summaries = write_chain(dir.path(), Compat::V2);
    let volumes = generations();
    for generation in 1..3 {
        let (data, zero) = changed_clusters(&volumes[generation - 1], &volumes[generation]);
        assert_eq!(summaries[generation].data_clusters, data + zero);
        assert_eq!(summaries[generation].zero_clusters, 0);
    }
    let header = info(&dir.path().join("gen1.qcow2"), false);
    assert_eq!(header["format-specific"]["data"]["compat"], "0.10");
}

#[test]
fn unchanged_volume_gives_an_overlay_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let volume = generations().swap_remove(0);
    let raw = dir.path().join("same.raw");
    write_sparse(&raw, &volume);
    convert_raw_file(
        &raw,
        &dir.path().join("base.qcow2"),
        &WriterOptions::default(),
        None,
    )
    .unwrap();
    let mut options = WriterOptions::default();
    options.backing_file = Some("base.qcow2".to_owned());
    let image = dir.path().join("same.qcow2");
    let summary = convert_raw_file(&raw, &image, &options, Some(&RawBacking(volume))).unwrap();
    assert_eq!((summary.data_clusters, summary.zero_clusters), (0, 0));
    assert_check_clean(&image);
    assert!(images_equal(&raw, "raw", &image, "qcow2"));
}
