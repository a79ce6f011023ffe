"""DeleteRecords and time/size retention with small segments: files gone
from disk, offsets preserved, log start offset survives restart, consumers
below it get OFFSET_OUT_OF_RANGE and reset."""

import glob
import os
import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from clients import produce_confluent


def logs(broker, topic):
    return sorted(glob.glob(os.path.join(broker.log_dirs, "%s-0" % topic, "*.log")))


def low_high(broker, topic):
    c = Consumer(broker.consumer_config(**{"group.id": "wm"}))
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.close()
    return lo, hi


def first_offset(broker, topic, reset="earliest", start=None):
    c = Consumer(broker.consumer_config(**{"group.id": "r-%s" % time.time(), "auto.offset.reset": reset}))
    c.assign([TopicPartition(topic, 0, start if start is not None else -2)])
    deadline = time.time() + 30
    try:
        while time.time() < deadline:
            for m in c.consume(1, 1.0):
                if m.error() is None:
                    return m.offset()
    finally:
        c.close()


def test_delete_records_moves_start_and_survives_restart(broker):
    a = AdminClient({"bootstrap.servers": broker.bootstrap})
    a.create_topics([NewTopic("dr", 1, 1, config={"segment.bytes": "4096"})])["dr"].result(30)
    produce_confluent(broker, "dr", [(b"k", b"x" * 300) for _ in range(200)], **{"linger.ms": 0, "batch.size": 1000})
    before = logs(broker, "dr")
    assert len(before) >= 5
    fs = a.delete_records([TopicPartition("dr", 0, 120)])
    r = fs[TopicPartition("dr", 0, 120)].result(30)
    assert r.low_watermark == 120
    assert low_high(broker, "dr") == (120, 200)
    after = logs(broker, "dr")
    assert len(after) < len(before)
    assert all(int(os.path.basename(p)[:20]) <= 120 for p in after[:1])
    assert first_offset(broker, "dr") == 120
    broker.restart()
    assert low_high(broker, "dr") == (120, 200)
    assert first_offset(broker, "dr") == 120
    # Below the start: OFFSET_OUT_OF_RANGE, reset to earliest.
    assert first_offset(broker, "dr", reset="earliest", start=5) == 120


def test_retention_by_size_and_time(broker_factory):
    b = broker_factory(args=["--log.retention.check.interval.ms=200"])
    a = AdminClient({"bootstrap.servers": b.bootstrap})
    a.create_topics([NewTopic("rs", 1, 1, config={"segment.bytes": "4096", "retention.bytes": "8192"})])["rs"].result(30)
    produce_confluent(b, "rs", [(b"k", b"x" * 300) for _ in range(300)], **{"linger.ms": 0, "batch.size": 1000})
    # As Kafka: whole sealed segments go while the log stays >= retention.bytes.
    def size():
        return sum(os.path.getsize(p) for p in logs(b, "rs"))

    deadline = time.time() + 30
    while time.time() < deadline and size() >= 8192 + 2 * 4096:
        time.sleep(0.3)
    lo, hi = low_high(b, "rs")
    assert hi == 300 and lo > 0
    assert size() < 8192 + 2 * 4096
    assert int(os.path.basename(logs(b, "rs")[0])[:20]) == lo
    assert first_offset(b, "rs") == lo

    a.create_topics([NewTopic("rt", 1, 1, config={"segment.bytes": "4096", "retention.ms": "1000"})])["rt"].result(30)
    produce_confluent(b, "rt", [(b"k", b"x" * 300) for _ in range(100)], **{"linger.ms": 0, "batch.size": 1000})
    deadline = time.time() + 30
    while time.time() < deadline and len(logs(b, "rt")) > 1:
        time.sleep(0.3)
    assert len(logs(b, "rt")) == 1  # only the active segment is left
    lo, hi = low_high(b, "rt")
    assert hi == 100 and lo > 0
