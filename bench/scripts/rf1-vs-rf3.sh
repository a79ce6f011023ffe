#!/usr/bin/env bash
# Replication cost on one host: the same workload against a topic with
# replication factor 1 and one with replication factor 3, on the same
# 3-node cluster (scripts/cluster), in one sitting, interleaved.
#
# Prints, for each pair, produce throughput and ack p50/p99/p99.9 of both and
# their ratio (RF 3 / RF 1), then the medians; `tidelog-bench compare` draws
# every run side by side. Every run directory (summary.json, .hgrm, SVGs) is
# kept under --out.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bench/scripts/rf1-vs-rf3.sh [options]

  --workload FILE     bench workload (default bench/workloads/max-throughput.toml);
                      bench/workloads/fixed-rate-latency.toml measures latency at 20 MB/s
  --duration-s S      length of each run (default 20, after the workload's warm-up)
  --repeat N          N interleaved RF 1 / RF 3 pairs (default 1)
  --dir DIR           cluster data and logs (default /var/tmp/tidelog-rf-bench; wiped first);
                      must be on a disk file system (O_DIRECT), not tmpfs. Each run's topic is
                      deleted after it (python3 confluent-kafka), but one unpaced run needs room
                      for duration x throughput x 3 (about 20 GB for 20 s here)
  --keep-cluster      leave the cluster running afterwards (scripts/cluster stop --dir DIR)
  --baseline FILE     hardware baseline JSON for the reports (tidelog-bench baseline)
  --out DIR           where the run directories go (default results/rf1-vs-rf3)
  -h, --help          this text

Both topics get the workload's partition count, acks=all and
min.insync.replicas=1 (the cluster default), so RF 3 acks wait for all three
replicas' fdatasync while RF 1 waits for the leader's only. Leaders are spread
over the three nodes in both. All three nodes, the bench and its clients
share this host's cores: the ratio, not the absolute figure, is the result.
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
workload="$root/bench/workloads/max-throughput.toml" duration=20 repeat=1
dir=/var/tmp/tidelog-rf-bench keep=0 baseline="" out=results/rf1-vs-rf3
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) workload=$2; shift 2 ;;
    --duration-s) duration=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --keep-cluster) keep=1; shift ;;
    --baseline) baseline=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

bench="$root/target/release/tidelog-bench"
if [ ! -x "$bench" ] || [ ! -x "$root/target/release/tidelog" ]; then
  echo "building tidelog and tidelog-bench (release)..."
  (cd "$root" && cargo build --release --bin tidelog -p tidelog-bench)
fi

rm -rf "$dir"
mkdir -p "$out"
echo "starting the cluster in $dir"
"$root/scripts/cluster" start --dir "$dir"
cleanup() {
  if [ "$keep" -eq 0 ]; then "$root/scripts/cluster" stop --dir "$dir" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

delete_topic() {
  python3 - "$1" <<'PY' || echo "warning: could not delete topic $1 (pip install confluent-kafka); delete $dir when done" >&2
import sys
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": "127.0.0.1:9092"})
admin.delete_topics([sys.argv[1]])[sys.argv[1]].result(60)
PY
}

stamp=$(date +%s)
runs=()
for i in $(seq 1 "$repeat"); do
  for rf in 1 3; do
    name="rf$rf-pair$i"
    echo "== pair $i: replication factor $rf (${duration} s)"
    args=(run --workload "$workload" --bootstrap 127.0.0.1:9092 --duration-s "$duration"
          --topic "rf$rf-$stamp-$i" --replication-factor "$rf" --broker-label "tidelog RF $rf"
          --out "$out/$name" --quiet)
    [ -n "$baseline" ] && args+=(--baseline "$baseline")
    "$bench" "${args[@]}"
    runs+=("$out/$name")
    # An unpaced run writes tens of GB (three times over at RF 3): free the disk.
    delete_topic "rf$rf-$stamp-$i"
  done
done

python3 - "$out" "$repeat" <<'PY'
import json, os, statistics, sys
out, repeat = sys.argv[1], int(sys.argv[2])
def load(name):
    s = json.load(open(os.path.join(out, name, "summary.json")))
    r = s["results"]
    a = r["latency_us"]["produce_ack_record"]
    return r["produce"]["mb_per_s"], a["p50"] / 1000, a["p99"] / 1000, a["p999"] / 1000
ratios = {"MB/s": [], "p50": [], "p99": [], "p99.9": []}
print("\npair  RF  produce MB/s  ack p50 ms  ack p99 ms  ack p99.9 ms")
for i in range(1, repeat + 1):
    one, three = load("rf1-pair%d" % i), load("rf3-pair%d" % i)
    for rf, v in ((1, one), (3, three)):
        print("%4d  %2d  %12.1f  %10.2f  %10.2f  %12.2f" % (i, rf, *v))
    for k, a, b in zip(ratios, one, three):
        ratios[k].append(b / a if a else float("nan"))
    print("      RF 3 / RF 1: throughput %.2fx, ack p50 %.2fx, p99 %.2fx, p99.9 %.2fx" % tuple(r[-1] for r in ratios.values()))
print("\nmedian RF 3 / RF 1 over %d pair(s): throughput %.2fx, ack p50 %.2fx, p99 %.2fx, p99.9 %.2fx"
      % (repeat, *(statistics.median(v) for v in ratios.values())))
PY
"$bench" compare --svg "$out/compare.svg" "${runs[@]}" > "$out/compare.txt" && echo "side by side: $out/compare.txt"
