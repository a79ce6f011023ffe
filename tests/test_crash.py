"""kill -9 while a client produces with acks=all and another consumes: after
restart every acknowledged record is present and intact at its acknowledged
offset, offsets are contiguous, and every record the consumer saw before the
crash is still there (visibility never runs ahead of durability)."""

import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from clients import check_contiguous, consume_confluent, produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

PARTITIONS = 6
ROUNDS = 3


def crash_value(round_no, i):
    return b"round-%d|seq-%d|" % (round_no, i) + (b"crash-payload-%d-" % (i % 89)) * (1 + i % 7)


class ProducerThread(threading.Thread):
    def __init__(self, broker, topic, round_no):
        super().__init__(daemon=True)
        self.producer = Producer(
            broker.producer_config(
                **{"linger.ms": 2, "message.timeout.ms": 10000, "batch.num.messages": 500, "queue.buffering.max.messages": 50000}
            )
        )
        self.topic = topic
        self.round_no = round_no
        self.acked = []  # (partition, offset, key, value)
        self.failed = 0
        self.stop = threading.Event()
        self.sent = 0

    def on_delivery(self, err, msg):
        if err is None:
            self.acked.append((msg.partition(), msg.offset(), msg.key(), msg.value()))
        else:
            self.failed += 1

    def run(self):
        i = 0
        while not self.stop.is_set():
            try:
                self.producer.produce(
                    self.topic, key=b"key-%d" % (i % 500), value=crash_value(self.round_no, i), on_delivery=self.on_delivery
                )
                i += 1
            except BufferError:
                self.producer.poll(0.05)
            self.producer.poll(0)
        self.sent = i

    def finish(self):
        """After the crash: everything still queued fails after message.timeout.ms."""
        self.join(30)
        self.producer.flush(60)


class ConsumerThread(threading.Thread):
    def __init__(self, broker, topic):
        super().__init__(daemon=True)
        self.consumer = Consumer(broker.consumer_config(**{"fetch.wait.max.ms": 50}))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self.seen = []  # (partition, offset, key, value)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for m in self.consumer.consume(num_messages=1000, timeout=0.2):
                if m.error():
                    continue  # EOF, and transport errors once the broker is gone
                self.seen.append((m.partition(), m.offset(), m.key(), m.value()))
        self.consumer.close()


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.05)


def test_kill9_loses_no_acked_or_seen_record(broker):
    crash_rounds(broker)


def test_kill9_across_segment_rolls(broker_factory):
    """Small segments: the crash lands while segments roll and seal."""
    broker = broker_factory(args=["--log.segment.bytes=262144"])
    crash_rounds(broker)
    # The log really rolled, and every partition's segments chain without gaps.
    import os

    import kafka_wire as kw

    rolled = 0
    assert broker.stop() == 0, broker.log_tail()
    for name in os.listdir(broker.log_dirs):
        pdir = os.path.join(broker.log_dirs, name)
        if not (os.path.isdir(pdir) and name.startswith("crash-")):
            continue
        segs = kw.segment_files(pdir)
        rolled += len(segs) - 1
        next_offset = 0
        for base, path in segs:
            batches, _ = kw.parse_segment(path)
            assert base == next_offset, "%s starts at %d, previous segment ended at %d" % (path, base, next_offset)
            for b in batches:
                assert b.crc_ok and b.base_offset == next_offset, (path, b.position, b.base_offset, next_offset)
                next_offset = b.next_offset
    assert rolled > 0, "no segment rolled with log.segment.bytes=262144"


def crash_rounds(broker):
    topic = unique_topic("crash")
    create_topic(broker, topic, PARTITIONS)
    all_acked, all_seen = [], []
    sent_values = set()

    for round_no in range(ROUNDS):
        prod = ProducerThread(broker, topic, round_no)
        cons = ConsumerThread(broker, topic)
        prod.start()
        cons.start()
        base = len(all_seen)
        wait_for(lambda: len(prod.acked) >= 20_000 and len(cons.seen) >= 5_000, 180, "acks and reads before the crash")
        broker.kill9()
        prod.stop.set()
        cons.stop.set()
        prod.finish()
        cons.join(30)
        assert prod.acked, "nothing acknowledged before the crash"
        all_acked += prod.acked
        all_seen += cons.seen
        sent_values.update(crash_value(round_no, i) for i in range(prod.sent))
        assert len(cons.seen) > 0 and len(all_seen) > base

        broker.start()
        wait_topic(broker, topic, PARTITIONS)
        wm = watermarks(broker, topic, range(PARTITIONS))
        ends = {p: hi for p, (_, hi) in wm.items()}
        assert all(lo == 0 for lo, _ in wm.values()), wm
        log = consume_confluent(broker, topic, ends)
        check_contiguous(log, ends)
        at = {(p, o): (k, v) for p, recs in log.items() for o, k, v in recs}

        lost = [(p, o) for p, o, k, v in all_acked if at.get((p, o)) != (k, v)]
        assert not lost, "round %d: %d acknowledged records missing or changed after kill -9, first %r (found %r)" % (
            round_no, len(lost), lost[:5], [at.get(x) for x in lost[:5]])
        unseen = [(p, o) for p, o, k, v in all_seen if at.get((p, o)) != (k, v)]
        assert not unseen, "round %d: %d records a consumer read before the crash are gone or changed, first %r" % (
            round_no, len(unseen), unseen[:5])
        # Nothing in the log that we did not send (no garbage from a torn write).
        foreign = [(p, o) for (p, o), (k, v) in at.items() if v not in sent_values]
        assert not foreign, "records nobody produced: %r" % foreign[:5]
        for p in range(PARTITIONS):
            top = max((o for q, o, _, _ in all_acked if q == p), default=-1)
            assert ends[p] >= top + 1, "partition %d high watermark %d below acked offset %d" % (p, ends[p], top)

    # The recovered log takes new writes at its end.
    wm = watermarks(broker, topic, range(PARTITIONS))
    acked = produce_confluent(broker, topic, [(b"key-%d" % i, b"after-crash-%d" % i) for i in range(600)])
    for p in range(PARTITIONS):
        offs = sorted(o for q, o, _, _ in acked if q == p)
        assert offs == list(range(wm[p][1], wm[p][1] + len(offs))), "partition %d continues at %r, hw was %d" % (p, offs[:3], wm[p][1])
