"""kill -9 during an unpaced acks=all produce, TIDELOG_KILL9_ROUNDS times (3 in
CI; the issue's long form is 20:
`TIDELOG_KILL9_ROUNDS=20 python3 -m pytest -s tests/test_produce_kill9.py`), then
the whole log read back and checked the way Jepsen's Kafka workload checks one:

- lost write: every acknowledged record is at the (partition, offset) its
  delivery report named, with the same key and value;
- inconsistent / nonmonotonic offsets: each partition reads back as offsets
  0, 1, 2, ... up to its high watermark, no gap, no offset twice;
- duplicate: with idempotence no value is in the log twice, and a round's
  values keep their produce order within a partition;
- garbage: nothing is in the log that no producer sent (a torn or stale
  write).

Records that were sent but never acknowledged may or may not be there; the test
reports how many survived.

Each round a fresh confluent-kafka producer (idempotent in two rounds of three,
not in the third; linger.ms 0-5; the client's largest in-flight window) writes
as fast as it can; after 0.3-1.5 s of acks the broker is SIGKILLed, the
producer is left to hit the dead broker, then stopped (what it still held is
purged), and the broker is started again on the same data dir and ports. Values
are unique: round number and sequence number, so every ack names exactly one
record. The random choices come from TIDELOG_KILL9_SEED (printed when not set).
"""

import collections
import os
import random
import threading
import time
from array import array

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from clients import produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic

ROUNDS = int(os.environ.get("TIDELOG_KILL9_ROUNDS", "3"))
PARTITIONS = 6
KEYS = 64
FILLER = b"".join(b"kill9-filler-%03d|" % i for i in range(16))  # 288 bytes, cut to 0..199

SEQ_BITS = 40  # a record's id: round << SEQ_BITS | seq
SEQ_MASK = (1 << SEQ_BITS) - 1


def key_of(seq):
    return b"k%d" % (seq % KEYS)


def value_of(round_no, seq):
    return b"r%d|s%d|" % (round_no, seq) + FILLER[: (seq * 37) % 200]


def parse_value(value):
    """(round, seq) from a value written by value_of, or None."""
    try:
        r, s, _ = value.split(b"|", 2)
        if r[:1] != b"r" or s[:1] != b"s":
            return None
        return int(r[1:]), int(s[1:])
    except (ValueError, TypeError):
        return None


class UnpacedProducer:
    """One round's producer: produce() as fast as the client takes records,
    keeping every successful delivery report as (partition, offset, seq)."""

    def __init__(self, broker, topic, round_no, idempotent, linger_ms):
        self.producer = Producer(
            broker.producer_config(
                **{
                    "enable.idempotence": idempotent,
                    "linger.ms": linger_ms,
                    # The largest window the client allows (idempotence caps it at 5).
                    "max.in.flight.requests.per.connection": 5 if idempotent else 1000000,
                    "queue.buffering.max.messages": 500000,
                    "message.timeout.ms": 60000,
                    "reconnect.backoff.ms": 50,
                    "reconnect.backoff.max.ms": 200,
                    # The dead broker's "connection refused" is expected; delivery
                    # reports carry what matters.
                    "log_level": 2,
                }
            )
        )
        self.topic = topic
        self.round_no = round_no
        self.partitions = array("q")
        self.offsets = array("q")
        self.seqs = array("q")
        self.errors = collections.Counter()
        self.bad_reports = []
        self.sent = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    @property
    def acked(self):
        return len(self.offsets)

    def _on_delivery(self, err, msg):
        if err is not None:
            self.errors[err.name()] += 1
            return
        parsed = parse_value(msg.value())
        if parsed is None or parsed[0] != self.round_no or msg.offset() < 0 or msg.key() != key_of(parsed[1]):
            self.bad_reports.append((msg.partition(), msg.offset(), msg.key(), msg.value()[:40]))
            return
        self.partitions.append(msg.partition())
        self.offsets.append(msg.offset())
        self.seqs.append(parsed[1])

    def _run(self):
        produce, poll = self.producer.produce, self.producer.poll
        topic, r, cb = self.topic, self.round_no, self._on_delivery
        seq = 0
        while not self._stop.is_set():
            try:
                produce(topic, key=key_of(seq), value=value_of(r, seq), on_delivery=cb)
            except BufferError:
                poll(0.005)
                continue
            seq += 1
            if seq % 64 == 0:
                poll(0)
        self.sent = seq

    def stop(self):
        """Stops producing; whatever the client still holds (queued or in
        flight to the dead broker) is purged and reported as failed."""
        self._stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "producer thread did not stop"
        self.producer.purge(in_queue=True, in_flight=True)
        left = self.producer.flush(30)
        assert left == 0, "%d messages still in the client after purge" % left
        self.producer = None  # gone before the broker is back: no reconnects
        assert not self.bad_reports, "delivery reports for records not sent this round: %r" % self.bad_reports[:3]


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for %s" % what
        time.sleep(0.01)


