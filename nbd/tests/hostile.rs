//! Raw-socket clients: the protocol details qemu does not exercise, and hostile clients that
//! must lose only their own connection.

mod fixture;

use std::net::TcpStream;

use fixture::Fixture;
use fixture::wire::{Client, EINVAL, ENOSPC, EPERM, IHAVEOPT};

/// A simple-reply read of 4 KiB at 0 that must see the base's pattern.
fn read_works(c: &mut Client) {
    c.request(0, 0, 7, 0, 4096);
    assert_eq!(c.simple_reply(7), 0);
    assert!(c.bytes(4096).iter().all(|&b| b == 0xaa));
}

#[test]
fn export_name_handshake_and_simple_reads() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    assert_eq!(c.export_name("disk"), fixture::SIZE);
    read_works(&mut c);
    c.request(3, 0, 8, 0, 0);
    assert_eq!(c.simple_reply(8), 0, "flush succeeds");
    c.request(2, 0, 9, 0, 0);
    assert!(c.is_closed(), "DISC ends the connection");
}

#[test]
fn unknown_export_name_closes_and_info_reports_unknown() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    let mut info = 5u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"other");
    info.extend_from_slice(&0u16.to_be_bytes());
    c.option(6, &info);
    assert_eq!(c.option_reply(6).0, (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");
    c.option(1, b"other");
    assert!(c.is_closed());
}

#[test]
fn writes_are_refused_with_eperm() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.export_name("disk");
    c.request(1, 0, 1, 0, 512);
    c.send(&[0x55; 512]);
    assert_eq!(c.simple_reply(1), EPERM);
    c.request(4, 0, 2, 0, 512);
    assert_eq!(c.simple_reply(2), EPERM, "trim");
    read_works(&mut c);
}

#[test]
fn oversized_and_out_of_range_requests_get_einval_and_the_connection_goes_on() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.export_name("disk");
    c.request(0, 0, 1, 0, 64 << 20);
    assert_eq!(c.simple_reply(1), EINVAL, "read above 32 MiB");
    c.request(0, 0, 2, fixture::SIZE - 512, 1024);
    assert_eq!(c.simple_reply(2), EINVAL, "read past the end");
    c.request(0, 0, 3, u64::MAX - 10, 512);
    assert_eq!(c.simple_reply(3), EINVAL, "offset overflow");
    c.request(0, 0, 4, 0, 0);
    assert_eq!(c.simple_reply(4), EINVAL, "zero length");
    c.request(99, 0, 5, 0, 512);
    assert_eq!(c.simple_reply(5), EINVAL, "unknown command");
    read_works(&mut c);
}

#[test]
fn garbage_after_the_handshake_ends_only_that_connection() {
    let fx = Fixture::new();
    let mut good = Client::connect(&fx);
    good.export_name("disk");
    let mut bad = Client::connect(&fx);
    bad.export_name("disk");
    bad.send(b"GET / HTTP/1.1\r\nHost: strata.invalid\r\n\r\n");
    assert!(bad.is_closed());
    read_works(&mut good);
}

#[test]
fn oversized_write_ends_the_connection() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.export_name("disk");
    c.request(1, 0, 1, 0, u32::MAX);
    assert!(c.is_closed());
}

#[test]
fn bad_option_magic_and_huge_options_end_the_handshake() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.send(&[0xff; 16]);
    assert!(c.is_closed(), "bad option magic");

    let mut c = Client::connect(&fx);
    let mut msg = IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&msg);
    assert!(c.is_closed(), "4 GiB option");

    let stream = TcpStream::connect(("127.0.0.1", fx.port)).unwrap();
    let mut c = Client(stream);
    c.bytes(18);
    c.send(&0xffff_ffffu32.to_be_bytes());
    assert!(c.is_closed(), "unknown client flags");

    let mut still = Client::connect(&fx);
    still.export_name("disk");
    read_works(&mut still);
}

#[test]
fn unsupported_and_malformed_options_get_error_replies() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.option(5, &[]);
    assert_eq!(c.option_reply(5).0, (1 << 31) + 1, "STARTTLS unsupported");
    c.option(3, b"x");
    assert_eq!(c.option_reply(3).0, (1 << 31) + 3, "LIST with data");
    c.option(10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        c.option_reply(10).0,
        (1 << 31) + 3,
        "meta context before structured replies"
    );
    c.option(7, &[0, 0, 0, 9]);
    assert_eq!(c.option_reply(7).0, (1 << 31) + 3, "GO with a cut name");
    c.option(3, &[]);
    let (kind, server) = c.option_reply(3);
    assert_eq!(
        (kind, &server[..]),
        (2, &[0, 0, 0, 4, b'd', b'i', b's', b'k'][..])
    );
    assert_eq!(c.option_reply(3).0, 1);
    c.option(2, &[]);
    assert_eq!(c.option_reply(2).0, 1, "ABORT acknowledged");
    assert!(c.is_closed());
}

