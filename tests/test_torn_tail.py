"""Damage the tail of the active segment while the broker is down, then start
it: recovery keeps every batch before the damaged one, byte for byte, keeps
nothing from the damaged batch on, and the next produce takes the damaged
batch's first offset.

On-disk contract (see DESIGN.md): `<log.dirs>/<topic>-<partition>/<base offset,
20 digits>.log` holds record batches v2 back to back exactly as on the wire,
possibly followed by a zero-filled preallocated tail."""

import os
import struct

import pytest
from confluent_kafka.admin import AdminClient

import kafka_wire as kw
from clients import consume_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

BATCHES = 20
PER_BATCH = 10


def batch_records(i):
    return [(b"b%02d-k%d" % (i, j), b"batch-%02d-record-%d-" % (i, j) + b"z" * (j * 3)) for j in range(PER_BATCH)]


def leader_port(broker, topic, partition=0):
    md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
    leader = md.topics[topic].partitions[partition].leader
    b = md.brokers[leader]
    assert b.host == "127.0.0.1"
    return b.port


def produce_batches(broker, topic, batches, first_offset=0):
    """Raw Produce, one request per batch so batch boundaries are ours."""
    port = leader_port(broker, topic)
    sent = []
    with kw.Conn(port) as c:
        v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
        off = first_offset
        for recs in batches:
            batch = kw.build_batch(recs)
            r = kw.produce(c, v, topic, 0, batch, acks=-1)
            assert (r.error_code, r.base_offset) == (0, off), r
            sent.append(batch)
            off += len(recs)
    return sent


def partition_dir(broker, topic, partition=0):
    return os.path.join(broker.log_dirs, "%s-%d" % (topic, partition))


def active_segment(broker, topic):
    pdir = partition_dir(broker, topic)
    segs = kw.segment_files(pdir)
    assert segs, "no .log segment in %s: %r" % (pdir, os.listdir(pdir))
    return segs[-1][1]


def check_segment_matches(path, sent, first_offset=0):
    """The file holds exactly `sent` (wire batches), base offsets assigned in
    order, CRC-covered bytes identical to what the client sent."""
    batches, tail = kw.parse_segment(path)
    assert len(batches) == len(sent), "%s: %d batches on disk, %d sent" % (path, len(batches), len(sent))
    off = first_offset
    for i, (b, s) in enumerate(zip(batches, sent)):
        assert b.base_offset == off, "batch %d base offset %d, expected %d" % (i, b.base_offset, off)
        assert b.magic == 2 and b.crc_ok, "batch %d at %d: magic %d crc_ok %s" % (i, b.position, b.magic, b.crc_ok)
        assert b.raw[kw.CRC_OFFSET :] == s[kw.CRC_OFFSET :], "batch %d differs from what was sent" % i
        assert b.batch_length == len(s) - kw.LOG_OVERHEAD
        off = b.next_offset
    assert set(tail) <= {0}, "%s: %d non-zero bytes after the last batch" % (path, sum(1 for x in tail if x))
    return batches


def damage(path, last, how):
    """Damage batch `last` (a DiskBatch), the last one in the file."""
    if how == "zero_tail_bytes":
        with open(path, "r+b") as f:
            f.seek(last.end - 16)
            f.write(b"\0" * 16)
    elif how == "truncate_mid_batch":
        os.truncate(path, last.position + last.size // 2)
    elif how == "flip_record_byte":
        with open(path, "r+b") as f:
            pos = last.position + kw.BATCH_HEADER_SIZE + (last.size - kw.BATCH_HEADER_SIZE) // 2
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0x40]))
    elif how == "flip_header_byte":
        # lastOffsetDelta: covered by the CRC, and would make offsets lie.
        with open(path, "r+b") as f:
            f.seek(last.position + 23 + 3)
            b = f.read(1)
            f.seek(last.position + 23 + 3)
            f.write(bytes([b[0] ^ 0x01]))
    elif how == "huge_length":
        with open(path, "r+b") as f:
            f.seek(last.position + 8)
            f.write(struct.pack(">i", 0x7FFFFFF0))
    elif how == "zero_whole_batch":
        with open(path, "r+b") as f:
            f.seek(last.position)
            f.write(b"\0" * last.size)
    else:
        raise ValueError(how)


DAMAGES = ["zero_tail_bytes", "truncate_mid_batch", "flip_record_byte", "flip_header_byte", "huge_length", "zero_whole_batch"]


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_last_batch_is_cut(broker, how, stop):
    topic = unique_topic("torn")
    create_topic(broker, topic, 1)
    recs = [batch_records(i) for i in range(BATCHES)]
    sent = produce_batches(broker, topic, recs)
    assert watermarks(broker, topic, [0]) == {0: (0, BATCHES * PER_BATCH)}

    if stop == "sigterm":
        assert broker.stop() == 0, broker.log_tail()
    else:
        broker.kill9()
    path = active_segment(broker, topic)
    batches = check_segment_matches(path, sent)
    damage(path, batches[-1], how)
    cut = batches[-1].base_offset
    assert cut == (BATCHES - 1) * PER_BATCH

    broker.start()
    wait_topic(broker, topic, 1)
    assert watermarks(broker, topic, [0]) == {0: (0, cut)}, "recovery kept the damaged batch or lost good ones"
    log = consume_confluent(broker, topic, {0: cut})[0]
    want = [(i * PER_BATCH + j, k, v) for i in range(BATCHES - 1) for j, (k, v) in enumerate(recs[i])]
    assert log == want

    # The next produce takes the damaged batch's first offset.
    new = [(b"after", b"recovery-%d" % j) for j in range(3)]
    sent2 = produce_batches(broker, topic, [new], first_offset=cut)
    assert watermarks(broker, topic, [0]) == {0: (0, cut + 3)}
    log = consume_confluent(broker, topic, {0: cut + 3})[0]
    assert log == want + [(cut + j, k, v) for j, (k, v) in enumerate(new)]

    # On disk: the good batches, then the new one; the damaged bytes are gone.
    assert broker.stop() == 0, broker.log_tail()
    check_segment_matches(active_segment(broker, topic), sent[:-1] + sent2)


