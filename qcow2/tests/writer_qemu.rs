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

/// Writes `clusters` 64 KiB clusters where every third is random and the others are text-like
/// (16 letters, about half compressible); returns the raw file's path.
fn interleaved_volume(dir: &Path, clusters: usize) -> std::path::PathBuf {
    let raw = dir.join("interleaved.raw");
    let mut bytes = writer_support::random_bytes(clusters * 65536, 7);
    for (i, cluster) in bytes.chunks_mut(65536).enumerate() {
        if i % 3 != 1 {
            for byte in cluster {
                *byte = b'a' + (*byte & 15);
            }
        }
    }
    std::fs::write(&raw, &bytes).unwrap();
    raw
}

/// The L2 entries of the image's first L2 table (64 KiB clusters).
fn l2_entries(image: &Path) -> Vec<u64> {
    let bytes = std::fs::read(image).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be64(40) as usize;
    let l2 = (be64(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (0..8192).map(|i| be64(l2 + i * 8)).collect()
}

#[test]
fn compressed_clusters_interleaved_with_raw_ones_are_packed_byte_adjacent() {
    let dir = tempfile::tempdir().unwrap();
    // 400 clusters: about 17 MiB compressed, so the tail is cut into several segments.
    let raw = interleaved_volume(dir.path(), 400);
    let image = dir.path().join("strata.qcow2");
    let mut options = options("compression_type=zstd");
    options.compress();
    let summary = convert_raw_file(&raw, &image, &options, None).unwrap();
    assert_eq!(summary.data_clusters, 133);
    assert_eq!(summary.compressed_clusters, 267);
    assert_check_clean(&image);
    assert!(images_equal(&raw, "raw", &image, "qcow2"));

    // Each compressed cluster starts in the sector where the one before it (in guest order,
    // a raw cluster between them) ends, except where the tail was cut into a new segment.
    let offset_bits = 62 - (16 - 8);
    let compressed: Vec<(u64, u64)> = l2_entries(&image)
        .into_iter()
        .filter(|entry| entry & (1 << 62) != 0)
        .map(|entry| {
            let offset = entry & ((1 << offset_bits) - 1);
            let extra = (entry >> offset_bits) & 0xff;
            (offset, extra)
        })
        .collect();
    assert_eq!(compressed.len(), 267);
    let adjacent = compressed
        .windows(2)
        .filter(|pair| pair[1].0 >> 9 == (pair[0].0 >> 9) + pair[0].1)
        .count();
    assert!(adjacent >= 266 - 8, "only {adjacent} of 266 pairs adjacent");

    // No larger than qemu-img's packing of the same volume.
    let theirs = dir.path().join("qemu.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .args(["-o", "compression_type=zstd"])
        .arg(&raw)
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success());
    let theirs = std::fs::metadata(&theirs).unwrap().len();
    assert!(
        summary.file_size <= theirs,
        "strata {} bytes, qemu-img {theirs}",
        summary.file_size
    );
}

#[test]
fn precompressed_clusters_are_stored_as_given() {
    use strata_qcow2::ClusterCompressor;
    let dir = tempfile::tempdir().unwrap();
    let raw = interleaved_volume(dir.path(), 30);
    let bytes = std::fs::read(&raw).unwrap();
    // As a backup does: compressed elsewhere, incompressible clusters written raw, the header
    // naming zstd without the writer compressing anything itself.
    let options = options("compression_type=zstd");
    let mut writer = Writer::new(MemorySink::new(), &options, bytes.len() as u64).unwrap();
    let mut compressor = ClusterCompressor::new(CompressionType::Zstd, Some(1), 65536).unwrap();
    for (i, cluster) in bytes.chunks(65536).enumerate() {
        let offset = i as u64 * 65536;
        match compressor.compress(cluster) {
            Some(packed) => writer.write_compressed(offset, packed).unwrap(),
            None => writer.write_data(offset, cluster).unwrap(),
        }
    }
    assert!(matches!(
        writer.write_compressed(30 * 65536, &[1, 2, 3]),
        Err(strata_qcow2::Error::BadRange { .. })
    ));
    let (sink, summary) = writer.finish().unwrap();
    assert_eq!(
        (summary.compressed_clusters, summary.data_clusters),
        (20, 10)
    );
    let image = dir.path().join("precompressed.qcow2");
    std::fs::write(&image, sink.image().unwrap()).unwrap();
    assert_check_clean(&image);
    assert!(images_equal(&raw, "raw", &image, "qcow2"));
    assert_eq!(
        info(&image, false)["format-specific"]["data"]["compression-type"],
        "zstd"
    );
}
