"""Bad input from the network: each gets the right Kafka error or a closed
connection, a log line, and the broker keeps serving everyone else."""

import random
import struct

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

import kafka_wire as kw
from clients import consume_confluent, produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

SOCKET_MAX = 1048576
MESSAGE_MAX = 10000


class Health:
    """Proves the broker still works: on fresh connections, a record produced
    and every record produced so far read back, plus ApiVersions on every shard."""

    def __init__(self, broker):
        self.broker = broker
        self.topic = unique_topic("health")
        create_topic(broker, self.topic, 1)
        self.values = []

    def check(self):
        for port in self.broker.ports:
            with kw.Conn(port) as c:
                table = kw.api_versions(c)
                assert kw.PRODUCE in table and kw.FETCH in table and kw.METADATA in table
        v = b"health-%d" % len(self.values)
        acked = produce_confluent(self.broker, self.topic, [(b"h", v)])
        assert acked[0][1] == len(self.values), acked
        self.values.append(v)
        got = consume_confluent(self.broker, self.topic, {0: len(self.values)})[0]
        assert got == [(i, b"h", x) for i, x in enumerate(self.values)]


@pytest.fixture
def limited(broker_factory):
    b = broker_factory(args=["--socket.request.max.bytes=%d" % SOCKET_MAX, "--message.max.bytes=%d" % MESSAGE_MAX])
    return b, Health(b)


def expect_closed(conn, what):
    closed, got = conn.wait_closed(15)
    assert closed, "%s: connection still open after 15 s (received %r)" % (what, got[:64])


def expect_log(broker, since, pattern, what):
    line = broker.wait_log(pattern, since=since, timeout=10)
    print("%s -> broker log: %s" % (what, line))
    assert line is not None, "%s: no broker log line matching %r; log since:\n%s" % (what, pattern, broker.log_since(since)[-3000:])
    return line


def leader_port(broker, topic, partition=0):
    md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
    return md.brokers[md.topics[topic].partitions[partition].leader].port


def test_oversized_frame_closes_connection(limited):
    broker, health = limited
    health.check()
    mark = broker.log_size()
    with kw.Conn(broker.port) as c:
        c.send_raw(kw.i32(100 * 1024 * 1024) + kw.request_header_v1(kw.METADATA, 4, 1) + b"\0" * 1024)
        expect_closed(c, "100 MiB frame")
    with kw.Conn(broker.port + 1) as c:
        c.send_raw(kw.i32(SOCKET_MAX + 1))
        expect_closed(c, "frame one byte over socket.request.max.bytes")
    expect_log(broker, mark, r"(?i)(too large|exceed|socket\.request\.max\.bytes|%d|oversize|frame)" % SOCKET_MAX, "oversized frame")
    health.check()


def test_frame_just_under_socket_limit_is_served(limited):
    """The limit rejects only frames above it: a Produce just under 1 MiB is
    read whole and answered (MESSAGE_TOO_LARGE here, as message.max.bytes is 10000)."""
    broker, health = limited
    topic = unique_topic("big")
    create_topic(broker, topic, 1)
    with kw.Conn(leader_port(broker, topic)) as c:
        v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
        batch = kw.build_batch([(b"k", random.Random(1).randbytes(SOCKET_MAX - 4096))])
        r = kw.produce(c, v, topic, 0, batch)
        assert r.error_code == kw.MESSAGE_TOO_LARGE, r
    health.check()


