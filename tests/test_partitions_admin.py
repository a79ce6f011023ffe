"""Partition and record administration through real clients: CreatePartitions
under a running keyed producer and consumer group, DeleteRecords then consume
from earliest (and after a restart), OffsetForLeaderEpoch answered from the
log, and ListOffsets by timestamp on a LogAppendTime topic."""

import collections
import os
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, OffsetSpec
from kafka.partitioner.default import murmur2

import kafka_wire as kw
from clients import produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

INVALID_PARTITIONS = 37
UNKNOWN_TOPIC_OR_PARTITION = 3
NOT_LEADER_OR_FOLLOWER = 6
OFFSET_OUT_OF_RANGE = 1
UNKNOWN_LEADER_EPOCH = 75
OFFSET_FOR_LEADER_EPOCH = 23


def admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})


def kafka_partition(key, count):
    """Kafka's (and librdkafka's murmur2_random) partition of a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % count


def leaders(broker, topic):
    """{partition: leader broker id} from Metadata."""
    md = admin(broker).list_topics(topic=topic, timeout=10)
    return {p: pm.leader for p, pm in md.topics[topic].partitions.items()}


# --------------------------------------------------------------------------
# CreatePartitions while a keyed producer and a consumer group run


class GroupMember(threading.Thread):
    """A subscribe()d librdkafka consumer that commits what it consumed
    synchronously when partitions are revoked, so a rebalance never hands a
    partition over with an older committed offset than what was read."""

    def __init__(self, broker, topic, group):
        super().__init__(daemon=True)
        self.topic = topic
        self.consumer = Consumer(
            broker.consumer_config(
                **{
                    "group.id": group,
                    "enable.partition.eof": False,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": True,
                    "topic.metadata.refresh.interval.ms": 1000,
                    "session.timeout.ms": 10000,
                    "heartbeat.interval.ms": 500,
                }
            )
        )
        self.records = []  # (partition, offset, key, value)
        self.errors = []
        self.assignment = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def on_assign(self, consumer, partitions):
        with self.lock:
            self.assignment = {tp.partition for tp in partitions}

    def commit(self, why):
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:  # nothing new since the last commit
                self.errors.append("commit %s: %s" % (why, e))

    def on_revoke(self, consumer, partitions):
        self.commit("on revoke")
        with self.lock:
            self.assignment = set()

    def run(self):
        self.consumer.subscribe([self.topic], on_assign=self.on_assign, on_revoke=self.on_revoke)
        try:
            while not self.stop.is_set():
                for m in self.consumer.consume(num_messages=1000, timeout=0.2):
                    if m.error():
                        if m.error().fatal() or m.topic() == self.topic:
                            self.errors.append(str(m.error()))
                        continue
                    with self.lock:
                        self.records.append((m.partition(), m.offset(), m.key(), m.value()))
            self.commit("at stop")
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            self.consumer.close()

    def current(self):
        with self.lock:
            return set(self.assignment), list(self.records)


class KeyedProducer(threading.Thread):
    """Produces keyed records as fast as the broker takes them; each record
    remembers the phase it was produced in (the main thread moves phases)."""

    KEYS = 200

    def __init__(self, broker, topic, idempotence):
        super().__init__(daemon=True)
        self.topic = topic
        self.producer = Producer(
            broker.producer_config(
                **{
                    "enable.idempotence": idempotence,
                    "acks": "all",
                    "partitioner": "murmur2_random",
                    "linger.ms": 5,
                    "topic.metadata.refresh.interval.ms": 1000,
                }
            )
        )
        self.phase = "before"
        self.produced = 0
        self.acked = []  # (partition, offset, key, value, phase)
        self.errors = []
        self.stop = threading.Event()
        self.saw_new_partition = threading.Event()
        self.lock = threading.Lock()

    def on_delivery(self, err, msg, phase):
        if err is not None:
            self.errors.append((str(err), msg.key()))
            return
        if msg.partition() >= 3:
            self.saw_new_partition.set()
        with self.lock:
            self.acked.append((msg.partition(), msg.offset(), msg.key(), msg.value(), phase))

    def count(self, phase):
        with self.lock:
            return sum(1 for a in self.acked if a[4] == phase)

    def run(self):
        i = 0
        while not self.stop.is_set():
            phase = self.phase
            key = b"key-%d" % (i % self.KEYS)
            value = b"%s|%d|%s" % (key, i, phase.encode())
            try:
                self.producer.produce(
                    self.topic, key=key, value=value, on_delivery=lambda e, m, ph=phase: self.on_delivery(e, m, ph)
                )
                i += 1
            except BufferError:
                pass
            self.producer.poll(0.001 if i % 5 == 0 else 0)
        left = self.producer.flush(60)
        if left:
            self.errors.append("%d records not delivered at flush" % left)
        self.produced = i


def wait_for(what, cond, timeout=60, interval=0.1):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(interval)


@pytest.mark.parametrize("idempotence", [True, False], ids=["idempotent", "plain"])
def test_create_partitions_under_keyed_producer_and_group(broker, idempotence):
    topic, group = unique_topic("grow"), unique_topic("g")
    create_topic(broker, topic, 3)
    members = [GroupMember(broker, topic, group) for _ in range(2)]
    for m in members:
        m.start()
    wait_for(
        "the group to own partitions 0..2",
        lambda: sorted(p for m in members for p in m.current()[0]) == [0, 1, 2],
    )

    prod = KeyedProducer(broker, topic, idempotence)
    prod.start()
    try:
        wait_for("2000 records acked on 3 partitions", lambda: prod.count("before") >= 2000)
        prod.phase = "transition"
        a = admin(broker)
        a.create_partitions([NewPartitions(topic, 6)], request_timeout=30)[topic].result(30)
        wait_topic(broker, topic, 6)
        # A record delivered to a new partition was partitioned with the new
        # count, so everything produced after its delivery report is too.
        assert prod.saw_new_partition.wait(30), "producer never sent to partitions 3..5 within 30s"
        prod.phase = "after"
        wait_for("3000 records acked on 6 partitions", lambda: prod.count("after") >= 3000)
    finally:
        prod.stop.set()
        prod.join(90)
    assert not prod.errors, prod.errors[:5]
    assert len(prod.acked) == prod.produced, "%d produced, %d acked" % (prod.produced, len(prod.acked))

    acked = {(p, o): (k, v) for p, o, k, v, _ in prod.acked}
    assert len(acked) == len(prod.acked), "two records acked at the same partition/offset"
    wait_for(
        "the group to consume all %d acked records" % len(acked),
        lambda: len({(p, o) for m in members for p, o, _, _ in m.current()[1]}) >= len(acked),
        timeout=60,
    )
    # Let the group settle one more refresh interval: a late duplicate would show.
    time.sleep(1.5)
    assignments = [m.current()[0] for m in members]
    for m in members:
        m.stop.set()
    for m in members:
        m.join(30)
    for m in members:
        assert not m.errors, m.errors[:5]

    # New partitions are placed like a new topic's: round robin over the shards.
    owner = leaders(broker, topic)
    assert owner == {q: (owner[0] + q) % broker.shards for q in range(6)}, owner

    # The group picked up the new partitions: all 6 owned, each by one member.
    assert sorted(p for a_ in assignments for p in a_) == [0, 1, 2, 3, 4, 5], assignments

    # Every acked record consumed exactly once, with its content.
    consumed = [r for m in members for r in m.records]
    positions = collections.Counter((p, o) for p, o, _, _ in consumed)
    dups = [po for po, n in positions.items() if n > 1]
    assert not dups, "%d records consumed more than once, e.g. %r" % (len(dups), dups[:5])
    assert set(positions) == set(acked), "missing %r, extra %r" % (
        sorted(set(acked) - set(positions))[:5],
        sorted(set(positions) - set(acked))[:5],
    )
    for p, o, k, v in consumed:
        assert acked[(p, o)] == (k, v), "at %d/%d consumed %r, acked %r" % (p, o, (k, v), acked[(p, o)])

    # Per partition: offsets 0..hw-1 with no gap, all of them acked.
    hw = watermarks(broker, topic, range(6))
    for p in range(6):
        offs = sorted(o for q, o in acked if q == p)
        assert offs == list(range(hw[p][1])), "partition %d: %d acked offsets, watermarks %r" % (p, len(offs), hw[p])

    # Keys: murmur2 % 3 before, murmur2 % 6 after, one of the two in between;
    # after the change each key lives in exactly one partition.
    after_parts = collections.defaultdict(set)
    for p, o, k, v, phase in prod.acked:
        old, new = kafka_partition(k, 3), kafka_partition(k, 6)
        want = {"before": {old}, "transition": {old, new}, "after": {new}}[phase]
        assert p in want, "%s record %r at partition %d, expected %r" % (phase, k, p, want)
        if phase == "after":
            after_parts[k].add(p)
    assert len(after_parts) == KeyedProducer.KEYS
    assert all(len(ps) == 1 for ps in after_parts.values())
    new_counts = collections.Counter(p for p, _, _, _, ph in prod.acked if ph == "after" and p >= 3)
    assert set(new_counts) == {3, 4, 5}, "new partitions got %r" % new_counts

    # Per key, consumption follows produce order inside each partition.
    by_part = collections.defaultdict(list)
    for p, o, k, v in consumed:
        by_part[p].append((o, k, int(v.split(b"|")[1])))
    for p, recs in by_part.items():
        last = {}
        for o, k, i in sorted(recs):
            assert i > last.get(k, -1), "partition %d: key %r seq %d after %d" % (p, k, i, last[k])
            last[k] = i


def test_create_partitions_errors_kafka_python(broker):
    from kafka.admin import KafkaAdminClient
    from kafka.errors import InvalidPartitionsError

    topic = unique_topic("cp")
    create_topic(broker, topic, 3)
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        for count in (2, 3):
            r = a.create_partitions({topic: count}, raise_errors=False)
            assert [(x.name, x.error_code) for x in r.results] == [(topic, INVALID_PARTITIONS)]
            assert "3 partitions" in r.results[0].error_message and str(count) in r.results[0].error_message
        with pytest.raises(InvalidPartitionsError):
            a.create_partitions({topic: 1})
        r = a.create_partitions({unique_topic("nope"): 5}, raise_errors=False)
        assert [x.error_code for x in r.results] == [UNKNOWN_TOPIC_OR_PARTITION]
        # validate_only: accepted, nothing created.
        r = a.create_partitions({topic: 8}, validate_only=True, raise_errors=False)
        assert [(x.name, x.error_code) for x in r.results] == [(topic, 0)]
        assert sorted(leaders(broker, topic)) == [0, 1, 2]
        r = a.create_partitions({topic: 4}, raise_errors=False)
        assert [(x.name, x.error_code) for x in r.results] == [(topic, 0)]
    finally:
        a.close()
    wait_topic(broker, topic, 4)
    owners = leaders(broker, topic)
    assert sorted(owners) == [0, 1, 2, 3] and set(owners.values()) <= {0, 1}
    # The new partition takes records and serves them back.
    acked = produce_confluent(broker, topic, [(b"k%d" % i, b"v%d" % i) for i in range(400)], partitioner="murmur2_random")
    on3 = [(o, k) for p, o, k, _ in acked if p == 3]
    assert on3 and [o for o, _ in on3] == list(range(len(on3)))
    assert all(kafka_partition(k, 4) == 3 for _, k in on3)

    # The acknowledged change is durable: a crash right after keeps 4 partitions,
    # their owners and the records on the new one.
    hw = watermarks(broker, topic, range(4))
    broker.kill9()
    broker.start()
    wait_topic(broker, topic, 4)
    assert leaders(broker, topic) == owners
    assert watermarks(broker, topic, range(4)) == hw
    got = consume_all(broker, topic, (3,), {3: hw[3][1]})
    assert [o for o, _ in got[3]] == [o for o, _ in on3]


# --------------------------------------------------------------------------
# DeleteRecords then consume from earliest


def produce_numbered(broker, topic, partition, start, n, size=100):
    """n records to one partition, value 'p<partition>-<i>' padded to `size`,
    in batches of up to 7; returns the acked offsets in order."""
    p = Producer(broker.producer_config(**{"linger.ms": 20, "batch.num.messages": 7}))
    acked, errors = [], []

    def cb(err, msg):
        (errors if err else acked).append(err or msg.offset())

    for i in range(start, start + n):
        p.produce(topic, value=(b"p%d-%d|" % (partition, i)).ljust(size, b"."), partition=partition, on_delivery=cb)
    assert p.flush(60) == 0
    assert not errors, errors[:3]
    return acked


def segments(broker, topic, partition):
    """[(base offset, next offset, file size)] of the partition's .log files."""
    out = []
    for base, path in kw.segment_files(os.path.join(broker.log_dirs, "%s-%d" % (topic, partition))):
        batches, _ = kw.parse_segment(path)
        nxt = batches[-1].next_offset if batches else base
        out.append((base, nxt, os.path.getsize(path)))
    return out


