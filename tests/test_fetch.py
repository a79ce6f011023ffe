"""Fetch semantics clients rely on: long polls wake on append, and small
max_bytes limits never stall a consumer (a batch larger than the limit is
still returned, as in Kafka)."""

import threading
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

from clients import consume_confluent, consume_kafka_python, produce_confluent
from conftest import create_topic, unique_topic


def test_long_poll_wakes_on_append(broker):
    topic = unique_topic("poll")
    create_topic(broker, topic, 1)
    got = []
    ready = threading.Event()

    def consume():
        c = Consumer(broker.consumer_config(**{"fetch.wait.max.ms": 10000, "fetch.min.bytes": 1}))
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while len(got) < 5 and time.monotonic() < deadline:
            m = c.poll(0.5)
            ready.set()
            if m is None or (m.error() and m.error().code() == KafkaError._PARTITION_EOF):
                continue
            assert not m.error(), m.error()
            got.append((m.offset(), m.value()))
        c.close()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert ready.wait(30)
    time.sleep(1)  # the consumer is now parked in a long poll on an empty log
    produce_confluent(broker, topic, [(b"k", b"wake-%d" % i) for i in range(5)])
    t.join(70)
    assert got == [(i, b"wake-%d" % i) for i in range(5)]


def test_small_fetch_limits_still_progress(broker):
    topic = unique_topic("maxbytes")
    create_topic(broker, topic, 2)
    recs = [(b"k%d" % (i % 4), (b"%05d-" % i) * 1000) for i in range(200)]  # 6 KB values
    acked = produce_confluent(broker, topic, recs, **{"batch.size": 100_000})
    ends = {p: sum(1 for q, _, _, _ in acked if q == p) for p in range(2)}
    for name, consume, cfg in [
        ("confluent", consume_confluent, {"fetch.max.bytes": 1024, "message.max.bytes": 1000, "max.partition.fetch.bytes": 1024, "receive.message.max.bytes": 1_000_000}),
        ("kafka-python", consume_kafka_python, {"fetch_max_bytes": 1024, "max_partition_fetch_bytes": 1024}),
    ]:
        got = consume(broker, topic, ends, timeout=120, **cfg)
        for p in range(2):
            assert [o for o, _, _ in got[p]] == list(range(ends[p])), name
        assert sorted((k, v) for recs_ in got.values() for _, k, v in recs_) == sorted(recs), name
