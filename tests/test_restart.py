"""A clean stop (SIGTERM) and a start on the same data dir lose nothing and
move nothing: same records at the same offsets, same high watermarks, same
partition owners, and new produces continue at the next offset."""

import collections

from confluent_kafka.admin import AdminClient

from clients import check_contiguous, check_roundtrip, consume_confluent, consume_kafka_python, make_records, produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

PARTITIONS = 6


def leaders(broker, topic):
    md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
    return {p.id: p.leader for p in md.topics[topic].partitions.values()}


def test_restart_keeps_data_offsets_and_watermarks(broker):
    topic = unique_topic("restart")
    create_topic(broker, topic, PARTITIONS)
    first = make_records(30_000)
    acked1 = produce_confluent(broker, topic, first)
    wm1 = watermarks(broker, topic, range(PARTITIONS))
    owners1 = leaders(broker, topic)
    ends1 = {p: hi for p, (_, hi) in wm1.items()}
    assert sum(ends1.values()) == len(first)
    before = consume_confluent(broker, topic, ends1)
    check_roundtrip(first, acked1, before)

    broker.restart()
    wait_topic(broker, topic, PARTITIONS)

    assert watermarks(broker, topic, range(PARTITIONS)) == wm1, "watermarks moved across a clean restart"
    assert leaders(broker, topic) == owners1, "partition owners moved across a restart"
    assert consume_confluent(broker, topic, ends1) == before
    assert consume_kafka_python(broker, topic, ends1) == before

    # New produces continue exactly where the log ended.
    second = make_records(36_000)[30_000:]
    acked2 = produce_confluent(broker, topic, second)
    new_offsets = collections.defaultdict(list)
    for p, o, _, _ in acked2:
        new_offsets[p].append(o)
    for p, offs in new_offsets.items():
        assert sorted(offs) == list(range(ends1[p], ends1[p] + len(offs))), (
            "partition %d: first offsets after restart %r, log ended at %d" % (p, sorted(offs)[:5], ends1[p])
        )
    wm2 = watermarks(broker, topic, range(PARTITIONS))
    ends2 = {p: hi for p, (_, hi) in wm2.items()}
    assert ends2 == {p: ends1[p] + len(new_offsets.get(p, [])) for p in range(PARTITIONS)}
    after = consume_confluent(broker, topic, ends2)
    check_roundtrip(first + second, acked1 + acked2, after)

    # A second restart (recovery of a log that was itself recovered) changes nothing.
    broker.restart()
    wait_topic(broker, topic, PARTITIONS)
    assert watermarks(broker, topic, range(PARTITIONS)) == wm2
    assert consume_confluent(broker, topic, ends2) == after


def test_restart_keeps_empty_and_auto_created_topics(broker):
    empty = unique_topic("empty")
    create_topic(broker, empty, 3)
    broker.restart()
    wait_topic(broker, empty, 3)
    assert watermarks(broker, empty, range(3)) == {p: (0, 0) for p in range(3)}
    acked = produce_confluent(broker, empty, [(b"k", b"v%d" % i) for i in range(10)])
    consumed = consume_confluent(broker, empty, {p: sum(1 for q, _, _, _ in acked if q == p) for p in range(3)})
    check_contiguous(consumed)
    assert sorted(v for recs in consumed.values() for _, _, v in recs) == sorted(b"v%d" % i for i in range(10))
