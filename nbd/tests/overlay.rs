//! Copy-on-write mode against qemu-io and qemu-img: writes land in the overlay, survive a
//! restart, and never touch the chain.

mod fixture;

use std::net::TcpListener;
use std::process::Command;

use fixture::{Fixture, OWNER, SIZE, run};
use strata_nbd::{Error, Overlay, Server};
use strata_qcow2::Image;

/// Runs qemu-io commands (one connection) on `url`; returns stdout.
fn qemu_io(url: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(url));
    assert!(!out.contains("failed"), "{commands:?}: {out}");
    out
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn qemu_io_writes_read_back_and_the_chain_files_are_unchanged() {
    let fx = Fixture::writable();
    let before = fx.chain_files();
    qemu_io(
        &fx.url(),
        &cmds(&[
            // Over base data, unaligned (copy on write of part of a granule).
            "write -P 0x5e 4097 1000",
            // Over a hole, two whole granules.
            "write -P 0x6f 32M 128k",
            // Zeroes over the base and the overlay layer: a whole granule and a part of one.
            "write -z 8M 100k",
            "flush",
        ]),
    );
    let out = qemu_io(
        &fx.url(),
        &cmds(&[
            "read -P 0xaa 0 4097",
            "read -P 0x5e 4097 1000",
            "read -P 0xaa 5097 1043479",
            "read -P 0x6f 32M 128k",
            "read -P 0 8M 100k",
            "read -P 0xcc 8491008 4096",
        ]),
    );
    assert_eq!(out.matches("read ").count(), 6, "{out}");

    assert_eq!(fx.chain_files(), before, "the chain's files changed");
    // qemu-img reads the whole export back, writes included.
    let copy = fx.dir.path().join("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", &fx.url(), copy.to_str().unwrap()]));
    let mut expected = fx.reference();
    expected[4097..5097].fill(0x5e);
    expected[32 << 20..(32 << 20) + (128 << 10)].fill(0x6f);
    expected[8 << 20..(8 << 20) + (100 << 10)].fill(0);
    assert!(std::fs::read(copy).unwrap() == expected, "copy differs");
}

#[test]
fn block_status_reflects_overlay_writes_zeroes_and_trims() {
    let fx = Fixture::writable();
    qemu_io(
        &fx.url(),
        &cmds(&["write -P 0x6f 32M 64k", "write -z 0 1M", "discard 8M 1M"]),
    );
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
            .clone()
    };
    // Written into a hole of the chain: data.
    assert_eq!(
        (at(32 << 20)["data"].clone(), at(32 << 20)["zero"].clone()),
        (true.into(), false.into())
    );
    // Zeroed over the base's data: zero, allocated.
    assert_eq!(
        (at(0)["data"].clone(), at(0)["zero"].clone()),
        (true.into(), true.into())
    );
    // Trimmed: a hole.
    assert_eq!(
        (at(8 << 20)["data"].clone(), at(8 << 20)["zero"].clone()),
        (false.into(), true.into())
    );
    // Untouched: the chain's own status (the overlay layer's data at OVERLAY_AT).
    assert_eq!(at(fixture::OVERLAY_AT + (1 << 20))["data"], false);
    assert_eq!(at(16 << 20)["zero"], true);
}

/// Serves `image` over the overlay at `path` for exactly `connections` clients, then drops
/// the server (and with it the overlay).
fn serve_for(
    image: Image,
    path: &std::path::Path,
    connections: usize,
) -> (String, std::thread::JoinHandle<()>) {
    let overlay = Overlay::open_or_create(path, SIZE, OWNER).unwrap();
    let server = Server::with_overlay("disk", image, overlay).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "nbd://127.0.0.1:{}/disk",
        listener.local_addr().unwrap().port()
    );
    let handle = std::thread::spawn(move || {
        for _ in 0..connections {
            let (stream, _) = listener.accept().unwrap();
            server.serve_connection(stream).unwrap();
        }
    });
    (url, handle)
}

#[test]
fn writes_survive_a_restart_and_the_overlay_refuses_another_backup() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("restart.cow");
    let (url, server) = serve_for(Image::open(&fx.top).unwrap(), &path, 1);
    qemu_io(
        &url,
        &cmds(&["write -P 0x42 3M 192k", "write -P 0x43 100 10"]),
    );
    server.join().unwrap();

    let (url, server) = serve_for(Image::open(&fx.top).unwrap(), &path, 1);
    qemu_io(
        &url,
        &cmds(&[
            "read -P 0x42 3M 192k",
            "read -P 0xaa 0 100",
            "read -P 0x43 100 10",
        ]),
    );
    server.join().unwrap();

    // The same file for another backup point, or another size, is refused.
    let other = Overlay::open_or_create(&path, SIZE, "another backup").unwrap_err();
    assert!(matches!(other, Error::OverlayMismatch { .. }), "{other}");
    assert!(
        other.to_string().contains("belongs to test chain"),
        "{other}"
    );
    let resized = Overlay::open_or_create(&path, SIZE * 2, OWNER).unwrap_err();
    assert!(
        matches!(resized, Error::OverlayMismatch { .. }),
        "{resized}"
    );

    // One process at a time.
    let held = Overlay::open_or_create(&path, SIZE, OWNER).unwrap();
    let busy = Overlay::open_or_create(&path, SIZE, OWNER).unwrap_err();
    assert!(matches!(busy, Error::OverlayBusy { .. }), "{busy}");
    drop(held);

    // Not an overlay at all.
    let garbage = fx.dir.path().join("garbage.cow");
    std::fs::write(&garbage, vec![0x17; 8192]).unwrap();
    let err = Overlay::open_or_create(&garbage, SIZE, OWNER).unwrap_err();
    assert!(matches!(err, Error::OverlayCorrupt { .. }), "{err}");
}

#[test]
fn concurrent_clients_writing_parts_of_the_same_granules_keep_each_others_bytes() {
    let fx = Fixture::writable();
    // Two clients write different parts of the same 64 KiB granules at once; each write
    // copies the rest of its granule, so without serialisation one would undo the other.
    let writers: Vec<_> = [(0x71u8, 0u64), (0x72, 40_000)]
        .into_iter()
        .map(|(pattern, within)| {
            let url = fx.url();
            std::thread::spawn(move || {
                let commands: Vec<String> = (0..64u64)
                    .map(|k| {
                        format!(
                            "write -P {pattern:#x} {} 1000",
                            (40 << 20) + k * 65536 + within
                        )
                    })
                    .collect();
                qemu_io(&url, &commands);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let checks: Vec<String> = (0..64u64)
        .flat_map(|k| {
            let at = (40 << 20) + k * 65536;
            [
                format!("read -P 0x71 {at} 1000"),
                format!("read -P 0 {} 39000", at + 1000),
                format!("read -P 0x72 {} 1000", at + 40_000),
            ]
        })
        .collect();
    let out = qemu_io(&fx.url(), &checks);
    assert_eq!(out.matches("read ").count(), 192);
}
