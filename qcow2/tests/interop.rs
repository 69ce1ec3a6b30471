//! Images made by the real qemu-img and qemu-io, hydrated by strata and compared byte for byte
//! with `qemu-img convert -O raw`.

mod common;

use common::{Scratch, patch};
use strata_qcow2::{BackingPolicy, ExtentKind, Image, OpenOptions};

/// Scattered writes, zero writes and discards, some unaligned, some crossing clusters.
const WORKLOAD: &[&str] = &[
    "write -P 0xab 0 100k",
    "write -P 0x11 1000k 5k",
    "write -P 0x22 3m 1m",
    "write -z 3200k 64k",
    "discard 3500k 128k",
    "write -P 0x33 7m 3k",
    "write -P 0x44 8388096 512",
];

#[test]
fn every_version_and_cluster_size() {
    let s = Scratch::new();
    for compat in ["0.10", "1.1"] {
        for cluster in [512, 4096, 65536, 2 << 20] {
            let name = format!("img-{compat}-{cluster}.qcow2");
            s.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cluster}"),
                &name,
                "8M",
            ]);
            s.qemu_io(&name, WORKLOAD);
            s.assert_hydrates_like_qemu(&name);
            let image = Image::open(s.path(&name)).expect("open");
            let info = &image.chain()[0];
            let q = info.qcow2.as_ref().expect("qcow2");
            assert_eq!(q.version, if compat == "1.1" { 3 } else { 2 });
            assert_eq!(q.cluster_size, cluster);
        }
    }
}

#[test]
fn a_size_that_is_not_whole_sectors_reads_as_qemu_reads_it() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "odd.qcow2", "1M"]);
    s.qemu_io("odd.qcow2", &["write -P 0x11 0 1M"]);
    // 100 bytes past the last whole sector: QEMU keeps whole sectors only.
    patch(
        &s.path("odd.qcow2"),
        24,
        &((1u64 << 20) + 100).to_be_bytes(),
    );
    let info = s.qemu_img(&["info", "--output=json", "odd.qcow2"]);
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
    assert_eq!(
        Image::open(s.path("odd.qcow2"))
            .expect("open")
            .virtual_size(),
        1 << 20
    );
    s.assert_hydrates_like_qemu("odd.qcow2");
}

#[test]
fn every_refcount_width() {
    let s = Scratch::new();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let name = format!("rc{bits}.qcow2");
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("refcount_bits={bits}"),
            &name,
            "8M",
        ]);
        s.qemu_io(&name, WORKLOAD);
        s.assert_hydrates_like_qemu(&name);
        let image = Image::open(s.path(&name)).expect("open");
        assert_eq!(
            image.chain()[0].qcow2.as_ref().map(|q| q.refcount_bits),
            Some(bits)
        );
    }
}

#[test]
fn zero_clusters_hide_the_backing_file() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_io("base.qcow2", &["write -P 0x5a 0 4M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    s.qemu_io(
        "top.qcow2",
        &["write -z 0 128k", "write -z 1m 4k", "discard 2m 64k"],
    );
    s.assert_hydrates_like_qemu("top.qcow2");
    let image = Image::open(s.path("top.qcow2")).expect("open");
    let mut buf = vec![0xffu8; 65536];
    image.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0), "zero cluster fell through");
    assert_eq!(
        image.map(0, 131072).expect("map")[0].kind,
        ExtentKind::Zero { depth: 0 }
    );
}

#[test]
fn compressed_clusters_zlib_and_zstd() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "src.raw", "4M"]);
    s.qemu_io(
        "src.raw",
        &[
            "write -P 0x61 0 1m",
            "write -P 0x62 1100k 300k",
            "write -P 0x63 3m 4k",
        ],
    );
    for (kind, cluster) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "4096"),
        ("zstd", "2M"),
    ] {
        let name = format!("c-{kind}-{cluster}.qcow2");
        s.qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={kind},cluster_size={cluster}"),
            "src.raw",
            &name,
        ]);
        s.assert_hydrates_like_qemu(&name);
        let image = Image::open(s.path(&name)).expect("open");
        let compressed = image
            .map(0, image.virtual_size())
            .expect("map")
            .iter()
            .any(|e| matches!(e.kind, ExtentKind::Compressed { .. }));
        assert!(compressed, "{name} has no compressed cluster");
    }
    // Compressed writes of single clusters through qemu-io, on top of plain data.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "w.qcow2", "4M"]);
    s.qemu_io(
        "w.qcow2",
        &["write -c -P 0x71 0 64k", "write -c -P 0x72 128k 64k"],
    );
    s.assert_hydrates_like_qemu("w.qcow2");
}

