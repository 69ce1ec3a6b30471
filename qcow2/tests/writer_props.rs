//! Property: any volume, in any cluster size and version, converts into an image that
//! `qemu-img check` finds clean and `qemu-img compare` finds equal to the volume.

mod writer_support;

use proptest::prelude::*;
use strata_qcow2::{Compat, RawBacking, WriterOptions, convert_raw_file};
use writer_support::{Piece, assert_check_clean, images_equal, random_bytes, write_volume};

fn piece() -> impl Strategy<Value = Piece> {
    // Lengths mostly unaligned, from a few bytes to a few clusters of 64 KiB.
    let len = prop_oneof![1u64..2048, 2048u64..200_000];
    prop_oneof![
        (len.clone(), any::<u64>()).prop_map(|(len, seed)| Piece::Random { len, seed }),
        (len.clone(), 1u8..=255).prop_map(|(len, byte)| Piece::Constant { len, byte }),
        len.clone().prop_map(|len| Piece::Zeros { len }),
        len.prop_map(|len| Piece::Hole { len }),
    ]
}

fn options() -> impl Strategy<Value = WriterOptions> {
    (
        prop::sample::select(vec![512u64, 4096, 65536, 1 << 21]),
        any::<bool>(),
        0u8..4,
    )
        .prop_map(|(cluster_size, v2, compression)| {
            let mut options = WriterOptions::default();
            options.cluster_size = cluster_size;
            options.compat = if v2 { Compat::V2 } else { Compat::V3 };
            match compression {
                1 => options.compress(),
                2 if !v2 => {
                    options.parse_qemu_options("compression_type=zstd").unwrap();
                    options.compress();
                }
                _ => {}
            }
            options
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_volume_converts_clean_and_equal(pieces in prop::collection::vec(piece(), 0..12), options in options()) {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("volume.raw");
        let image = dir.path().join("volume.qcow2");
        write_volume(&raw, &pieces);
        let summary = convert_raw_file(&raw, &image, &options, None).unwrap();
        prop_assert_eq!(std::fs::metadata(&image).unwrap().len(), summary.file_size);
        assert_check_clean(&image);
        prop_assert!(images_equal(&raw, "raw", &image, "qcow2"));
        // Nothing is stored for zeros or holes: at most one stored cluster per cluster of
        // non-zero input.
        let cluster = options.cluster_size;
        let nonzero: u64 = pieces.iter().map(|p| match p {
            Piece::Random { len, .. } | Piece::Constant { len, .. } => len.div_ceil(cluster) + 1,
            _ => 0,
        }).sum();
        prop_assert!(summary.data_clusters + summary.compressed_clusters <= nonzero);
    }
}

/// A change between two backups: bytes at `offset` (a fraction of the volume) become random,
/// zero or a constant.
#[derive(Debug, Clone)]
struct Change {
    at: f64,
    len: usize,
    byte: Option<u8>,
    seed: u64,
}

fn change() -> impl Strategy<Value = Change> {
    (
        0.0..1.0f64,
        1usize..150_000,
        prop::option::of(0u8..3),
        any::<u64>(),
    )
        .prop_map(|(at, len, byte, seed)| Change {
            at,
            len,
            byte,
            seed,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn every_overlay_reads_as_the_new_volume(
        pieces in prop::collection::vec(piece(), 1..8),
        changes in prop::collection::vec(change(), 0..6),
        grow in 0u64..100_000,
        options in options(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let old_raw = dir.path().join("old.raw");
        let size = write_volume(&old_raw, &pieces);
        let old = std::fs::read(&old_raw).unwrap();
        let mut new = old.clone();
        new.resize((size + grow) as usize, 0);
        for change in &changes {
            let start = (change.at * new.len() as f64) as usize;
            let end = (start + change.len).min(new.len());
            match change.byte {
                Some(byte) => new[start..end].fill(byte),
                None => new[start..end].copy_from_slice(&random_bytes(end - start, change.seed)),
            }
        }
        let new_raw = dir.path().join("new.raw");
        std::fs::write(&new_raw, &new).unwrap();

        let base = dir.path().join("old.qcow2");
        convert_raw_file(&old_raw, &base, &options, None).unwrap();
        let mut overlay_options = options.clone();
        overlay_options.backing_file = Some("old.qcow2".to_owned());
        let overlay = dir.path().join("new.qcow2");
        let summary = convert_raw_file(&new_raw, &overlay, &overlay_options, Some(&RawBacking(old))).unwrap();
        assert_check_clean(&overlay);
        prop_assert!(images_equal(&new_raw, "raw", &overlay, "qcow2"));
        // Only changed clusters are stored: each change touches at most len/cluster + 2.
        let cluster = options.cluster_size as usize;
        let bound: usize = changes.iter().map(|c| c.len / cluster + 2).sum::<usize>() + (grow as usize).div_ceil(cluster) + 1;
        prop_assert!((summary.data_clusters + summary.compressed_clusters + summary.zero_clusters) as usize <= bound);
        if options.compat == Compat::V2 {
            prop_assert_eq!(summary.zero_clusters, 0);
        }
    }
}
