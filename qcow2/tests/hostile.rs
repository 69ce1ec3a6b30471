//! Hostile images: each ends in its specific error, never a panic or a huge allocation.

mod common;

use common::{Scratch, be64, first_l2_entry, hand_header, patch};
use strata_qcow2::{BackingPolicy, Error, Image, OpenOptions, hydrate};

/// A small valid v3 image with data in its first cluster.
fn valid(s: &Scratch, name: &str) -> std::path::PathBuf {
    s.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
    s.qemu_io(name, &["write -P 0x5c 0 128k"]);
    s.path(name)
}

fn corrupt_what(result: Result<Image, Error>) -> String {
    match result {
        Err(Error::Corrupt { what, .. }) => what,
        Err(other) => panic!("expected a Corrupt error, got {other}"),
        Ok(_) => panic!("expected a Corrupt error, the image opened"),
    }
}

/// Reads the whole virtual disk and returns the error it ends in.
fn read_error(image: &Image) -> Error {
    let out = tempfile::tempfile().expect("temp file");
    match hydrate(image, &out, "out") {
        Err(e) => e,
        Ok(_) => panic!("reading the image succeeded"),
    }
}

#[test]
fn truncated_header() {
    let s = Scratch::new();
    let path = valid(&s, "t.qcow2");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..50]).expect("truncate");
    assert!(corrupt_what(Image::open(&path)).contains("truncated"));
    std::fs::write(&path, &bytes[..2]).expect("truncate");
    // Two bytes cannot hold the magic: the image is probed as raw and opens as a raw image.
    let image = Image::open(&path).expect("a 2-byte file is a raw image");
    assert_eq!(image.virtual_size(), 2);
}

#[test]
fn not_qcow2_when_the_format_is_forced() {
    let s = Scratch::new();
    std::fs::write(s.path("x.raw"), vec![7u8; 4096]).expect("write");
    let options = OpenOptions {
        format: Some(strata_qcow2::Format::Qcow2),
        ..OpenOptions::default()
    };
    assert!(matches!(
        Image::open_with_options(s.path("x.raw"), &options),
        Err(Error::NotQcow2 { .. })
    ));
}