#[test]
fn extended_l2_subclusters() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    s.qemu_io("base.qcow2", &["write -P 0x42 0 8M"]);
    for cluster in ["16k", "128k", "2M"] {
        let name = format!("ext-{cluster}.qcow2");
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("extended_l2=on,cluster_size={cluster}"),
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &name,
        ]);
        s.qemu_io(
            &name,
            &[
                "write -P 0x01 0 4k",
                "write -P 0x02 70k 9k",
                "write -z 200k 8k",
                "write -z 1m 256k",
                "discard 3m 64k",
                "write -P 0x03 5m 100",
            ],
        );
        s.assert_hydrates_like_qemu(&name);
        let image = Image::open(s.path(&name)).expect("open");
        assert_eq!(
            image.chain()[0].qcow2.as_ref().map(|q| q.extended_l2),
            Some(true)
        );
    }
}

#[test]
fn chains_with_mixed_cluster_sizes_and_sizes() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "base.qcow2",
        "6M",
    ]);
    s.qemu_io("base.qcow2", &["write -P 0x10 0 6M"]);
    // A smaller overlay with small clusters, then a larger one with large clusters.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "5M",
    ]);
    s.qemu_io("mid.qcow2", &["write -P 0x20 4k 4k", "write -z 1m 12k"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1M",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "9M",
    ]);
    s.qemu_io("top.qcow2", &["write -P 0x30 2m 4k", "write -P 0x31 8m 1m"]);
    s.assert_hydrates_like_qemu("top.qcow2");
    let image = Image::open(s.path("top.qcow2")).expect("open");
    assert_eq!(image.depth(), 3);
    assert_eq!(image.virtual_size(), 9 << 20);
}

#[test]
fn raw_backing_files() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "3M"]);
    s.qemu_io("base.raw", &["write -P 0x77 0 3M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
        "4M",
    ]);
    s.qemu_io("top.qcow2", &["write -P 0x78 1m 64k", "write -z 2m 64k"]);
    s.assert_hydrates_like_qemu("top.qcow2");
    let image = Image::open(s.path("top.qcow2")).expect("open");
    assert_eq!(image.chain()[1].format, strata_qcow2::Format::Raw);
}

#[test]
fn backing_format_is_probed_when_absent() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "2M"]);
    s.qemu_io("base.qcow2", &["write -P 0x66 0 1M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    // Turn the backing-format extension into an unknown one: the name stays, the format must
    // be probed (qemu-img refuses to write such an image itself).
    let header = std::fs::read(s.path("top.qcow2")).expect("read");
    let at = header
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    common::patch(&s.path("top.qcow2"), at as u64, &[0x12, 0x34, 0x56, 0x78]);
    let image = Image::open(s.path("top.qcow2")).expect("open");
    assert_eq!(
        image.chain()[0]
            .qcow2
            .as_ref()
            .and_then(|q| q.backing_format.clone()),
        None
    );
    assert_eq!(image.chain()[1].format, strata_qcow2::Format::Qcow2);
    s.assert_hydrates_like_qemu("top.qcow2");
}

#[test]
fn relative_backing_names_in_subfolders() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("vol/old")).expect("mkdir");
    s.qemu_img(&["create", "-q", "-f", "qcow2", "vol/old/base.qcow2", "2M"]);
    s.qemu_io("vol/old/base.qcow2", &["write -P 0x01 0 2M"]);
    // mid lives in vol/old and names base relative to itself.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "vol/old/mid.qcow2",
    ]);
    s.qemu_io("vol/old/mid.qcow2", &["write -P 0x02 64k 64k"]);
    // top lives in vol and names mid through the subfolder.
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "old/mid.qcow2",
        "-F",
        "qcow2",
        "vol/top.qcow2",
    ]);
    s.qemu_io("vol/top.qcow2", &["write -P 0x03 128k 64k"]);
    s.assert_hydrates_like_qemu("vol/top.qcow2");
    let image = Image::open(s.path("vol/top.qcow2")).expect("open");
    let names: Vec<_> = image.chain().iter().map(|l| l.name.clone()).collect();
    assert!(names[2].ends_with("vol/old/base.qcow2"), "{names:?}");
}

#[test]
fn internal_snapshot_and_bitmap_are_ignored() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    s.qemu_io("img.qcow2", &["write -P 0x01 0 1M"]);
    s.qemu_img(&["snapshot", "-c", "snap1", "img.qcow2"]);
    s.qemu_io("img.qcow2", &["write -P 0x02 512k 1M"]);
    s.qemu_img(&["bitmap", "--add", "img.qcow2", "bm0"]);
    s.qemu_io("img.qcow2", &["write -P 0x03 3m 64k"]);
    s.assert_hydrates_like_qemu("img.qcow2");
    let image = Image::open(s.path("img.qcow2")).expect("open");
    let q = image.chain()[0].qcow2.clone().expect("qcow2");
    assert_eq!(q.snapshots, 1);
    assert!(q.bitmaps);
}

