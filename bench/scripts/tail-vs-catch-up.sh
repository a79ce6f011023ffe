#!/usr/bin/env bash
# Tail latency with and without a concurrent catch-up reader.
#
# Runs bench/workloads/fixed-rate-latency.toml (20 MB/s, acks=all, a tail
# consumer) against a running broker in pairs: once alone, once while a
# catch-up reader loops over the topic "backlog" (written with --fill), and
# prints each pair's end-to-end and produce-ack percentiles, their ratio,
# what the host itself did meanwhile (hiccups, steal) and the catch-up rate;
# with --repeat N, N interleaved pairs and the median ratio. Every run
# directory (summary.json, .hgrm, SVGs) is kept under --out.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bench/scripts/tail-vs-catch-up.sh [options]

  --bootstrap HOST:PORT   broker to measure (default 127.0.0.1:9092)
  --fill                  first write the backlog: topic "backlog", 6 partitions,
                          --backlog-records x 1 KiB (a broker-side topic that
                          already exists is reused as it is)
  --backlog-records N     records written by --fill (default 4000000, ~4 GB)
  --cold                  before every catch-up pass, drop the backlog's segment
                          files from the page cache (needs --data-dir on this host),
                          so the catch-up reads the disk
  --data-dir DIR          the broker's log.dirs (for --cold)
  --catch-up-priority P   idle (default): the catch-up reader runs under
                          SCHED_IDLE (chrt -i 0), standing in for a consumer on
                          another host, so its own CPU use does not count against
                          the broker; normal: same priority as everything else
  --duration-s S          length of each tail run (default 20, plus 3 s warm-up)
  --repeat N              N pairs of runs, alone and with catch-up interleaved,
                          so drift in the host shows as spread (default 1)
  --baseline FILE         hardware baseline JSON for the reports (default: none)
  --out DIR               where the run directories go (default results/tail-vs-catch-up)
  -h, --help              this text

Put the broker's own settings (fetch.sendfile.max.bytes.per.second,
fetch.readahead.bytes, ...) on the broker; this script only drives clients.
USAGE
}

bootstrap=127.0.0.1:9092 fill=0 backlog_records=4000000 cold=0 data_dir="" priority=idle
duration=20 repeat=1 baseline="" out=results/tail-vs-catch-up
while [ $# -gt 0 ]; do
  case "$1" in
    --bootstrap) bootstrap=$2; shift 2 ;;
    --fill) fill=1; shift ;;
    --backlog-records) backlog_records=$2; shift 2 ;;
    --cold) cold=1; shift ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --catch-up-priority) priority=$2; shift 2 ;;
    --duration-s) duration=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --baseline) baseline=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

here=$(cd "$(dirname "$0")/../.." && pwd)
bench=$(command -v tidelog-bench || true)
[ -n "$bench" ] || bench=$here/target/release/tidelog-bench
[ -x "$bench" ] || { echo "tidelog-bench not found: run cargo build --release first" >&2; exit 1; }
if [ "$cold" = 1 ] && [ ! -d "$data_dir" ]; then
  echo "--cold needs --data-dir (the broker's log.dirs on this host)" >&2; exit 2
fi
case "$priority" in
  idle) prefix=(chrt -i 0) ;;
  normal) prefix=() ;;
  *) echo "--catch-up-priority must be idle or normal" >&2; exit 2 ;;
esac
base_args=(--no-baseline)
[ -n "$baseline" ] && base_args=(--baseline "$baseline")
mkdir -p "$out"
case "$repeat" in ''|*[!0-9]*|0) echo "--repeat must be a positive number" >&2; exit 2 ;; esac
# Runs of an earlier invocation would count in the summary.
rm -rf "$out"/catch-up-* "$out"/alone-* "$out"/with-catch-up-*

if [ "$fill" = 1 ]; then
  echo "filling the backlog: $backlog_records x 1 KiB records into topic backlog"
  "$bench" run --topic backlog --partitions 6 --producers 2 --consumers 0 --records "$backlog_records" \
    --warmup-s 0 --bootstrap "$bootstrap" --no-baseline --quiet --out "$out/fill" | grep -E "^produce "
