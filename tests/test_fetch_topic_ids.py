"""Fetch v13-v16 on the wire: topics by id (KIP-516), an unknown id answered
UNKNOWN_TOPIC_ID, and a partition asked of the wrong broker answered with
its current leader and, in v16, that leader's endpoint (KIP-951).

librdkafka (confluent-kafka here) fetches with v16 whenever the broker
offers it, so every consumer test drives these versions too; this test pins
down the fields a client cannot be seen to check. The replica side of v15
(KIP-903's `replica_state` with the broker epoch) is what the cluster's own
followers send: tests/test_replication_*.py."""

import struct
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import kafka_wire as kw
from conftest import create_topic, unique_topic

NOT_LEADER_OR_FOLLOWER = 6
UNKNOWN_TOPIC_ID = 100


def tagged_fields(r):
    """{tag: bytes} of a flexible structure's tagged-field section."""
    out = {}
    for _ in range(read_uvarint(r)):
        tag = read_uvarint(r)
        out[tag] = r._take(read_uvarint(r))
    return out


def read_uvarint(r):
    shift = value = 0
    while True:
        b = r._take(1)[0]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value
        shift += 7


def compact_array(r, dec):
    n = read_uvarint(r) - 1
    return None if n < 0 else [dec(r) for _ in range(n)]


def compact_string(r):
    n = read_uvarint(r) - 1
    return None if n < 0 else r._take(n).decode()


def fetch_body(version, topic_id, partition, offset, max_wait_ms=100):
    part = (
        kw.i32(partition)
        + kw.i32(-1)  # current_leader_epoch
        + kw.i64(offset)
        + kw.i32(-1)  # last_fetched_epoch
        + kw.i64(-1)  # log_start_offset
        + kw.i32(1 << 20)
        + b"\x00"
    )
    topic = topic_id.bytes + kw.uvarint(2) + part + b"\x00"
    body = b"" if version >= 15 else kw.i32(-1)  # replica_id, until v15's replica_state
    body += kw.i32(max_wait_ms) + kw.i32(1) + kw.i32(1 << 20) + kw.i8(0) + kw.i32(0) + kw.i32(-1)
    body += kw.uvarint(2) + topic  # one topic
    body += kw.uvarint(1)  # no forgotten topics
    body += kw.compact_string("")  # rack
    body += b"\x00"
    return body


def parse_fetch(r):
    """(top-level tags, [(topic id, [partition dict])]) of a v13+ response."""
    r.i32()  # throttle
    assert r.i16() == 0
    r.i32()  # session

    def partition(r):
        p = {
            "index": r.i32(),
            "error": r.i16(),
            "hw": r.i64(),
            "lso": r.i64(),
            "log_start": r.i64(),
        }
        compact_array(r, lambda r: (r.i64(), r.i64(), tagged_fields(r)))
        r.i32()  # preferred read replica
        n = read_uvarint(r) - 1
        p["records"] = b"" if n < 0 else r._take(n)
        p["tags"] = tagged_fields(r)
        return p

    def topic(r):
        tid = uuid.UUID(bytes=r._take(16))
        parts = compact_array(r, partition)
        tagged_fields(r)
        return tid, parts

    topics = compact_array(r, topic)
    tags = tagged_fields(r)
    assert r.remaining() == 0, "%d trailing bytes" % r.remaining()
    return tags, topics


def fetch(port, version, topic_id, partition, offset):
    with kw.Conn(port) as c:
        corr = c.send_request(kw.FETCH, version, fetch_body(version, topic_id, partition, offset), header_version=2)
        return parse_fetch(c.recv_response(corr, header_version=1))


def topic_id_of(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    from confluent_kafka import TopicCollection

    desc = admin.describe_topics(TopicCollection([topic]))[topic].result(30)
    tid = desc.topic_id
    msb = tid.get_most_significant_bits() & ((1 << 64) - 1)
    lsb = tid.get_least_significant_bits() & ((1 << 64) - 1)
    return uuid.UUID(int=(msb << 64) | lsb)


def test_fetch_by_topic_id_unknown_id_and_current_leader(broker_factory):
    b = broker_factory(shards=2)
    topic = unique_topic("tid")
    create_topic(b, topic, 2)
    p = Producer(b.producer_config(acks="all"))
    for part in range(2):
        for i in range(5):
            p.produce(topic, value=b"v-%d-%d" % (part, i), partition=part)
    assert p.flush(30) == 0
    tid = topic_id_of(b.bootstrap, topic)
    assert tid.int != 0

    # Which shard owns partition 0: the one that answers it without error.
    answers = {port: fetch(port, 16, tid, 0, 0) for port in b.ports}
    owners = [port for port, (_, topics) in answers.items() if topics[0][1][0]["error"] == 0]
    assert len(owners) == 1, answers
    owner = owners[0]
    owner_id = owner - b.port  # a single node: broker id = shard = port offset

    for version in (13, 15, 16):
        tags, topics = fetch(owner, version, tid, 0, 0)
        assert [t[0] for t in topics] == [tid], "v%d: the answer names the topic by id" % version
        part = topics[0][1][0]
        assert (part["index"], part["error"], part["hw"], part["log_start"]) == (0, 0, 5, 0), (version, part)
        got = []
        data = part["records"]
        while data:
            batch_len = struct.unpack(">i", data[8:12])[0] + 12
            got += [(o, v) for o, _, v in kw.decode_batch(data[:batch_len])]
            data = data[batch_len:]
        assert got == [(i, b"v-0-%d" % i) for i in range(5)], (version, got)
        assert not tags, "v%d: no node endpoints when every partition was answered" % version

    # The other shard: NOT_LEADER_OR_FOLLOWER with the current leader, and in
    # v16 where that leader listens.
    other = next(port for port in b.ports if port != owner)
    for version in (13, 16):
        tags, topics = fetch(other, version, tid, 0, 0)
        part = topics[0][1][0]
        assert part["error"] == NOT_LEADER_OR_FOLLOWER, (version, part)
        leader = part["tags"].get(1)
        assert leader is not None, "v%d: current_leader (tag 1) missing: %r" % (version, part["tags"])
        leader_id, leader_epoch = struct.unpack(">ii", leader[:8])
        assert (leader_id, leader_epoch) == (owner_id, 0)
        if version >= 16:
            r = kw.Reader(tags[0])
            endpoints = compact_array(r, lambda r: (r.i32(), compact_string(r), r.i32(), compact_string(r), tagged_fields(r)))
            assert [(e[0], e[1], e[2]) for e in endpoints] == [(owner_id, "127.0.0.1", owner)], endpoints
        else:
            assert not tags, "v13 has no node endpoints"

    # An id no topic has.
    unknown = uuid.uuid4()
    _, topics = fetch(owner, 16, unknown, 0, 0)
    assert topics[0][0] == unknown
    assert topics[0][1][0]["error"] == UNKNOWN_TOPIC_ID, topics
