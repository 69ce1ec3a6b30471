//! Decodes arbitrary bytes as the side files stored next to each backup, a checksum list or a
//! digest manifest, both from memory (`decode`) and from a file (`open`), and reads back every
//! entry through the lookups. Any panic, hang or huge allocation is a bug, and so is a
//! disagreement: `decode` and `open` must accept the same files, every entry must be found by
//! its index, and a decoded file must encode to bytes that decode to the same list.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_chain::{ClusterChecksums, DigestManifest};

/// Where the files for `open` are made (tmpfs when there is one).
fn file_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

/// An unnamed file holding `bytes`.
fn file_of(bytes: &[u8]) -> std::fs::File {
    let mut file = tempfile::tempfile_in(file_dir()).expect("temporary file");
    file.write_all(bytes).expect("temporary file");
    file
}

/// Checks the lookups of a list against its entries: `get` and `first_in` find each entry,
/// and nothing between two entries.
fn check_checksums(list: &ClusterChecksums) {
    let mut previous: Option<u64> = None;
    let mut seen = 0u64;
    for entry in list.iter() {
        let (index, crc) = entry.expect("a decoded list reads back");
        assert_eq!(
            list.get(index).expect("lookup"),
            Some(crc),
            "cluster {index}"
        );
        let from = previous.map_or(0, |p| p + 1);
        // A range cannot end past u64::MAX, so that cluster is found only by `get`.
        if let Some(end) = index.checked_add(1) {
            assert_eq!(
                list.first_in(from..end).expect("lookup"),
                Some(index),
                "first in {from}..={index}"
            );
        }
        if index > from {
            assert_eq!(list.get(index - 1).expect("lookup"), None);
        }
        previous = Some(index);
        seen += 1;
    }
    assert_eq!(seen, list.len());
    if let Some(last) = previous.and_then(|p| p.checked_add(1)) {
        assert_eq!(list.first_in(last..u64::MAX).expect("lookup"), None);
    }
}

/// Like [`check_checksums`] for a manifest.
fn check_digests(manifest: &DigestManifest) {
    let mut previous: Option<u64> = None;
    let mut seen = 0u64;
    for entry in manifest.iter() {
        let (index, digest) = entry.expect("a decoded manifest reads back");
        assert_eq!(
            manifest.get(index).expect("lookup"),
            Some(digest),
            "cluster {index}"
        );
        if index > previous.map_or(0, |p| p + 1) {
            assert_eq!(manifest.get(index - 1).expect("lookup"), None);
        }
        previous = Some(index);
        seen += 1;
    }
    assert_eq!(seen, manifest.len());
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the format: even a checksum list, odd a digest manifest.
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    if kind & 1 == 0 {
        let decoded = ClusterChecksums::decode(bytes);
        let opened = ClusterChecksums::open(file_of(bytes));
        assert_eq!(decoded.is_ok(), opened.is_ok(), "{decoded:?} vs {opened:?}");
        let (Ok(decoded), Ok(opened)) = (decoded, opened) else {
            return;
        };
        assert_eq!(decoded, opened);
        check_checksums(&decoded);
        check_checksums(&opened);
        let again =
            ClusterChecksums::decode(&decoded.encode().expect("encode")).expect("re-decode");
        assert_eq!(again, decoded);
    } else {
        let decoded = DigestManifest::decode(bytes);
        let opened = DigestManifest::open(file_of(bytes));
        assert_eq!(decoded.is_ok(), opened.is_ok(), "{decoded:?} vs {opened:?}");
        let (Ok(decoded), Ok(opened)) = (decoded, opened) else {
            return;
        };
        assert_eq!(decoded, opened);
        check_digests(&decoded);
        check_digests(&opened);
        let again = DigestManifest::decode(&decoded.encode().expect("encode")).expect("re-decode");
        assert_eq!(again, decoded);
    }
});