#[test]
fn dirty_image_with_lazy_refcounts_reads() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "img.qcow2",
        "4M",
    ]);
    // `abort` ends qemu-io without closing the image: the dirty bit stays set.
    let status = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x4d 0 200k", "-c", "abort", "img.qcow2"])
        .current_dir(s.dir())
        .output()
        .expect("qemu-io");
    assert!(
        !status.status.success(),
        "abort should end qemu-io abnormally"
    );
    let image = Image::open(s.path("img.qcow2")).expect("open dirty image");
    let q = image.chain()[0].qcow2.clone().expect("qcow2");
    assert!(q.dirty && q.lazy_refcounts);
    let mut buf = vec![0u8; 200 << 10];
    image.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0x4d));
}

#[test]
fn external_data_file() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data",
        "img.qcow2",
        "4M",
    ]);
    s.qemu_io("img.qcow2", &["write -P 0x44 64k 200k", "write -z 1m 64k"]);
    s.assert_hydrates_like_qemu("img.qcow2");
    let image = Image::open(s.path("img.qcow2")).expect("open");
    let data_file = image.chain()[0].qcow2.clone().and_then(|q| q.data_file);
    assert!(data_file.is_some_and(|d| d.ends_with("img.data")));
}

#[test]
fn absolute_backing_paths_need_the_permissive_policy() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    let base = base.to_str().expect("utf-8");
    s.qemu_img(&["create", "-q", "-f", "qcow2", base, "1M"]);
    s.qemu_io(base, &["write -P 0x09 0 64k"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base,
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    assert!(matches!(
        Image::open(s.path("top.qcow2")),
        Err(strata_qcow2::Error::PathRefused { .. })
    ));
    let options = OpenOptions {
        policy: BackingPolicy::Permissive,
        ..OpenOptions::default()
    };
    s.assert_hydrates_like_qemu_with("top.qcow2", &options);
}

#[test]
fn hydration_of_a_huge_sparse_image_is_fast_and_sparse() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "big.qcow2", "64G"]);
    s.qemu_io(
        "big.qcow2",
        &["write -P 0x01 0 512k", "write -P 0x02 40G 512k"],
    );
    let image = Image::open(s.path("big.qcow2")).expect("open");
    let out = s.path("big.raw");
    let dest = std::fs::File::create(&out).expect("create");
    let started = std::time::Instant::now();
    let stats = strata_qcow2::hydrate(&image, &dest, "big.raw").expect("hydrate");
    let took = started.elapsed();
    assert_eq!(stats.data_bytes, 1 << 20);
    assert!(
        took.as_secs_f64() < 1.0,
        "64 GiB sparse hydration took {took:?}"
    );
    let meta = std::fs::metadata(&out).expect("stat");
    assert_eq!(meta.len(), 64 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "output is not sparse: {} blocks",
        meta.blocks()
    );
}

#[test]
fn scattered_runs_of_a_chain_hydrate_in_place_sparse_and_in_order() {
    // Three layers of 64 KiB runs spread over 256 MiB, each layer's runs between the others',
    // some of them all zeros inside data clusters.
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "0.qcow2", "256M"]);
    let mut data_runs = 0u64;
    for layer in 0..3u64 {
        let name = format!("{layer}.qcow2");
        if layer > 0 {
            s.overlay(&name, &format!("{}.qcow2", layer - 1));
        }
        let writes: Vec<String> = (0..120u64)
            .map(|r| {
                let offset = (r * 3 + layer) * (704 << 10);
                match r % 10 {
                    // Written zeros are stored as data by `write -P 0`.
                    9 => format!("write -P 0 {offset} 64k"),
                    _ => {
                        data_runs += 1;
                        format!("write -P {} {offset} 64k", (layer * 40 + r) % 250 + 1)
                    }
                }
            })
            .collect();
        let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
        s.qemu_io(&name, &writes);
    }
    s.qemu_img(&["convert", "-O", "raw", "2.qcow2", "expected.raw"]);
    let image = Image::open(s.path("2.qcow2")).expect("open");
    let out = s.path("out.raw");
    let dest = std::fs::File::create(&out).expect("create");
    let mut reached = Vec::new();
    strata_qcow2::hydrate_with_progress(&image, &dest, "out.raw", &mut |at| reached.push(at))
        .expect("hydrate");
    assert!(
        std::fs::read(&out).expect("read") == std::fs::read(s.path("expected.raw")).expect("read"),
        "the hydrated file differs from qemu-img's"
    );
    // Only the non-zero runs take blocks (a little more for the file system's own).
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&out).expect("stat").blocks() * 512;
    assert!(
        blocks >= data_runs * (64 << 10) && blocks < data_runs * (64 << 10) + (1 << 20),
        "{blocks} bytes allocated for {data_runs} runs of 64 KiB"
    );
    assert!(
        reached.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {reached:?}"
    );
    assert_eq!(reached.last(), Some(&(256 << 20)));
}
