#!/usr/bin/env bash
# Compression, side by side: `strata backup` (default options: zstd level 1, folder target)
# and `strata convert -c -o compression_type=zstd` against
# `qemu-img convert -c -o compression_type=zstd -O qcow2` of the same raw file, in
# interleaved pairs, with image sizes, wall times, each pair's ratios and the medians.
#
# The volume is issue 14's mixed case, interleaved cluster by cluster (64 KiB): a third
# text (C headers from /usr/include, or this repository's sources if there are none), a third
# random, a third holes. Random clusters do not shrink and are stored raw by both tools, so
# what the text costs and how compressed clusters pack between raw ones decide the sizes.
# The raw file stays in the page cache for both tools (nothing is dropped unless
# DROP_CACHES=1 and root).
#
#   cargo build --release --features cli --bin strata
#   benches/compress.sh [PAIRS] [MIB]          # STRATA=path/to/strata to override
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-3}
mib=${2:-256}
strata=${STRATA:-build/release/strata}
[ -x "$strata" ] || { echo "build it first: cargo build --release --features cli --bin strata" >&2; exit 2; }
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

cluster=65536
clusters=$((mib * 1048576 / cluster))
groups=$((clusters / 3))
# Text: whole files concatenated, as much as a third of the volume takes (head closing the
# pipe early is expected).
{
  find /usr/include -name '*.h' -type f | sort | xargs -r cat
  git ls-files -z | xargs -0 cat
} 2>/dev/null | head -c $((groups * cluster)) >"$work/text" || true
[ "$(stat -c %s "$work/text")" -eq $((groups * cluster)) ] || { echo "not enough text" >&2; exit 2; }
head -c $((groups * cluster)) /dev/urandom >"$work/random"
raw="$work/volume.raw"
truncate -s $((clusters * cluster)) "$raw"
for g in $(seq 0 $((groups - 1))); do
  dd if="$work/text" of="$raw" bs=$cluster skip="$g" seek=$((3 * g)) count=1 conv=notrunc status=none
  dd if="$work/random" of="$raw" bs=$cluster skip="$g" seek=$((3 * g + 1)) count=1 conv=notrunc status=none
done
rm -f "$work/text" "$work/random"
echo "volume: $mib MiB, $clusters clusters of 64 KiB: text, random, hole, text, random, hole, ..."

drop() { if [ "${DROP_CACHES:-0}" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
now() { date +%s.%N; }
size() { stat -c %s "$1"; }
declare -a bt qt ct bs qs cs br cr
for p in $(seq "$pairs"); do
  rm -rf "$work/target" "$work/qemu.qcow2" "$work/strata.qcow2"
  drop; a=$(now)
  out=$("$strata" backup -q --target "$work/target" --volume v "$raw")
  b=$(now)
  backup_size=$(echo "$out" | sed -n 's/.*(\([0-9]*\) bytes image).*/\1/p')
  drop; c=$(now)
  qemu-img convert -c -o compression_type=zstd -f raw -O qcow2 "$raw" "$work/qemu.qcow2"
  d=$(now)
  drop; e=$(now)
  "$strata" convert -c -o compression_type=zstd -f raw -O qcow2 "$raw" "$work/strata.qcow2"
  f=$(now)
  q=$(size "$work/qemu.qcow2"); s=$(size "$work/strata.qcow2")
  bt+=("$(echo "$b - $a" | bc)"); qt+=("$(echo "$d - $c" | bc)"); ct+=("$(echo "$f - $e" | bc)")
  bs+=("$backup_size"); qs+=("$q"); cs+=("$s")
  br+=("$(echo "${bt[-1]} / ${qt[-1]}" | bc -l)"); cr+=("$(echo "${ct[-1]} / ${qt[-1]}" | bc -l)")
  printf 'pair %d: qemu-img %d bytes %.2f s | backup %d bytes %.2f s (size %.3f, time %.3f) | convert -c %d bytes %.2f s (size %.3f, time %.3f)\n' \
    "$p" "$q" "${qt[-1]}" "$backup_size" "${bt[-1]}" "$(echo "$backup_size / $q" | bc -l)" \
    "$(echo "${bt[-1]} / ${qt[-1]}" | bc -l)" "$s" "${ct[-1]}" "$(echo "$s / $q" | bc -l)" \
    "$(echo "${ct[-1]} / ${qt[-1]}" | bc -l)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mq=$(median "${qt[@]}"); mb=$(median "${bt[@]}"); mc=$(median "${ct[@]}")
printf 'median: qemu-img %.2f s, backup %.2f s (ratio %.3f), convert -c %.2f s (ratio %.3f); sizes: backup/qemu-img %.3f, convert -c/qemu-img %.3f (load: %s)\n' \
  "$mq" "$mb" "$(echo "$mb / $mq" | bc -l)" "$mc" "$(echo "$mc / $mq" | bc -l)" \
  "$(echo "${bs[-1]} / ${qs[-1]}" | bc -l)" "$(echo "${cs[-1]} / ${qs[-1]}" | bc -l)" \
  "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'median of the pairs'"'"' time ratios: backup %.3f, convert -c %.3f\n' "$(median "${br[@]}")" "$(median "${cr[@]}")"
# Both images read as the volume, and are clean.
qemu-img compare -q -f raw -F qcow2 "$raw" "$work/strata.qcow2" && echo "strata convert -c image matches the volume"
qemu-img check -q "$work/strata.qcow2" && echo "strata convert -c image checks clean"
image=$(find "$work/target" -name '*.qcow2' | head -n 1)
if [ -n "$image" ]; then
  qemu-img compare -q -f raw -F qcow2 "$raw" "$image" && echo "backup image matches the volume"
  qemu-img check -q "$image" && echo "backup image checks clean"
fi