def read_log(broker, topic, ends, sent, timeout=600):
    """Reads every partition from offset 0 to its end offset. Returns
    ({partition: array of record ids indexed by offset, -1 where none},
    [problems]). Checks offsets, keys, values and that every record was sent."""
    c = Consumer(broker.consumer_config(**{"fetch.wait.max.ms": 100}))
    ids = {p: array("q") for p in ends}
    problems = []
    client_errors = []
    pending = {p for p, end in ends.items() if end > 0}
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, "reading the log timed out at %r of %r; client errors %r" % (
                {p: len(ids[p]) for p in ends}, ends, client_errors[-3:])
            for m in c.consume(num_messages=10000, timeout=1.0):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    if err.fatal() or m.partition() in ends:
                        raise AssertionError("consumer error on %s/%s: %s" % (m.topic(), m.partition(), err))
                    client_errors.append(str(err))
                    continue
                p, o = m.partition(), m.offset()
                log = ids[p]
                if o >= ends[p]:
                    problems.append("partition %d: offset %d at or past the high watermark %d" % (p, o, ends[p]))
                    pending.discard(p)
                    continue
                if o < len(log):
                    problems.append("partition %d: offset %d read again after %d (nonmonotonic)" % (p, o, len(log) - 1))
                    continue
                if o > len(log):
                    problems.append("partition %d: offsets %d..%d missing (gap)" % (p, len(log), o - 1))
                    log.extend([-1] * (o - len(log)))
                parsed = parse_value(m.value())
                if parsed is None or parsed[0] >= len(sent) or parsed[1] >= sent[parsed[0]]:
                    problems.append("partition %d offset %d: a record nobody sent, key %r value %r" % (
                        p, o, m.key(), (m.value() or b"")[:40]))
                    log.append(-1)
                elif m.key() != key_of(parsed[1]) or m.value() != value_of(*parsed):
                    problems.append("partition %d offset %d: round %d seq %d with key %r value %r (changed)" % (
                        p, o, parsed[0], parsed[1], m.key(), m.value()[:40]))
                    log.append(-1)
                else:
                    log.append(parsed[0] << SEQ_BITS | parsed[1])
                if o >= ends[p] - 1:
                    pending.discard(p)
    finally:
        c.close()
    for p, end in ends.items():
        if len(ids[p]) != end:
            problems.append("partition %d: read %d offsets, high watermark %d" % (p, len(ids[p]), end))
    return ids, problems


