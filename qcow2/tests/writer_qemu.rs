//! Images written by strata, judged by qemu-img: `check` clean, `compare` equal to the source.

mod writer_support;

use std::path::Path;

use strata_qcow2::{
    Compat, CompressionType, MemorySink, WriteSummary, Writer, WriterOptions, convert_raw_file,
};
use writer_support::{Piece, assert_check_clean, images_equal, info, write_volume};

fn options(list: &str) -> WriterOptions {
    let mut options = WriterOptions::default();
    options.parse_qemu_options(list).unwrap();
    options
}

fn convert_and_verify(dir: &Path, pieces: &[Piece], options: &WriterOptions) -> WriteSummary {
    let raw = dir.join("volume.raw");
    let image = dir.join("volume.qcow2");
    write_volume(&raw, pieces);
    let summary = convert_raw_file(&raw, &image, options, None).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), summary.file_size);
    assert_check_clean(&image);
    assert!(
        images_equal(&raw, "raw", &image, "qcow2"),
        "{pieces:?} {options:?}"
    );
    summary
}

#[test]
fn sparse_volume_in_every_cluster_size_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let pieces = [
        Piece::Random {
            len: 70_000,
            seed: 1,
        },
        Piece::Hole { len: 3 << 20 },
        Piece::Zeros { len: 200_000 },
        Piece::Constant {
            len: 5000,
            byte: 0x5a,
        },
        Piece::Hole { len: 1 << 20 },
        Piece::Random {
            len: 2_100_000,
            seed: 2,
        },
        Piece::Constant { len: 777, byte: 1 },
    ];
    for bits in 9..=21 {
        for compat in ["0.10", "1.1"] {
            let options = options(&format!("cluster_size={},compat={compat}", 1u64 << bits));
            convert_and_verify(dir.path(), &pieces, &options);
        }
    }
}

#[test]
fn empty_and_all_hole_volumes() {
    let dir = tempfile::tempdir().unwrap();
    for pieces in [
        vec![],
        vec![Piece::Hole { len: 10 << 20 }],
        vec![Piece::Zeros { len: 1 << 20 }],
    ] {
        let size = convert_and_verify(dir.path(), &pieces, &WriterOptions::default()).file_size;
        assert!(
            size <= 4 * 65536,
            "an image without data holds only metadata: {size}"
        );
    }
}

#[test]
fn compressed_images_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let pieces = [
        Piece::Constant {
            len: 300_000,
            byte: 0x11,
        },
        Piece::Random {
            len: 100_000,
            seed: 3,
        },
        Piece::Hole { len: 1 << 20 },
        // Repeats further apart than a 4 KiB deflate window.
        Piece::Constant {
            len: 9000,
            byte: 0x22,
        },
        Piece::Random { len: 5000, seed: 4 },
        Piece::Constant {
            len: 9000,
            byte: 0x22,
        },
        Piece::Random { len: 5000, seed: 4 },
        Piece::Constant {
            len: 123,
            byte: 0x33,
        },
    ];
    for list in [
        "cluster_size=512",
        "cluster_size=4k,compat=0.10",
        "cluster_size=64k",
        "cluster_size=2M",
        "cluster_size=512,compression_type=zstd",
        "cluster_size=64k,compression_type=zstd",
        "cluster_size=2M,compression_type=zstd",
    ] {
        let mut options = options(list);
        options.compress();
        let compressed = convert_and_verify(dir.path(), &pieces, &options);
        let plain = convert_and_verify(dir.path(), &pieces, &self::options(list));
        assert!(compressed.compressed_clusters > 0, "{list}: {compressed:?}");
        assert_eq!(
            compressed.compressed_clusters + compressed.data_clusters,
            plain.data_clusters
        );
        assert!(
            compressed.file_size <= plain.file_size,
            "{list}: {compressed:?} vs {plain:?}"
        );
        let header = info(&dir.path().join("volume.qcow2"), false);
        let expected = if options.compression == Some(CompressionType::Zstd) {
            "zstd"
        } else {
            "zlib"
        };
        if options.compat == Compat::V3 {
            assert_eq!(
                header["format-specific"]["data"]["compression-type"], expected,
                "{list}"
            );
        }
    }
}

#[test]
fn multipart_header_padding_is_neither_leak_nor_error() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, min_header) in [(512u64, 5u64 << 20), (65536, 5 << 20), (65536, 1000)] {
        let mut options = WriterOptions::default();
        options.cluster_size = cluster;
        let mut writer = Writer::new(
            MemorySink::with_min_header_len(min_header),
            &options,
            8 << 20,
        )
        .unwrap();
        let data = writer_support::random_bytes(3 * cluster as usize, 9);
        writer.write_data(cluster, &data).unwrap();
        let (sink, summary) = writer.finish().unwrap();
        let bytes = sink.into_image().unwrap();
        assert_eq!(bytes.len() as u64, summary.file_size);
        let header_area = min_header.next_multiple_of(cluster).max(cluster);
        assert!(
            bytes[cluster as usize..header_area as usize]
                .iter()
                .all(|&b| b == 0)
        );
        let image = dir.path().join("multipart.qcow2");
        std::fs::write(&image, &bytes).unwrap();
        assert_check_clean(&image);
        let mut expected = vec![0u8; 8 << 20];
        expected[cluster as usize..4 * cluster as usize].copy_from_slice(&data);
        let raw = dir.path().join("expected.raw");
        std::fs::write(&raw, &expected).unwrap();
        assert!(images_equal(&raw, "raw", &image, "qcow2"));
    }
}

#[test]
fn huge_sparse_volume_costs_only_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("huge.raw");
    let image = dir.path().join("huge.qcow2");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(1 << 40).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        b"one tebibyte, almost empty",
        (1 << 40) - 100_000,
    )
    .unwrap();
    let summary = convert_raw_file(&raw, &image, &WriterOptions::default(), None).unwrap();
    assert_eq!(summary.data_clusters, 1);
    // Header, 1 data cluster, 1 L2 table, 1 L1 cluster, 1 refcount block, 1 refcount table.
    assert_eq!(summary.file_size, 6 * 65536);
    assert_check_clean(&image);
    let header = info(&image, false);
    assert_eq!(header["virtual-size"], 1u64 << 40);
}
