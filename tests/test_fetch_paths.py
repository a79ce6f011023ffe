"""Fetch paths (issue 4): hot reads from the recent-batch cache, cold reads
sent from segment files with sendfile, both mixed in one response, and the
partial/oversize batch cases clients rely on.

How bytes left the broker is read from the counters each shard logs when it
stops ("fetch bytes in responses: M from memory, F by sendfile, L read to locate
batches"): a cold read must go out by sendfile, with only batch headers read
through user space.
"""

import os
import re
import threading
import time
import zlib

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from clients import produce_waiting
from conftest import create_topic, unique_topic

STATS = re.compile(
    r"shard (\d+): stopped, all appended data durable; fetch bytes in responses: (\d+) from memory, (\d+) by sendfile, (\d+) read to locate batches"
)


def fetch_stats(broker):
    """{shard: (memory, sendfile, located)} from the log of a stopped broker."""
    out = {}
    for m in STATS.finditer(broker.log_text()):
        out[int(m.group(1))] = tuple(int(g) for g in m.group(2, 3, 4))
    return out


def payload(partition, seq, size):
    head = b"p%d-s%d|" % (partition, seq)
    body = (b"%08d" % seq) * (size // 8 + 1)
    return head + body[: size - len(head)]


def leaders(broker, topic):
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
    return {p.id: p.leader for p in md.topics[topic].partitions.values()}


def send(p, topic, partition, value, on_delivery):
    """Queues one record on Producer `p`, waiting while its buffer is full."""
    produce_waiting(p, topic, partition=partition, value=value, on_delivery=on_delivery)


def produce(broker, topic, partition, first_seq, count, size):
    p = Producer(broker.producer_config(**{"linger.ms": 5, "batch.size": 256 * 1024}))
    errors = []
    for seq in range(first_seq, first_seq + count):
        send(p, topic, partition, payload(partition, seq, size), lambda err, msg: errors.append(err) if err else None)
    assert p.flush(120) == 0
    assert not errors, errors[:3]


def consume_range(broker, topic, starts, ends, timeout=300, **extra):
    """Reads [start, end) of each partition; returns {p: [(offset, crc32, value-prefix)]}."""
    c = Consumer(broker.consumer_config(**extra))
    out = {p: [] for p in starts}
    try:
        c.assign([TopicPartition(topic, p, starts[p]) for p in starts])
        pending = {p for p in starts if ends[p] > starts[p]}
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, {p: len(v) for p, v in out.items()}
            for m in c.consume(num_messages=1000, timeout=1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(str(m.error()))
                v = m.value()
                out[m.partition()].append((m.offset(), zlib.crc32(v), v[:24]))
                if m.offset() >= ends[m.partition()] - 1:
                    pending.discard(m.partition())
    finally:
        c.close()
    return out


def check_exact(got, partition, first_seq, start, end, size):
    recs = got[partition]
    assert [o for o, _, _ in recs] == list(range(start, end)), "partition %d offsets" % partition
    for i, (_, crc, _) in enumerate(recs):
        seq = first_seq + i
        assert crc == zlib.crc32(payload(partition, seq, size)), "partition %d seq %d content" % (partition, seq)


def test_cold_reads_go_out_by_sendfile(broker):
    topic = unique_topic("cold")
    create_topic(broker, topic, 2)
    size, n = 4000, 3000
    for p in (0, 1):
        produce(broker, topic, p, 0, n, size)
    broker.restart()  # empties the recent-batch cache: everything is cold now
    got = consume_range(broker, topic, {0: 0, 1: 0}, {0: n, 1: n})
    for p in (0, 1):
        check_exact(got, p, 0, 0, n, size)
    assert broker.stop() == 0
    stats = fetch_stats(broker)
    assert set(stats) == {0, 1}, broker.log_tail()
    memory = sum(s[0] for s in stats.values())
    sendfile = sum(s[1] for s in stats.values())
    located = sum(s[2] for s in stats.values())
    data = 2 * n * size
    assert memory == 0, "cold data must not be served from user-space buffers: %r" % stats
    assert sendfile >= data, "every consumed byte went out by sendfile: %r < %d" % (stats, data)
    # Locating a fetch's first batch reads a header window, not the data.
    assert located < data // 4, "too much read through user space: %r" % stats


def test_hot_and_cold_partitions_in_one_response(broker):
    """Two partitions on the same shard: one read cold from its segment, one
    hot from the cache, in the same Fetch; both clients decode it."""
    topic = unique_topic("mixed")
    create_topic(broker, topic, 4)
    owners = leaders(broker, topic)
    by_shard = {}
    for p, leader in sorted(owners.items()):
        by_shard.setdefault(leader, []).append(p)
    cold, hot = next(ps for ps in by_shard.values() if len(ps) >= 2)[:2]
    size, n = 1000, 2000
    produce(broker, topic, cold, 0, n, size)
    produce(broker, topic, hot, 0, n, size)
    broker.restart()
    produce(broker, topic, hot, n, n, size)  # only this part is in the cache
    got = consume_range(broker, topic, {cold: 0, hot: n}, {cold: n, hot: 2 * n})
    check_exact(got, cold, 0, 0, n, size)
    check_exact(got, hot, n, n, 2 * n, size)

    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=5000)
    try:
        kc.assign([KTP(topic, cold), KTP(topic, hot)])
        kc.seek(KTP(topic, cold), 0)
        kc.seek(KTP(topic, hot), n)
        seen = {cold: [], hot: []}
        deadline = time.monotonic() + 120
        while (len(seen[cold]) < n or len(seen[hot]) < n) and time.monotonic() < deadline:
            for tp, msgs in kc.poll(timeout_ms=1000).items():
                seen[tp.partition].extend((m.offset, zlib.crc32(m.value)) for m in msgs)
    finally:
        kc.close()
    assert [o for o, _ in seen[cold]] == list(range(n))
    assert [o for o, _ in seen[hot]] == list(range(n, 2 * n))
    assert [c for _, c in seen[cold]] == [zlib.crc32(payload(cold, s, size)) for s in range(n)]
    assert [c for _, c in seen[hot]] == [zlib.crc32(payload(hot, s, size)) for s in range(n, 2 * n)]
    assert broker.stop() == 0
    memory, sendfile, _ = fetch_stats(broker)[owners[cold]]
    assert memory > 0 and sendfile > 0, "the shard served both paths: %r" % (fetch_stats(broker),)


def test_oversize_and_partial_batches(broker):
    """Batches far larger than the fetch limits still come through whole
    (KIP-74), and cold responses cut at the limit (a partial last batch, as
    Kafka sends) lose nothing."""
    topic = unique_topic("limits")
    create_topic(broker, topic, 1)
    size, n = 30000, 200
    produce(broker, topic, 0, 0, n, size)
    broker.restart()
    # librdkafka needs fetch.max.bytes >= message.max.bytes (its floor is 1000).
    limits = {"message.max.bytes": 1000, "fetch.max.bytes": 1000, "max.partition.fetch.bytes": 1000, "fetch.min.bytes": 1}
    got = consume_range(broker, topic, {0: 0}, {0: n}, **limits)
    check_exact(got, 0, 0, 0, n, size)
    odd = {"message.max.bytes": 100000, "fetch.max.bytes": 100000, "max.partition.fetch.bytes": 70001}  # cuts batches mid-way
    got = consume_range(broker, topic, {0: 0}, {0: n}, **odd)
    check_exact(got, 0, 0, 0, n, size)
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False,
                       fetch_max_bytes=1024, max_partition_fetch_bytes=1024)
    try:
        kc.assign([KTP(topic, 0)])
        kc.seek(KTP(topic, 0), 0)
        seen = []
        deadline = time.monotonic() + 120
        while len(seen) < n and time.monotonic() < deadline:
            for _, msgs in kc.poll(timeout_ms=1000).items():
                seen.extend((m.offset, zlib.crc32(m.value)) for m in msgs)
    finally:
        kc.close()
    assert [o for o, _ in seen] == list(range(n))
    assert [c for _, c in seen] == [zlib.crc32(payload(0, s, size)) for s in range(n)]


