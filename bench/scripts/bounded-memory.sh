#!/usr/bin/env bash
# Issue 20's memory scenario: does the broker keep its memory bounded and its
# producers at speed while 1,000 connections sit idle and 100 consumers fetch
# and never read their sockets?
#
# Against a running broker: writes a backlog (so the stuck fetches have data
# to be answered with), runs a paced tidelog-bench produce alone, then the
# same run while bench/scripts/stuck-clients.py holds the idle and stuck
# connections, and prints the broker's RSS/FD/thread samples and the two runs
# side by side (tidelog-bench compare).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bench/scripts/bounded-memory.sh --broker-pid PID [options]

  --broker-pid PID        the broker's PID (RSS, FDs and threads from /proc; CPU for the bench)
  --host HOST             broker host (default 127.0.0.1)
  --port P                first shard port (default 9092)
  --shards N              shard ports P..P+N-1 (default 2)
  --idle N                idle connections (default 1000)
  --stuck N               consumers that fetch and never read (default 100)
  --pipeline N            Fetch requests each stuck consumer sends unread (default 8)
  --rate-mb R             produce rate of the bench runs (default 20)
  --duration-s S          length of each bench run (default 30)
  --backlog-records N     1 KiB records written to topic "stuck-backlog" first (default 300000);
                          0 skips it (the topic must then exist)
  --out DIR               run directories and samples (default results/bounded-memory)
  -h, --help              this text
USAGE
}

pid="" host=127.0.0.1 port=9092 shards=2 idle=1000 stuck=100 pipeline=8 rate=20 duration=30
backlog=300000 out=results/bounded-memory
while [ $# -gt 0 ]; do
  case "$1" in
    --broker-pid) pid=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --stuck) stuck=$2; shift 2 ;;
    --pipeline) pipeline=$2; shift 2 ;;
    --rate-mb) rate=$2; shift 2 ;;
    --duration-s) duration=$2; shift 2 ;;
    --backlog-records) backlog=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$pid" ] || { echo "--broker-pid is required (see --help)" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="${TIDELOG_BENCH_BIN:-$here/../../target/release/tidelog-bench}"
bootstrap="$host:$port"
ports=$(seq -s, "$port" $((port + shards - 1)))
mkdir -p "$out"

if [ "$backlog" -gt 0 ]; then
  echo "== writing the backlog: $backlog x 1 KiB to stuck-backlog"
  "$bench" run --bootstrap "$bootstrap" --topic stuck-backlog --partitions 6 --producers 1 --consumers 0 \
    --records "$backlog" --record-size 1024 --no-baseline --quiet --name backlog --out "$out/backlog" >/dev/null
fi

run() {
  "$bench" run --bootstrap "$bootstrap" --topic "bounded-$1" --partitions 6 --producers 1 --consumers 1 \
    --rate-mb "$rate" --record-size 1024 --acks all --duration-s "$duration" --warmup-s 3 \
    --broker-pid "$pid" --no-baseline --name "$1" --out "$out/$1"
}

echo "== alone"
run alone
echo "== with $idle idle connections and $stuck stuck consumers"
python3 "$here/stuck-clients.py" --host "$host" --ports "$ports" --topic stuck-backlog --partitions 6 \
  --idle "$idle" --stuck "$stuck" --pipeline "$pipeline" --hold-s $((duration + 15)) \
  --broker-pid "$pid" --csv "$out/stuck-clients.csv" &
clients=$!
sleep 8
run with-stuck
wait "$clients"
"$bench" compare --svg "$out/compare.svg" "$out/alone" "$out/with-stuck" || true
