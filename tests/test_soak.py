"""The soak's CI form: scripts/soak.py for 2 minutes (TIDELOG_SOAK_S overrides).

A real release broker under produce + 3 consumer groups (tidelog-bench
`--verify --strict`), retention, compaction and a topic create/delete loop,
with the broker's RSS, open files and threads sampled every 10 s. The soak's
verdict must be PASS: no verification finding, the compaction and topic-churn
checks hold, retention and compaction both ran, no broker crash or panic, and
RSS and open files at the end within the bounds scripts/soak.py states
(bench/README.md, section Soak). Any problem fails the test: the last
known engine gap, the compacted topic's files and FDs growing with every
roll, is fixed (the cleaner merges small cleaned segments, as Kafka's
does), so there is no xfail any more. The samples, SVG, verdict and logs
stay in the test's dir when it fails.

Also here: the smallest reproduction of a bug the soak found and that is
now fixed, a Fetch in the gap compaction leaves before the active segment.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import kafka_wire as kw
from conftest import create_topic, unique_topic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(REPO, "scripts", "soak.py")


def test_soak(binary, data_root):
    duration = float(os.environ.get("TIDELOG_SOAK_S", "120"))
    bench = os.environ.get("TIDELOG_BENCH_BIN") or os.path.join(os.path.dirname(binary), "tidelog-bench")
    if not os.access(bench, os.X_OK):
        pytest.fail("tidelog-bench not found at %s: cargo build --release -p tidelog-bench, or set TIDELOG_BENCH_BIN" % bench)
    out = os.path.join(data_root, "soak-%s" % uuid.uuid4().hex[:8])
    cmd = [sys.executable, SOAK, "--duration", str(duration), "--out", out, "--tidelog-bin", binary, "--bench-bin", bench]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 600)
    text = proc.stdout.decode("utf-8", "replace")
    print(text)
    verdict_path = os.path.join(out, "verdict.json")
    assert os.path.exists(verdict_path), "soak exited %d without a verdict (outputs in %s):\n%s" % (
        proc.returncode,
        out,
        text[-5000:],
    )
    with open(verdict_path) as f:
        verdict = json.load(f)
    problems = verdict["problems"]
    assert verdict["bench"].get("records_checked"), "the bench verified no records: %r" % verdict["bench"]
    assert not problems, "soak verdict %s (outputs in %s):\n  %s\n\n%s" % (
        verdict["verdict"],
        out,
        "\n  ".join(problems),
        text[-3000:],
    )
    assert proc.returncode == 0, "soak exited %d with a PASS verdict" % proc.returncode
    shutil.rmtree(out, ignore_errors=True)


def test_fetch_in_compaction_gap_before_active_segment(broker_factory):
    """A compacted log whose last sealed segment lost its tail records to
    compaction (their keys were written again into the active segment): a
    Fetch at the first removed offset must be answered at once with the
    active segment's batches, as it is for such a gap between two sealed
    segments and as it is after a restart."""
    b = broker_factory(args=["--log.cleaner.backoff.ms=1000"])
    topic = unique_topic("gap")
    create_topic(b, topic, 1, config={"cleanup.policy": "compact", "segment.bytes": "16384"})
    p = Producer(b.producer_config(**{"linger.ms": 0}))

    def send(keys):
        for k in keys:
            p.produce(topic, key=k, value=b"v" * 100, partition=0)
            assert p.flush(10) == 0

    send([b"k-%d" % i for i in range(200)])  # about 2 segments of 16 KiB and an active one
    part_dir = os.path.join(b.log_dirs, "%s-0" % topic)
    segments = kw.segment_files(part_dir)
    assert len(segments) >= 2, "expected a sealed segment, have %r" % segments
    batches, _ = kw.parse_segment(segments[-2][1])
    tail = batches[-3:]
    gap_from = tail[0].base_offset
    active_base = segments[-1][0]
    send([k for bt in tail for (_o, k, _v) in kw.decode_batch(bt.raw)])  # the sealed tail is now obsolete
    deadline = time.monotonic() + 30
    while True:
        left, _ = kw.parse_segment(segments[-2][1])
        if left and left[-1].next_offset == gap_from:
            break
        assert time.monotonic() < deadline, "compaction did not remove the sealed segment's tail within 30 s"
        time.sleep(0.5)

    md = AdminClient({"bootstrap.servers": b.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
    port = md.brokers[md.topics[topic].partitions[0].leader].port
    with kw.Conn(port, timeout=10) as conn:
        body = kw.fetch_body_v4([(topic, [(0, gap_from, 1 << 20)])], max_wait_ms=0, min_bytes=0)
        corr = conn.send_request(1, 4, body)
        try:
            r = conn.recv_response(corr)
        except (socket.timeout, TimeoutError):
            pytest.fail(
                "Fetch at offset %d (compacted away; the active segment starts at %d) not answered within 10 s"
                % (gap_from, active_base)
            )
    r.i32()  # throttle_time_ms
    assert r.i32() == 1 and r.string() == topic and r.i32() == 1 and r.i32() == 0
    error = r.i16()
    r.i64()  # high watermark
    r.i64()  # last stable offset
    r.i32()  # aborted transactions (null)
    records = r.kbytes() or b""
    assert error == 0, "Fetch at %d answered error %d" % (gap_from, error)
    (base,) = struct.unpack_from(">q", records, 0) if len(records) >= 8 else (None,)
    assert base is not None and base >= active_base, "Fetch at %d returned %d bytes starting at %r" % (
        gap_from,
        len(records),
        base,
    )
