//! Many requests in flight at once, on one connection and on several: every reply goes out
//! whole, under its own cookie, with the bytes of its own range; writes in flight land where
//! they were sent, and copy-on-write keeps the backup's bytes around them.

mod fixture;

use std::collections::BTreeMap;
use std::process::Command;

use fixture::wire::{Client, EINVAL, SIMPLE_REPLY, STRUCTURED_REPLY};
use fixture::{DISTINCT_LEN, Fixture, SIZE, distinct_bytes, run};

const READ: u16 = 0;
const WRITE: u16 = 1;
const FLUSH: u16 = 3;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;
const FLAG_DF: u16 = 1 << 2;
const CHUNK_DONE: u16 = 1;
const CHUNK_DATA: u16 = 1;
const CHUNK_HOLE: u16 = 2;
const CHUNK_STATUS: u16 = 5;
const CHUNK_ERROR: u16 = (1 << 15) + 1;

/// What a pipelined request must get back.
enum Expect {
    /// The bytes of `offset..offset + len`, in data and hole chunks.
    Read { offset: u64, len: u32 },
    /// `base:allocation` descriptors for a part of the range.
    Status { len: u32 },
    /// An error chunk.
    Error(u32),
}

/// An offset and length for request `k`, spread over the distinct data and the hole after it,
/// unaligned, up to 192 KiB.
fn range_of(k: u64) -> (u64, u32) {
    let len = 1 + (k * 104_729) % (192 << 10);
    let offset = (k * 7_654_321) % (DISTINCT_LEN + (4 << 20));
    (offset, len as u32)
}

#[test]
fn nbdcopy_and_qemu_img_with_many_requests_in_flight_copy_every_byte_in_place() {
    let fx = Fixture::distinct(false);
    let reference = fx.reference();
    let copy = fx.dir.path().join("nbdcopy.raw");
    run(Command::new("nbdcopy").args([
        "--connections=2",
        "--requests=64",
        "--request-size=16384",
        &fx.url(),
        copy.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&copy).unwrap() == reference,
        "nbdcopy's copy differs"
    );
    let converted = fx.dir.path().join("converted.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-m",
        "16",
        "-W",
        "-f",
        "raw",
        "-O",
        "raw",
        &fx.url(),
        converted.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&converted).unwrap() == reference,
        "qemu-img's copy differs"
    );
}

#[test]
fn pipelined_structured_requests_get_whole_replies_under_their_own_cookies() {
    let fx = Fixture::distinct(false);
    let reference = fx.reference();
    let mut c = Client::connect(&fx);
    c.go_structured();
    let mut expected = BTreeMap::new();
    for cookie in 1..=300u64 {
        let (offset, len) = range_of(cookie);
        match cookie % 6 {
            0 => {
                c.request(BLOCK_STATUS, 0, cookie, offset, len);
                expected.insert(cookie, Expect::Status { len });
            }
            1 => {
                c.request(READ, 0, cookie, SIZE - 512, 1024);
                expected.insert(cookie, Expect::Error(EINVAL));
            }
            k => {
                let flags = if k == 2 { FLAG_DF } else { 0 };
                c.request(READ, flags, cookie, offset, len);
                expected.insert(cookie, Expect::Read { offset, len });
            }
        }
    }
    // Bytes received so far for each read, and how many of them.
    let mut reads: BTreeMap<u64, (Vec<u8>, u64)> = BTreeMap::new();
    while !expected.is_empty() {
        assert_eq!(
            c.u32(),
            STRUCTURED_REPLY,
            "a reply starts where the last ended"
        );
        let flags = c.u16();
        let kind = c.u16();
        let cookie = c.u64();
        let len = c.u32() as usize;
        let payload = c.bytes(len);
        let expect = expected
            .get(&cookie)
            .unwrap_or_else(|| panic!("a chunk for cookie {cookie}, which was never sent"));
        match (expect, kind) {
            (&Expect::Read { offset, len }, CHUNK_DATA | CHUNK_HOLE) => {
                let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
                let chunk = if kind == CHUNK_DATA {
                    payload[8..].to_vec()
                } else {
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                    vec![0; n as usize]
                };
                let end = at + chunk.len() as u64;
                assert!(
                    offset <= at && end <= offset + u64::from(len),
                    "cookie {cookie}: chunk {at:#x}..{end:#x} outside its read"
                );
                assert!(
                    chunk[..] == reference[at as usize..end as usize],
                    "cookie {cookie}: wrong bytes at {at:#x}"
                );
                reads.entry(cookie).or_default().1 += chunk.len() as u64;
                if flags & CHUNK_DONE != 0 {
                    assert_eq!(
                        reads[&cookie].1,
                        u64::from(len),
                        "cookie {cookie}: all sent"
                    );
                }
            }
            (&Expect::Status { len }, CHUNK_STATUS) => {
                assert_eq!(&payload[..4], &1u32.to_be_bytes(), "context id");
                let covered: u64 = payload[4..]
                    .chunks_exact(8)
                    .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())))
                    .sum();
                assert!(covered > 0 && covered <= u64::from(len), "cookie {cookie}");
                assert_eq!(flags & CHUNK_DONE, CHUNK_DONE, "one status chunk");
            }
            (&Expect::Error(error), CHUNK_ERROR) => {
                assert_eq!(&payload[..4], &error.to_be_bytes(), "cookie {cookie}");
                assert_eq!(flags & CHUNK_DONE, CHUNK_DONE, "one error chunk");
            }
            _ => panic!("cookie {cookie}: unexpected chunk type {kind}"),
        }
        if flags & CHUNK_DONE != 0 {
            expected.remove(&cookie);
        }
    }
}