def test_catch_up_over_many_sealed_segments_while_producing(broker_factory):
    """A consumer catches up from the start of CATCHUP_MB (default 2048) of
    data spread over many sealed segments while a producer keeps appending:
    every record exactly once, in order."""
    total_mb = int(os.environ.get("TIDELOG_CATCHUP_MB", "2048"))
    broker = broker_factory(args=["--log.segment.bytes=67108864"])
    topic = unique_topic("catchup")
    partitions = 4
    create_topic(broker, topic, partitions)
    size = 16 * 1024
    per_partition = total_mb * 1024 * 1024 // size // partitions
    threads = [threading.Thread(target=produce, args=(broker, topic, p, 0, per_partition, size)) for p in range(partitions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in range(partitions):
        segs = [f for f in os.listdir(os.path.join(broker.log_dirs, "%s-%d" % (topic, p))) if f.endswith(".log")]
        assert len(segs) >= max(2, total_mb // partitions // 64), (p, segs)
    extra = 2000
    more = threading.Thread(target=lambda: [produce(broker, topic, p, per_partition, extra, size) for p in range(partitions)])
    more.start()
    ends = {p: per_partition + extra for p in range(partitions)}
    got = consume_range(broker, topic, {p: 0 for p in range(partitions)}, ends, timeout=900)
    more.join()
    for p in range(partitions):
        check_exact(got, p, 0, 0, per_partition + extra, size)
