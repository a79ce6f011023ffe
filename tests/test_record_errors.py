"""Per-record produce errors (KIP-467, issue 16): records a topic's rules
refuse — a record without a key on a compacted topic, a CreateTime
timestamp outside message.timestamp.before/after.max.ms — fail their whole
batch with INVALID_RECORD / INVALID_TIMESTAMP, and Produce v8+ names each
offending record in `record_errors` (its index in the batch and why) with an
`error_message` for the partition. Nothing of a refused batch is written.

The record indexes are checked on the raw wire (kafka_wire's Produce v8):
confluent-kafka keeps librdkafka's per-record error text to itself, so with
it the test checks what it can see — every record of the batch failed with
the code, and the partition carries on."""

import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

import kafka_wire as kw
from conftest import unique_topic

INVALID_RECORD = 87
INVALID_TIMESTAMP = 32
GZIP = 1
HOUR_MS = 3_600_000


def create(bootstrap, topic, **config):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(30)


def high_watermark(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "hw"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        c.close()


def produce_raw(port, topic, records, compression=0):
    with kw.Conn(port) as c:
        return kw.produce(c, 8, topic, 0, kw.build_batch(records, compression))


def test_records_without_key_on_a_compacted_topic_are_named(broker_factory):
    b = broker_factory(shards=1)
    topic = unique_topic("keys")
    create(b.bootstrap, topic, **{"cleanup.policy": "compact"})
    now = int(time.time() * 1000)
    for compression in (0, GZIP):
        r = produce_raw(b.port, topic, [(b"k0", b"a", now), (None, b"b", now), (b"k2", b"c", now), (None, b"d", now)],
                        compression)
        assert r.error_code == INVALID_RECORD, r
        assert [i for i, _ in r.record_errors] == [1, 3], r.record_errors
        assert all("key" in m for _, m in r.record_errors), r.record_errors
        assert r.error_message and "2 record(s)" in r.error_message, r.error_message
        assert r.base_offset == -1
    assert high_watermark(b.bootstrap, topic) == 0, "a refused batch wrote nothing"

    # A real client: every record of the batch fails with the code; a keyed
    # record afterwards is appended at offset 0.
    p = Producer(b.producer_config(**{"linger.ms": 100, "acks": "all"}))
    reports = []
    for i in range(3):
        p.produce(topic, key=None if i == 1 else b"k%d" % i, value=b"v", partition=0,
                  on_delivery=lambda err, msg: reports.append((err.code() if err else 0, msg.offset())))
    assert p.flush(30) == 0
    assert sorted(code for code, _ in reports) == [INVALID_RECORD] * 3, reports
    reports.clear()
    p.produce(topic, key=b"ok", value=b"v", partition=0,
              on_delivery=lambda err, msg: reports.append((err.code() if err else 0, msg.offset())))
    assert p.flush(30) == 0
    assert reports == [(0, 0)], reports


def test_timestamps_outside_the_topic_bounds_are_named(broker_factory):
    b = broker_factory(shards=1)
    future = unique_topic("future")
    create(b.bootstrap, future)  # Kafka 4's default: at most an hour ahead
    now = int(time.time() * 1000)
    r = produce_raw(b.port, future, [(b"a", b"1", now), (b"b", b"2", now + 2 * HOUR_MS), (b"c", b"3", now)])
    assert r.error_code == INVALID_TIMESTAMP, r
    assert [i for i, _ in r.record_errors] == [1], r.record_errors
    assert str(now + 2 * HOUR_MS) in r.record_errors[0][1]
    # Within the hour: accepted.
    r = produce_raw(b.port, future, [(b"a", b"1", now), (b"b", b"2", now + HOUR_MS // 2)])
    assert (r.error_code, r.base_offset) == (0, 0), r

    past = unique_topic("past")
    create(b.bootstrap, past, **{"message.timestamp.before.max.ms": "60000"})
    now = int(time.time() * 1000)
    for compression in (0, GZIP):
        r = produce_raw(b.port, past, [(b"a", b"1", now - HOUR_MS), (b"b", b"2", now), (b"c", b"3", now - HOUR_MS)],
                        compression)
        assert r.error_code == INVALID_TIMESTAMP, r
        assert [i for i, _ in r.record_errors] == [0, 2], r.record_errors
    assert high_watermark(b.bootstrap, past) == 0

    # LogAppendTime: the broker's clock replaces the producer's, nothing to refuse.
    stamped = unique_topic("stamped")
    create(b.bootstrap, stamped, **{"message.timestamp.type": "LogAppendTime"})
    r = produce_raw(b.port, stamped, [(b"a", b"1", now + 5 * HOUR_MS)])
    assert (r.error_code, r.base_offset) == (0, 0), r

    # The bounds are topic configs like any other.
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, past)
    configs = admin.describe_configs([res])[res].result(30)
    assert configs["message.timestamp.before.max.ms"].value == "60000"
    assert configs["message.timestamp.after.max.ms"].value == "3600000"