GARBAGE = {
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "negative_length": kw.i32(-5) + b"\x01\x02\x03\x04\x05",
    "zero_length": kw.i32(0),
    "frame_shorter_than_header": kw.frame(b"\x00\x03"),
    "client_id_past_frame": kw.frame(kw.i16(kw.METADATA) + kw.i16(4) + kw.i32(1) + kw.i16(500) + b"abc"),
    "random_bytes": kw.frame(bytes([0xFF, 0xF1]) + random.Random(7).randbytes(60)),
    "produce_body_garbage": kw.frame(kw.request_header_v1(kw.PRODUCE, 7, 1) + random.Random(8).randbytes(64)),
    "metadata_array_count_lies": kw.frame(kw.request_header_v1(kw.METADATA, 4, 1) + kw.i32(0x7FFFFFFF) + b"\x00\x01a"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_closes_connection(limited, name):
    broker, health = limited
    mark = broker.log_size()
    with kw.Conn(broker.port) as c:
        c.send_raw(GARBAGE[name])
        expect_closed(c, name)
    expect_log(
        broker,
        mark,
        r"(?i)(invalid|malformed|garbage|decod|pars|unknown|unsupported|bad|frame|short|truncat|too large|exceed|length|size|error|clos)",
        name,
    )
    health.check()


def test_bad_crc_is_corrupt_message_and_not_appended(limited):
    broker, health = limited
    topic = unique_topic("crc")
    create_topic(broker, topic, 1)
    good1 = [(b"k%d" % i, b"good-1-%d" % i) for i in range(3)]
    good2 = [(b"k%d" % i, b"good-2-%d" % i) for i in range(4)]
    bad = bytearray(kw.build_batch([(b"k", b"this batch will be damaged in flight")]))
    bad[-5] ^= 0x20
    assert not kw.batch_crc_ok(bad)
    mark = broker.log_size()
    with kw.Conn(leader_port(broker, topic)) as c:
        v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
        r = kw.produce(c, v, topic, 0, kw.build_batch(good1))
        assert (r.error_code, r.base_offset) == (0, 0), r
        r = kw.produce(c, v, topic, 0, bytes(bad))
        assert r.error_code == kw.CORRUPT_MESSAGE, r
        # The same connection keeps working, and the bad batch took no offsets.
        r = kw.produce(c, v, topic, 0, kw.build_batch(good2))
        assert (r.error_code, r.base_offset) == (0, 3), r
    expect_log(broker, mark, r"(?i)(crc|corrupt)", "bad CRC")
    assert watermarks(broker, topic, [0]) == {0: (0, 7)}
    got = consume_confluent(broker, topic, {0: 7})[0]
    assert got == [(i, k, v) for i, (k, v) in enumerate(good1 + good2)]
    health.check()


def _retotal_crc(batch):
    struct.pack_into(">I", batch, kw.CRC_OFFSET, kw.crc32c(bytes(batch[kw.ATTRIBUTES_OFFSET :])))


@pytest.mark.parametrize(
    "lie",
    [
        "batch_length_past_frame",
        "batch_length_short",
        "magic_3",
        # Uncompressed batches have their records walked (protocol::batch::validate_records).
        "records_truncated",
    ],
)
def test_inconsistent_batch_rejected(limited, lie):
    """Lengths and magic are checked against the frame: never trusted."""
    broker, health = limited
    topic = unique_topic("lie")
    create_topic(broker, topic, 1)
    batch = bytearray(kw.build_batch([(b"k%d" % i, b"v%d" % i) for i in range(5)]))
    if lie == "batch_length_past_frame":
        struct.pack_into(">i", batch, 8, len(batch) - 12 + 1000)
    elif lie == "batch_length_short":
        struct.pack_into(">i", batch, 8, 30)
    elif lie == "magic_3":
        batch[16] = 3
    elif lie == "records_truncated":
        del batch[-4:]
        struct.pack_into(">i", batch, 8, len(batch) - 12)
        _retotal_crc(batch)
    with kw.Conn(leader_port(broker, topic)) as c:
        v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
        r = kw.produce(c, v, topic, 0, bytes(batch))
        allowed = (kw.CORRUPT_MESSAGE, 87)  # CORRUPT_MESSAGE, INVALID_RECORD
        if lie == "magic_3":
            allowed += (43,)  # UNSUPPORTED_FOR_MESSAGE_FORMAT is Kafka's word for a format it cannot take
        assert r.error_code in allowed, "%s: %r (want one of %r)" % (lie, r, allowed)
        r = kw.produce(c, v, topic, 0, kw.build_batch([(b"ok", b"ok")]))
        assert (r.error_code, r.base_offset) == (0, 0), r
    assert consume_confluent(broker, topic, {0: 1})[0] == [(0, b"ok", b"ok")]
    health.check()


def test_batch_over_message_max_bytes_is_message_too_large(limited):
    broker, health = limited
    topic = unique_topic("large")
    create_topic(broker, topic, 1)
    big = b"L" * 20_000
    mark = broker.log_size()
    with kw.Conn(leader_port(broker, topic)) as c:
        v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
        r = kw.produce(c, v, topic, 0, kw.build_batch([(b"big", big)]))
        assert r.error_code == kw.MESSAGE_TOO_LARGE, r
    expect_log(broker, mark, r"(?i)(too large|message\.max\.bytes|exceed|%d)" % MESSAGE_MAX, "batch over message.max.bytes")

    # The same through librdkafka, which must be allowed to send it.
    errors, oks = [], []
    p = Producer(broker.producer_config(**{"message.max.bytes": 1_000_000, "compression.type": "none", "retries": 0}))
    p.produce(topic, key=b"big", value=big, on_delivery=lambda e, m: (errors if e else oks).append(e or m.offset()))
    assert p.flush(60) == 0
    p.produce(topic, key=b"small", value=b"s" * 100, on_delivery=lambda e, m: (errors if e else oks).append(e or m.offset()))
    assert p.flush(60) == 0
    assert [e.code() for e in errors] == [KafkaError.MSG_SIZE_TOO_LARGE], errors
    assert oks == [0]
    assert consume_confluent(broker, topic, {0: 1})[0] == [(0, b"small", b"s" * 100)]
    health.check()


def test_unknown_api_key_closes_connection(limited):
    broker, health = limited
    mark = broker.log_size()
    with kw.Conn(broker.port) as c:
        c.send_request(999, 0, b"")
        expect_closed(c, "api key 999")
    expect_log(broker, mark, r"(?i)(unknown|unsupported|invalid|999|api)", "unknown api key")
    health.check()


def test_unsupported_version_of_other_api_closes_connection(limited):
    broker, health = limited
    mark = broker.log_size()
    with kw.Conn(broker.port) as c:
        c.send_request(kw.METADATA, 99, kw.metadata_body(4, None))
        expect_closed(c, "Metadata v99")
    expect_log(broker, mark, r"(?i)(unsupported|version|99)", "Metadata v99")
    health.check()


def test_api_versions_too_new_answers_v0_with_unsupported_version(limited):
    broker, health = limited
    with kw.Conn(broker.port) as c:
        # What a newer client sends first (KIP-511): header v2, v3-style body.
        body = kw.compact_string("tidelog-tests") + kw.compact_string("1.0") + b"\x00"
        corr = c.send_request(kw.API_VERSIONS, 99, body, header_version=2)
        raw = c.recv_frame()
        r = kw.Reader(raw)
        assert r.i32() == corr
        err, table, apis = kw.parse_api_versions_v0(r)
        assert err == kw.UNSUPPORTED_VERSION, err
        assert r.remaining() == 0, "response is not in v0 format: %d trailing bytes" % r.remaining()
        assert len(raw) == 4 + 2 + 4 + 6 * len(apis)
        assert apis, "empty api list"
        for key in (kw.PRODUCE, kw.FETCH, kw.LIST_OFFSETS, kw.METADATA, kw.API_VERSIONS, kw.CREATE_TOPICS):
            assert key in table, "api %d missing from %r" % (key, table)
        lo, hi = table[kw.API_VERSIONS]
        assert lo == 0 and 3 <= hi < 99, table[kw.API_VERSIONS]
        # The connection stays usable: the client retries with a version it knows.
        assert kw.api_versions(c) == table
    health.check()


INVALID_NAMES = ["bad/name", "a" * 250, "..", ".", "has space", "t\u00f6pic", ""]


def test_invalid_topic_name_create_topics(limited):
    broker, health = limited
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    mark = broker.log_size()
    for name in INVALID_NAMES:
        if name == "":
            continue  # librdkafka refuses an empty name itself
        fut = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)], request_timeout=15)[name]
        with pytest.raises(Exception) as ei:
            fut.result(timeout=30)
        err = ei.value.args[0]
        assert err.code() == KafkaError.TOPIC_EXCEPTION, "%r: %s" % (name, err)
    expect_log(broker, mark, r"(?i)(invalid|topic)", "invalid topic name")
    names = set(admin.list_topics(timeout=10).topics)
    assert not names & set(INVALID_NAMES), names & set(INVALID_NAMES)
    health.check()


def test_invalid_topic_name_metadata_auto_create(limited):
    broker, health = limited
    for port in broker.ports:
        with kw.Conn(port) as c:
            v = kw.pick_version(kw.api_versions(c), kw.METADATA, 4, 8)
            md = kw.metadata(c, v, INVALID_NAMES, allow_auto_topic_creation=True)
            by_name = {t.name: t for t in md["topics"]}
            assert set(by_name) == set(INVALID_NAMES), sorted(by_name)
            for name, t in by_name.items():
                assert t.error_code == kw.INVALID_TOPIC_EXCEPTION, "%r: error %d" % (name, t.error_code)
                assert t.partitions == []
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    assert not set(admin.list_topics(timeout=10).topics) & set(INVALID_NAMES)
    health.check()
