#!/usr/bin/env bash
# Restore from object storage, side by side: `strata restore` against boto3's `download_file`
# of the same objects (its peer for S3 throughput: 10 threads x 8 MiB ranged GETs, set
# explicitly below), in interleaved pairs (the order alternates), with each pair's ratio, the
# server's CPU time for each side, and the medians. Two cases:
#   base  - a full backup of a MIB-MiB random volume: one image object;
#   chain - a base and two overlays (each rewriting an eighth of the volume in scattered 2 MiB
#           runs): strata restores the top point, boto3 downloads every object of the chain.
# Then the physical limit: the same server streaming the base object to curl with 1 GET and
# with 8 parallel ranged GETs of 8 MiB (no client work but the socket), as MB/s.
#
# Server: s3s-fs (a real S3 protocol server with efficient ranged GETs:
# `cargo install s3s-fs@0.14.1 --features binary`), or moto with SERVER=moto (moto assembles the
# whole object for every ranged GET, so every ranged reader pays O(object) per request there).
#
# Measured 2026-12-01, late (2 cores; the runs themselves load it to 3-5): s3s-fs 320 MiB,
# output on a tmpfs, 7 pairs: base 0.64, chain 0.57 (limit: 8 parallel curl GETs 270-283 MB/s,
# which strata's base restore matched); output on disk (OUT=disk), 5 pairs: base 0.76, chain
# 0.59; moto 64 MiB, 3 pairs: base 0.52, chain 0.72. 2026-12-02, onto a loop device
# (OUT=device, strata flushing it, boto3 not), 5 pairs: base 0.75, chain 0.64 (the binary
# before direct device writes: base 1.25, 3 pairs). Earlier runs of this script, before each
# run started from the same state, swung from 0.35 to 1.9 for the same binaries: see run_case.
#
#   cargo build --release --features cli --bin strata
#   benches/s3_restore.sh [PAIRS] [MIB]   # STRATA=..., SERVER=s3s-fs|moto, CASES="base chain",
#                                         # OUT=tmpfs|disk|device,
#                                         # FLAGS="--fetch-part-size 16M --fetch-parallel 4"
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-5}
mib=${2:-320}
strata=${STRATA:-build/release/strata}
server=${SERVER:-s3s-fs}
cases=${CASES:-base chain}
read -r -a flags <<<"${FLAGS:-}"
[ -x "$strata" ] || { echo "build it first: cargo build --release --features cli --bin strata" >&2; exit 2; }
work=$(mktemp -d)
pid= mounted=
# Both sides write their output to $out: a tmpfs when run as root (OUT=disk to keep it on the
# work dir's disk). A disk output adds this VM's page-cache effects to whichever side they land
# on (see run_case), which drown the fetch path being compared. OUT=device restores onto a loop
# device over a file on the work dir's disk instead (root), as a datamover restores onto a raw
# block volume, and flushes it; boto3 then downloads to that disk and does not flush.
out=$work/out
dest=$out/out.raw dev=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$mounted" ] && umount "$out"
  [ -n "$dev" ] && losetup -d "$dev"; rm -rf "$work"
}
trap cleanup EXIT
mkdir "$out"
if [ "${OUT:-tmpfs}" = tmpfs ] && [ "$(id -u)" = 0 ] && mount -t tmpfs -o size=$((3 * mib + 256))m tmpfs "$out"; then
  mounted=1
fi
if [ "${OUT:-tmpfs}" = device ]; then
  truncate -s "${mib}M" "$work/device.img"
  dev=$(losetup -f --show "$work/device.img")
  dest=$dev
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
case "$server" in
  s3s-fs)
    mkdir -p "$work/root/bench"
    s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$work/root" \
      >"$work/server.log" 2>&1 &
    pid=$! ;;
  moto)
    moto_server -H 127.0.0.1 -p "$port" >"$work/server.log" 2>&1 &
    pid=$! ;;
  *) echo "SERVER is s3s-fs or moto" >&2; exit 2 ;;
esac
for _ in $(seq 100); do curl -s "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
[ "$server" = moto ] && curl -fsS -X PUT "http://127.0.0.1:$port/bench" >/dev/null
export AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_ENDPOINT_URL="http://127.0.0.1:$port"

# The volumes: base (one backup) and chain (base + two overlays of scattered 2 MiB runs).
head -c $((mib << 20)) /dev/urandom >"$work/base.raw"
"$strata" backup --target s3://bench/p --volume base -q "$work/base.raw" >/dev/null
cp "$work/base.raw" "$work/chain.raw"
"$strata" backup --target s3://bench/p --volume chain -q "$work/chain.raw" >/dev/null
for layer in 1 2; do
  runs=$((mib / 16))
  for r in $(seq 0 $((runs - 1))); do
    off=$(( (r * 16 + layer * 5) % (mib - 2) ))
    head -c $((2 << 20)) /dev/urandom | dd of="$work/chain.raw" bs=1M seek="$off" conv=notrunc status=none
  done
  "$strata" backup --target s3://bench/p --volume chain -q "$work/chain.raw" >/dev/null
