//! Property test: random write/zero/discard sequences applied through qemu-io (compressed clusters
//! included), on a base and an
//! overlay, always hydrate exactly as `qemu-img convert -O raw` does.

mod common;

use common::Scratch;
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { pattern: u8, offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

impl Op {
    /// The qemu-io command; requests are 512-byte aligned as qemu-io requires.
    fn command(&self) -> String {
        match self {
            Op::Write {
                pattern,
                offset,
                len,
            } => format!("write -P {pattern} {offset} {len}"),
            Op::Zero { offset, len } => format!("write -z {offset} {len}"),
            Op::Discard { offset, len } => format!("discard {offset} {len}"),
        }
    }
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE / 512).prop_flat_map(|start| {
        let max = (SIZE / 512 - start).min(1024);
        (Just(start * 512), (1..=max).prop_map(|n| n * 512))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), range()).prop_map(|(pattern, (offset, len))| Op::Write { pattern, offset, len }),
        2 => range().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => range().prop_map(|(offset, len)| Op::Discard { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_hydrate_like_qemu(
        cluster_bits in prop::sample::select(vec![9u32, 12, 16, 17]),
        extended in any::<bool>(),
        compressed in prop::collection::btree_set(0..32u64, 0..4),
        base_ops in prop::collection::vec(op(), 1..8),
        top_ops in prop::collection::vec(op(), 0..8),
    ) {
        let cluster_size = 1u64 << cluster_bits;
        let extended = extended && cluster_bits >= 14;
        let s = Scratch::new();
        let opts = format!("cluster_size={cluster_size},extended_l2={}", if extended { "on" } else { "off" });
        s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, "base.qcow2", &SIZE.to_string()]);
        // Compressed writes go first: qemu only compresses into unallocated clusters.
        let commands: Vec<String> = compressed
            .iter()
            .map(|c| format!("write -c -P {} {} {cluster_size}", 0x80 + c, c * cluster_size))
            .chain(base_ops.iter().map(Op::command))
            .collect();
        s.qemu_io("base.qcow2", &commands.iter().map(String::as_str).collect::<Vec<_>>());
        s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        if !top_ops.is_empty() {
            let commands: Vec<String> = top_ops.iter().map(Op::command).collect();
            s.qemu_io("top.qcow2", &commands.iter().map(String::as_str).collect::<Vec<_>>());
        }
        s.assert_hydrates_like_qemu("top.qcow2");
    }
}
