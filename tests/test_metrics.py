"""/metrics and /health on metrics.listeners: counters move by exactly what
a real client produced and consumed; every shard reports."""

import re
import urllib.request

from confluent_kafka import Consumer, TopicPartition

from clients import produce_confluent
from conftest import pick_ports


def scrape(port, path="/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return r.status, r.read().decode()


def samples(text, name):
    """{labels-string: value} of one metric family's samples."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^%s(\{[^}]*\})? (\S+)$" % re.escape(name), line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def total(text, name, **labels):
    want = ['%s="%s"' % kv for kv in labels.items()]
    return sum(v for k, v in samples(text, name).items() if all(w in k for w in want))


def metrics_broker(broker_factory):
    port = pick_ports(1)
    b = broker_factory(args=["--metrics.listeners=127.0.0.1:%d" % port])
    return b, port


def test_health_and_format(broker_factory):
    b, port = metrics_broker(broker_factory)
    status, body = scrape(port, "/health")
    assert status == 200 and body.startswith("ok: 2 of 2 shards"), body
    status, text = scrape(port)
    assert status == 200
    assert total(text, "tidelog_shards") == 2
    # Every sample belongs to a declared family.
    families = set(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    names = {f for f, _ in families}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            n = re.split(r"[{ ]", line)[0]
            base = re.sub(r"_(bucket|sum|count)$", "", n)
            assert n in names or base in names, line
    try:
        urllib.request.urlopen("http://127.0.0.1:%d/nope" % port, timeout=5)
        assert False, "404 expected"
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_counters_move_by_exact_amounts(broker_factory):
    b, port = metrics_broker(broker_factory)
    topic = "metrics-exact"
    records = [(b"k%d" % (i % 7), b"v" * (50 + i % 13)) for i in range(3000)]
    _, before = scrape(port)
    acked = produce_confluent(b, topic, records, **{"linger.ms": 20})
    _, after_produce = scrape(port)
    produced = total(after_produce, "tidelog_produce_records_total", topic=topic) - total(
        before, "tidelog_produce_records_total", topic=topic
    )
    assert produced == len(records)
    # Bytes in equal the bytes now in the log (segments hold exactly the appended batches).
    in_bytes = total(after_produce, "tidelog_produce_bytes_total", topic=topic)
    assert in_bytes > sum(len(k) + len(v) for k, v in records)
    assert in_bytes == total(after_produce, "tidelog_log_size_bytes", topic=topic)
    hw = total(after_produce, "tidelog_high_watermark", topic=topic)
    assert hw == len(records)
    produce_requests = total(after_produce, "tidelog_requests_total", api="Produce")
    assert produce_requests >= 1
    assert total(after_produce, "tidelog_request_latency_seconds_count", api="Produce") == produce_requests
    assert total(after_produce, "tidelog_flush_bytes_total") >= in_bytes

    # Consume everything once, from the tail cache (just produced).
    parts = sorted({p for p, _, _, _ in acked})
    c = Consumer(b.consumer_config(**{"group.id": "m", "enable.auto.commit": False}))
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    got = 0
    import time

    deadline = time.time() + 60
    while got < len(records) and time.time() < deadline:
        for m in c.consume(500, 1.0):
            if m.error() is None:
                got += 1
    c.close()
    assert got == len(records)
    _, after_consume = scrape(port)
    out_bytes = total(after_consume, "tidelog_fetch_bytes_total", topic=topic)
    # Each batch was sent at least once; the consumer may have re-fetched a cut tail.
    assert out_bytes >= in_bytes
    assert total(after_consume, "tidelog_fetch_records_total", topic=topic) <= out_bytes
    assert total(after_consume, "tidelog_requests_total", api="Fetch") >= 1
