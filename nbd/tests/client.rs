//! The NBD client against real servers (strata's own, qemu-nbd) and hostile fake servers
//! that must produce a clear error, never a panic or a huge allocation.

mod fixture;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fixture::{Fixture, run};
use strata_nbd::{Client, Error};

/// Every data range `next_data` reports, in order.
fn data_ranges(client: &Client) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(range) = client.next_data(pos).unwrap() {
        assert!(
            range.start >= pos && range.end > range.start,
            "{range:?} at {pos}"
        );
        pos = range.end;
        out.push(range);
    }
    out
}

#[test]
fn reads_strata_s_export_and_skips_its_holes_and_zeros() {
    let fx = Fixture::new();
    let client = Client::open(&fx.url()).unwrap();
    assert_eq!(client.size(), fixture::SIZE);
    assert!(client.has_block_status());
    // Base data at 0 and 8 MiB (the overlay's 64 KiB inside it); 16 MiB is a zero cluster.
    assert_eq!(data_ranges(&client), vec![0..1 << 20, 8 << 20..9 << 20]);

    let mut all = vec![0u8; fixture::SIZE as usize];
    client.read_at(&mut all, 0).unwrap();
    assert!(all == fx.reference());
    // Holes came as hole chunks: only the 2 MiB of data crossed the wire.
    assert_eq!(client.data_bytes_read(), 2 << 20);

    let err = client.read_at(&mut [0u8; 512], fixture::SIZE).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

/// `qemu-nbd` serving `file` read-only on a free port; killed on drop.
struct QemuNbd(Child, u16);

impl QemuNbd {
    fn start(format: &str, file: &std::path::Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("qemu-nbd")
            .args(["-r", "-f", format, "-x", "vol", "-b", "127.0.0.1"])
            .args(["-p", &port.to_string(), "--persistent"])
            .arg(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self(child, port)
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol", self.1)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reads_only_the_data_of_a_large_sparse_qemu_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("sparse.qcow2");
    let s = src.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s, "4G"]));
    for cmd in [
        "write -P 0x11 0 1M",
        "write -P 0x22 1G 512k",
        "write -P 0x33 3G 2M",
        "write -z 2G 1M",
    ] {
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, s]));
    }
    let server = QemuNbd::start("qcow2", &src);
    let client = Client::open(&server.url()).unwrap();
    assert_eq!(client.size(), 4 << 30);

    // Copy every data range into a sparse file, then compare with the source.
    let out = dir.path().join("copy.raw");
    let file = std::fs::File::create(&out).unwrap();
    file.set_len(client.size()).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut listed = 0;
    for range in data_ranges(&client) {
        let mut pos = range.start;
        while pos < range.end {
            let n = (range.end - pos).min(buf.len() as u64) as usize;
            client.read_at(&mut buf[..n], pos).unwrap();
            file.write_all_at(&buf[..n], pos).unwrap();
            pos += n as u64;
        }
        listed += range.end - range.start;
    }
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .args([&out, &src]));
    // 3.5 MiB of data in a 4 GiB export (qemu-nbd may round to its 64 KiB clusters).
    assert!((3584 << 10..4 << 20).contains(&listed), "listed {listed}");
    assert_eq!(client.data_bytes_read(), listed);
}

/// A fake server: a correct handshake (structured replies, `base:allocation` as context 7,
/// a 1 MiB export), then `misbehave` answers the first request.
fn fake_server(misbehave: impl FnOnce(&mut TcpStream, u64) + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let cookie = fake_handshake(&mut s, 1 << 20, 0);
        misbehave(&mut s, cookie);
        // Hold the socket open so the client sees the misbehaviour, not an EOF.
        std::thread::sleep(Duration::from_secs(2));
    });
    format!("nbd://127.0.0.1:{port}/x")
}

