"""Log compaction (cleanup.policy=compact) with real clients: the cleaner
keeps exactly the latest record per key at the offset it was produced at,
tombstones stay for delete.retention.ms and then go, compressed batches are
compacted too, and a kill -9 in the middle of a compaction pass loses no key."""

import glob
import os
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from clients import produce_confluent
from conftest import create_topic, pick_ports, unique_topic
from test_metrics import scrape, total

CONVERGE_S = 90


def consume_all(broker, topic):
    """[(offset, key, value)] of partition 0 from the beginning to the high watermark."""
    c = Consumer(broker.consumer_config(**{"group.id": "compaction-check"}))
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for m in c.consume(500, 1.0):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        return out
                    raise AssertionError("consume error: %s" % m.error())
                out.append((m.offset(), m.key(), m.value()))
        raise AssertionError("no partition EOF within 60 s (%d records read)" % len(out))
    finally:
        c.close()


def latest_per_key(acked):
    """What a fully compacted log holds: the last acked record of each key,
    in offset order, as (offset, key, value); value None is a tombstone."""
    latest = {}
    for _, offset, key, value in sorted(acked, key=lambda r: r[1]):
        latest[key] = (offset, key, value)
    return sorted(latest.values())


def wait_for(broker, topic, expected, timeout=CONVERGE_S):
    """Consumes until the partition reads exactly `expected` (the cleaner runs
    in the background); returns the last read."""
    deadline = time.monotonic() + timeout
    while True:
        got = consume_all(broker, topic)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def check_read(got, acked):
    """Offsets strictly increase and every record read is the one produced at
    that offset."""
    by_offset = {r[1]: (r[2], r[3]) for r in acked}
    offsets = [r[0] for r in got]
    assert offsets == sorted(set(offsets)), "offsets not strictly increasing"
    for offset, key, value in got:
        assert by_offset.get(offset) == (key, value), "offset %d holds %r, produced %r" % (
            offset,
            (key, value),
            by_offset.get(offset),
        )


def log_bytes(broker, topic):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(broker.log_dirs, "%s-0" % topic, "*.log")))


def cleaner_broker(broker_factory):
    """A broker whose cleaner runs every 200 ms, with /metrics on its own port."""
    port = pick_ports(1)
    args = ["--log.cleaner.backoff.ms=200", "--log.cleaner.min.cleanable.ratio=0.01", "--metrics.listeners=127.0.0.1:%d" % port]
    return broker_factory(args=args), port


def appended_bytes(port, topic):
    """What Produce appended to partition 0, from the broker's counter. The
    files themselves may already be partly compacted when a test looks."""
    return total(scrape(port)[1], "tidelog_produce_bytes_total", topic=topic, partition="0")


def set_topic_config(broker, topic, name, value):
    a = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    res = ConfigResource(
        ConfigResource.Type.TOPIC, topic, incremental_configs=[ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)]
    )
    a.incremental_alter_configs([res])[res].result(30)


def test_compaction_keeps_latest_per_key_and_expires_tombstones(broker_factory):
    b, port = cleaner_broker(broker_factory)
    topic = unique_topic("compact")
    create_topic(
        b,
        topic,
        1,
        config={
            "cleanup.policy": "compact",
            "segment.bytes": "4096",
            "min.compaction.lag.ms": "0",
            "delete.retention.ms": "3600000",
        },
    )
    # 200 keys x 20 versions, then tombstones for every 4th key, then unique
    # filler keys so the tombstones end up in sealed segments.
    records = [(b"key-%03d" % k, b"key-%03d|v%02d|%s" % (k, v, b"x" * (k % 17))) for v in range(20) for k in range(200)]
    records += [(b"key-%03d" % k, None) for k in range(0, 200, 4)]
    records += [(b"filler-%04d" % i, b"f" * 40) for i in range(300)]
    acked = produce_confluent(b, topic, records, **{"linger.ms": 0, "batch.size": 2000})
    assert sorted(r[1] for r in acked) == list(range(len(records)))
    produced_bytes = appended_bytes(port, topic)
    assert produced_bytes > 100_000, produced_bytes

    with_tombstones = latest_per_key(acked)
    assert len(with_tombstones) == 200 + 300
    assert sum(1 for r in with_tombstones if r[2] is None) == 50
    got = wait_for(b, topic, with_tombstones)
    assert got == with_tombstones, "after compaction: %d records, want %d" % (len(got), len(with_tombstones))
    check_read(got, acked)
    assert b.wait_log(r"%s-0: compacted segment \d+" % topic, timeout=1) is not None
    assert log_bytes(b, topic) < produced_bytes / 3

    # Tombstones go once delete.retention.ms has passed since their segment was cleaned.
    set_topic_config(b, topic, "delete.retention.ms", "1000")
    live = [r for r in with_tombstones if r[2] is not None]
    got = wait_for(b, topic, live)
    assert got == live, "after tombstone expiry: %d records, want %d" % (len(got), len(live))
    check_read(got, acked)

    # Same view after a restart, and the log continues at the same end offset.
    b.restart()
    assert consume_all(b, topic) == live
    more = produce_confluent(b, topic, [(b"key-001", b"after-restart")])
    assert more[0][1] == len(records)


