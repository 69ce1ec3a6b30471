//! Hydration onto a real block device (a loop device over a file): zero ranges are zeroed with
//! `fallocate` instead of data writes, the result reads exactly as `qemu-img convert` makes it,
//! and `target_is_zero` leaves zero ranges alone.
//!
//! Needs root for `losetup`; without it the test says so and passes, except under `CI`, where
//! it fails (CI runs as root and must run it).

mod common;
#[path = "common/loop_device.rs"]
mod loop_device;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::Scratch;
use loop_device::Loop;
use strata_qcow2::{DeviceWriter, HydrateOptions, Image, hydrate_with};

const SIZE: u64 = 64 << 20;

/// A two-image chain: 8 MiB of data in the base, an overlay that zeroes part of it, rewrites
/// some, and leaves 56 MiB never written.
fn chain(s: &Scratch) -> String {
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    s.qemu_io("base.qcow2", &["write -P 0x5a 0 8M"]);
    s.overlay("top.qcow2", "base.qcow2");
    s.qemu_io("top.qcow2", &["write -z 1M 2M", "write -P 0x33 6M 1M"]);
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "expected.raw"]);
    "top.qcow2".to_string()
}

/// A device whose every byte is 0xee, so that anything not written or zeroed shows.
fn garbage_device(s: &Scratch) -> Option<(Loop, std::fs::File)> {
    let backing = s.path("device.img");
    let file = std::fs::File::create(&backing).expect("backing file");
    let garbage = vec![0xeeu8; 1 << 20];
    for offset in (0..SIZE).step_by(garbage.len()) {
        file.write_all_at(&garbage, offset).expect("fill");
    }
    file.sync_all().expect("sync");
    let dev = Loop::attach(&backing)?;
    let device = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&dev.device)
        .expect("open the loop device");
    Some((dev, device))
}

fn read_device(device: &std::fs::File) -> Vec<u8> {
    let mut content = vec![0u8; SIZE as usize];
    device.read_exact_at(&mut content, 0).expect("read device");
    content
}

#[test]
fn zero_ranges_of_a_block_device_cost_no_data_writes() {
    let s = Scratch::new();
    let top = chain(&s);
    let Some((dev, device)) = garbage_device(&s) else {
        return;
    };
    let image = Image::open(s.path(&top)).expect("open");
    let mut reached = Vec::new();
    let stats = hydrate_with(
        &image,
        &device,
        &dev.device,
        &HydrateOptions::default(),
        &mut |at| reached.push(at),
    )
    .expect("hydrate");
    // Progress is the end of the finished prefix: zero ranges come after the data before them.
    assert!(
        reached.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {reached:?}"
    );
    assert_eq!(reached.last(), Some(&SIZE));
    let expected = std::fs::read(s.path("expected.raw")).expect("expected");
    assert!(
        read_device(&device) == expected,
        "the device differs from qemu-img"
    );
    // 6 MiB of data (8 MiB less the 2 MiB zeroed) are written; the other 58 MiB are zeroed
    // without data writes.
    assert_eq!(stats.written_bytes, 6 << 20);
    assert_eq!(stats.zeroed_bytes, 58 << 20);
    let status = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(s.path(&top))
        .arg(&dev.device)
        .status()
        .expect("qemu-img compare");
    assert!(status.success(), "qemu-img compare found differences");
}

#[test]
fn target_is_zero_leaves_zero_ranges_alone() {
    let s = Scratch::new();
    let top = chain(&s);
    let Some((dev, device)) = garbage_device(&s) else {
        return;
    };
    let image = Image::open(s.path(&top)).expect("open");
    let mut options = HydrateOptions::default();
    options.target_is_zero = true;
    let stats = hydrate_with(&image, &device, &dev.device, &options, &mut |_| {}).expect("hydrate");
    assert_eq!(stats.zeroed_bytes, 0);
    assert_eq!(stats.written_bytes, 6 << 20);
    let content = read_device(&device);
    let expected = std::fs::read(s.path("expected.raw")).expect("expected");
    // Data is where it belongs; what the chain reads as zeros was not touched (the device
    // broke its promise to read zeros, so its garbage shows).
    assert!(content[..1 << 20] == expected[..1 << 20]);
    assert!(content[1 << 20..3 << 20].iter().all(|&b| b == 0xee));
    assert!(content[6 << 20..7 << 20] == expected[6 << 20..7 << 20]);
    assert!(content[8 << 20..].iter().all(|&b| b == 0xee));
}

/// The flags of this process's descriptors open on `path`, from `/proc/self/fdinfo`.
fn open_flags_of(path: &std::path::Path) -> Vec<u32> {
    let mut flags = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .flatten()
    {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(octal) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
            flags.push(u32::from_str_radix(octal.trim(), 8).expect("octal flags"));
        }
    }
    flags
}

#[test]
fn aligned_device_writes_go_around_the_page_cache_and_the_rest_through_it() {
    const O_DIRECT: u32 = 0o40000;
    let s = Scratch::new();
    let Some((dev, device)) = garbage_device(&s) else {
        return;
    };
    let writer = DeviceWriter::new(&device);
    assert!(writer.is_direct(), "a loop device takes O_DIRECT");
    let direct_fds = open_flags_of(std::path::Path::new(&dev.device))
        .into_iter()
        .filter(|f| f & O_DIRECT != 0)
        .count();
    assert_eq!(
        direct_fds, 1,
        "one descriptor of the device is open with O_DIRECT"
    );
    // Page-aligned memory, a whole number of blocks at a block-aligned offset: direct.
    let mut memory = vec![0u8; (3 << 20) + 4096];
    let start = memory.as_ptr().align_offset(4096);
    let aligned = &mut memory[start..start + (3 << 20)];
    aligned
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    writer
        .write_all_at(aligned, 8 << 20)
        .expect("aligned write");
    assert_eq!(writer.direct_bytes(), 3 << 20);
    // Misaligned offset and length: through the page cache, next to what went direct.
    let odd = vec![0x42u8; 1000];
    writer
        .write_all_at(&odd, (11 << 20) + 100)
        .expect("odd write");
    assert_eq!(writer.direct_bytes(), 3 << 20);
    device.sync_data().expect("flush");
    let content = read_device(&device);
    assert!(
        content[8 << 20..11 << 20] == *aligned,
        "the direct write landed"
    );
    assert!(
        content[(11 << 20) + 100..(11 << 20) + 1100]
            .iter()
            .all(|&b| b == 0x42)
    );
    assert!(content[..8 << 20].iter().all(|&b| b == 0xee));
    assert!(
        content[11 << 20..(11 << 20) + 100]
            .iter()
            .all(|&b| b == 0xee)
    );
    assert!(content[(11 << 20) + 1100..].iter().all(|&b| b == 0xee));
}