/// The server's side of a correct handshake for an export of `size` bytes with the
/// transmission flags `flags` (besides `HAS_FLAGS | READ_ONLY`); returns the cookie of the
/// first request.
fn fake_handshake(s: &mut TcpStream, size: u64, flags: u16) -> u64 {
    s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags).unwrap();
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if option == 10 {
            option_reply(
                s,
                option,
                4,
                &[&7u32.to_be_bytes()[..], b"base:allocation"].concat(),
            );
        }
        if option == 7 {
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&(1u16 | 2 | flags).to_be_bytes());
            option_reply(s, option, 3, &info);
        }
        option_reply(s, option, 1, &[]);
        if option == 7 {
            break;
        }
    }
    let mut request = [0u8; 28];
    s.read_exact(&mut request).unwrap();
    u64::from_be_bytes(request[8..16].try_into().unwrap())
}

/// A `base:allocation` block status chunk (context 7) with `extents` (length, flags).
fn status_chunk(flags: u16, cookie: u64, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut payload = 7u32.to_be_bytes().to_vec();
    for (len, state) in extents {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&state.to_be_bytes());
    }
    chunk(flags, 5, cookie, &payload)
}

fn option_reply(s: &mut TcpStream, option: u32, kind: u32, data: &[u8]) {
    let mut msg = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut msg = 0x668e_33efu32.to_be_bytes().to_vec();
    msg.extend_from_slice(&flags.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    msg.extend_from_slice(payload);
    msg
}

/// The error a 4 KiB read at 0 gets from a server misbehaving with `reply`.
fn read_error(reply: impl FnOnce(&mut TcpStream, u64) + Send + 'static) -> String {
    let client = Client::open(&fake_server(reply)).unwrap();
    let err = client.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(matches!(err, Error::BadServer { .. }), "{err}");
    err.to_string()
}

#[test]
fn a_bad_greeting_magic_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let err = Client::open(&format!("nbd://127.0.0.1:{port}/x")).unwrap_err();
    assert!(err.to_string().contains("greeting magic"), "{err}");
}

#[test]
fn an_oversized_option_reply_is_refused_before_allocating() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
        let mut buf = [0u8; 20];
        s.read_exact(&mut buf).unwrap();
        let mut msg = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        msg.extend_from_slice(&8u32.to_be_bytes());
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&msg).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let err = Client::open(&format!("nbd://127.0.0.1:{port}/x")).unwrap_err();
    assert!(
        err.to_string().contains("option reply of 4294967295 bytes"),
        "{err}"
    );
}

#[test]
fn a_reply_for_an_unknown_handle_is_named() {
    let err = read_error(|s, cookie| {
        let mut msg = 0x6744_6698u32.to_be_bytes().to_vec();
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&(cookie + 99).to_be_bytes());
        s.write_all(&msg).unwrap();
    });
    assert!(err.contains("reply for unknown handle"), "{err}");
}

#[test]
fn a_chunk_past_the_request_is_named() {
    let err = read_error(|s, cookie| {
        let mut payload = 2048u64.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0x55; 4096]);
        s.write_all(&chunk(1, 1, cookie, &payload)).unwrap();
    });
    assert!(err.contains("past the request"), "{err}");
}

#[test]
fn an_oversized_data_chunk_is_refused_before_reading_it() {
    let err = read_error(|s, cookie| {
        let mut msg = chunk(1, 1, cookie, &[]);
        let at = msg.len() - 4;
        msg[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        msg.extend_from_slice(&0u64.to_be_bytes());
        s.write_all(&msg).unwrap();
    });
    assert!(err.contains("past the request"), "{err}");
}

#[test]
fn overlapping_or_missing_chunks_are_named() {
    let err = read_error(|s, cookie| {
        let mut payload = 0u64.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0x55; 2048]);
        s.write_all(&chunk(0, 1, cookie, &payload)).unwrap();
        s.write_all(&chunk(1, 1, cookie, &payload)).unwrap();
    });
    assert!(err.contains("overlapping chunk"), "{err}");
    let err = read_error(|s, cookie| {
        let mut payload = 0u64.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0x55; 2048]);
        s.write_all(&chunk(1, 1, cookie, &payload)).unwrap();
    });
    assert!(err.contains("covered 2048 of 4096 bytes"), "{err}");
}