def test_clean_segment_survives_restarts_unchanged(broker):
    """No damage: recovery keeps every batch (a zeroed preallocated tail is a clean end)."""
    topic = unique_topic("clean")
    create_topic(broker, topic, 1)
    recs = [batch_records(i) for i in range(BATCHES)]
    sent = produce_batches(broker, topic, recs)
    broker.kill9()
    check_segment_matches(active_segment(broker, topic), sent)
    broker.start()
    wait_topic(broker, topic, 1)
    assert watermarks(broker, topic, [0]) == {0: (0, BATCHES * PER_BATCH)}
    assert broker.stop() == 0
    check_segment_matches(active_segment(broker, topic), sent)
    broker.start()
    wait_topic(broker, topic, 1)
    log = consume_confluent(broker, topic, {0: BATCHES * PER_BATCH})[0]
    assert log == [(i * PER_BATCH + j, k, v) for i in range(BATCHES) for j, (k, v) in enumerate(recs[i])]



def test_segment_roll_and_sealed_segment_indexes(broker_factory):
    """With a small log.segment.bytes the log rolls: segments are named by the
    base offset of their first batch, contiguous, sealed ones are truncated to
    their data and carry `.index`/`.timeindex` whose entries point at batch
    starts; everything stays readable across a restart. (The active segment's
    indexes live in memory until it is sealed, and are rebuilt on recovery.)"""
    broker = broker_factory(args=["--log.segment.bytes=2000"])
    topic = unique_topic("roll")
    create_topic(broker, topic, 1)
    recs = [batch_records(i) for i in range(BATCHES)]
    sent = produce_batches(broker, topic, recs)
    want = [(i * PER_BATCH + j, k, v) for i in range(BATCHES) for j, (k, v) in enumerate(recs[i])]
    assert consume_confluent(broker, topic, {0: BATCHES * PER_BATCH})[0] == want
    assert broker.stop() == 0, broker.log_tail()

    pdir = partition_dir(broker, topic)
    segs = kw.segment_files(pdir)
    assert len(segs) >= 3, "20 batches of ~350 bytes with log.segment.bytes=2000 gave segments %r" % segs
    names = set(os.listdir(pdir))
    on_disk = []
    next_offset = 0
    for n, (base, path) in enumerate(segs):
        batches, tail = kw.parse_segment(path)
        assert batches, "empty segment %s" % path
        assert batches[0].base_offset == base == next_offset, (path, batches[0].base_offset, next_offset)
        assert batches[-1].end <= 2000 or len(batches) == 1, "%s grew to %d bytes" % (path, batches[-1].end)
        next_offset = batches[-1].next_offset
        on_disk += batches
        if n == len(segs) - 1:
            continue  # the active segment
        assert tail == b"", "sealed %s keeps %d bytes of preallocated tail" % (path, len(tail))
        stem = "%020d" % base
        assert {stem + ".index", stem + ".timeindex"} <= names, "index files missing beside sealed %s: %r" % (path, sorted(names))
        starts = {b.position: b for b in batches}
        with open(os.path.join(pdir, stem + ".index"), "rb") as f:
            idx = f.read()
        assert len(idx) % 8 == 0
        for e in range(0, len(idx), 8):
            rel, pos = struct.unpack_from(">II", idx, e)
            assert pos in starts, "%s.index entry %d -> position %d is not a batch start" % (stem, rel, pos)
            b = starts[pos]
            assert b.base_offset <= base + rel < b.next_offset, (stem, rel, pos, b.base_offset)
        with open(os.path.join(pdir, stem + ".timeindex"), "rb") as f:
            tidx = f.read()
        assert len(tidx) % 12 == 0
        last_ts = -1
        for e in range(0, len(tidx), 12):
            ts, rel = struct.unpack_from(">qI", tidx, e)
            assert ts >= last_ts and base + rel < next_offset, (stem, ts, rel)
            last_ts = ts
    assert next_offset == BATCHES * PER_BATCH
    assert [b.raw[kw.CRC_OFFSET:] for b in on_disk] == [x[kw.CRC_OFFSET:] for x in sent]

    broker.start()
    wait_topic(broker, topic, 1)
    assert watermarks(broker, topic, [0]) == {0: (0, BATCHES * PER_BATCH)}
    assert consume_confluent(broker, topic, {0: BATCHES * PER_BATCH})[0] == want
