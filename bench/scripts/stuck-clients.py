#!/usr/bin/env python3
"""Hostile-but-legal clients against a running broker, with its memory sampled.

Opens --idle connections that say ApiVersions once and then sit there, and
--stuck consumers that pipeline --pipeline Fetch requests for every partition
of --topic from offset 0 (--fetch-bytes per partition) and never read a byte
of the answers. Meanwhile it samples the broker's RSS, open files and threads
every --sample-s into --csv and prints one progress line per sample; at the
end it prints the peak and final figures and closes everything.

Run a producer next to it (tidelog-bench) to see whether the broker keeps its
throughput: bench/README.md "Bounded memory" has the whole recipe.

Issue 20's scenario: 1,000 idle connections plus 100 consumers that fetch
and never read their sockets.
"""

import argparse
import csv
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import kafka_wire as kw  # noqa: E402

FETCH, API_VERSIONS = 1, 18


def proc_figures(pid):
    rss_kb = threads = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return rss_kb * 1024, fds, threads


def send_request(sock, api_key, version, corr, body):
    sock.sendall(kw.frame(kw.request_header_v1(api_key, version, corr, "stuck-clients") + body))


def read_frame(sock):
    n = int.from_bytes(recv_exact(sock, 4), "big", signed=True)
    return recv_exact(sock, n)


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed by the broker")
        out += chunk
    return bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    ap.add_argument("--ports", required=True,
                    help="comma-separated shard ports (tidelog: port P is shard 0, P+1 shard 1, ...); "
                         "connections are spread over them and each stuck consumer fetches the "
                         "partitions led by its port's shard")
    ap.add_argument("--topic", required=True, help="topic the stuck consumers fetch (ideally with a backlog)")
    ap.add_argument("--partitions", type=int, required=True, help="partitions of --topic")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections (default 1000)")
    ap.add_argument("--stuck", type=int, default=100, help="consumers that fetch and never read (default 100)")
    ap.add_argument("--pipeline", type=int, default=8,
                    help="Fetch requests each stuck consumer sends without reading (default 8)")
    ap.add_argument("--fetch-bytes", type=int, default=1 << 20,
                    help="partition_max_bytes of each Fetch (default 1 MiB)")
    ap.add_argument("--hold-s", type=float, default=60, help="how long to hold them (default 60)")
    ap.add_argument("--broker-pid", type=int, required=True, help="PID of the broker, for /proc sampling")
    ap.add_argument("--sample-s", type=float, default=1.0, help="sampling interval (default 1 s)")
    ap.add_argument("--csv", default="stuck-clients.csv", help="samples: t_s,rss_bytes,fds,threads")
    args = ap.parse_args()

    ports = [int(p) for p in args.ports.split(",")]
    t0 = time.monotonic()
    rows = [(0.0,) + proc_figures(args.broker_pid)]
    print("before: rss %.1f MiB, fds %d, threads %d" % (rows[0][1] / 2**20, rows[0][2], rows[0][3]), flush=True)

    idle = []
    for i in range(args.idle):
        s = socket.create_connection((args.host, ports[i % len(ports)]), timeout=10)
        send_request(s, API_VERSIONS, 0, 1, b"")
        read_frame(s)
        idle.append(s)
    print("%d idle connections open (ApiVersions answered on each)" % len(idle), flush=True)

    # Each stuck consumer fetches the partitions of the shard behind its port.
    # The broker answers NOT_LEADER_OR_FOLLOWER for the others, which is cheap:
    # ask for all of them, so the test does not depend on the placement.
    stuck = []
    for i in range(args.stuck):
        s = socket.create_connection((args.host, ports[i % len(ports)]), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = kw.fetch_body_v4(
            [(args.topic, [(p, 0, args.fetch_bytes) for p in range(args.partitions)])],
            max_wait_ms=500,
            max_bytes=args.fetch_bytes * args.partitions,
        )
        for c in range(args.pipeline):
            send_request(s, FETCH, 4, c + 1, body)
        stuck.append(s)
    print("%d stuck consumers, %d Fetch requests each, never read" % (len(stuck), args.pipeline), flush=True)

    deadline = time.monotonic() + args.hold_s
    while time.monotonic() < deadline:
        time.sleep(args.sample_s)
        t = time.monotonic() - t0
        try:
            row = (round(t, 1),) + proc_figures(args.broker_pid)
        except FileNotFoundError:
            print("the broker (pid %d) is gone" % args.broker_pid, file=sys.stderr)
            return 1
        rows.append(row)
        print("t=%6.1fs rss %8.1f MiB  fds %5d  threads %3d" % (row[0], row[1] / 2**20, row[2], row[3]), flush=True)

    for s in idle + stuck:
        s.close()
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "rss_bytes", "fds", "threads"])
        w.writerows(rows)
    peak = max(r[1] for r in rows)
    print("peak rss %.1f MiB (before %.1f MiB), peak fds %d, peak threads %d; samples in %s"
          % (peak / 2**20, rows[0][1] / 2**20, max(r[2] for r in rows), max(r[3] for r in rows), args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