#[test]
fn structured_reads_send_holes_and_block_status_describes_the_chain() {
    let fx = Fixture::new();
    let mut c = Client::connect(&fx);
    c.go_structured();

    // 0..1M is data (0xaa), 1M..2M unallocated: one data chunk and one hole chunk.
    c.request(0, 0, 1, 0, 2 << 20);
    let (flags, kind, payload) = c.chunk(1);
    assert_eq!((flags, kind, payload.len()), (0, 1, 8 + (1 << 20)));
    assert_eq!(&payload[..8], &0u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0xaa));
    let (flags, kind, payload) = c.chunk(1);
    assert_eq!((flags, kind), (1, 2), "final hole chunk");
    assert_eq!(
        payload,
        [&(1u64 << 20).to_be_bytes()[..], &(1u32 << 20).to_be_bytes()].concat()
    );

    // DF: one data chunk holding zeros for the hole.
    c.request(0, 1 << 2, 2, (1 << 20) - 512, 1024);
    let (flags, kind, payload) = c.chunk(2);
    assert_eq!((flags, kind, payload.len()), (1, 1, 8 + 1024));
    assert!(payload[8..520].iter().all(|&b| b == 0xaa));
    assert!(payload[520..].iter().all(|&b| b == 0));

    // A read past the end is an error chunk.
    c.request(0, 0, 3, fixture::SIZE, 512);
    let (flags, kind, payload) = c.chunk(3);
    assert_eq!((flags, kind), (1, (1 << 15) + 1));
    assert_eq!(&payload[..4], &EINVAL.to_be_bytes());

    // Block status of the whole export.
    c.request(7, 0, 4, 0, fixture::SIZE as u32);
    let (flags, kind, payload) = c.chunk(4);
    assert_eq!((flags, kind), (1, 5));
    assert_eq!(&payload[..4], &1u32.to_be_bytes(), "context id");
    let descriptors: Vec<(u64, u32)> = payload[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(descriptors.iter().map(|d| d.0).sum::<u64>(), fixture::SIZE);
    let expected = vec![
        (1 << 20, 0),
        (7 << 20, 3),
        (1 << 20, 0),
        (7 << 20, 3),
        (1 << 20, 2),
        (47 << 20, 3),
    ];
    assert_eq!(descriptors, expected);

    // REQ_ONE: only the first descriptor.
    c.request(7, 1 << 3, 5, 0, fixture::SIZE as u32);
    let (_, _, payload) = c.chunk(5);
    assert_eq!(payload.len(), 4 + 8);
    assert_eq!(&payload[4..8], &(1u32 << 20).to_be_bytes());
    assert_eq!(&payload[8..], &0u32.to_be_bytes());
}

#[test]
fn writable_export_advertises_writes_and_refuses_writes_past_the_end() {
    let fx = Fixture::writable();
    let mut c = Client::connect(&fx);
    c.option(1, b"disk");
    assert_eq!(c.u64(), fixture::SIZE);
    let flags = c.u16();
    assert_eq!(flags & (1 << 1), 0, "not READ_ONLY");
    let wanted = 1 | 1 << 2 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 8;
    assert_eq!(
        flags & wanted,
        wanted,
        "HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN"
    );

    // Past the end: ENOSPC for writes (the payload is consumed), EINVAL for a trim.
    c.request(1, 0, 1, fixture::SIZE - 512, 1024);
    c.send(&[0x55; 1024]);
    assert_eq!(c.simple_reply(1), ENOSPC, "write past the end");
    c.request(6, 0, 2, fixture::SIZE, 512);
    assert_eq!(c.simple_reply(2), ENOSPC, "write zeroes past the end");
    c.request(4, 0, 3, fixture::SIZE - 512, 1024);
    assert_eq!(c.simple_reply(3), EINVAL, "trim past the end");
    c.request(1, 0, 4, 0, 0);
    assert_eq!(c.simple_reply(4), EINVAL, "zero-length write");

    // The connection goes on: a FUA write at the end, read back.
    c.request(1, 1, 5, fixture::SIZE - 512, 512);
    c.send(&[0x55; 512]);
    assert_eq!(c.simple_reply(5), 0);
    c.request(0, 0, 6, fixture::SIZE - 1024, 1024);
    assert_eq!(c.simple_reply(6), 0);
    let data = c.bytes(1024);
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..].iter().all(|&b| b == 0x55));
    read_works(&mut c);
}