def list_offsets(broker, topic, partitions, spec):
    a = admin(broker)
    fs = a.list_offsets({TopicPartition(topic, p): spec for p in partitions}, request_timeout=30)
    return {tp.partition: f.result(30).offset for tp, f in fs.items()}


def consume_all(broker, topic, partitions, ends, start=-2, reset="earliest"):
    """{partition: [(offset, value)]} from `start` (default OFFSET_BEGINNING) to ends[p]."""
    c = Consumer(broker.consumer_config(**{"auto.offset.reset": reset}))
    out = {p: [] for p in partitions}
    try:
        c.assign([TopicPartition(topic, p, start) for p in partitions])
        pending = {p for p in partitions if not out[p] or out[p][-1][0] < ends[p] - 1}
        eof = set()
        deadline = time.monotonic() + 60
        while pending - eof:
            assert time.monotonic() < deadline, "consume timed out: %r" % {p: len(v) for p, v in out.items()}
            for m in c.consume(1000, 0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        if m.offset() >= ends[m.partition()]:
                            eof.add(m.partition())
                        continue
                    raise AssertionError("consumer error: %s" % m.error())
                out[m.partition()].append((m.offset(), m.value()))
                if m.offset() >= ends[m.partition()] - 1:
                    pending.discard(m.partition())
    finally:
        c.close()
    return out


def test_delete_records_then_consume_from_earliest(broker):
    topic = unique_topic("dr")
    create_topic(broker, topic, 2, config={"segment.bytes": "4096"})
    for p in (0, 1):
        assert produce_numbered(broker, topic, p, 0, 200) == list(range(200))
    before = {p: segments(broker, topic, p) for p in (0, 1)}
    assert all(len(s) >= 5 for s in before.values()), before
    # 103 falls inside a batch (batches of up to 7 records), not on a boundary.
    batch_bases = [b.base_offset for _, path in kw.segment_files(os.path.join(broker.log_dirs, "%s-0" % topic))
                   for b in kw.parse_segment(path)[0]]
    assert 103 not in batch_bases, "offset 103 starts a batch; the test wants a mid-batch cut"

    a = admin(broker)
    targets = [TopicPartition(topic, 0, 103), TopicPartition(topic, 1, -1)]  # -1: up to the high watermark
    fs = a.delete_records(targets, request_timeout=30)
    low = {tp.partition: f.result(30).low_watermark for tp, f in fs.items()}
    assert low == {0: 103, 1: 200}

    # Out of range: past the high watermark.
    f = a.delete_records([TopicPartition(topic, 0, 201)], request_timeout=30)[TopicPartition(topic, 0, 201)]
    with pytest.raises(KafkaException) as e:
        f.result(30)
    assert e.value.args[0].code() == KafkaError.OFFSET_OUT_OF_RANGE
    # Never backwards: a smaller offset leaves the start where it is.
    f = a.delete_records([TopicPartition(topic, 0, 50)], request_timeout=30)[TopicPartition(topic, 0, 50)]
    assert f.result(30).low_watermark == 103

    def check(when):
        assert list_offsets(broker, topic, (0, 1), OffsetSpec.earliest()) == {0: 103, 1: 200}, when
        assert list_offsets(broker, topic, (0, 1), OffsetSpec.latest()) == {0: 200, 1: 200}, when
        assert watermarks(broker, topic, (0, 1)) == {0: (103, 200), 1: (200, 200)}, when
        got = consume_all(broker, topic, (0, 1), {0: 200, 1: 200})
        assert [o for o, _ in got[0]] == list(range(103, 200)), when
        assert all(v.startswith(b"p0-%d|" % o) for o, v in got[0]), when
        assert got[1] == [], when
        # Below the start: OFFSET_OUT_OF_RANGE, auto.offset.reset=earliest lands on 103.
        got = consume_all(broker, topic, (0,), {0: 200}, start=10)
        assert [o for o, _ in got[0]] == list(range(103, 200)), when
        # Segment files wholly below the new start are gone; the rest are untouched.
        for p, cut in ((0, 103), (1, 200)):
            kept = [(b, n) for b, n, _ in before[p] if n > cut]
            if not kept:  # everything was below the cut: the active segment stays
                kept = [(b, n) for b, n, _ in before[p][-1:]]
            assert [(b, n) for b, n, _ in segments(broker, topic, p)] == kept, (when, p)
            names = os.listdir(os.path.join(broker.log_dirs, "%s-%d" % (topic, p)))
            for b, n, _ in before[p]:
                if (b, n) not in kept:
                    stem = "%020d" % b
                    assert not [x for x in names if x.startswith(stem)], (when, p, stem, names)

    check("after DeleteRecords")
    broker.restart()
    check("after restart")
    # Produce continues at the high watermark.
    assert produce_numbered(broker, topic, 0, 200, 10) == list(range(200, 210))
    assert watermarks(broker, topic, (0,)) == {0: (103, 210)}


def test_list_offsets_by_time_respects_log_start(broker):
    topic = unique_topic("drt")
    create_topic(broker, topic, 1, config={"segment.bytes": "4096"})
    assert produce_numbered(broker, topic, 0, 0, 200) == list(range(200))
    a = admin(broker)
    f = a.delete_records([TopicPartition(topic, 0, 103)], request_timeout=30)[TopicPartition(topic, 0, 103)]
    assert f.result(30).low_watermark == 103
    assert list_offsets(broker, topic, (0,), OffsetSpec.earliest()) == {0: 103}
    # Every record's timestamp is >= 1: the first one still in the log is 103.
    assert list_offsets(broker, topic, (0,), OffsetSpec.for_timestamp(1)) == {0: 103}


@pytest.mark.parametrize("compression", ["gzip", "lz4"])
def test_list_offsets_by_time_inside_compressed_batch(broker, compression):
    topic = unique_topic("tsc")
    create_topic(broker, topic, 1)
    t0 = 1_700_000_000_000
    p = Producer(broker.producer_config(**{"linger.ms": 200, "compression.type": compression}))
    for i in range(10):
        p.produce(topic, value=b"v" * 1000, partition=0, timestamp=t0 + i * 1000)
    assert p.flush(30) == 0
    (_, path), = kw.segment_files(os.path.join(broker.log_dirs, "%s-0" % topic))
    batches, _ = kw.parse_segment(path)
    assert [(x.base_offset, x.record_count) for x in batches] == [(0, 10)]
    assert len(batches[0].raw) < 10 * 1000, "the batch is not compressed"
    c = Consumer(broker.consumer_config())
    try:
        # One partition per request: librdkafka merges duplicates of a partition.
        got = [c.offsets_for_times([TopicPartition(topic, 0, t0 + at)], timeout=30)[0] for at in (2500, 8500)]
    finally:
        c.close()
    assert [x.offset for x in got] == [3, 9]


# --------------------------------------------------------------------------
# OffsetForLeaderEpoch


def offset_for_leader_epoch(port, version, topic, parts):
    """parts: [(partition, current_leader_epoch, leader_epoch)] ->
    {partition: (error, leader_epoch, end_offset)}."""
    body = kw.i32(-1) if version >= 3 else b""
    body += kw.array(
        [topic],
        lambda t: kw.string(t) + kw.array(parts, lambda p: kw.i32(p[0]) + kw.i32(p[1]) + kw.i32(p[2])),
    )
    with kw.Conn(port) as conn:
        r = conn.request(OFFSET_FOR_LEADER_EPOCH, version, body)
        r.i32()  # throttle
        topics = r.array(lambda rr: (rr.string(), rr.array(lambda x: (x.i16(), x.i32(), x.i32(), x.i64()))))
        assert r.remaining() == 0
    assert [t for t, _ in topics] == [topic]
    got = [(p, (e, ep, off)) for e, p, ep, off in topics[0][1]]
    assert [p for p, _ in got] == [p[0] for p in parts], "partitions answered out of order: %r" % got
    return dict(got)


@pytest.mark.parametrize("version", [2, 3])
def test_offset_for_leader_epoch(broker, version):
    topic = unique_topic("ofle")
    create_topic(broker, topic, 3)
    ends = {0: 57, 1: 3, 2: 0}
    for p, n in ends.items():
        if n:
            assert produce_numbered(broker, topic, p, 0, n) == list(range(n))
    owner = leaders(broker, topic)
    assert set(owner.values()) == {0, 1}, owner
    hw = watermarks(broker, topic, ends)
    assert {p: h for p, (_, h) in hw.items()} == ends
    for port_index, port in enumerate(broker.ports):
        mine = [p for p in ends if owner[p] == port_index]
        others = [p for p in ends if owner[p] != port_index]
        got = offset_for_leader_epoch(port, version, topic, [(p, 0, 0) for p in mine] + [(p, -1, 0) for p in others])
        for p in mine:
            assert got[p] == (0, 0, ends[p]), (p, got)
        for p in others:
            assert got[p] == (NOT_LEADER_OR_FOLLOWER, -1, -1), (p, got)
    p0_port = broker.ports[owner[0]]
    # current_leader_epoch -1: no fencing check.
    assert offset_for_leader_epoch(p0_port, version, topic, [(0, -1, 0)]) == {0: (0, 0, 57)}
    assert offset_for_leader_epoch(p0_port, version, topic, [(0, 1, 0)]) == {0: (UNKNOWN_LEADER_EPOCH, -1, -1)}
    # An epoch newer than the leader's: undefined epoch and offset, no error.
    assert offset_for_leader_epoch(p0_port, version, topic, [(0, 0, 4)]) == {0: (0, -1, -1)}
    assert offset_for_leader_epoch(p0_port, version, topic, [(99, -1, 0)]) == {99: (UNKNOWN_TOPIC_OR_PARTITION, -1, -1)}
    # The end offset follows appends.
    produce_numbered(broker, topic, 0, 57, 5)
    assert offset_for_leader_epoch(p0_port, version, topic, [(0, 0, 0)]) == {0: (0, 0, 62)}


# --------------------------------------------------------------------------
# ListOffsets by timestamp on a LogAppendTime topic


def now_ms():
    return int(time.time() * 1000)


def produce_burst(broker, topic, start, n, create_time):
    """n records to partition 0 carrying producer timestamp `create_time`, in
    many small batches; returns (acked offsets, wall ms before, wall ms after)."""
    p = Producer(broker.producer_config(**{"linger.ms": 0, "batch.num.messages": 3}))
    acked = []
    before = now_ms()
    for i in range(start, start + n):
        p.produce(topic, value=(b"r%d|" % i).ljust(200, b"."), partition=0, timestamp=create_time,
                  on_delivery=lambda err, msg: acked.append(err or msg.offset()))
        p.poll(0)
    assert p.flush(60) == 0
    after = now_ms() + 1  # the broker's ms clock may round up within the current ms
    assert acked == list(range(start, start + n)), acked[:5]
    return acked, before, after


def test_list_offsets_by_time_on_log_append_time_topic(broker):
    topic = unique_topic("lat")
    create_topic(broker, topic, 1, config={"message.timestamp.type": "LogAppendTime", "segment.bytes": "4096"})
    day = 24 * 3600 * 1000
    # Producer timestamps that would answer differently if the broker kept
    # them: burst 1 claims tomorrow, burst 2 claims 2001.
    _, b1, a1 = produce_burst(broker, topic, 0, 60, now_ms() + day)
    time.sleep(0.05)
    between = now_ms()
    time.sleep(0.05)
    _, b2, a2 = produce_burst(broker, topic, 60, 60, 1_000_000_000_000)
    assert a1 < between < b2
    assert len(segments(broker, topic, 0)) >= 3  # the lookups cross sealed segments

    c = Consumer(broker.consumer_config())
    got = []
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        while len(got) < 120:
            assert time.monotonic() < deadline, len(got)
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    got.append((m.offset(), m.timestamp()))
        # offsets_for_times through librdkafka's ListOffsets.
        def at(ts):
            return c.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=30)[0].offset

        assert at(between) == 60
        assert at(b1 - 1000) == 0
        assert at(a2 + day + 1000) == -1  # nothing that late: end (-1), as Kafka answers
        # Any time inside burst 2 finds a record of burst 2 whose time is >= it.
        ts_of = dict((o, t) for o, (_, t) in got)
        mid = ts_of[90]
        first = min(o for o, t in ts_of.items() if t >= mid)
        assert at(mid) == first
    finally:
        c.close()

    assert [o for o, _ in got] == list(range(120))
    types = {tt for _, (tt, _) in got}
    assert types == {2}, "timestamp types %r, want only LOG_APPEND_TIME (2)" % types
    for o, (_, ts) in got:
        lo, hi = (b1, a1) if o < 60 else (b2, a2)
        assert lo <= ts <= hi, "offset %d: timestamp %d outside its produce window [%d, %d]" % (o, ts, lo, hi)
    stamps = [ts for _, (_, ts) in got]
    assert stamps == sorted(stamps), "broker times go backwards"

    # kafka-python's ListOffsets agrees.
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    try:
        r = kc.offsets_for_times({KTP(topic, 0): between})[KTP(topic, 0)]
        assert r.offset == 60 and r.timestamp == ts_of[60], r
        assert kc.beginning_offsets([KTP(topic, 0)]) == {KTP(topic, 0): 0}
        assert kc.end_offsets([KTP(topic, 0)]) == {KTP(topic, 0): 120}
    finally:
        kc.close()