def test_compaction_of_lz4_compressed_batches(broker_factory):
    """What most real clients send: compressed batches. They are compacted
    like plain ones, and no longer hold back tombstone expiry."""
    b, port = cleaner_broker(broker_factory)
    topic = unique_topic("compact-lz4")
    create_topic(
        b,
        topic,
        1,
        config={
            "cleanup.policy": "compact",
            "segment.bytes": "4096",
            "min.compaction.lag.ms": "0",
            "delete.retention.ms": "3600000",
        },
    )
    records = [(b"key-%03d" % k, b"key-%03d|v%02d|%s" % (k, v, b"z" * (k % 23))) for v in range(20) for k in range(200)]
    records += [(b"key-%03d" % k, None) for k in range(1, 200, 5)]
    # Random filler does not compress: the tombstones end up in sealed segments.
    records += [(b"filler-%04d" % i, os.urandom(40)) for i in range(300)]
    acked = produce_confluent(b, topic, records, compression="lz4", **{"linger.ms": 0, "batch.size": 2000})
    assert sorted(r[1] for r in acked) == list(range(len(records)))
    produced_bytes = appended_bytes(port, topic)
    assert produced_bytes > 50_000, produced_bytes

    with_tombstones = latest_per_key(acked)
    assert len(with_tombstones) == 200 + 300
    assert sum(1 for r in with_tombstones if r[2] is None) == 40
    got = wait_for(b, topic, with_tombstones)
    assert got == with_tombstones, "after compaction: %d records, want %d" % (len(got), len(with_tombstones))
    check_read(got, acked)
    assert b.wait_log(r"%s-0: compacted segment \d+" % topic, timeout=1) is not None
    assert log_bytes(b, topic) < produced_bytes / 2

    set_topic_config(b, topic, "delete.retention.ms", "1000")
    live = [r for r in with_tombstones if r[2] is not None]
    got = wait_for(b, topic, live)
    assert got == live, "after tombstone expiry: %d records, want %d" % (len(got), len(live))
    check_read(got, acked)

    b.restart()
    assert consume_all(b, topic) == live


def test_kill9_during_compaction_loses_no_key(broker_factory):
    b = broker_factory(
        args=[
            "--log.cleaner.backoff.ms=200",
            "--log.cleaner.min.cleanable.ratio=0.01",
            # Slow enough that a pass over ~2 MB takes seconds.
            "--log.cleaner.io.max.bytes.per.second=1048576",
        ]
    )
    topic = unique_topic("compact-crash")
    # Built as a plain log, then switched to compact, so the first pass has a large log to chew on.
    create_topic(b, topic, 1, config={"cleanup.policy": "delete", "segment.bytes": "65536"})
    records = [(b"key-%03d" % k, b"key-%03d|v%02d|%s" % (k, v, b"y" * 150)) for v in range(20) for k in range(500)]
    records += [(b"filler-%04d" % i, b"f" * 100) for i in range(1000)]
    acked = produce_confluent(b, topic, records, **{"linger.ms": 5, "batch.size": 16384})
    expected = latest_per_key(acked)

    since = b.log_size()
    set_topic_config(b, topic, "cleanup.policy", "compact")
    started = b.wait_log(r"%s-0: compaction started" % topic, since=since, timeout=60)
    assert started is not None, "the cleaner never started on the compacted topic"
    # Kill once it is rewriting segments (the key map is built by then).
    assert b.wait_log(r"%s-0: compacted segment" % topic, since=since, timeout=60) is not None
    b.kill9()

    b.start()
    got = consume_all(b, topic)
    check_read(got, acked)
    seen = {}
    for offset, key, value in got:
        seen[key] = (offset, key, value)
    assert sorted(seen.values()) == expected, "latest value per key lost or wrong after kill -9"
    # The cleaner picks up again and converges.
    got = wait_for(b, topic, expected)
    assert got == expected
    check_read(got, acked)