#[test]
fn a_bad_reply_magic_and_a_huge_block_status_are_named() {
    let err = read_error(|s, _| s.write_all(&[0xee; 20]).unwrap());
    assert!(err.contains("reply magic 0xeeeeeeee"), "{err}");

    let url = fake_server(|s, cookie| {
        let mut msg = chunk(1, 5, cookie, &[]);
        let at = msg.len() - 4;
        msg[at..].copy_from_slice(&(1u32 << 30).to_be_bytes());
        s.write_all(&msg).unwrap();
    });
    let client = Client::open(&url).unwrap();
    let err = client.next_data(0).unwrap_err();
    assert!(
        err.to_string()
            .contains("block status chunk of 1073741824 bytes"),
        "{err}"
    );
}

#[test]
fn a_second_block_status_chunk_is_refused_and_no_range_passes_the_export_end() {
    // A first chunk covering the whole 1 MiB export, then a second that starts over at 0.
    let url = fake_server(|s, cookie| {
        s.write_all(&status_chunk(0, cookie, &[(1 << 20, 0)]))
            .unwrap();
        s.write_all(&status_chunk(1, cookie, &[(4096, 0), (4096, 3)]))
            .unwrap();
    });
    let client = Client::open(&url).unwrap();
    let err = client.next_data(0).unwrap_err();
    assert!(matches!(err, Error::BadServer { .. }), "{err}");
    assert!(
        err.to_string().contains("second block status chunk"),
        "{err}"
    );

    // One chunk whose last extent runs past the export: the data range ends at the end.
    let url = fake_server(|s, cookie| {
        s.write_all(&status_chunk(1, cookie, &[(4096, 3), (u32::MAX, 0)]))
            .unwrap();
    });
    let client = Client::open(&url).unwrap();
    assert_eq!(client.next_data(0).unwrap(), Some(4096..1 << 20));
}

#[test]
fn a_flood_of_block_status_chunks_is_refused_at_the_second() {
    // 2000 chunks of 4096 extents (64 MiB of descriptors) and then a done chunk: the client
    // must stop at the second chunk instead of collecting them all.
    let url = fake_server(|s, cookie| {
        let extents = vec![(1, 0); 4096];
        for _ in 0..2000 {
            if s.write_all(&status_chunk(0, cookie, &extents)).is_err() {
                return;
            }
        }
        let _ = s.write_all(&chunk(1, 0, cookie, &[]));
    });
    let client = Client::open(&url).unwrap();
    let err = client.next_data(0).unwrap_err();
    assert!(
        err.to_string().contains("second block status chunk"),
        "{err}"
    );
}

#[test]
fn a_pooled_connection_reporting_another_size_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // The first connection fails its first read (EIO), so the client drops it and opens
        // a second, which reports a 2 MiB export and would answer a read with a hole.
        let (mut first, _) = listener.accept().unwrap();
        let cookie = fake_handshake(&mut first, 1 << 20, 0);
        let mut reply = 0x6744_6698u32.to_be_bytes().to_vec();
        reply.extend_from_slice(&5u32.to_be_bytes());
        reply.extend_from_slice(&cookie.to_be_bytes());
        first.write_all(&reply).unwrap();
        let (mut second, _) = listener.accept().unwrap();
        let cookie = fake_handshake(&mut second, 2 << 20, 0);
        let mut hole = 0u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        let _ = second.write_all(&chunk(1, 2, cookie, &hole));
        std::thread::sleep(Duration::from_secs(2));
    });
    let client = Client::open(&format!("nbd://127.0.0.1:{port}/x")).unwrap();
    let err = client.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(matches!(err, Error::Refused { code: 5, .. }), "{err}");
    let err = client.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(matches!(err, Error::BadServer { .. }), "{err}");
    assert!(err.to_string().contains("2097152-byte export"), "{err}");
}

#[test]
fn urls_parse_and_bad_ones_are_refused() {
    let parse = strata_nbd::parse_url;
    assert_eq!(
        parse("nbd://h:1234/e").unwrap(),
        ("h:1234".into(), "e".into())
    );
    assert_eq!(parse("nbd://h").unwrap(), ("h:10809".into(), String::new()));
    assert!(parse("http://h/e").is_err());
    assert!(parse("nbd:///e").is_err());
}
