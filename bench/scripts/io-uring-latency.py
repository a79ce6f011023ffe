#!/usr/bin/env python3
"""Per-opcode io_uring latency (submit to completion) from a perf trace.

Record the broker's io_uring tracepoints while a workload runs, then feed
the `perf script` output to this script:

    perf record -o uring.data -p $(pgrep -f 'target/release/tidelog ') \\
        -e io_uring:io_uring_submit_req,io_uring:io_uring_complete,io_uring:io_uring_queue_async_work \\
        -- sleep 3
    perf script -i uring.data > uring.txt
    bench/scripts/io-uring-latency.py uring.txt

It prints how many operations of each opcode were submitted, how many the
kernel handed to io-wq worker threads (io_uring_queue_async_work: a punt,
one more thread hop on that operation's path) and, for the opcodes that
matter to the write path, the submit-to-completion latency percentiles.
WRITE_FIXED is a segment write (O_DSYNC for single-write flush rounds, so
its latency includes the device cache flush); FSYNC is a round's fdatasync.
"""

import argparse
import collections
import re
import sys

EVENT = re.compile(r" (\d+\.\d+): +io_uring:(\w+): .*?(?:req|request) (0x[0-9a-f]+)")
OPCODE = re.compile(r"opcode (\w+)")
SHOWN = ("WRITE_FIXED", "FSYNC", "FALLOCATE", "READ_FIXED", "WRITE", "SENDMSG", "RECV", "POLL_ADD")


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="`perf script` output of the io_uring tracepoints (- for stdin)")
    args = ap.parse_args()
    source = sys.stdin if args.trace == "-" else open(args.trace)
    submitted = {}
    latencies = collections.defaultdict(list)
    counts = collections.Counter()
    punted = collections.Counter()
    for line in source:
        m = EVENT.search(line)
        if not m:
            continue
        t, event, req = float(m.group(1)), m.group(2), m.group(3)
        op = OPCODE.search(line)
        if event == "io_uring_submit_req" and op:
            submitted[req] = (t, op.group(1))
            counts[op.group(1)] += 1
        elif event == "io_uring_queue_async_work":
            punted[op.group(1) if op else "?"] += 1
        elif event == "io_uring_complete" and req in submitted:
            t0, name = submitted.pop(req)
            latencies[name].append((t - t0) * 1e6)
    if not counts:
        sys.exit("no io_uring_submit_req events: was perf recording the broker's pid with the io_uring tracepoints?")
    print("submitted:", ", ".join("%s %d" % kv for kv in counts.most_common()))
    print("punted to io-wq:", ", ".join("%s %d" % kv for kv in punted.most_common()) or "none")
    for name in SHOWN:
        v = sorted(latencies.get(name, []))
        if v:
            print(
                "%-12s n %7d  p50 %6.0f  p90 %6.0f  p99 %6.0f  max %7.0f us"
                % (name, len(v), percentile(v, 0.5), percentile(v, 0.9), percentile(v, 0.99), v[-1])
            )


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        pass
