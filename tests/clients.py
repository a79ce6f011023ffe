"""Produce and consume through real Kafka clients, and the checks every
roundtrip must pass.

Two client stacks: confluent-kafka (librdkafka, C) and kafka-python (pure
Python). Neither uses consumer groups (not implemented yet): consumers
assign() partitions and start from the beginning, producers run without
idempotence.
"""

import collections
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

KEYS = 1000


# --------------------------------------------------------------------------
# the data


def make_value(key_index, seq, i):
    """Value that names its key and per-key sequence number, plus a payload
    of varying length (0..250 bytes), compressible but not constant."""
    head = b"key-%d|seq-%d|" % (key_index, seq)
    plen = (i * 37) % 251
    payload = (b"payload-%d-" % (i % 97) * 32)[:plen]
    return head + payload


def make_records(n, keys=KEYS):
    """[(key, value)] in produce order: key i % keys, sequence i // keys."""
    return [(b"key-%d" % (i % keys), make_value(i % keys, i // keys, i)) for i in range(n)]


def parse_value(value):
    key, seq, _ = value.split(b"|", 2)
    return key, int(seq[len(b"seq-") :])


# --------------------------------------------------------------------------
# producers


def produce_waiting(p, topic, **fields):
    """Queues one record on confluent Producer `p`, polling while its buffer is full."""
    while True:
        try:
            p.produce(topic, **fields)
            break
        except BufferError:
            p.poll(0.05)
    p.poll(0)


def produce_confluent(broker, topic, records, compression="none", flush_timeout=300, **extra):
    """Produces (key, value) records; returns [(partition, offset, key, value)]
    from the delivery reports, in delivery order. Fails on any delivery error."""
    cfg = broker.producer_config(**{"compression.type": compression, "linger.ms": 5})
    cfg.update(extra)
    p = Producer(cfg)
    acked, errors = [], []

    def on_delivery(err, msg):
        if err is not None:
            errors.append((err, msg.key()))
        else:
            acked.append((msg.partition(), msg.offset(), msg.key(), msg.value()))

    for k, v in records:
        produce_waiting(p, topic, key=k, value=v, on_delivery=on_delivery)
    left = p.flush(flush_timeout)
    assert left == 0, "%d messages still queued after %ss" % (left, flush_timeout)
    assert not errors, "delivery errors (%d), first: %r" % (len(errors), errors[:3])
    assert len(acked) == len(records)
    return acked


def produce_kafka_python(broker, topic, records, compression="none", **extra):
    from kafka import KafkaProducer

    cfg = dict(
        bootstrap_servers=broker.bootstrap,
        acks="all",
        compression_type=None if compression == "none" else compression,
        linger_ms=5,
        batch_size=64 * 1024,
        enable_idempotence=False,
        request_timeout_ms=60000,
    )
    cfg.update(extra)
    p = KafkaProducer(**cfg)
    try:
        futures = [(p.send(topic, key=k, value=v), k, v) for k, v in records]
        p.flush(timeout=300)
        acked = []
        for f, k, v in futures:
            md = f.get(timeout=60)
            acked.append((md.partition, md.offset, k, v))
    finally:
        p.close(timeout=30)
    return acked


PRODUCERS = {"confluent": produce_confluent, "kafka-python": produce_kafka_python}


# --------------------------------------------------------------------------
# offsets


def watermarks(broker, topic, partitions, timeout=30):
    """{partition: (low, high)} through ListOffsets (confluent-kafka)."""
    c = Consumer(broker.consumer_config())
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False) for p in partitions}
    finally:
        c.close()


# --------------------------------------------------------------------------
# consumers


def consume_confluent(broker, topic, ends, timeout=300, **extra):
    """Reads every partition in `ends` ({partition: end offset}) from offset 0
    up to its end offset; returns {partition: [(offset, key, value)]}."""
    c = Consumer(broker.consumer_config(**extra))
    out = {p: [] for p in ends}
    client_errors = []
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        pending = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, "consume timed out; still waiting on %r, have %r" % (
                {p: (len(out[p]), ends[p]) for p in pending},
                {p: len(v) for p, v in out.items()},
            ) + " client errors: %r" % client_errors[-5:]
            for m in c.consume(num_messages=10000, timeout=1.0):
                if m.error():
                    err = m.error()
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    if err.fatal() or (m.topic() == topic and m.partition() in ends):
                        raise AssertionError("consumer error on %s/%s: %s" % (m.topic(), m.partition(), err))
                    client_errors.append(str(err))  # client-level, librdkafka retries
                    continue
                p = m.partition()
                out[p].append((m.offset(), m.key(), m.value()))
                if m.offset() >= ends[p] - 1:
                    pending.discard(p)
    finally:
        c.close()
    return out


def consume_kafka_python(broker, topic, ends, timeout=300, **extra):
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    cfg = dict(
        bootstrap_servers=broker.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=10000,
    )
    cfg.update(extra)
    c = KafkaConsumer(**cfg)
    out = {p: [] for p in ends}
    try:
        tps = [KTP(topic, p) for p in ends]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        pending = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, "consume timed out; still waiting on %r" % (
                {p: (len(out[p]), ends[p]) for p in pending},
            )
            for tp, msgs in c.poll(timeout_ms=1000).items():
                for m in msgs:
                    out[tp.partition].append((m.offset, m.key, m.value))
                    if m.offset >= ends[tp.partition] - 1:
                        pending.discard(tp.partition)
    finally:
        c.close()
    return out


CONSUMERS = {"confluent": consume_confluent, "kafka-python": consume_kafka_python}


# --------------------------------------------------------------------------
# checks


def check_contiguous(consumed, ends=None):
    """Offsets of every partition are exactly 0..n-1 (n = end offset if given)."""
    for p, recs in consumed.items():
        offsets = [o for o, _, _ in recs]
        n = ends[p] if ends is not None else len(offsets)
        if offsets != list(range(n)):
            first_bad = next((i for i, o in enumerate(offsets) if o != i), len(offsets))
            raise AssertionError(
                "partition %d: %d offsets, expected 0..%d; first mismatch at index %d: %r"
                % (p, len(offsets), n - 1, first_bad, offsets[max(0, first_bad - 2) : first_bad + 3])
            )


def check_roundtrip(records, acked, consumed):
    """`records` [(key, value)] in produce order, `acked` the producer's
    [(partition, offset, key, value)], `consumed` {partition: [(offset, key, value)]}."""
    total = sum(len(v) for v in consumed.values())
    assert total == len(records), "consumed %d records, produced %d" % (total, len(records))
    check_contiguous(consumed)

    # Byte-identical content, as a multiset.
    got = collections.Counter((k, v) for recs in consumed.values() for _, k, v in recs)
    want = collections.Counter(records)
    if got != want:
        missing = list((want - got).items())[:3]
        extra = list((got - want).items())[:3]
        raise AssertionError("content differs: missing %r ... extra %r ..." % (missing, extra))

    # Every acknowledged record is at the offset its delivery report gave.
    by_pos = {(p, o): (k, v) for p, recs in consumed.items() for o, k, v in recs}
    assert len(acked) == len(records)
    assert len({(p, o) for p, o, _, _ in acked}) == len(acked), "two acks for the same offset"
    for p, o, k, v in acked:
        assert by_pos.get((p, o)) == (k, v), "acked %r at %d/%d, found %r" % ((k, v[:40]), p, o, by_pos.get((p, o)))

    # Each key lives in one partition, in produce order with no gap.
    where = collections.defaultdict(set)
    seqs = collections.defaultdict(list)
    for p, recs in sorted(consumed.items()):
        for _, k, v in recs:
            vk, seq = parse_value(v)
            assert vk == k, "value %r under key %r" % (v[:40], k)
            where[k].add(p)
            seqs[k].append(seq)
    for k, ps in where.items():
        assert len(ps) == 1, "key %r in partitions %r" % (k, ps)
    expected_seqs = collections.defaultdict(list)
    for k, v in records:
        expected_seqs[k].append(parse_value(v)[1])
    for k, s in seqs.items():
        assert s == expected_seqs[k], "key %r out of order: %r..." % (k, s[:20])
