#!/usr/bin/env bash
# Restore onto a block device, side by side: `strata convert -O raw CHAIN /dev/loopN` against
# `qemu-img convert -n -O raw CHAIN /dev/loopN`, in interleaved rounds on one loop device, with
# each round's ratios and the medians. Needs root (losetup) and qemu-img.
#
# strata flushes the device (fdatasync) before it reports success; qemu-img's default cache mode
# for convert (`unsafe`) never flushes, so a third leg runs qemu-img with `-t writeback`, which
# flushes at the end as strata does: that is the like-for-like pair.
#
# The chain is issue 14's case: a 4 GiB volume holding 128 MiB of data in a 4-deep chain (32
# MiB written per image at spread offsets, a few ranges zeroed in the overlays). What limits
# both tools is the device: the data must be written (128 MiB), and everything else zeroed
# without data writes (fallocate / BLKZEROOUT); a tool that writes zeros writes 4 GiB.
#
# The chain is read cold (after `drop_caches`) by default, as a datamover reads it from a
# target; CACHE=warm reads it into the page cache before each run instead, which leaves the
# device's writes (and strata's flush of them) as the only disk work.
#
#   cargo build --release --features cli --bin strata
#   sudo benches/block_restore.sh [PAIRS]          # STRATA=path/to/strata to override
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-5}
strata=${STRATA:-build/release/strata}
[ -x "$strata" ] || { echo "build it first: cargo build --release --features cli --bin strata" >&2; exit 2; }
work=$(mktemp -d)
dev=
cleanup() { [ -n "$dev" ] && losetup -d "$dev"; rm -rf "$work"; }
trap cleanup EXIT

qemu-img create -q -f qcow2 "$work/0.qcow2" 4G
qemu-io -c "write -P 0x11 0 32M" "$work/0.qcow2" >/dev/null
for i in 1 2 3; do
  qemu-img create -q -f qcow2 -b "$((i - 1)).qcow2" -F qcow2 "$work/$i.qcow2"
  qemu-io -c "write -P 0x$((i + 1))$((i + 1)) $((i * 1000))M 32M" \
    -c "write -z $(((i - 1) * 1000 + 8))M 4M" "$work/$i.qcow2" >/dev/null
done
chain="$work/3.qcow2"
truncate -s 4G "$work/device.img"
dev=$(losetup -f --show "$work/device.img")

now() { date +%s.%N; }
declare -a ts tq tw
prepare() {
  sync
  if [ "${CACHE:-cold}" = warm ]; then cat "$work"/*.qcow2 >/dev/null; else echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi
}
timed() { prepare; local a b; a=$(now); "$@"; b=$(now); echo "$b - $a" | bc; }
for p in $(seq "$pairs"); do
  s=$(timed "$strata" convert -O raw "$chain" "$dev")
  q=$(timed qemu-img convert -n -O raw "$chain" "$dev")
  w=$(timed qemu-img convert -t writeback -n -O raw "$chain" "$dev")
  ts+=("$s"); tq+=("$q"); tw+=("$w")
  printf 'round %d: strata %.3f s, qemu-img %.3f s (unsafe), %.3f s (writeback); ratios %.3f, %.3f\n' \
    "$p" "$s" "$q" "$w" "$(echo "$s / $q" | bc -l)" "$(echo "$s / $w" | bc -l)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ms=$(median "${ts[@]}"); mq=$(median "${tq[@]}"); mw=$(median "${tw[@]}")
printf 'median (%s chain): strata %.3f s, qemu-img %.3f s unsafe (ratio %.3f), %.3f s writeback (ratio %.3f); load %s\n' \
  "${CACHE:-cold}" "$ms" "$mq" "$(echo "$ms / $mq" | bc -l)" "$mw" "$(echo "$ms / $mw" | bc -l)" "$(cut -d' ' -f1-3 /proc/loadavg)"
# The last copy (qemu-img's) and strata's read the same: check strata's once more.
"$strata" convert -O raw "$chain" "$dev"
qemu-img compare -q -f qcow2 -F raw "$chain" "$dev" && echo "strata's device content matches the chain"
