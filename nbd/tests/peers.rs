//! The server against real NBD peers: qemu-img, qemu-io and libnbd's nbdinfo / nbdcopy.

mod fixture;

use std::process::Command;

use fixture::{Fixture, run};

#[test]
fn qemu_img_convert_over_nbd_equals_the_chain() {
    let fx = Fixture::new();
    let out = fx.dir.path().join("out.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", &fx.url(), out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), fx.reference());
}

#[test]
fn qemu_img_map_over_nbd_shows_holes_and_zeros() {
    let fx = Fixture::new();
    let json =
        run(Command::new("qemu-img").args(["map", "--output", "json", "-f", "raw", &fx.url()]));
    let extents: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let at = |offset: u64| {
        extents
            .iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                start <= offset && offset < start + e["length"].as_u64().unwrap()
            })
            .unwrap_or_else(|| panic!("no extent at {offset:#x} in {json}"))
    };
    // Data written by the base and the overlay.
    assert_eq!(at(0)["data"], true);
    assert_eq!(at(fixture::OVERLAY_AT)["data"], true);
    // The zeroed range reads as zeros, the untouched tail is a hole.
    assert_eq!(at(fixture::ZERO_AT)["zero"], true);
    assert_eq!(at(fixture::SIZE - 1)["zero"], true);
    assert_eq!(at(fixture::SIZE - 1)["data"], false);
}

#[test]
fn qemu_io_reads_the_patterns() {
    let fx = Fixture::new();
    let read =
        |cmd: &str| run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", cmd, &fx.url()]));
    assert!(read("read -P 0xaa 0 1M").contains("read 1048576/1048576"));
    assert!(
        read(&format!("read -P 0xcc {} 64k", fixture::OVERLAY_AT)).contains("read 65536/65536")
    );
    assert!(read(&format!("read -P 0 {} 1M", fixture::ZERO_AT)).contains("read 1048576/1048576"));
    // A wrong pattern is reported, so the checks above can fail.
    let wrong = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x11 0 4k", &fx.url()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("Pattern verification failed"));
}

#[test]
fn nbdinfo_lists_the_export_and_maps_holes() {
    let fx = Fixture::new();
    let list = run(Command::new("nbdinfo").args(["--list", &fx.url_without_export()]));
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(
        list.contains(&format!("export-size: {} ", fixture::SIZE)),
        "{list}"
    );
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("is_read_only: true"), "{list}");

    let map = run(Command::new("nbdinfo").args(["--map", &fx.url()]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let mut num = || f.next().unwrap().parse::<u64>().unwrap();
            (num(), num(), num() as u32)
        })
        .collect();
    let flags_at = |offset: u64| {
        rows.iter()
            .find(|(s, l, _)| *s <= offset && offset < s + l)
            .unwrap_or_else(|| panic!("no row at {offset:#x} in {map}"))
            .2
    };
    assert_eq!(flags_at(0), 0, "{map}");
    assert_eq!(flags_at(fixture::ZERO_AT), 2, "{map}");
    assert_eq!(flags_at(fixture::SIZE - 1), 3, "{map}");
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), fixture::SIZE);
}

#[test]
fn nbdcopy_copies_the_chain() {
    let fx = Fixture::new();
    let out = fx.dir.path().join("copy.raw");
    run(Command::new("nbdcopy").args([&fx.url(), out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), fx.reference());
}
