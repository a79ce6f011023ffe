"""Produce keyed records with acks=all through a real client, consume them all
from the beginning through both client stacks: exact count, byte-identical
content, per-key order, contiguous offsets, and every delivery report's offset
holds the record it acknowledged. Once per compression codec."""

import os

import pytest

import kafka_wire as kw
from clients import CONSUMERS, PRODUCERS, check_roundtrip, make_records, watermarks
from conftest import create_topic, unique_topic

PARTITIONS = 6
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def count_for(compression):
    # The uncompressed case carries the full 100k; codecs use 20k to bound runtime.
    return 100_000 if compression == "none" else 20_000


@pytest.mark.parametrize("compression", list(CODEC_IDS))
@pytest.mark.parametrize("producer", ["confluent", "kafka-python"])
def test_roundtrip(broker, producer, compression):
    topic = unique_topic("rt-%s-%s" % (producer, compression))
    create_topic(broker, topic, PARTITIONS)
    records = make_records(count_for(compression))

    acked = PRODUCERS[producer](broker, topic, records, compression)

    wm = watermarks(broker, topic, range(PARTITIONS))
    assert all(lo == 0 for lo, _ in wm.values()), wm
    ends = {p: hi for p, (_, hi) in wm.items()}
    assert sum(ends.values()) == len(records), "high watermarks %r sum to %d, produced %d" % (
        ends,
        sum(ends.values()),
        len(records),
    )
    for p in range(PARTITIONS):
        acked_here = [o for q, o, _, _ in acked if q == p]
        assert len(acked_here) == ends[p], "partition %d: %d acks, high watermark %d" % (p, len(acked_here), ends[p])
    assert sum(1 for e in ends.values() if e > 0) >= 2, "1000 keys landed in fewer than 2 partitions: %r" % ends

    for name, consume in CONSUMERS.items():
        consumed = consume(broker, topic, ends)
        try:
            check_roundtrip(records, acked, consumed)
        except AssertionError as e:
            raise AssertionError("consumer %s: %s" % (name, e)) from None

    # Compressed batches are stored as the producer sent them: on disk every
    # batch carries the producer's codec and a valid CRC.
    codec = CODEC_IDS[compression]
    on_disk = 0
    with_codec = 0
    for p in range(PARTITIONS):
        pdir = os.path.join(broker.log_dirs, "%s-%d" % (topic, p))
        assert os.path.isdir(pdir), "no partition dir %s" % pdir
        next_offset = 0
        for _, path in kw.segment_files(pdir):
            batches, _ = kw.parse_segment(path)
            for b in batches:
                assert b.magic == 2 and b.crc_ok, "bad batch at %s:%d" % (path, b.position)
                attrs = int.from_bytes(b.raw[21:23], "big")
                # Clients send a batch uncompressed when compressing would not
                # shrink it (e.g. a lone first record), so 0 is allowed per batch.
                assert attrs & 0x7 in (0, codec), "batch at %s:%d has codec %d, sent %d" % (path, b.position, attrs & 7, codec)
                if attrs & 0x7 == codec:
                    with_codec += b.record_count
                assert b.base_offset == next_offset, "%s:%d base offset %d, expected %d" % (
                    path,
                    b.position,
                    b.base_offset,
                    next_offset,
                )
                next_offset = b.next_offset
                on_disk += b.record_count
        assert next_offset == ends[p], "partition %d: segments end at %d, high watermark %d" % (p, next_offset, ends[p])
    assert on_disk == len(records)
    assert with_codec >= 0.9 * len(records), "only %d of %d records in %s batches on disk" % (with_codec, len(records), compression)
