#!/usr/bin/env bash
# Memory and requests against the chain's depth: a volume backed up DEPTH times (a full
# backup, then incrementals of 4 MiB scattered changes each) into an S3 server (moto, started
# here) and into a folder target, then, for the chain's depth 1 (a single full backup of the
# same data) and DEPTH:
# - `strata restore` of the latest point from S3: wall time and peak RSS (GNU time's %M);
# - `strata verify` of every backup from S3: wall time, peak RSS and the requests moto logged;
# - the peer, `qemu-img convert -O raw` of the same chain from the folder target's files
#   (qemu-img reads no object storage): its peak RSS.
# The restored volume is compared with the source. Flat is what is wanted: the same peak at
# depth 1 and DEPTH, and verify requests in proportion to the backups.
#
# Measured here (release, moto, one run each, load 2.1 to 2.5): docs/target.md, "Memory against
# depth" (a 64-deep restore's peak 278 MiB before one cache budget served all readers, 128 to
# 146 after; verify of all 64 backups 101 s and 19,301 requests before, 6 s and 1,030 after,
# 5.8 s and 900 once verify stopped reading each manifest again).
#
#   cargo build --release --features cli --bin strata
#   benches/deep_chain.sh [DEPTH]      # default 64; STRATA=path/to/strata to override
set -euo pipefail
cd "$(dirname "$0")/.."
depth=${1:-64}
strata=$(realpath "${STRATA:-build/release/strata}")
[ -x "$strata" ] || { echo "build it first: cargo build --release --features cli --bin strata" >&2; exit 2; }
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
moto=
cleanup() { [ -n "$moto" ] && kill "$moto" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
curl -s -X PUT "http://127.0.0.1:$port/deep-bench" -o /dev/null
export AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret

vol="$work/vol.img"
truncate -s 1G "$vol"
head -c 64M /dev/urandom | dd of="$vol" conv=notrunc status=none
for i in $(seq 0 $((depth - 1))); do
  for k in 0 1 2 3; do
    head -c 1M /dev/urandom | dd of="$vol" bs=1M seek=$(( (i * 37 + k * 251) % 1024 )) conv=notrunc status=none
  done
  "$strata" backup -q --target "s3://deep-bench/chain" --volume v "$vol" >/dev/null
  "$strata" backup -q --target "$work/folder" --volume v "$vol" >/dev/null
done
"$strata" backup -q --target "s3://deep-bench/one" --volume v "$vol" >/dev/null
top=$(ls -t "$work"/folder/volumes/v/images/*.qcow2 | head -1)

peak() { /usr/bin/time -f '%e %M' -o "$work/t" "$@" >/dev/null; read -r s kb <"$work/t"; printf '%.2f s, %.1f MiB' "$s" "$(echo "$kb / 1024" | bc -l)"; }
requests() { wc -l <"$work/moto.log"; }
for case in one chain; do
  n=$([ "$case" = one ] && echo 1 || echo "$depth")
  rm -f "$work/out.raw"
  r=$(peak "$strata" restore -q --target "s3://deep-bench/$case" --volume v "$work/out.raw")
  cmp -s "$work/out.raw" "$vol" || { echo "depth $n: the restore differs from the volume" >&2; exit 1; }
  before=$(requests)
  v=$(peak "$strata" verify --target "s3://deep-bench/$case" --volume v)
  after=$(requests)
  printf 'depth %3d: restore %s; verify of %d backups %s, %d requests\n' "$n" "$r" "$n" "$v" "$((after - before))"
done
rm -f "$work/out.raw"
printf 'peer, depth %d from files: qemu-img convert -O raw %s\n' "$depth" "$(peak qemu-img convert -O raw "$top" "$work/out.raw")"
