#!/usr/bin/env bash
# Peak memory against the volume: the maximum resident set size (GNU time's %M) of
# `strata backup` (full), `strata backup` (an incremental comparing digests), `strata verify`
# and `strata restore`, for fully written volumes of each size given, side by side with
# qemu-img doing the nearest job: `convert -c -O qcow2` (full), `check` (verify) and
# `convert -O raw` (restore). qemu-img has no content-based incremental (`convert -B` copies
# every allocated cluster of the source), so the incremental has no peer. Rows of each size,
# then the ratio of the largest size's peaks to the smallest's: flat is 1.00. The restore is
# checked against the volume (by checksum, so the volume and the copy never coexist).
#
# The volume is fully written with text (every cluster non-zero and compressible, so every
# cluster has a digest, a checksum and a compressed L2 entry: the worst case for per-cluster
# tables), in a file of exactly the size; the incremental overwrites 1 MiB in every 64 MiB.
# CLUSTER (bytes, default 65536) is the chain's cluster size: 4096 makes the per-cluster tables
# 16 times larger for the same data (16 GiB at 4 KiB clusters: 4M entries, about 100 MiB of
# digests alone if held in memory). Needs free disk of a little more than the largest size
# (the volume, then the restored copy; the images are small).
#
# Measured here (release, one run each, load 2.0-2.4), 1 GiB vs 16 GiB at 64 KiB clusters:
# before streaming the tables, full backup 38.9 vs 58.8 MiB, incremental 36.0 vs 50.4, verify
# 14.4 vs 25.1, restore 30.5 vs 34.8; after, 40.3 vs 45.4, 37.9 vs 37.9, 14.8 vs 15.6, 31.0 vs
# 31.5 (qemu-img convert -c 12.9 vs 14.8, check 8.0 vs 7.8, convert -O raw 10.8 vs 12.4).
# At 4 KiB clusters, 1 vs 4 GiB: before 59.7 vs 114.1, 49.8 vs 86.3, 22.2 vs 67.4, 33.9 vs
# 53.4; after 46.7 vs 46.6, 37.8 vs 38.2, 14.8 vs 14.5, 30.9 vs 30.9.
#
#   cargo build --release --features cli --bin strata
#   benches/rss.sh [GIB...]          # default: 1 16; STRATA=path/to/strata to override
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 16)
cluster=${CLUSTER:-65536}
strata=${STRATA:-build/release/strata}
[ -x "$strata" ] || { echo "build it first: cargo build --release --features cli --bin strata" >&2; exit 2; }
work=$(mktemp -d "${WORK:-/tmp}/rss.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

# Peak RSS in MiB of a command (its output discarded).
peak() {
  /usr/bin/time -f %M -o "$work/kb" "$@" >/dev/null || { echo "failed: $*" >&2; return 1; }
  echo "scale=1; $(cat "$work/kb") / 1024" | bc
}

declare -A row
echo "cluster size $cluster bytes; load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%8s %9s | %12s %12s | %12s | %12s %12s | %12s %12s\n' written clusters \
  "backup full" "qemu -c" "incremental" "verify" "qemu check" "restore" "qemu raw"
for gib in "${sizes[@]}"; do
  vol="$work/volume.raw" target="$work/target"
  rm -rf "$target" "$work"/*.qcow2 "$work"/*.raw
  bytes=$((gib << 30))
  # Text: compressible, never a zero cluster.
  # (yes stops on SIGPIPE once head has enough.)
  { yes "strata memory bench $gib GiB: the quick brown fox jumps over the lazy dog" || true; } |
    head -c "$bytes" >"$vol"
  b_full=$(peak "$strata" backup -q --cluster-size "$cluster" --target "$target" --volume v "$vol")
  q_full=$(peak qemu-img convert -c -f raw -O qcow2 -o "compression_type=zstd,cluster_size=$cluster" "$vol" "$work/base.qcow2")
  for mib in $(seq 0 64 $(((bytes >> 20) - 1))); do
    head -c 1048576 /dev/urandom | dd of="$vol" bs=1M seek="$mib" conv=notrunc status=none
  done
  b_incr=$(peak "$strata" backup -q --target "$target" --volume v "$vol")
  b_verify=$(peak "$strata" verify --target "$target" --volume v)
  q_check=$(peak qemu-img check "$work/base.qcow2")
  # The volume makes room for the restored copies once its checksum is taken.
  sum=$(md5sum <"$vol")
  rm -f "$vol"
  b_restore=$(peak "$strata" restore -q --target "$target" --volume v "$work/restored.raw")
  [ "$(md5sum <"$work/restored.raw")" = "$sum" ] || { echo "the restore differs from the volume" >&2; exit 1; }
  rm -f "$work/restored.raw"
  q_restore=$(peak qemu-img convert -O raw "$work/base.qcow2" "$work/qemu.raw")
  rm -f "$work/qemu.raw"
  row[$gib]="$b_full $q_full $b_incr $b_verify $q_check $b_restore $q_restore"
  # shellcheck disable=SC2086
  printf '%6d G %9d | %9s MiB %8s MiB | %8s MiB | %8s MiB %8s MiB | %8s MiB %8s MiB\n' \
    "$gib" $((bytes / cluster)) ${row[$gib]}
done
first=${sizes[0]} last=${sizes[-1]}
read -r -a lo <<<"${row[$first]}"
read -r -a hi <<<"${row[$last]}"
ratios=""
for i in "${!lo[@]}"; do ratios+=$(printf ' %12.2f' "$(echo "${hi[$i]} / ${lo[$i]}" | bc -l)"); done
echo "peak at $last GiB / peak at $first GiB (flat is 1.00):"
echo "                    $ratios"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
