#!/usr/bin/env bash
# Restore from object storage, side by side: `strata restore` of a full backup from an S3 server
# against boto3's `download_file` of the same image object (its peer for S3 throughput), in
# interleaved pairs, with each pair's ratio and the medians.
#
# Server: s3s-fs (a real S3 protocol server with efficient ranged GETs:
# `cargo install s3s-fs@0.14.1 --features binary`), or moto with SERVER=moto (moto assembles the
# whole object for every ranged GET, so it punishes ranged readers; quoted for that reason only).
#
#   cargo build --release --example strata
#   benches/s3_restore.sh [PAIRS] [MIB]        # STRATA=..., SERVER=s3s-fs|moto
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-5}
mib=${2:-320}
strata=${STRATA:-build/release/examples/strata}
server=${SERVER:-s3s-fs}
[ -x "$strata" ] || { echo "build it first: cargo build --release --example strata" >&2; exit 2; }
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

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

head -c $((mib << 20)) /dev/urandom >"$work/volume.raw"
"$strata" backup --target s3://bench/p --volume v -q "$work/volume.raw" >/dev/null
key=$(python3 - <<'EOF'
import boto3
s3 = boto3.client("s3")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bench", Prefix="p/volumes/v/images/")["Contents"]]
print(keys[0])
EOF
)
cat >"$work/get.py" <<'EOF'
import sys, boto3
boto3.client("s3").download_file("bench", sys.argv[1], sys.argv[2])
EOF

now() { date +%s.%N; }
declare -a ts tb
for p in $(seq "$pairs"); do
  rm -f "$work/out.raw" "$work/obj.qcow2"
  a=$(now); "$strata" restore --target s3://bench/p --volume v -q "$work/out.raw" >/dev/null; b=$(now)
  c=$(now); python3 "$work/get.py" "$key" "$work/obj.qcow2"; d=$(now)
  s=$(echo "$b - $a" | bc); q=$(echo "$d - $c" | bc)
  ts+=("$s"); tb+=("$q")
  printf 'pair %d: strata restore %.3f s, boto3 download_file %.3f s, ratio %.3f\n' "$p" "$s" "$q" "$(echo "$s / $q" | bc -l)"
done
cmp -s "$work/out.raw" "$work/volume.raw" && echo "restored volume matches"
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ms=$(median "${ts[@]}"); mb=$(median "${tb[@]}")
printf 'median (%s, %d MiB image): strata %.3f s, boto3 %.3f s, ratio %.3f; load %s\n' "$server" "$mib" \
  "$ms" "$mb" "$(echo "$ms / $mb" | bc -l)" "$(cut -d' ' -f1-3 /proc/loadavg)"