#[test]
fn pipelined_simple_reads_get_their_own_bytes() {
    let fx = Fixture::distinct(false);
    let reference = fx.reference();
    let mut c = Client::connect(&fx);
    assert_eq!(c.export_name("disk"), SIZE);
    let mut expected = BTreeMap::new();
    for cookie in 1..=200u64 {
        let (offset, len) = range_of(cookie);
        c.request(READ, 0, cookie, offset, len);
        expected.insert(cookie, (offset, len));
    }
    while let Some(first) = expected.keys().next().copied() {
        assert_eq!(
            c.u32(),
            SIMPLE_REPLY,
            "a reply starts where the last ended (after {first})"
        );
        assert_eq!(c.u32(), 0, "no error");
        let cookie = c.u64();
        let (offset, len) = expected
            .remove(&cookie)
            .unwrap_or_else(|| panic!("a reply for cookie {cookie}, unsent or answered"));
        let data = c.bytes(len as usize);
        let want = &reference[offset as usize..offset as usize + len as usize];
        assert!(data == want, "cookie {cookie}: wrong bytes at {offset:#x}");
    }
}

#[test]
fn pipelined_writes_into_shared_granules_keep_each_others_bytes_and_the_backups() {
    let fx = Fixture::distinct(true);
    let mut want = fx.reference();
    let chain = fx.chain_files();
    let mut c = Client::connect(&fx);
    c.go_structured();
    // 256 writes of 1000 bytes, 3000 bytes apart: about 22 to a 64 KiB granule, all in flight
    // on one connection, with zeroing writes between some of them.
    let mut cookies = Vec::new();
    for k in 0..256u64 {
        let offset = (2 << 20) + k * 3000;
        let cookie = k + 1;
        if k % 8 == 7 {
            c.request(WRITE_ZEROES, 0, cookie, offset, 1000);
            want[offset as usize..offset as usize + 1000].fill(0);
        } else {
            let data = distinct_bytes(offset, 1000, 2);
            c.request(WRITE, 0, cookie, offset, 1000);
            c.send(&data);
            want[offset as usize..offset as usize + 1000].copy_from_slice(&data);
        }
        cookies.push(cookie);
    }
    let mut answered = Vec::new();
    for _ in &cookies {
        assert_eq!(c.u32(), SIMPLE_REPLY);
        assert_eq!(c.u32(), 0, "write succeeded");
        answered.push(c.u64());
    }
    answered.sort_unstable();
    assert_eq!(answered, cookies, "one reply per write");
    c.request(FLUSH, 0, 999, 0, 0);
    assert_eq!(c.simple_reply(999), 0);

    let copy = fx.dir.path().join("written.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &fx.url(),
        copy.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&copy).unwrap() == want,
        "written export differs"
    );
    assert!(fx.chain_files() == chain, "the backup never changes");
}

#[test]
fn nbdcopy_writes_with_many_requests_in_flight_land_in_place() {
    let fx = Fixture::distinct(true);
    let chain = fx.chain_files();
    // 4 KiB requests, 64 in flight on one connection: sixteen to a granule, most of them
    // writing part of a granule that another request is copying on write.
    let source = fx.dir.path().join("source.raw");
    let data = distinct_bytes(0, SIZE as usize, 3);
    std::fs::write(&source, &data).unwrap();
    run(Command::new("nbdcopy").args([
        "--connections=1",
        "--requests=64",
        "--request-size=4096",
        "--flush",
        source.to_str().unwrap(),
        &fx.url(),
    ]));
    let copy = fx.dir.path().join("copied.raw");
    run(Command::new("nbdcopy").args([&fx.url(), copy.to_str().unwrap()]));
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "written export differs"
    );
    assert!(fx.chain_files() == chain, "the backup never changes");
}