#[test]
fn bad_version() {
    let s = Scratch::new();
    let path = valid(&s, "v.qcow2");
    patch(&path, 4, &4u32.to_be_bytes());
    match Image::open(&path) {
        Err(Error::Unsupported { feature, .. }) => assert!(feature.contains("version 4")),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn cluster_bits_out_of_range() {
    let s = Scratch::new();
    for bits in [8u32, 22, 63, 0xffff_ffff] {
        let path = valid(&s, &format!("c{bits}.qcow2"));
        patch(&path, 20, &bits.to_be_bytes());
        assert!(
            corrupt_what(Image::open(&path)).contains("cluster_bits"),
            "bits {bits}"
        );
    }
}

#[test]
fn giant_l1_table() {
    let s = Scratch::new();
    let path = valid(&s, "l1.qcow2");
    patch(&path, 36, &0x1000_0000u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("32 MiB cap"));
    // Within the cap but larger than the file: refused before allocating.
    patch(&path, 36, &0x0040_0000u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("past the end of the file"));
}

#[test]
fn l1_too_small_for_the_virtual_size() {
    let s = Scratch::new();
    let path = valid(&s, "small.qcow2");
    patch(&path, 24, &(1u64 << 50).to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("too small for the virtual size"));
}

#[test]
fn unaligned_tables() {
    let s = Scratch::new();
    let path = valid(&s, "l1.qcow2");
    let l1 = be64(&path, 40);
    patch(&path, 40, &(l1 + 8).to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("not cluster-aligned"));

    let path = valid(&s, "rc.qcow2");
    let rc = be64(&path, 48);
    patch(&path, 48, &(rc + 512).to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("refcount table offset"));

    // An L1 entry naming an unaligned L2 table fails at read time.
    let path = valid(&s, "l2.qcow2");
    let l1 = be64(&path, 40);
    let entry = be64(&path, l1);
    patch(&path, l1, &(entry + 512).to_be_bytes());
    let image = Image::open(&path).expect("opens: the L2 table is read lazily");
    match read_error(&image) {
        Error::Corrupt { what, offset, .. } => {
            assert!(what.contains("not cluster-aligned"), "{what}");
            assert_eq!(offset, l1);
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_chain_whose_l1_tables_pass_64_mib_is_refused() {
    // Three images of 2 MiB clusters whose virtual size (2^61) needs a full 32 MiB L1 table
    // each, in sparse files: the first two fill the chain's 64 MiB, the third is refused.
    let s = Scratch::new();
    let l1_entries = 4u32 << 20;
    for i in 0..3 {
        let next = format!("l{}", i + 1);
        let backing = (i < 2).then_some(next.as_str());
        let file = std::fs::File::create(s.path(&format!("l{i}"))).unwrap();
        file.set_len((2 << 20) + u64::from(l1_entries) * 8).unwrap();
        let header = hand_header(21, 1 << 61, l1_entries, 2 << 20, 0, backing);
        std::os::unix::fs::FileExt::write_all_at(&file, &header, 0).unwrap();
    }
    match Image::open(s.path("l0")) {
        Err(Error::Unsupported { image, feature }) => {
            assert!(image.ends_with("l2"), "{image}");
            assert_eq!(
                feature,
                "an L1 table of 33554432 bytes, past the chain's limit of 64 MiB of L1 tables"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn giant_refcount_table() {
    let s = Scratch::new();
    let path = valid(&s, "rc.qcow2");
    patch(&path, 56, &1000u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("8 MiB cap"));
}

#[test]
fn entries_past_the_end_of_the_file() {
    let s = Scratch::new();
    // An L2 entry pointing far past the end.
    let path = valid(&s, "data.qcow2");
    let entry_at = first_l2_entry(&path);
    patch(
        &path,
        entry_at,
        &((1u64 << 63) | (1u64 << 40)).to_be_bytes(),
    );
    let image = Image::open(&path).expect("open");
    match read_error(&image) {
        Error::Corrupt { what, offset, .. } => {
            assert!(what.contains("past the end of the image file"), "{what}");
            assert_eq!(offset, entry_at);
        }
        other => panic!("unexpected {other}"),
    }
    // An L1 entry pointing past the end.
    let path = valid(&s, "l2.qcow2");
    let l1 = be64(&path, 40);
    patch(&path, l1, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let image = Image::open(&path).expect("open");
    match read_error(&image) {
        Error::Corrupt { what, .. } => assert!(what.contains("L2 table"), "{what}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn reserved_bits_in_entries() {
    let s = Scratch::new();
    let path = valid(&s, "r.qcow2");
    let entry_at = first_l2_entry(&path);
    let entry = be64(&path, entry_at);
    patch(&path, entry_at, &(entry | 1 << 58).to_be_bytes());
    let image = Image::open(&path).expect("open");
    match read_error(&image) {
        Error::Corrupt { what, .. } => assert!(what.contains("reserved bits"), "{what}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn unknown_incompatible_bits_are_named() {
    let s = Scratch::new();
    let path = valid(&s, "u.qcow2");
    patch(&path, 72, &(1u64 << 7 | 1 << 40).to_be_bytes());
    match Image::open(&path) {
        Err(Error::UnknownIncompatibleFeatures { bits, names, .. }) => {
            assert_eq!(bits, 1 << 7 | 1 << 40);
            assert_eq!(names, "bit 7, bit 40");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn control_characters_from_the_image_are_escaped_in_error_messages() {
    let s = Scratch::new();
    // An unknown incompatible bit (20) named, in the feature name table, by a string that
    // would return the cursor, clear the line and print a green "OK".
    let mut h = hand_header(16, 0, 0, 0, 1 << 20, None);
    h[104..108].copy_from_slice(&0x6803_f857u32.to_be_bytes());
    h[108..112].copy_from_slice(&48u32.to_be_bytes());
    h[113] = 20;
    let name = b"x\r\x1b[2K\x1b[32mOK: restore complete\x1b[0m";
    h[114..114 + name.len()].copy_from_slice(name);
    std::fs::write(s.path("f"), &h).unwrap();
    let err = Image::open(s.path("f")).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownIncompatibleFeatures { names, .. } if names.contains('\r')),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(r"'x\r\u{1b}[2K\u{1b}[32mOK: restore complete\u{1b}[0m'"),
        "{err}"
    );
    // A backing name with the same trick; the lower layer does not exist.
    std::fs::write(
        s.path("t"),
        hand_header(16, 0, 0, 0, 0, Some("b\r\x1b[2KOK")),
    )
    .unwrap();
    let err = Image::open(s.path("t")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(r"b\r\u{1b}[2KOK: I/O error while opening"),
        "{err}"
    );
}

#[test]
fn backing_loops() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    s.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    s.qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    assert!(matches!(
        Image::open(s.path("b.qcow2")),
        Err(Error::BackingLoop { .. })
    ));
    s.qemu_img(&["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    s.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "./self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    assert!(matches!(
        Image::open(s.path("self.qcow2")),
        Err(Error::BackingLoop { .. })
    ));
}

#[test]
fn chains_deeper_than_the_limit() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "0.qcow2", "1M"]);
    for i in 1..6 {
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &format!("{}.qcow2", i - 1),
            "-F",
            "qcow2",
            &format!("{i}.qcow2"),
        ]);
    }
    let options = OpenOptions {
        max_depth: 4,
        ..OpenOptions::default()
    };
    assert!(matches!(
        Image::open_with_options(s.path("5.qcow2"), &options),
        Err(Error::ChainTooDeep { limit: 4, .. })
    ));
    assert_eq!(
        Image::open(s.path("5.qcow2"))
            .expect("default limit")
            .depth(),
        6
    );
}

#[test]
fn absolute_and_climbing_backing_paths() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("vol")).expect("mkdir");
    s.qemu_img(&["create", "-q", "-f", "qcow2", "outside.qcow2", "1M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../outside.qcow2",
        "-F",
        "qcow2",
        "vol/climb.qcow2",
    ]);
    let abs = s.path("outside.qcow2");
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        abs.to_str().expect("utf-8"),
        "-F",
        "qcow2",
        "vol/abs.qcow2",
    ]);
    for name in ["vol/climb.qcow2", "vol/abs.qcow2"] {
        match Image::open(s.path(name)) {
            Err(Error::PathRefused { reason, .. }) => {
                assert!(
                    reason.contains("climbs out") || reason.contains("absolute"),
                    "{reason}"
                );
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
        let permissive = OpenOptions {
            policy: BackingPolicy::Permissive,
            ..OpenOptions::default()
        };
        assert_eq!(
            Image::open_with_options(s.path(name), &permissive)
                .expect("trusted")
                .depth(),
            2
        );
    }
}

#[test]
fn backing_names_that_lead_out_through_a_symbolic_link_are_refused() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("vol")).expect("mkdir");
    std::fs::create_dir(s.path("elsewhere")).expect("mkdir");
    s.qemu_img(&["create", "-q", "-f", "qcow2", "elsewhere/base.qcow2", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "vol/inside.qcow2", "1M"]);
    // A link to a folder outside, a link to a file outside, and a link that stays inside.
    std::os::unix::fs::symlink(s.path("elsewhere"), s.path("vol/dir")).expect("symlink");
    std::os::unix::fs::symlink(s.path("elsewhere/base.qcow2"), s.path("vol/file.qcow2"))
        .expect("symlink");
    std::os::unix::fs::symlink("inside.qcow2", s.path("vol/alias.qcow2")).expect("symlink");
    for (top, backing) in [
        ("vol/through-dir.qcow2", "dir/base.qcow2"),
        ("vol/through-file.qcow2", "file.qcow2"),
        ("vol/through-alias.qcow2", "alias.qcow2"),
    ] {
        s.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", top,
        ]);
    }
    for top in ["vol/through-dir.qcow2", "vol/through-file.qcow2"] {
        match Image::open(s.path(top)) {
            Err(Error::PathRefused { reason, .. }) => {
                assert!(reason.contains("symbolic link"), "{top}: {reason}");
            }
            other => panic!("{top}: unexpected {other:?}"),
        }
        let permissive = OpenOptions {
            policy: BackingPolicy::Permissive,
            ..OpenOptions::default()
        };
        let trusted = Image::open_with_options(s.path(top), &permissive).expect("trusted");
        assert_eq!(trusted.depth(), 2);
    }
    let inside = Image::open(s.path("vol/through-alias.qcow2")).expect("a link inside");
    assert_eq!(inside.depth(), 2);
}

#[test]
fn encrypted_images_are_refused() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "luks.qcow2",
        "1M",
    ]);
    match Image::open(s.path("luks.qcow2")) {
        Err(e @ Error::Encrypted { method: "LUKS", .. }) => {
            assert!(e.to_string().contains("encrypted"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let path = valid(&s, "aes.qcow2");
    patch(&path, 32, &1u32.to_be_bytes());
    assert!(matches!(
        Image::open(&path),
        Err(Error::Encrypted { method: "AES", .. })
    ));
}

#[test]
fn corrupt_deflate_data() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "z.qcow2", "1M"]);
    s.qemu_io("z.qcow2", &["write -c -P 0x31 0 64k"]);
    let entry_at = first_l2_entry(&s.path("z.qcow2"));
    let entry = be64(&s.path("z.qcow2"), entry_at);
    assert!(entry & (1 << 62) != 0, "the cluster is compressed");
    let host = entry & ((1u64 << 54) - 1);
    patch(&s.path("z.qcow2"), host, &[0xff; 16]);
    let image = Image::open(s.path("z.qcow2")).expect("open");
    match read_error(&image) {
        Error::Corrupt { what, offset, .. } => {
            assert!(what.contains("compressed cluster"), "{what}");
            assert_eq!(offset, host);
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_zstd_cluster_asking_for_a_128_mib_window_is_corrupt() {
    let s = Scratch::new();
    std::fs::write(s.path("a.raw"), vec![0x41; 65536]).expect("write");
    s.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "a.raw",
        "z.qcow2",
    ]);
    let entry = be64(&s.path("z.qcow2"), first_l2_entry(&s.path("z.qcow2")));
    assert!(entry & (1 << 62) != 0, "the cluster is compressed");
    let host = entry & ((1u64 << 54) - 1);
    // The same 64 KiB of 'A' as one RLE block, in a frame declaring a 2^27-byte window.
    let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x88, 0x03, 0x00, 0x08, 0x41];
    patch(&s.path("z.qcow2"), host, &frame);
    let image = Image::open(s.path("z.qcow2")).expect("open");
    match read_error(&image) {
        Error::Corrupt { what, offset, .. } => {
            assert!(
                what.contains("compressed cluster: zstd data is invalid"),
                "{what}"
            );
            assert_eq!(offset, host);
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn backing_name_outside_the_first_cluster() {
    let s = Scratch::new();
    let path = valid(&s, "b.qcow2");
    patch(&path, 8, &0x1_0000u64.to_be_bytes());
    patch(&path, 16, &10u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("backing file name"));
    patch(&path, 16, &5000u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("longer than 1023"));
    // An offset so large that offset + size wraps around to a small end (found by the
    // open_image fuzz target: it panicked, slicing from the offset to the wrapped end).
    patch(&path, 8, &0xffff_ffff_ffff_ff1fu64.to_be_bytes());
    patch(&path, 16, &0x200u32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("outside the first cluster"));
}

#[test]
fn header_extension_running_past_the_cluster() {
    let s = Scratch::new();
    let path = valid(&s, "e.qcow2");
    let len = u64::from(u32::from_be_bytes(
        std::fs::read(&path).expect("read")[100..104]
            .try_into()
            .expect("4 bytes"),
    ));
    patch(&path, len, &0x1234_5678u32.to_be_bytes());
    patch(&path, len + 4, &0x00ff_ffffu32.to_be_bytes());
    assert!(corrupt_what(Image::open(&path)).contains("header extension"));
}

#[test]
fn reads_outside_the_virtual_disk() {
    let s = Scratch::new();
    let image = Image::open(valid(&s, "o.qcow2")).expect("open");
    let mut buf = [0u8; 16];
    assert!(matches!(
        image.read_at(&mut buf, (4 << 20) - 8),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        image.read_at(&mut buf, u64::MAX - 4),
        Err(Error::OutOfRange { .. })
    ));
}
