//! Images written by strata's writer, read back by strata's reader; overlays written against
//! the reader's view of their backing chain.

mod writer_support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_qcow2::{Compat, ExtentKind, Image, WriterOptions, convert_raw_file};
use writer_support::{assert_check_clean, images_equal, random_bytes};

fn write_raw(path: &Path, bytes: &[u8]) {
    let file = File::create(path).unwrap();
    for (i, block) in bytes.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            file.write_all_at(block, (i * 4096) as u64).unwrap();
        }
    }
    file.set_len(bytes.len() as u64).unwrap();
}

fn read_all(image: &Image) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut out, 0).unwrap();
    out
}

fn volume(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    bytes[1000..300_000].copy_from_slice(&random_bytes(299_000, 11));
    bytes[len / 2..len / 2 + 70_000].fill(0x3c);
    let end = len - 777;
    bytes[end..].copy_from_slice(&random_bytes(777, 12));
    bytes
}

#[test]
fn every_option_reads_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = volume(3 << 20);
    let raw = dir.path().join("v.raw");
    write_raw(&raw, &bytes);
    for list in [
        "cluster_size=512",
        "compat=0.10",
        "cluster_size=2M",
        "cluster_size=4k,compression_type=zstd",
    ] {
        for compress in [false, true] {
            let mut options = WriterOptions::default();
            options.parse_qemu_options(list).unwrap();
            if compress {
                options.compress();
            }
            let image_path = dir.path().join("v.qcow2");
            convert_raw_file(&raw, &image_path, &options, None).unwrap();
            let image = Image::open(&image_path).unwrap();
            assert_eq!(image.virtual_size(), bytes.len() as u64);
            assert_eq!(image.cluster_size(), options.cluster_size);
            assert!(read_all(&image) == bytes, "{list} compress={compress}");
        }
    }
}

#[test]
fn overlays_against_the_readers_chain() {
    let dir = tempfile::tempdir().unwrap();
    let gen0 = volume(4 << 20);
    let mut gen1 = gen0.clone();
    gen1[0..65536].fill(0); // was data: must become a zero cluster
    gen1[2 << 20..(2 << 20) + 10].fill(9);
    let mut gen2 = gen1.clone();
    gen2[65536..131072].fill(0); // zeroed in gen2, data in gen0
    gen2[3 << 20] = 1;

    let mut backing: Option<String> = None;
    for (generation, bytes) in [gen0, gen1, gen2].iter().enumerate() {
        let raw = dir.path().join(format!("g{generation}.raw"));
        let path = dir.path().join(format!("g{generation}.qcow2"));
        write_raw(&raw, bytes);
        let mut options = WriterOptions::default();
        options.compat = Compat::V3;
        let summary = match &backing {
            None => convert_raw_file(&raw, &path, &options, None).unwrap(),
            Some(name) => {
                options.backing_file = Some(name.clone());
                let chain = Image::open(dir.path().join(name)).unwrap();
                convert_raw_file(&raw, &path, &options, Some(&chain)).unwrap()
            }
        };
        if generation > 0 {
            assert_eq!(
                (summary.data_clusters, summary.zero_clusters),
                (1, 1),
                "generation {generation}"
            );
        }
        assert_check_clean(&path);
        assert!(images_equal(&raw, "raw", &path, "qcow2"));
        let image = Image::open(&path).unwrap();
        assert!(read_all(&image) == *bytes, "generation {generation}");
        backing = Some(format!("g{generation}.qcow2"));
    }
    let top = Image::open(dir.path().join("g2.qcow2")).unwrap();
    let first = top.map(0, 65536).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].kind, ExtentKind::Zero { depth: 1 });
    let second = top.map(65536, 65536).unwrap();
    assert_eq!(second[0].kind, ExtentKind::Zero { depth: 0 });
}