done
cat >"$work/keys.py" <<'EOF_PY'
import sys, boto3
s3 = boto3.client("s3")
prefix = "p/volumes/%s/images/" % sys.argv[1]
for o in s3.list_objects_v2(Bucket="bench", Prefix=prefix)["Contents"]:
    print(o["Key"], o["Size"])
EOF_PY
cat >"$work/get.py" <<'EOF_PY'
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
# boto3's defaults, spelled out: ranged GETs of 8 MiB, 10 threads.
config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20,
                        max_concurrency=10, use_threads=True)
s3 = boto3.client("s3")
for key in sys.argv[2:]:
    s3.download_file("bench", key, os.path.join(sys.argv[1], os.path.basename(key)), Config=config)
EOF_PY

now() { date +%s.%N; }
# The server's CPU time (user + system) in seconds.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

run_case() {
  local name=$1 keys bytes
  keys=$(python3 "$work/keys.py" "$name" | awk '{print $1}' | tr '\n' ' ')
  bytes=$(python3 "$work/keys.py" "$name" | awk '{s += $2} END {print s}')
  local -a ts tb cs cb
  for p in $(seq "$pairs"); do
    local a b c d s q c0 c1 c2 c3
    # Each run starts in the same state: no dirty pages (the writeback of what ran before would
    # land on whichever runs then), and its own previous output just removed, so the page
    # cache it fills comes from pages freed a moment ago. On a VM with free page reporting
    # (this one), memory freed more than about 2 s earlier has gone back to the host, and
    # touching it again cost the side that ran second in a pair 1.3 s more of 320 MiB.
    strata_run() { sync; [ -n "$dev" ] || rm -f "$dest"; c0=$(cpu); a=$(now)
      "$strata" restore --target s3://bench/p --volume "$name" "${flags[@]}" -q "$dest" >/dev/null
      b=$(now); c1=$(cpu); }
    boto_run() { sync; rm -rf "$out/objects"; mkdir "$out/objects"; c2=$(cpu); c=$(now)
      # shellcheck disable=SC2086
      python3 "$work/get.py" "$out/objects" $keys
      d=$(now); c3=$(cpu); }
    if [ $((p % 2)) = 1 ]; then strata_run; boto_run; else boto_run; strata_run; fi
    s=$(echo "$b - $a" | bc); q=$(echo "$d - $c" | bc)
    ts+=("$s"); tb+=("$q"); cs+=("$(echo "$c1 - $c0" | bc)"); cb+=("$(echo "$c3 - $c2" | bc)")
    printf '%s pair %d: strata restore %.3f s, boto3 download_file %.3f s, ratio %.3f; server CPU %.2f s vs %.2f s\n' \
      "$name" "$p" "$s" "$q" "$(echo "$s / $q" | bc -l)" "${cs[-1]}" "${cb[-1]}"
  done
  cmp -s -n $((mib << 20)) "$dest" "$work/$name.raw" && echo "$name: restored volume matches"
  local ms mb
  ms=$(median "${ts[@]}"); mb=$(median "${tb[@]}")
  printf '%s median (%s, output on %s, %d MiB volume, %d objects, %d MiB stored, %d pairs): strata %.3f s, boto3 %.3f s, ratio %.3f; server CPU %.2f s vs %.2f s; load %s\n' \
    "$name" "$server" "$([ -n "$dev" ] && echo "a loop device" || { [ -n "$mounted" ] && echo tmpfs || echo disk; })" "$mib" "$(wc -w <<<"$keys")" $((bytes >> 20)) "$pairs" "$ms" "$mb" \
    "$(echo "$ms / $mb" | bc -l)" "$(median "${cs[@]}")" "$(median "${cb[@]}")" "$(cut -d' ' -f1-3 /proc/loadavg)"
}
for name in $cases; do run_case "$name"; done

# The physical limit: raw GETs of the base object to /dev/null, 1 stream and 8 x 8 MiB parts.
read -r key size < <(python3 "$work/keys.py" base)
url="http://127.0.0.1:$port/bench/$key"
get() { curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:benchsecret \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@" -o /dev/null; }
a=$(now); get "$url"; b=$(now)
parts=$(( (size + (8 << 20) - 1) / (8 << 20) ))
export -f get; export url size
c=$(now)
seq 0 $((parts - 1)) | xargs -P 8 -I{} bash -c \
  'i={}; s=$((i << 23)); e=$(( s + (8 << 20) - 1 )); [ $e -ge $size ] && e=$((size - 1)); get -H "Range: bytes=$s-$e" "$url"'
d=$(now)
printf 'limit (%s, base object %d MiB): curl 1 GET %.0f MB/s, 8 parallel 8 MiB GETs %.0f MB/s; load %s\n' "$server" \
  $((size >> 20)) "$(echo "$size / ($b - $a) / 1000000" | bc -l)" "$(echo "$size / ($d - $c) / 1000000" | bc -l)" \
  "$(cut -d' ' -f1-3 /proc/loadavg)"
