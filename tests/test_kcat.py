"""kcat (Debian's, on its own librdkafka) as a producer, consumer and
metadata client."""

import collections
import json
import shutil
import subprocess

import pytest

from conftest import create_topic, unique_topic

pytestmark = pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (scripts/test installs it)")


@pytest.mark.parametrize("compression", ["none", "snappy"])
def test_kcat_produce_consume(broker, compression):
    topic = unique_topic("kcat")
    create_topic(broker, topic, 3)
    lines = ["k%d:line-%d-key-k%d-%s" % (i % 50, i, i % 50, "x" * (i % 40)) for i in range(5000)]
    produce = subprocess.run(
        ["kcat", "-b", broker.bootstrap, "-t", topic, "-P", "-K", ":", "-z", compression,
         "-X", "acks=all", "-X", "enable.idempotence=false"],
        input=("\n".join(lines) + "\n").encode(),
        capture_output=True,
        timeout=120,
    )
    assert produce.returncode == 0, produce.stderr.decode()

    consume = subprocess.run(
        ["kcat", "-b", broker.bootstrap, "-t", topic, "-C", "-o", "beginning", "-e", "-q",
         "-f", "%p\t%o\t%k\t%s\n"],
        capture_output=True,
        timeout=120,
    )
    assert consume.returncode == 0, consume.stderr.decode()
    rows = [l.split("\t", 3) for l in consume.stdout.decode().splitlines() if l]
    assert len(rows) == len(lines), "kcat consumed %d of %d" % (len(rows), len(lines))

    by_partition = collections.defaultdict(list)
    for p, o, k, v in rows:
        by_partition[int(p)].append((int(o), k, v))
    assert len(by_partition) >= 2, "50 keys in fewer than 2 of 3 partitions"
    for p, recs in by_partition.items():
        assert [o for o, _, _ in recs] == list(range(len(recs))), "partition %d offsets not contiguous" % p

    got = collections.Counter("%s:%s" % (k, v) for _, _, k, v in rows)
    assert got == collections.Counter(lines)

    # per key: one partition, produce order
    order = collections.defaultdict(list)
    parts = collections.defaultdict(set)
    for p, recs in sorted(by_partition.items()):
        for _, k, v in recs:
            order[k].append(int(v.split("-")[1]))
            parts[k].add(p)
    for k in order:
        assert len(parts[k]) == 1
        assert order[k] == sorted(order[k]) and len(order[k]) == 100, k


def test_kcat_metadata(broker):
    topic = unique_topic("kcatmd")
    create_topic(broker, topic, 4)
    out = subprocess.run(["kcat", "-b", broker.bootstrap, "-L", "-J"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    md = json.loads(out.stdout)
    assert sorted((b["id"], b["name"]) for b in md["brokers"]) == [
        (i, "127.0.0.1:%d" % p) for i, p in enumerate(broker.ports)
    ]
    t = [t for t in md["topics"] if t["topic"] == topic]
    assert len(t) == 1
    assert sorted(p["partition"] for p in t[0]["partitions"]) == [0, 1, 2, 3]
    assert {p["leader"] for p in t[0]["partitions"]} == {0, 1}
