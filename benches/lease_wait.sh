#!/bin/bash
# Measures how long the backup after a writer killed at "claimed" waits on moto with the default lease (30 s).
set -e
cd "$(dirname "$0")/.."
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p $PORT >/tmp/moto-lw.log 2>&1 & M=$!
trap "kill $M" EXIT
for i in $(seq 50); do curl -fs http://127.0.0.1:$PORT/ >/dev/null && break; sleep 0.2; done
curl -fsS -X PUT http://127.0.0.1:$PORT/leasewait >/dev/null
export AWS_ENDPOINT=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=t AWS_SECRET_ACCESS_KEY=t AWS_REGION=us-east-1
B=${STRATA:-build/debug/strata}
head -c 8M /dev/urandom > /tmp/lw.raw
$B backup --target s3://leasewait/p --volume v -q /tmp/lw.raw >/dev/null
head -c 1M /dev/urandom | dd of=/tmp/lw.raw conv=notrunc 2>/dev/null
STRATA_FAILPOINT=claimed $B backup --target s3://leasewait/p --volume v -q /tmp/lw.raw || true
for i in 1 2 3; do
  s=$(date +%s.%N); $B backup --target s3://leasewait/p --volume v -q /tmp/lw.raw 2>&1 | grep -v '^2026' ; e=$(date +%s.%N)
  echo "next backup after a kill: $(echo "$e - $s" | bc) s"
  head -c 1M /dev/urandom | dd of=/tmp/lw.raw conv=notrunc 2>/dev/null
  STRATA_FAILPOINT=claimed $B backup --target s3://leasewait/p --volume v -q /tmp/lw.raw || true
done