fi

# Dropping gigabytes of page cache costs kernel CPU time: like the reader,
# it runs at the catch-up priority, so the measurement does not measure it.
evict() {
  "${prefix[@]}" python3 - "$data_dir" <<'PY'
import glob, os, sys
n = 0
for f in glob.glob(os.path.join(sys.argv[1], "backlog-*", "*.log")):
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    n += 1
if n == 0:
    sys.exit("no backlog segments under %s: wrong --data-dir, or run with --fill" % sys.argv[1])
PY
}

tail_run() { # name
  echo "tail run: $1 (${duration}s + 3s warm-up)"
  "$bench" run --workload "$here/bench/workloads/fixed-rate-latency.toml" --topic tail --duration-s "$duration" \
    --warmup-s 3 --bootstrap "$bootstrap" "${base_args[@]}" --quiet --out "$out/$1" \
    | grep -E "^(end-to-end|produce ack|host hiccups|slowest batch acks)"
}

for i in $(seq 1 "$repeat"); do
  tail_run "alone-$i"
  stop=$out/.stop-catch-up
  rm -f "$stop"
  (
    pass=0
    while [ ! -f "$stop" ]; do
      pass=$((pass + 1))
      [ "$cold" = 1 ] && evict
      "${prefix[@]}" "$bench" run --workload "$here/bench/workloads/catch-up-pass.toml" --bootstrap "$bootstrap" \
        --no-baseline --hiccup-interval-us 0 --quiet --out "$out/catch-up-$i-$pass" >"$out/catch-up-$i-$pass.log" 2>&1
    done
  ) &
  loop=$!
  sleep 2
  tail_run "with-catch-up-$i"
  touch "$stop"
  echo "waiting for the catch-up pass in progress to end"
  wait "$loop"
  rm -f "$stop"
done

python3 - "$out" "$repeat" <<'PY'
import glob, json, os, sys
out, repeat = sys.argv[1], int(sys.argv[2])
def summary(name):
    return json.load(open(os.path.join(out, name, "summary.json")))
# The host's own pauses in a run: a produce stall as long as a hiccup, at the
# same time, was the host (steal, interrupts, other load), not the broker.
def host(s):
    h = s.get("hiccups")
    if not h:
        return "hiccup meter off"
    late = max(c["late_us"]["max"] for c in h["per_cpu"]) / 1000
    over = sum(c["over_10ms"] for c in h["per_cpu"])
    steal = sum(c["steal_ms"] for c in h["per_cpu"])
    return "longest hiccup %.1f ms, %d over 10 ms, steal %.0f ms" % (late, over, steal)
ratios = []
for i in range(1, repeat + 1):
    sa, sb = summary("alone-%d" % i), summary("with-catch-up-%d" % i)
    a, b = sa["results"]["latency_us"], sb["results"]["latency_us"]
    print("\npair %d: %-14s %12s %12s %8s" % (i, "ms", "alone", "catch-up", "ratio"))
    for series in ("end_to_end", "produce_ack_batch"):
        for p in ("p50", "p99", "p999", "max"):
            x, y = a[series][p] / 1000, b[series][p] / 1000
            print("%-22s %12.3f %12.3f %8.2f" % (series + " " + p, x, y, y / x if x else float("nan")))
    x, y = a["end_to_end"]["p99"], b["end_to_end"]["p99"]
    ratios.append(y / x if x else float("nan"))
    print("host during alone:    %s" % host(sa))
    print("host during catch-up: %s" % host(sb))
rates = []
for d in sorted(glob.glob(os.path.join(out, "catch-up-*", "summary.json"))):
    c = json.load(open(d))["results"]["consume"]
    if c["records"]:
        rates.append(c["mb_per_s"])
print()
if rates:
    print("catch-up passes: %d, MB/s min %.0f / mean %.0f / max %.0f" % (len(rates), min(rates), sum(rates) / len(rates), max(rates)))
r = sorted(ratios)
print("end-to-end p99 ratio (catch-up / alone) per pair: %s; median %.2f" % (", ".join("%.2f" % x for x in ratios), r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2))
PY
