//! What a chain of hostile images costs in memory, alone in its binary so that no other test
//! moves the process's peak RSS (`VmHWM`) while it measures.

mod common;

use std::os::unix::fs::FileExt;

use common::hand_header;
use strata_qcow2::Image;

/// The process's peak resident set so far, in KiB.
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .expect("VmHWM in kB")
}

#[test]
fn a_chain_of_sparse_images_with_huge_tables_stays_within_the_chain_budget() {
    // 24 images of 2 MiB clusters, each an L1 table of 4 Mi entries (32 MiB, the per-image
    // cap) whose first 16 entries point at distinct all-zero L2 tables: 66 MiB of file each,
    // nearly all of it holes. Before the chain budget, opening and mapping 8 of them cost
    // 514 MiB (a whole L1 table and 16 cached 2 MiB tables per image), 128 of them ~8 GiB.
    // Now the L1 tables cost what the virtual size needs (16 entries) and the L2 caches
    // share the chain's 64 MiB, which 24 images' shares of 2 tables overflow: the peak grows
    // by that and by the tables being read (72 MiB measured, the same 128 deep; 40 MiB 8 deep).
    const BITS: u32 = 21;
    const CLUSTER: u64 = 1 << BITS;
    const L1_ENTRIES: u32 = 4 << 20;
    const TABLES: u64 = 16;
    let depth = 24;
    let dir = tempfile::tempdir().expect("temporary folder");
    let l1_offset = CLUSTER;
    let tables_at = l1_offset + u64::from(L1_ENTRIES) * 8;
    let size = TABLES << (BITS + BITS - 3);
    for i in 0..depth {
        let next = format!("l{}", i + 1);
        let backing = (i + 1 < depth).then_some(next.as_str());
        let file = std::fs::File::create(dir.path().join(format!("l{i}"))).expect("create");
        file.set_len(tables_at + TABLES * CLUSTER).expect("set_len");
        let header = hand_header(BITS, size, L1_ENTRIES, l1_offset, 0, backing);
        file.write_all_at(&header, 0).expect("header");
        let l1: Vec<u8> = (0..TABLES)
            .flat_map(|t| (tables_at + t * CLUSTER).to_be_bytes())
            .collect();
        file.write_all_at(&l1, l1_offset).expect("L1");
    }

    let before = vm_hwm_kib();
    let image = Image::open(dir.path().join("l0")).expect("open");
    assert_eq!(image.depth(), depth);
    let mut extents = 0;
    image
        .for_each_extent(0, image.virtual_size(), |_| {
            extents += 1;
            Ok(())
        })
        .expect("map");
    let grown = vm_hwm_kib() - before;
    assert_eq!(extents, 1, "the whole disk is one unallocated extent");
    assert!(grown < 80 << 10, "peak RSS grew by {} MiB", grown >> 10);
}
