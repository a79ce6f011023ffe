"""Old clients and legacy message formats (issue 16).

Clients that cannot ask ApiVersions speak Produce v0-v2 / Fetch v0-v3 /
ListOffsets v0 and magic 0/1 MessageSets: librdkafka with
`api.version.request=false, broker.version.fallback=0.9.0` (Produce v1 and
Fetch v1: magic 0) and kafka-python with `api_version=(0, 10)` (Produce v2
and Fetch v2: magic 1). The broker converts their messages to record
batches v2 on produce and down-converts on fetch. librdkafka with
`broker.version.fallback=0.10.0` still sends ApiVersions (librdkafka treats
any fallback >= 0.10 as "queryable") and so speaks the modern versions: its
test checks it works unchanged.
"""

import logging
import re
import struct
import time
import zlib

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

import kafka_wire as w
from conftest import create_topic, unique_topic

OLD_09 = {"api.version.request": False, "broker.version.fallback": "0.9.0"}
OLD_010 = {"api.version.request": False, "broker.version.fallback": "0.10.0"}

CORRUPT_MESSAGE = 2
INVALID_RECORD = 87


class SentVersions(logging.Handler):
    """librdkafka's `debug=protocol` lines ("Sent ProduceRequest (v1, ...")
    through confluent-kafka's `logger`: which API versions it really sent."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.sent = set()
        self.logger = logging.getLogger("librdkafka-%d" % id(self))
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        self.logger.propagate = False

    def emit(self, record):
        self.sent.update(re.findall(r"Sent (\w+) \(v(\d+)", record.getMessage()))

    def config(self):
        return {"debug": "protocol", "logger": self.logger}

    def versions(self, api):
        return {int(v) for a, v in self.sent if a == api}


def records_for(n, prefix="r"):
    return [(("k%d" % (i % 7)).encode(), ("%s-%05d-" % (prefix, i)).encode() + b"x" * (i % 50)) for i in range(n)]


def confluent_produce(broker, topic, records, partition=None, headers=None, **extra):
    cfg = broker.producer_config(**{"linger.ms": 5})
    cfg.update(extra)
    p = Producer(cfg)
    acked, errors = [], []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked.append((msg.partition(), msg.offset(), msg.key(), msg.value(), msg.timestamp()))

    for k, v in records:
        kw = {"key": k, "value": v, "on_delivery": on_delivery}
        if partition is not None:
            kw["partition"] = partition
        if headers is not None:
            kw["headers"] = headers
        p.produce(topic, **kw)
        p.poll(0)
    assert p.flush(60) == 0, "messages still queued"
    assert not errors, "delivery errors: %r" % errors[:3]
    assert len(acked) == len(records)
    return acked


def confluent_consume(broker, topic, partitions, expect, **extra):
    """assign() every partition from the start, read `expect` records."""
    cfg = broker.consumer_config(**extra)
    c = Consumer(cfg)
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < expect and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError("consumer error: %s" % m.error())
            got.append((m.partition(), m.offset(), m.key(), m.value(), m.timestamp(), m.headers()))
    finally:
        c.close()
    assert len(got) == expect, "consumed %d of %d" % (len(got), expect)
    return got


def kafka_python_producer(broker, **extra):
    from kafka import KafkaProducer

    cfg = dict(
        bootstrap_servers=broker.bootstrap,
        api_version=(0, 10),
        acks="all",
        linger_ms=5,
        request_timeout_ms=30000,
    )
    cfg.update(extra)
    return KafkaProducer(**cfg)


def kafka_python_consume(broker, topic, partitions, expect, **extra):
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition as KTP

    cfg = dict(
        bootstrap_servers=broker.bootstrap,
        api_version=(0, 10),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    cfg.update(extra)
    c = KafkaConsumer(**cfg)
    c.assign([KTP(topic, p) for p in range(partitions)])
    c.seek_to_beginning()
    got = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for m in batch:
                    got.append((m.partition, m.offset, m.key, m.value, (m.timestamp_type, m.timestamp)))
    finally:
        c.close()
    assert len(got) == expect, "consumed %d of %d" % (len(got), expect)
    return got


def by_partition(rows):
    out = {}
    for row in rows:
        out.setdefault(row[0], []).append(row)
    return out


def check_same_records(acked, got):
    """Per partition: the same (offset, key, value) in offset order, contiguous from 0."""
    a = {p: [(r[1], r[2], r[3]) for r in sorted(rows, key=lambda r: r[1])] for p, rows in by_partition(acked).items()}
    g = {p: [(r[1], r[2], r[3]) for r in rows] for p, rows in by_partition(got).items()}
    assert g == a
    for rows in g.values():
        assert [r[0] for r in rows] == list(range(len(rows))), "offsets not contiguous from 0"


# --------------------------------------------------------------------------
# librdkafka with broker.version.fallback=0.9.0: magic 0


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4"])
def test_librdkafka_09_produce_and_consume(broker, codec):
    topic = unique_topic("old09")
    create_topic(broker, topic, 2)
    recs = records_for(300)
    seen = SentVersions()
    acked = confluent_produce(broker, topic, recs, **OLD_09, **{"compression.codec": codec}, **seen.config())
    got = confluent_consume(broker, topic, 2, len(recs), **OLD_09, **seen.config())
    check_same_records(acked, got)
    # The legacy requests really were what carried them.
    assert seen.versions("ProduceRequest") == {1} and seen.versions("FetchRequest") == {1}, seen.sent
    # Per key produce order survives (keys hash to one partition).
    for key in {k for k, _ in recs}:
        assert [r[3] for r in got if r[2] == key] == [v for k, v in recs if k == key]
    # Magic 0 carries no timestamp.
    assert {r[4][0] for r in got} == {0}, "0.9 consumers see no timestamp type: %r" % {r[4] for r in got}
    # A modern consumer reads the converted v2 batches: same records,
    # NO_TIMESTAMP (-1) as Kafka stores magic-0 messages.
    modern = confluent_consume(broker, topic, 2, len(recs))
    check_same_records(acked, modern)
    assert {r[4][1] for r in modern} == {-1}


def test_librdkafka_09_group_consumer_commits(broker):
    topic = unique_topic("old09g")
    create_topic(broker, topic, 2)
    recs = records_for(200)
    confluent_produce(broker, topic, recs, **OLD_09)
    group = unique_topic("g")
    seen = SentVersions()
    cfg = broker.consumer_config(
        **OLD_09,
        **{"group.id": group, "enable.partition.eof": False, "session.timeout.ms": 6000},
        **seen.config(),
    )
    c = Consumer(cfg)
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 120 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        got.append(m)
    assert len(got) >= 120
    # Commit exactly what was read, synchronously.
    last = {}
    for m in got:
        last[m.partition()] = m.offset() + 1
    c.commit(offsets=[TopicPartition(topic, p, o) for p, o in last.items()], asynchronous=False)
    committed = {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in last], timeout=10)}
    assert committed == last
    c.close()
    # A new member of the group resumes from the commits: everything else, once.
    c = Consumer(cfg)
    c.subscribe([topic])
    rest = []
    deadline = time.monotonic() + 60
    while len(rest) < len(recs) - len(got) and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        rest.append(m)
    c.close()
    read = sorted((m.partition(), m.offset()) for m in got + rest)
    assert len(read) == len(recs) and len(set(read)) == len(recs), "a record missed or read twice"
    assert all(m.offset() >= last.get(m.partition(), 0) for m in rest)
    assert seen.versions("FetchRequest") == {1}, seen.sent
    # A new group starts where auto.offset.reset says: ListOffsets v0.
    assert seen.versions("ListOffsetsRequest") == {0}, seen.sent
    assert seen.versions("JoinGroupRequest") == {0} and seen.versions("OffsetCommitRequest") == {2}, seen.sent
    assert seen.versions("OffsetFetchRequest") == {1}, seen.sent


# --------------------------------------------------------------------------
# librdkafka with broker.version.fallback=0.10.0


def test_librdkafka_010_fallback_still_negotiates(broker):
    topic = unique_topic("old010")
    create_topic(broker, topic, 2)
    recs = records_for(200)
    seen = SentVersions()
    acked = confluent_produce(broker, topic, recs, **OLD_010, **{"compression.codec": "gzip"}, **seen.config())
    got = confluent_consume(broker, topic, 2, len(recs), **OLD_010, **seen.config())
    check_same_records(acked, got)
    # librdkafka asks ApiVersions anyway and picks modern versions.
    assert seen.versions("ApiVersionRequest"), seen.sent
    assert min(seen.versions("ProduceRequest")) >= 3 and min(seen.versions("FetchRequest")) >= 4, seen.sent
    # CreateTime, the producer's clock.
    now_ms = time.time() * 1000
    assert {r[4][0] for r in got} == {1}
    assert all(abs(r[4][1] - now_ms) < 120_000 for r in got)


# --------------------------------------------------------------------------
# kafka-python with api_version=(0, 10): magic 1


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4"])
def test_kafka_python_010_produce_and_consume(broker, codec):
    topic = unique_topic("kp010")
    create_topic(broker, topic, 2)
    recs = records_for(300)
    p = kafka_python_producer(broker, compression_type=codec)
    base_ts = int(time.time() * 1000) - 10_000
    futures = [p.send(topic, key=k, value=v, timestamp_ms=base_ts + i) for i, (k, v) in enumerate(recs)]
    p.flush(60)
    acked = []
    for (k, v), f in zip(recs, futures):
        md = f.get(timeout=30)
        acked.append((md.partition, md.offset, k, v))
    p.close()
    got = kafka_python_consume(broker, topic, 2, len(recs))
    check_same_records(acked, got)
    # CreateTime: each record carries the timestamp it was sent with.
    sent_ts = {v: base_ts + i for i, (_, v) in enumerate(recs)}
    assert all(r[4] == (0, sent_ts[r[3]]) for r in got), got[:3]
    # The same through librdkafka with modern versions.
    modern = confluent_consume(broker, topic, 2, len(recs))
    check_same_records(acked, modern)
    assert all(r[4] == (1, sent_ts[r[3]]) for r in modern)


def test_kafka_python_010_log_append_time(broker):
    topic = unique_topic("kplat")
    create_topic(broker, topic, 1, config={"message.timestamp.type": "LogAppendTime"})
    recs = records_for(50)
    p = kafka_python_producer(broker)
    before = int(time.time() * 1000)
    futures = [p.send(topic, key=k, value=v, partition=0, timestamp_ms=1_000_000) for k, v in recs]
    p.flush(30)
    mds = [f.get(timeout=30) for f in futures]
    after = int(time.time() * 1000)
    p.close()
    # Produce v2 answers the append time.
    assert all(before - 1000 <= md.timestamp <= after + 1000 for md in mds), [md.timestamp for md in mds[:3]]
    got = kafka_python_consume(broker, topic, 1, len(recs))
    assert [(r[2], r[3]) for r in got] == recs
    assert {r[4][0] for r in got} == {1}, "LogAppendTime"
    assert all(before - 1000 <= r[4][1] <= after + 1000 for r in got)


# --------------------------------------------------------------------------
# mixed: new-format producer, old consumers; old producers, new consumer


def test_mixed_formats_same_records(broker):
    topic = unique_topic("mixed")
    create_topic(broker, topic, 1)
    new = records_for(60, "new")
    headers = [("h", b"dropped for old clients")]
    confluent_produce(broker, topic, new, partition=0, headers=headers)
    old = records_for(60, "old")
    confluent_produce(broker, topic, old, partition=0, **OLD_09)
    p = kafka_python_producer(broker)
    kp = records_for(60, "kp")
    for k, v in kp:
        p.send(topic, key=k, value=v, partition=0)
    p.flush(30)
    p.close()
    everything = new + old + kp
    views = {
        "modern librdkafka": confluent_consume(broker, topic, 1, len(everything)),
        "librdkafka 0.9 (magic 0)": confluent_consume(broker, topic, 1, len(everything), **OLD_09),
        "kafka-python 0.10 (magic 1)": kafka_python_consume(broker, topic, 1, len(everything)),
    }
    for name, got in views.items():
        assert [(r[2], r[3]) for r in got] == everything, name
        assert [r[1] for r in got] == list(range(len(everything))), name
    # Headers survive for modern clients only.
    modern = views["modern librdkafka"]
    assert all(r[5] == headers for r in modern[:60])
    assert all(not r[5] for r in modern[60:])


# --------------------------------------------------------------------------
# raw wire: bad input


def message_v1(key, value, timestamp_ms, offset=0, attributes=0):
    body = struct.pack(">bbq", 1, attributes, timestamp_ms) + w.kbytes(key) + w.kbytes(value)
    crc = zlib.crc32(body) & 0xFFFFFFFF
    msg = struct.pack(">I", crc) + body
    return struct.pack(">qi", offset, len(msg)) + msg


def message_v0(key, value, offset=0):
    body = struct.pack(">bb", 0, 0) + w.kbytes(key) + w.kbytes(value)
    msg = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF) + body
    return struct.pack(">qi", offset, len(msg)) + msg


def produce_v2_body(topic, partition, message_set):
    return (
        w.i16(-1)
        + w.i32(30000)
        + w.i32(1)
        + w.string(topic)
        + w.i32(1)
        + w.i32(partition)
        + w.kbytes(message_set)
    )


def parse_produce_v2(r):
    topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.i64(), r.i64()))))
    r.i32()  # throttle
    return topics[0][1][0]


def list_offsets_v0(conn, topic, partition, timestamp):
    body = w.i32(-1) + w.i32(1) + w.string(topic) + w.i32(1) + w.i32(partition) + w.i64(timestamp) + w.i32(1)
    r = conn.request(2, 0, body)
    topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.array(lambda r: r.i64())))))
    return topics[0][1][0]


def fetch_old(conn, version, topic, partition, offset, max_bytes=1 << 20):
    """Fetch v0-v3: (partition, error, high watermark, message set bytes)."""
    body = (
        w.i32(-1)
        + w.i32(100)
        + w.i32(0)
        + (w.i32(1 << 20) if version >= 3 else b"")
        + w.i32(1)
        + w.string(topic)
        + w.i32(1)
        + w.i32(partition)
        + w.i64(offset)
        + w.i32(max_bytes)
    )
    r = conn.request(1, version, body)
    if version >= 1:
        r.i32()  # throttle
    topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.i64(), r.kbytes()))))
    assert r.remaining() == 0
    return topics[0][1][0]


def fetch_v2(conn, topic, partition, offset, max_bytes=1 << 20):
    return fetch_old(conn, 2, topic, partition, offset, max_bytes)


def parse_message_set(data):
    out = []
    at = 0
    while at + 12 <= len(data):
        offset, size = struct.unpack_from(">qi", data, at)
        if at + 12 + size > len(data):
            break  # a partial message at the end: old clients drop it
        msg = data[at + 12 : at + 12 + size]
        (crc,) = struct.unpack_from(">I", msg, 0)
        assert crc == zlib.crc32(msg[4:]) & 0xFFFFFFFF, "bad crc at offset %d" % offset
        magic, attributes = struct.unpack_from(">bb", msg, 4)
        r = w.Reader(msg[6:])
        ts = r.i64() if magic == 1 else None
        out.append((offset, magic, attributes, ts, r.kbytes(), r.kbytes()))
        at += 12 + size
    return out


def owner_port(broker, topic, partition):
    with w.Conn(broker.port) as c:
        md = w.metadata(c, 4, [topic])
    leader = [p for p in md["topics"][0].partitions if p.index == partition][0].leader
    return [b[2] for b in md["brokers"] if b[0] == leader][0]


def test_raw_bad_crc_and_truncated_message_sets_write_nothing(broker):
    topic = unique_topic("raw")
    create_topic(broker, topic, 1)
    port = owner_port(broker, topic, 0)
    good = message_v1(b"k", b"good", 1_700_000_000_000)
    bad = bytearray(message_v1(b"k", b"bad", 1_700_000_000_000))
    bad[-1] ^= 0xFF  # payload changed after the CRC was computed
    with w.Conn(port) as c:
        # A wrong CRC: CORRUPT_MESSAGE, nothing written (the good message in
        # the same set is refused with it, as Kafka refuses the whole set).
        r = parse_produce_v2(c.request(0, 2, produce_v2_body(topic, 0, good + bytes(bad))))
        assert r[1] == CORRUPT_MESSAGE, r
        assert r[2] == -1
        # A MessageSet cut in the middle of its last message.
        r = parse_produce_v2(c.request(0, 2, produce_v2_body(topic, 0, good + good[:-5])))
        assert r[1] == CORRUPT_MESSAGE, r
        # A size field claiming more than the set holds.
        lying = good[:8] + struct.pack(">i", 1 << 20) + good[12:]
        r = parse_produce_v2(c.request(0, 2, produce_v2_body(topic, 0, lying)))
        assert r[1] == CORRUPT_MESSAGE, r
        # A v2 record batch is not what Produce v2 carries.
        batch = w.build_batch([(b"k", b"v2 batch")])
        r = parse_produce_v2(c.request(0, 2, produce_v2_body(topic, 0, batch)))
        assert r[1] == INVALID_RECORD, r
        assert list_offsets_v0(c, topic, 0, -1) == (0, 0, [0]), "nothing may have been written"
        # The connection still works: a good set goes in at offset 0 ...
        r = parse_produce_v2(c.request(0, 2, produce_v2_body(topic, 0, good + message_v1(None, b"two", 1_700_000_000_005))))
        assert r[:3] == (0, 0, 0), r
        assert r[3] == -1, "CreateTime topic: no log_append_time"
        assert list_offsets_v0(c, topic, 0, -1) == (0, 0, [2])
        assert list_offsets_v0(c, topic, 0, -2) == (0, 0, [0])
        # ... and Fetch v2 answers it as magic 1 messages, offsets and timestamps kept.
        p = fetch_v2(c, topic, 0, 0)
        assert (p[0], p[1], p[2]) == (0, 0, 2)
        assert parse_message_set(p[3]) == [
            (0, 1, 0, 1_700_000_000_000, b"k", b"good"),
            (1, 1, 0, 1_700_000_000_005, None, b"two"),
        ]
        # From offset 1, and with a budget smaller than a message: one message.
        assert [m[0] for m in parse_message_set(fetch_v2(c, topic, 0, 1)[3])] == [1]
        assert len(parse_message_set(fetch_v2(c, topic, 0, 0, max_bytes=10)[3])) == 1


def test_raw_produce_v0_and_fetch_v0_v3_shapes(broker):
    """Produce v0 (no throttle time in the answer) with magic-0 messages,
    read back by Fetch v0-v1 as magic 0 and v2-v3 as magic 1."""
    topic = unique_topic("rawv0")
    create_topic(broker, topic, 1)
    port = owner_port(broker, topic, 0)
    with w.Conn(port) as c:
        r = c.request(0, 0, produce_v2_body(topic, 0, message_v0(b"a", b"zero") + message_v0(None, b"one")))
        topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.i64()))))
        assert r.remaining() == 0, "Produce v0 has no throttle time"
        assert topics == [(topic, [(0, 0, 0)])]
        r = c.request(0, 1, produce_v2_body(topic, 0, message_v1(b"b", b"two", 1_700_000_000_002)))
        topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16(), r.i64()))))
        assert r.i32() == 0 and r.remaining() == 0, "Produce v1 ends with the throttle time"
        assert topics == [(topic, [(0, 0, 2)])]
        for version, magic in [(0, 0), (1, 0), (2, 1), (3, 1)]:
            p = fetch_old(c, version, topic, 0, 0)
            assert p[:3] == (0, 0, 3), (version, p)
            msgs = parse_message_set(p[3])
            assert [(m[0], m[1], m[4], m[5]) for m in msgs] == [
                (0, magic, b"a", b"zero"),
                (1, magic, None, b"one"),
                (2, magic, b"b", b"two"),
            ], version
            # Magic 1: the magic-0 messages have no timestamp, the magic-1 one keeps its own.
            assert [m[3] for m in msgs] == ([None] * 3 if magic == 0 else [-1, -1, 1_700_000_000_002])


def test_raw_offset_commit_v0_v1_and_offset_fetch_v0(broker):
    """Kafka 0.8's OffsetCommit v0 (no generation: a commit from outside any
    group generation) and v1 (per-partition commit timestamp), read back by
    OffsetFetch v0 and v1: tidelog keeps them all in __consumer_offsets."""
    topic = unique_topic("oc")
    create_topic(broker, topic, 2)
    group = unique_topic("g")
    with w.Conn(broker.port) as c:
        r = c.request(10, 0, w.string(group))
        err, node, host, port = r.i16(), r.i32(), r.string(), r.i32()
        assert err == 0, err

    def commit_body(version, offsets):
        body = w.string(group)
        if version == 1:
            body += w.i32(-1) + w.string("")
        parts = lambda p, o: w.i32(p) + w.i64(o) + (w.i64(-1) if version == 1 else b"") + w.string("m%d" % o)
        return body + w.i32(1) + w.string(topic) + w.i32(len(offsets)) + b"".join(parts(p, o) for p, o in offsets)

    def fetch_offsets(conn, version):
        body = w.string(group) + w.i32(1) + w.string(topic) + w.i32(2) + w.i32(0) + w.i32(1)
        r = conn.request(9, version, body)
        topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i64(), r.string(), r.i16()))))
        assert r.remaining() == 0
        return sorted(topics[0][1])

    with w.Conn(port) as c:
        r = c.request(8, 0, commit_body(0, [(0, 5), (1, 9)]))
        topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16()))))
        assert r.remaining() == 0, "OffsetCommit v0 has no throttle time"
        assert topics == [(topic, [(0, 0), (1, 0)])]
        for version in (0, 1):
            assert fetch_offsets(c, version) == [(0, 5, "m5", 0), (1, 9, "m9", 0)], version
        r = c.request(8, 1, commit_body(1, [(1, 11)]))
        topics = r.array(lambda r: (r.string(), r.array(lambda r: (r.i32(), r.i16()))))
        assert r.remaining() == 0 and topics == [(topic, [(1, 0)])]
        assert fetch_offsets(c, 0) == [(0, 5, "m5", 0), (1, 11, "m11", 0)]
    # A modern client sees the same commits.
    cons = Consumer(broker.consumer_config(**{"group.id": group}))
    got = cons.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    cons.close()
    assert [(tp.partition, tp.offset) for tp in got] == [(0, 5), (1, 11)]
