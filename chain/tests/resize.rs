//! Chains across volume resizes: a fold of the middle of a chain whose volume shrank and grew
//! again keeps the point, since the range past the shorter image's end reads as zeros before
//! the fold and after it (not as the grandparent's old data).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_chain::{ChangeSource, DigestAlgorithm, DigestManifest, backup, merge};
use strata_qcow2::{FileSink, Image, WriterOptions};

const CLUSTER: u64 = 65536;
const MIB: u64 = 1 << 20;

fn take(
    dir: &Path,
    volume: &Path,
    name: &str,
    backing: Option<&str>,
    previous: Option<&DigestManifest>,
) -> DigestManifest {
    let mut options = WriterOptions::default();
    options.cluster_size = CLUSTER;
    options.backing_file = backing.map(str::to_owned);
    let source = match previous {
        Some(previous) => ChangeSource::Digests { previous },
        None => ChangeSource::Full,
    };
    let sink = FileSink::create(dir.join(name)).expect("sink");
    let file = File::open(volume).expect("volume");
    let (_, outcome) = backup(
        &file,
        sink,
        &options,
        source,
        DigestAlgorithm::Blake3,
        &mut |_| {},
    )
    .expect("backup");
    outcome.digests
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    let image = Image::open(dir.join(name)).expect("open");
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut buf, 0).expect("read");
    buf
}

fn resize(volume: &Path, size: u64) {
    File::options()
        .write(true)
        .open(volume)
        .expect("open")
        .set_len(size)
        .expect("resize");
}

#[test]
fn folding_the_middle_of_a_shrink_then_grow_chain_keeps_the_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("vol.raw");
    {
        let file = File::create(&volume).expect("volume");
        file.set_len(2 * MIB).expect("size");
        file.write_all_at(&vec![b'A'; CLUSTER as usize], 0)
            .expect("write");
        file.write_all_at(&vec![b'G'; CLUSTER as usize], 1536 << 10)
            .expect("write");
    }
    let g = take(dir.path(), &volume, "g.qcow2", None, None);
    resize(&volume, MIB);
    let p = take(dir.path(), &volume, "p.qcow2", Some("g.qcow2"), Some(&g));
    resize(&volume, 2 * MIB);
    take(dir.path(), &volume, "c.qcow2", Some("p.qcow2"), Some(&p));
    let expected = std::fs::read(&volume).expect("volume");
    assert_eq!(read(dir.path(), "c.qcow2"), expected, "before the fold");

    let chain = Image::open(dir.path().join("c.qcow2")).expect("open");
    let mut options = WriterOptions::default();
    options.cluster_size = CLUSTER;
    options.backing_file = Some("g.qcow2".into());
    merge(
        &chain,
        FileSink::create(dir.path().join("folded.qcow2")).expect("sink"),
        &options,
    )
    .expect("merge");
    let folded = read(dir.path(), "folded.qcow2");
    assert_eq!(
        folded.iter().zip(&expected).position(|(a, b)| a != b),
        None,
        "the folded point differs from the volume"
    );
    assert_eq!(folded.len(), expected.len());
}