def test_kill9_during_unpaced_produce_loses_no_acked_record(broker):
    seed = int(os.environ.get("TIDELOG_KILL9_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print("\nTIDELOG_KILL9_SEED=%d, %d rounds, broker log %s" % (seed, ROUNDS, broker.log_path))
    topic = unique_topic("kill9")
    create_topic(broker, topic, PARTITIONS)
    t0 = time.monotonic()
    rounds = []  # per round: dict(idempotent, linger, acked arrays, sent, errors)

    for r in range(ROUNDS):
        idempotent = r % 3 != 1
        linger_ms = rng.choice([0, 1, 2, 5])
        produce_s = rng.uniform(0.3, 1.5)
        prod = UnpacedProducer(broker, topic, r, idempotent, linger_ms)
        prod.start()
        wait_for(lambda: prod.acked > 0 or prod.errors, 60, "the first ack of round %d" % r)
        assert prod.acked > 0, "round %d: delivery errors before any ack: %r" % (r, prod.errors)
        time.sleep(produce_s)
        broker.mark_log("round %d: kill -9 after %.2f s of acks, %d delivery reports served (idempotence %s, "
                        "linger.ms %d)" % (r, produce_s, prod.acked, idempotent, linger_ms))
        broker.kill9()
        # The producer goes on against the dead broker and meets its errors.
        time.sleep(0.5)
        prod.stop()
        assert prod.sent > prod.acked, "round %d: everything sent was acked, the kill hit no produce in flight" % r
        top = [-1] * PARTITIONS
        for p, o in zip(prod.partitions, prod.offsets):
            top[p] = max(top[p], o)
        rounds.append(dict(idempotent=idempotent, linger_ms=linger_ms, partitions=prod.partitions,
                           offsets=prod.offsets, seqs=prod.seqs, sent=prod.sent, errors=prod.errors, top=top))

        t_restart = time.monotonic()
        broker.start()
        wait_topic(broker, topic, PARTITIONS)
        wm = watermarks(broker, topic, range(PARTITIONS))
        restart_s = time.monotonic() - t_restart
        # Cheap check every round: no high watermark below an acked offset.
        for p in range(PARTITIONS):
            lo, hi = wm[p]
            assert lo == 0, "round %d: partition %d log start %d after restart" % (r, p, lo)
            for q, rd in enumerate(rounds):
                assert hi > rd["top"][p], (
                    "round %d: after restart partition %d high watermark %d, but round %d had offset %d acked"
                    % (r, p, hi, q, rd["top"][p]))
        print("round %2d: idempotence %-5s linger.ms %d, killed after %.2f s: %7d acked of %7d sent, "
              "%d acked so far, errors %s; restart %.1f s, high watermarks %s, %.0f s elapsed" % (
                  r, idempotent, linger_ms, produce_s, len(rounds[-1]["offsets"]), rounds[-1]["sent"],
                  sum(len(x["offsets"]) for x in rounds), dict(rounds[-1]["errors"]), restart_s,
                  [wm[p][1] for p in range(PARTITIONS)], time.monotonic() - t0))

    # ---- the whole log, against every ack
    wm = watermarks(broker, topic, range(PARTITIONS))
    ends = {p: hi for p, (_, hi) in wm.items()}
    sent = [rd["sent"] for rd in rounds]
    ids, problems = read_log(broker, topic, ends, sent)

    # Duplicates and per-partition order of each round's values.
    seen = [bytearray(n) for n in sent]
    dups = collections.Counter()
    reordered = collections.Counter()
    for p in range(PARTITIONS):
        last = {}
        for o, rid in enumerate(ids[p]):
            if rid < 0:
                continue
            r, s = rid >> SEQ_BITS, rid & SEQ_MASK
            if seen[r][s]:
                dups[r] += 1
                if rounds[r]["idempotent"] and dups[r] <= 3:
                    problems.append("round %d (idempotent) seq %d in the log twice, again at %d/%d" % (r, s, p, o))
            seen[r][s] = 1
            if s < last.get(r, -1):
                reordered[r] += 1
                if rounds[r]["idempotent"] and reordered[r] <= 3:
                    problems.append("round %d (idempotent) partition %d: seq %d at offset %d after seq %d" % (
                        r, p, s, o, last[r]))
            last[r] = max(s, last.get(r, -1))

    # Lost writes: every ack at its offset with its record.
    lost = []
    for r, rd in enumerate(rounds):
        for p, o, s in zip(rd["partitions"], rd["offsets"], rd["seqs"]):
            log = ids[p]
            if not (o < len(log) and log[o] == (r << SEQ_BITS | s)):
                found = log[o] if o < len(log) else None
                lost.append("round %d seq %d acked at %d/%d, found %s" % (
                    r, s, p, o, "nothing" if found is None or found < 0 else
                    "round %d seq %d" % (found >> SEQ_BITS, found & SEQ_MASK)))
    if lost:
        problems.insert(0, "%d acknowledged record(s) lost, first: %s" % (len(lost), "; ".join(lost[:5])))

    acked = sum(len(rd["offsets"]) for rd in rounds)
    present = [sum(x) for x in seen]
    for r, rd in enumerate(rounds):
        n = len(rd["offsets"])
        print("round %2d: sent %7d, acked %7d, unacked but in the log %6d, unacked and gone %6d, duplicates %d, "
              "out of order %d" % (r, rd["sent"], n, present[r] - n, rd["sent"] - present[r], dups[r], reordered[r]))
    print("%d rounds: %d records acked, %d in the log (high watermarks %s), all checked in %.0f s" % (
        ROUNDS, acked, sum(ends.values()), [ends[p] for p in range(PARTITIONS)], time.monotonic() - t0))
    assert not problems, "%d problem(s) after %d kill -9 rounds (seed %d):\n%s" % (
        len(problems), ROUNDS, seed, "\n".join(problems[:20]))
    assert sum(ends.values()) >= acked

    # The recovered log takes new writes right at its end.
    more = produce_confluent(broker, topic, [(key_of(i), b"after-%d" % i) for i in range(120)])
    for p in range(PARTITIONS):
        offs = sorted(o for q, o, _, _ in more if q == p)
        assert offs == list(range(ends[p], ends[p] + len(offs))), "partition %d continues at %r, high watermark was %d" % (
            p, offs[:3], ends[p])
