"""Kafka transactions (issue 15; KIP-98, KIP-447, KIP-664) against the real
binary with real clients: commit/abort visibility for read_committed and
read_uncommitted consumers (librdkafka and kafka-python), the last stable
offset holding read_committed back while a transaction is open, zombie
fencing by a second producer with the same transactional.id, the broker
aborting a timed-out transaction, consume-transform-produce across kill -9
of the broker (exactly once), TxnOffsetCommit visibility, Kafka's errors for
bad transaction requests on the raw wire, and FindCoordinator /
DescribeTransactions / ListTransactions.

Markers take an offset each, so what consumers see has gaps: the checks are on
exact value sequences per partition, and on offsets only where Kafka fixes
them (every delivered record at its delivered offset, one marker per partition
per finished transaction)."""

import json
import os
import random
import re
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

import txn_wire as tw

try:
    from confluent_kafka import IsolationLevel
except ImportError:  # older confluent-kafka
    from confluent_kafka.admin import IsolationLevel

HERE = os.path.dirname(os.path.abspath(__file__))
FENCING = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


# --------------------------------------------------------------------------
# helpers


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def create_topic(broker, name, partitions):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
    from conftest import wait_topic

    wait_topic(broker, name, partitions)


def broker_help(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


ABORT_CHECK_FLAG = "transaction.abort.timed.out.transaction.cleanup.interval.ms"


def txn_broker(broker_factory, binary):
    """A 2-shard broker; if the binary has Kafka's timed-out-transaction
    check interval, it runs every 500 ms instead of 10 s."""
    args = []
    if ABORT_CHECK_FLAG in broker_help(binary):
        args.append("--%s=500" % ABORT_CHECK_FLAG)
    return broker_factory(args=args)


def txn_producer(broker, txn_id, errors=None, **extra):
    """A transactional confluent-kafka producer. Client-level errors go to
    the list `errors` (without an error_cb confluent-kafka raises a fatal
    error out of whatever poll or flush is running; the tests look for it
    where the transaction API reports it)."""
    errors = [] if errors is None else errors
    cfg = {
        "bootstrap.servers": broker.bootstrap,
        "transactional.id": txn_id,
        "linger.ms": 5,
        "log_level": 3,
        "error_cb": errors.append,
    }
    cfg.update(extra)
    return Producer(cfg)


def plain_producer(broker):
    return Producer(broker.producer_config(**{"linger.ms": 5}))


class Deliveries:
    """on_delivery callback that records (partition, offset) per value and
    every error."""

    def __init__(self):
        self.at = {}
        self.errors = []

    def __call__(self, err, msg):
        if err is not None:
            self.errors.append((msg.value().decode(), err))
        else:
            self.at[msg.value().decode()] = (msg.partition(), msg.offset())


def produce_all(producer, topic, items, cb, flush=True):
    """items: [(partition, value)], produced in order."""
    for p, v in items:
        producer.produce(topic, value=v.encode(), key=v.encode(), partition=p, on_delivery=cb)
    if flush:
        assert producer.flush(30) == 0, "records left unflushed"


def read_partitions(broker, topic, partitions, isolation, settle=1.5, timeout=60, group=None):
    """{partition: [(offset, value)]} from offset 0 to the end (high watermark
    for read_uncommitted, last stable offset for read_committed), plus
    whatever arrives within `settle` seconds after every partition's EOF."""
    c = Consumer(
        broker.consumer_config(
            **{"isolation.level": isolation, "group.id": group or uid("reader")}
        )
    )
    try:
        c.assign([TopicPartition(topic, p, 0) for p in partitions])
        out = {p: [] for p in partitions}
        eof = set()
        deadline = time.monotonic() + timeout
        while eof != set(partitions):
            assert time.monotonic() < deadline, "no EOF on %r after %ss: %r" % (
                sorted(set(partitions) - eof),
                timeout,
                {p: len(v) for p, v in out.items()},
            )
            for m in c.consume(1000, 0.3):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise KafkaException(m.error())
                out[m.partition()].append((m.offset(), m.value().decode()))
        end = time.monotonic() + settle
        while time.monotonic() < end:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out[m.partition()].append((m.offset(), m.value().decode()))
        return out
    finally:
        c.close()


def read_kafka_python(broker, topic, partitions, isolation, expected_total, timeout=60):
    """The same with kafka-python's consumer: {partition: [(offset, value)]},
    reading until `expected_total` records and 1.5 s more."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition as KTP

    c = KafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        isolation_level=isolation,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    try:
        c.assign([KTP(topic, p) for p in partitions])
        for p in partitions:
            c.seek(KTP(topic, p), 0)
        out = {p: [] for p in partitions}
        n = 0
        deadline = time.monotonic() + timeout
        settle_until = None
        while True:
            now = time.monotonic()
            if settle_until is None and n >= expected_total:
                settle_until = now + 1.5
            if (settle_until is not None and now > settle_until) or now > deadline:
                break
            for tp, msgs in c.poll(timeout_ms=300).items():
                for m in msgs:
                    out[tp.partition].append((m.offset, m.value.decode()))
                    n += 1
        return out
    finally:
        c.close()


def values(read):
    return {p: [v for _, v in recs] for p, recs in read.items()}


def assert_sequences(got, want, what):
    """Exact per-partition value sequences, with the first difference named."""
    problems = []
    for p in sorted(set(got) | set(want)):
        g, w = got.get(p, []), want.get(p, [])
        if g == w:
            continue
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        problems.append(
            "partition %s: %d values, %d expected; first difference at %d: got %r, expected %r; "
            "extra %r, missing %r"
            % (p, len(g), len(w), i, g[i : i + 4], w[i : i + 4], sorted(set(g) - set(w))[:6], sorted(set(w) - set(g))[:6])
        )
    assert not problems, "%s:\n%s" % (what, "\n".join(problems))


def list_offsets(broker, topic, partitions, isolation):
    """{partition: latest offset}: the high watermark (read_uncommitted) or
    the last stable offset (read_committed), by AdminClient ListOffsets."""
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    level = IsolationLevel.READ_COMMITTED if isolation == "read_committed" else IsolationLevel.READ_UNCOMMITTED
    req = {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions}
    res = admin.list_offsets(req, isolation_level=level, request_timeout=30)
    return {tp.partition: f.result(30).offset for tp, f in res.items()}


def committed_offsets(broker, group, topic, partitions, isolation="read_uncommitted"):
    """OffsetFetch through librdkafka; read_uncommitted sends require_stable
    false, so pending transactional offsets are not waited for."""
    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": group,
            "isolation.level": isolation,
            "log_level": 3,
        }
    )
    try:
        got = c.committed([TopicPartition(topic, p) for p in partitions], timeout=30)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def wait_until(pred, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached within %ss" % (what, timeout))
        time.sleep(interval)


# --------------------------------------------------------------------------
# 1. commit / abort visibility


def test_commit_and_abort_visibility(broker):
    P = [0, 1, 2]
    topic = uid("txvis")
    create_topic(broker, topic, 3)
    plain = plain_producer(broker)
    txn_id = uid("vis")
    tp = txn_producer(broker, txn_id)
    tp.init_transactions(60)
    cb = Deliveries()
    log = {p: [] for p in P}  # (value, txn index or None), in produce = offset order
    outcome = {}
    markers = {p: 0 for p in P}

    def plain_step(tag, n=3):
        items = [(p, "%s-p%d-%d" % (tag, p, i)) for i in range(n) for p in P]
        produce_all(plain, topic, items, cb)
        for p, v in items:
            log[p].append((v, None))

    def txn_step(k, commit, parts, n=4, interleave=None):
        tp.begin_transaction()
        items = [(p, "t%d-%s-p%d-%d" % (k, "c" if commit else "a", p, i)) for i in range(n) for p in parts]
        produce_all(tp, topic, items, cb)
        for p, v in items:
            log[p].append((v, k))
        if interleave:
            # non-transactional records inside the open transaction's span
            plain_step(interleave, 2)
        if commit:
            tp.commit_transaction(30)
        else:
            tp.abort_transaction(30)
        outcome[k] = commit
        for p in parts:
            markers[p] += 1

    plain_step("n0")
    txn_step(1, True, P)
    plain_step("n1")
    txn_step(2, False, [0, 2], interleave="n2")
    txn_step(3, True, [1, 2], interleave="n3")
    txn_step(4, False, P)
    plain_step("n4")
    txn_step(5, True, [0, 1])
    txn_step(6, False, [1])
    plain_step("n5")
    assert not cb.errors, cb.errors[:5]

    expect_all = {p: [v for v, _ in log[p]] for p in P}
    expect_committed = {p: [v for v, k in log[p] if k is None or outcome[k]] for p in P}
    aborted = {v for p in P for v, k in log[p] if k is not None and not outcome[k]}
    assert aborted and all(expect_committed[p] != expect_all[p] for p in P)

    # High watermark = records + one marker per finished transaction that
    # touched the partition; nothing open, so the LSO is the same.
    hw = list_offsets(broker, topic, P, "read_uncommitted")
    assert hw == {p: len(expect_all[p]) + markers[p] for p in P}
    assert list_offsets(broker, topic, P, "read_committed") == hw

    # On the wire: a read_committed Fetch lists each aborted transaction in
    # range as (producer id, its first offset on the partition); a
    # read_uncommitted one lists none.
    txn_port = tw.txn_coordinator_port(broker, txn_id)
    pid = tw.describe_transactions(txn_port, [txn_id])[txn_id].producer_id
    leaders = tw.leader_ports(broker, topic, P)
    for p in P:
        first = {}
        for v, k in log[p]:
            if k is not None and not outcome[k]:
                first.setdefault(k, cb.at[v][1])
        want = sorted((pid, o) for o in first.values())
        err, phw, lso, ab = tw.fetch_aborted(leaders[p], topic, p, 1)
        assert (err, phw, lso) == (0, hw[p], hw[p])
        assert sorted(ab or []) == want, (p, ab, want)
        err, _, _, ab = tw.fetch_aborted(leaders[p], topic, p, 0)
        assert err == 0 and not ab, (p, ab)

    rc = read_partitions(broker, topic, P, "read_committed")
    ru = read_partitions(broker, topic, P, "read_uncommitted")
    assert_sequences(values(rc), expect_committed, "read_committed (librdkafka)")
    assert_sequences(values(ru), expect_all, "read_uncommitted (librdkafka)")
    for read in (rc, ru):
        for p in P:
            for off, v in read[p]:
                assert cb.at[v] == (p, off), (v, cb.at[v], (p, off))
    # The gaps in what read_uncommitted sees are exactly the markers.
    for p in P:
        offs = [o for o, _ in ru[p]]
        assert offs == sorted(offs) and len(set(offs)) == len(offs)
        assert hw[p] - len(offs) == markers[p]

    # kafka-python's consumer agrees (it filters aborted records itself from
    # the Fetch response's aborted_transactions).
    total_c = sum(len(v) for v in expect_committed.values())
    total_a = sum(len(v) for v in expect_all.values())
    assert_sequences(
        values(read_kafka_python(broker, topic, P, "read_committed", total_c)), expect_committed, "read_committed (kafka-python)"
    )
    assert_sequences(
        values(read_kafka_python(broker, topic, P, "read_uncommitted", total_a)), expect_all, "read_uncommitted (kafka-python)"
    )


# --------------------------------------------------------------------------
# 2. an open transaction holds read_committed back at the LSO


def test_open_transaction_holds_back_read_committed(broker):
    topic, group = uid("txlso"), uid("glso")
    create_topic(broker, topic, 1)
    plain = plain_producer(broker)
    cb = Deliveries()
    pre = ["pre-%d" % i for i in range(5)]
    produce_all(plain, topic, [(0, v) for v in pre], cb)

    tp = txn_producer(broker, uid("lso"))
    tp.init_transactions(60)
    tp.begin_transaction()
    txn = ["txn-%d" % i for i in range(4)]
    produce_all(tp, topic, [(0, v) for v in txn], cb)
    mid = ["mid-%d" % i for i in range(3)]
    produce_all(plain, topic, [(0, v) for v in mid], cb)
    assert not cb.errors

    # LSO = first offset of the open transaction; HW past it.
    assert list_offsets(broker, topic, [0], "read_committed") == {0: 5}
    assert list_offsets(broker, topic, [0], "read_uncommitted") == {0: 12}
    (port,) = tw.leader_ports(broker, topic, [0]).values()
    assert tw.list_offsets_latest(port, topic, [0], 1) == {0: (0, 5)}
    assert tw.list_offsets_latest(port, topic, [0], 0) == {0: (0, 12)}

    c = Consumer(
        broker.consumer_config(**{"isolation.level": "read_committed", "group.id": group})
    )
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    eof_at = None
    deadline = time.monotonic() + 30
    # Everything before the transaction, then EOF (at the LSO), then nothing
    # for 3 s although 7 more records are in the log.
    while eof_at is None or time.monotonic() - eof_at < 3:
        assert time.monotonic() < deadline, got
        for m in c.consume(100, 0.3):
            if m.error() is not None:
                assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                if eof_at is None:
                    eof_at = time.monotonic()
                continue
            got.append(m.value().decode())
    assert got == pre

    # Lag of a read_committed consumer ends at the LSO: its committed
    # position equals the LSO, which its own watermark query reports.
    pos = c.position([TopicPartition(topic, 0)])
    assert pos[0].offset == 5
    c.commit(offsets=pos, asynchronous=False)
    assert committed_offsets(broker, group, topic, [0]) == {0: 5}
    lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    assert (lo, hi) == (0, 5), "read_committed consumer's watermark is the LSO"

    tp.commit_transaction(30)
    deadline = time.monotonic() + 30
    while len(got) < len(pre) + len(txn) + len(mid):
        assert time.monotonic() < deadline, got
        for m in c.consume(100, 0.3):
            if m.error() is None:
                got.append(m.value().decode())
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        for m in c.consume(100, 0.2):
            if m.error() is None:
                got.append(m.value().decode())
    assert got == pre + txn + mid
    c.close()
    # 12 records + the commit marker
    assert list_offsets(broker, topic, [0], "read_committed") == {0: 13}
    assert list_offsets(broker, topic, [0], "read_uncommitted") == {0: 13}


# --------------------------------------------------------------------------
# 3. zombie fencing


def test_zombie_is_fenced(broker):
    topic = uid("txfence")
    create_topic(broker, topic, 2)
    txn_id = uid("fence")
    a_cb, b_cb = Deliveries(), Deliveries()

    a_errors = []
    a = txn_producer(broker, txn_id, errors=a_errors)
    a.init_transactions(60)
    a.begin_transaction()
    produce_all(a, topic, [(0, "a-0"), (0, "a-1")], a_cb)
    assert not a_cb.errors

    # B's InitProducerId aborts A's open transaction and bumps the epoch.
    b = txn_producer(broker, txn_id)
    b.init_transactions(60)
    b.begin_transaction()
    produce_all(b, topic, [(0, "b-0"), (1, "b-1")], b_cb)
    b.commit_transaction(30)
    assert not b_cb.errors

    # A, the zombie: a new partition (AddPartitionsToTxn with the old epoch)
    # and one already in its transaction (Produce with the old epoch).
    # (No delivery callbacks or flush here: confluent-kafka then raises the
    # fatal error from inside the callback dispatch; commit_transaction
    # flushes and reports it.)
    a.produce(topic, value=b"a-2", partition=1)
    a.produce(topic, value=b"a-3", partition=0)
    with pytest.raises(KafkaException) as ei:
        a.commit_transaction(30)
    err = ei.value.args[0]
    if not err.fatal():
        # A stale-epoch Produce may surface as an abortable error first; the
        # abort's EndTxn then meets the new epoch at the coordinator.
        assert err.txn_requires_abort(), err
        with pytest.raises(KafkaException) as ei:
            a.abort_transaction(30)
        err = ei.value.args[0]
    assert err.fatal(), err
    assert err.code() in FENCING, err
    with pytest.raises(KafkaException):
        a.begin_transaction()

    rc = values(read_partitions(broker, topic, [0, 1], "read_committed"))
    assert rc == {0: ["b-0"], 1: ["b-1"]}
    ru = values(read_partitions(broker, topic, [0, 1], "read_uncommitted"))
    # A's first records were written (then aborted); its later ones never.
    assert ru == {0: ["a-0", "a-1", "b-0"], 1: ["b-1"]}


# --------------------------------------------------------------------------
# 4. the broker aborts a timed-out transaction


def test_transaction_timeout_aborts(broker_factory, binary):
    timeout_ms = 3000
    broker = txn_broker(broker_factory, binary)
    fast = ABORT_CHECK_FLAG in broker_help(binary)
    topic = uid("txtimeout")
    create_topic(broker, topic, 1)
    (leader,) = tw.leader_ports(broker, topic, [0]).values()
    cb = Deliveries()
    tp_id = uid("timeout")
    port = tw.txn_coordinator_port(broker, tp_id)
    # Clients connected and warmed up before the clock starts: the checks
    # of the open transaction below are raw requests, well inside the timeout.
    plain = plain_producer(broker)
    produce_all(plain, topic, [(0, "before-0")], cb)
    tp = txn_producer(broker, tp_id, errors=[], **{"transaction.timeout.ms": timeout_ms})
    tp.init_transactions(60)
    tp.begin_transaction()
    started = time.monotonic()
    produce_all(tp, topic, [(0, "stalled-%d" % i) for i in range(3)], cb)
    after = ["after-%d" % i for i in range(3)]
    produce_all(plain, topic, [(0, v) for v in after], cb)
    st = tw.describe_transactions(port, [tp_id])[tp_id]
    lso = tw.list_offsets_latest(leader, topic, [0], 1)
    hw = tw.list_offsets_latest(leader, topic, [0], 0)
    checked = time.monotonic() - started
    assert checked < timeout_ms / 1000.0, "checks of the open transaction took %.2f s" % checked
    assert not cb.errors
    assert (st.error_code, st.transaction_state, st.transaction_timeout_ms) == (0, "Ongoing", timeout_ms), st
    assert (lso, hw) == ({0: (0, 1)}, {0: (0, 7)})
    pid, epoch = st.producer_id, st.producer_epoch

    # The abort marker (offset 7) lets the LSO reach the high watermark 8:
    # within the timeout plus Kafka's check interval (10 s default).
    bound = timeout_ms / 1000.0 + (0.5 if fast else 10) + 8
    wait_until(
        lambda: list_offsets(broker, topic, [0], "read_committed") == {0: 8},
        bound,
        "LSO past the timed-out transaction",
    )
    assert time.monotonic() - started >= timeout_ms / 1000.0 - 0.2, "aborted before transaction.timeout.ms"
    assert list_offsets(broker, topic, [0], "read_uncommitted") == {0: 8}
    assert values(read_partitions(broker, topic, [0], "read_committed")) == {0: ["before-0"] + after}
    assert values(read_partitions(broker, topic, [0], "read_uncommitted")) == {
        0: ["before-0", "stalled-0", "stalled-1", "stalled-2"] + after
    }

    # Kafka fences the producer as it aborts on timeout: the epoch is bumped.
    st = wait_until(
        lambda: (lambda x: x if x.transaction_state == "CompleteAbort" else None)(
            tw.describe_transactions(port, [tp_id])[tp_id]
        ),
        10,
        "CompleteAbort",
    )
    assert (st.error_code, st.producer_id, st.producer_epoch) == (0, pid, epoch + 1), st

    with pytest.raises(KafkaException):
        tp.commit_transaction(10)
    assert values(read_partitions(broker, topic, [0], "read_committed")) == {0: ["before-0"] + after}


# --------------------------------------------------------------------------
# 5. consume-transform-produce across kill -9


PIPELINE_PAUSE_S = 0.02  # between writing and committing each batch of <= 50 records


class Pipeline:
    def __init__(self, tmp_path, broker, in_topic, out_topic, group, txn_id, total, n):
        self.progress = str(tmp_path / ("pipeline-%d.jsonl" % n))
        self.err = self.progress + ".err"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "txn_pipeline.py"),
                broker.bootstrap,
                in_topic,
                out_topic,
                group,
                txn_id,
                str(total),
                self.progress,
                str(PIPELINE_PAUSE_S),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.err, "w"),
        )

    def events(self):
        try:
            with open(self.progress) as f:
                return [json.loads(x) for x in f if x.strip()]
        except FileNotFoundError:
            return []

    def committed(self):
        c = [e["committed"] for e in self.events() if e.get("event") == "commit"]
        return c[-1] if c else 0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stderr(self):
        try:
            return open(self.err).read()[-2000:]
        except FileNotFoundError:
            return ""


def test_consume_transform_produce_exactly_once_across_kill9(broker, tmp_path):
    n = int(os.environ.get("TIDELOG_TXN_RECORDS", "3000"))
    kills = int(os.environ.get("TIDELOG_TXN_KILL9_ROUNDS", "3"))
    seed = int(os.environ.get("TIDELOG_TXN_SEED", str(random.randrange(1 << 30))))
    rnd = random.Random(seed)
    print("TIDELOG_TXN_SEED=%d" % seed)
    P = [0, 1, 2]
    in_topic, out_topic, group, txn_id = uid("ctp-in"), uid("ctp-out"), uid("ctp-g"), uid("ctp")
    create_topic(broker, in_topic, 3)
    create_topic(broker, out_topic, 3)
    cb = Deliveries()
    inputs = {p: ["in-p%d-%05d" % (p, i) for i in range(n // 3 + (1 if p < n % 3 else 0))] for p in P}
    plain = plain_producer(broker)
    produce_all(plain, in_topic, [(p, v) for p in P for v in inputs[p]], cb)
    assert not cb.errors and len(cb.at) == n

    runs = 0
    kills_done = 0
    pipes = []

    def start():
        nonlocal runs
        runs += 1
        p = Pipeline(tmp_path, broker, in_topic, out_topic, group, txn_id, n, runs)
        pipes.append(p)
        return p

    try:
        for k in range(kills):
            target = (k + 1) * n // (kills + 2)
            pipe = start()
            deadline = time.monotonic() + 90
            while pipe.committed() < target:
                if pipe.proc.poll() == 0:
                    break  # finished before the target: no kill this round
                if pipe.proc.poll() is not None:
                    # A client error (e.g. right after the restart): a fresh
                    # process carries on, as an operator's supervisor would.
                    pipe = start()
                assert time.monotonic() < deadline, "pipeline stuck below %d: %r\n%s" % (
                    target,
                    [e for q in pipes for e in q.events()][-5:],
                    "\n".join(q.stderr() for q in pipes),
                )
                time.sleep(0.05)
            if pipe.proc.poll() == 0:
                print("pipeline finished before kill -9 #%d" % (k + 1))
                break
            time.sleep(rnd.uniform(0, 0.1))
            broker.kill9()
            if pipe.committed() < n:
                kills_done += 1
            pipe.kill()
            print("kill -9 #%d at committed=%d" % (k + 1, pipe.committed()))
            broker.start()

        deadline = time.monotonic() + 120
        pipe = start()
        while True:
            rc = pipe.proc.poll()
            if rc == 0:
                break
            if rc is not None:
                pipe = start()
            assert time.monotonic() < deadline, "pipeline did not finish: %r\n%s" % (
                [e for q in pipes for e in q.events()][-5:],
                "\n".join(q.stderr() for q in pipes),
            )
            time.sleep(0.1)
    finally:
        for p in pipes:
            p.kill()
    print("pipeline processes: %d, kill -9s mid-run: %d" % (runs, kills_done))
    assert kills_done >= 1, "no kill -9 landed before the pipeline had committed everything"

    rc = read_partitions(broker, out_topic, P, "read_committed")
    got = values(rc)
    for p in P:
        want = ["out-" + v for v in inputs[p]]
        if got[p] != want:
            dup = len(got[p]) - len(set(got[p]))
            missing = sorted(set(want) - set(got[p]))
            raise AssertionError(
                "partition %d: %d read_committed outputs, %d expected, %d duplicates, missing e.g. %r"
                % (p, len(got[p]), len(want), dup, missing[:5])
            )
    ru = values(read_partitions(broker, out_topic, P, "read_uncommitted"))
    print("aborted outputs left in the log: %d" % (sum(map(len, ru.values())) - n))
    assert committed_offsets(broker, group, in_topic, P, isolation="read_committed") == {p: len(inputs[p]) for p in P}
    assert sum(len(inputs[p]) for p in P) == n


# --------------------------------------------------------------------------
# 6. TxnOffsetCommit visibility


def test_txn_offset_commit_visibility(broker):
    P = [0, 1]
    topic, group = uid("txoff"), uid("goff")
    create_topic(broker, topic, 2)
    plain = plain_producer(broker)
    produce_all(plain, topic, [(p, "r-%d-%d" % (p, i)) for i in range(10) for p in P], Deliveries())
    meta_consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "log_level": 3})
    meta = meta_consumer.consumer_group_metadata()
    gport = coordinator_of_group(broker, group)
    with tw.kw.Conn(gport) as conn:
        offset_fetch_v7 = tw.kw.pick_version(tw.kw.api_versions(conn), tw.OFFSET_FETCH, 1, 7) >= 7

    tp = txn_producer(broker, uid("off"))
    tp.init_transactions(60)
    tp.begin_transaction()
    tp.produce(topic, value=b"x", partition=0)
    tp.send_offsets_to_transaction([TopicPartition(topic, 0, 5), TopicPartition(topic, 1, 7)], meta, 30)
    assert tp.flush(30) == 0

    # Pending: not visible to OffsetFetch (and "unstable" to require_stable).
    assert committed_offsets(broker, group, topic, P) == {0: -1001, 1: -1001}
    assert tw.offset_fetch(gport, group, topic, P)[0] == {0: (-1, 0), 1: (-1, 0)}
    if offset_fetch_v7:
        got, top = tw.offset_fetch(gport, group, topic, P, version=7, require_stable=True)
        assert top == tw.UNSTABLE_OFFSET_COMMIT or all(
            e == tw.UNSTABLE_OFFSET_COMMIT for _, e in got.values()
        ), (got, top)

    tp.commit_transaction(30)
    # As in Kafka, EndTxn returns before the markers are written, so right
    # after the commit a plain OffsetFetch may still see the old offsets;
    # require_stable (librdkafka's read_committed) waits them out.
    assert committed_offsets(broker, group, topic, P, isolation="read_committed") == {0: 5, 1: 7}
    assert committed_offsets(broker, group, topic, P) == {0: 5, 1: 7}
    if offset_fetch_v7:
        assert tw.offset_fetch(gport, group, topic, P, version=7, require_stable=True) == (
            {0: (5, 0), 1: (7, 0)},
            0,
        )

    # Aborted offsets are never visible.
    tp.begin_transaction()
    tp.send_offsets_to_transaction([TopicPartition(topic, 0, 9)], meta, 30)
    assert committed_offsets(broker, group, topic, P) == {0: 5, 1: 7}
    tp.abort_transaction(30)
    assert committed_offsets(broker, group, topic, P) == {0: 5, 1: 7}
    assert committed_offsets(broker, group, topic, P, isolation="read_committed") == {0: 5, 1: 7}
    meta_consumer.close()


def coordinator_of_group(broker, group):
    err, _, _, port = tw.find_coordinator(broker.port, group, 0)
    assert err == 0 and port in broker.ports
    return port


# --------------------------------------------------------------------------
# 7. bad transaction requests on the raw wire


def test_bad_transaction_requests(broker):
    topic, group = uid("txbad"), uid("gbad")
    create_topic(broker, topic, 2)
    txn_id = uid("bad")
    port = tw.txn_coordinator_port(broker, txn_id)
    other = tw.other_port(broker, port)

    # Unknown transactional id: EndTxn gets INVALID_PRODUCER_ID_MAPPING.
    unknown = uid("nobody")
    uport = tw.txn_coordinator_port(broker, unknown)
    assert tw.end_txn(uport, unknown, 4242, 0, True) == tw.INVALID_PRODUCER_ID_MAPPING
    assert tw.end_txn(uport, unknown, 4242, 0, False, version=1) == tw.INVALID_PRODUCER_ID_MAPPING
    assert tw.end_txn(tw.other_port(broker, uport), unknown, 4242, 0, True) == tw.NOT_COORDINATOR

    # Two InitProducerIds: same id, epoch 0 then 1.
    err, pid, epoch0 = tw.init_producer_id(port, txn_id)
    assert err == 0 and pid >= 0, (err, pid, epoch0)
    err, pid1, epoch1 = tw.init_producer_id(port, txn_id)
    assert err == 0 and pid1 == pid and epoch1 == epoch0 + 1, (err, pid1, epoch1)
    assert tw.init_producer_id(other, txn_id)[0] == tw.NOT_COORDINATOR

    # Stale epoch: PRODUCER_FENCED (v2+), INVALID_PRODUCER_EPOCH for older
    # versions (KafkaApis maps it for clients that predate PRODUCER_FENCED).
    assert tw.add_partitions(port, txn_id, pid, epoch0, topic, [0, 1]) == {0: tw.PRODUCER_FENCED, 1: tw.PRODUCER_FENCED}
    assert tw.add_partitions(port, txn_id, pid, epoch0, topic, [0], version=1) == {0: tw.INVALID_PRODUCER_EPOCH}
    # Another producer id with this transactional id.
    assert tw.add_partitions(port, txn_id, pid + 1000, epoch1, topic, [0]) == {0: tw.INVALID_PRODUCER_ID_MAPPING}
    assert tw.add_offsets(port, txn_id, pid, epoch0, group) == tw.PRODUCER_FENCED
    assert tw.end_txn(port, txn_id, pid, epoch0, True) == tw.PRODUCER_FENCED
    assert tw.end_txn(port, txn_id, pid, epoch0, True, version=1) == tw.INVALID_PRODUCER_EPOCH
    assert tw.add_partitions(other, txn_id, pid, epoch1, topic, [0]) == {0: tw.NOT_COORDINATOR}

    # Nothing was added: the transaction is Empty, and EndTxn on it is
    # INVALID_TXN_STATE.
    st = tw.describe_transactions(port, [txn_id])[txn_id]
    assert (st.error_code, st.transaction_state, st.producer_id, st.producer_epoch) == (0, "Empty", pid, epoch1)
    assert tw.partitions_of(st) == {}
    assert tw.end_txn(port, txn_id, pid, epoch1, True) == tw.INVALID_TXN_STATE

    # TxnOffsetCommit with a stale epoch after the group joined the
    # transaction with the current one.
    gport = coordinator_of_group(broker, group)
    assert tw.add_offsets(port, txn_id, pid, epoch1, group) == 0
    # Kafka verifies it with the transaction coordinator (KIP-890) and turns
    # the coordinator's PRODUCER_FENCED into INVALID_PRODUCER_EPOCH
    # (AddPartitionsToTxnManager); another producer id is
    # INVALID_PRODUCER_ID_MAPPING.
    bad = tw.txn_offset_commit(gport, txn_id, group, pid, epoch0, topic, {0: 3, 1: 4})
    assert bad == {0: tw.INVALID_PRODUCER_EPOCH, 1: tw.INVALID_PRODUCER_EPOCH}, bad
    bad = tw.txn_offset_commit(gport, txn_id, group, pid + 1000, epoch1, topic, {0: 3})
    assert bad == {0: tw.INVALID_PRODUCER_ID_MAPPING}, bad
    # TxnOffsetCommit to a broker that is not the group's coordinator.
    assert tw.txn_offset_commit(tw.other_port(broker, gport), txn_id, group, pid, epoch1, topic, {0: 3}) == {
        0: tw.NOT_COORDINATOR
    }
    # Commit the (offset-less) transaction: the refused offsets never appear.
    assert tw.end_txn(port, txn_id, pid, epoch1, True) == 0
    wait_until(
        lambda: tw.describe_transactions(port, [txn_id])[txn_id].transaction_state == "CompleteCommit",
        15,
        "CompleteCommit",
    )
    assert tw.offset_fetch(gport, group, topic, [0, 1])[0] == {0: (-1, 0), 1: (-1, 0)}
    assert committed_offsets(broker, group, topic, [0, 1]) == {0: -1001, 1: -1001}

    # Nothing reached the topic: no records, no markers.
    assert list_offsets(broker, topic, [0, 1], "read_uncommitted") == {0: 0, 1: 0}
    assert values(read_partitions(broker, topic, [0, 1], "read_uncommitted", settle=0.5)) == {0: [], 1: []}


def raw_txn_setup(broker_factory, shards, partitions, args):
    """A broker, a new topic of `partitions` partitions and a transactional id
    initialised on the raw wire: (broker, topic, txn id, coordinator port,
    producer id, epoch, leader port by partition)."""
    b = broker_factory(shards=shards, args=args)
    topic = uid("txraw")
    create_topic(b, topic, partitions)
    txn_id = uid("raw")
    port = tw.txn_coordinator_port(b, txn_id)
    err, pid, epoch = tw.init_producer_id(port, txn_id)
    assert err == 0, err
    return b, topic, txn_id, port, pid, epoch, tw.leader_ports(b, topic, list(range(partitions)))


def test_unverified_transactional_write_is_refused(broker_factory):
    """KIP-890: a transactional batch for a partition that is not in the
    producer's open transaction is refused before it is appended, so it can
    never leave a transaction that no coordinator will end."""
    b, topic, txn_id, port, pid, epoch, leaders = raw_txn_setup(broker_factory, 2, 2, [])

    # Partition 0 was never added: INVALID_TXN_STATE, and nothing is written.
    batch = tw.txn_batch(pid, epoch, 0, [b"stray-0", b"stray-1"])
    r = tw.txn_produce(leaders[0], txn_id, topic, 0, batch)
    assert r.error_code == tw.INVALID_TXN_STATE, r
    assert "not in the open transaction" in (r.error_message or ""), r
    assert tw.list_offsets_latest(leaders[0], topic, [0], 0) == {0: (0, 0)}

    # Once added, the same batch goes in; committing it makes it readable.
    assert tw.add_partitions(port, txn_id, pid, epoch, topic, [0]) == {0: 0}
    r = tw.txn_produce(leaders[0], txn_id, topic, 0, batch)
    assert (r.error_code, r.base_offset) == (0, 0), r
    assert tw.end_txn(port, txn_id, pid, epoch, True) == 0
    wait_until(lambda: tw.list_offsets_latest(leaders[0], topic, [0], 1) == {0: (0, 3)}, 15, "LSO past the marker")

    # A fenced producer (its epoch bumped by a new InitProducerId) is refused
    # on a partition it never wrote: INVALID_PRODUCER_EPOCH (Produce predates
    # PRODUCER_FENCED), and nothing is written.
    err, pid2, epoch2 = tw.init_producer_id(port, txn_id)
    assert (err, pid2) == (0, pid) and epoch2 == epoch + 1, (err, pid2, epoch2)
    stale = tw.txn_batch(pid, epoch, 2, [b"zombie"])
    r = tw.txn_produce(leaders[1], txn_id, topic, 1, stale)
    assert r.error_code == tw.INVALID_PRODUCER_EPOCH, r
    assert tw.list_offsets_latest(leaders[1], topic, [1], 0) == {1: (0, 0)}
    assert values(read_partitions(b, topic, [0, 1], "read_committed", settle=0.5)) == {
        0: ["stray-0", "stray-1"],
        1: [],
    }


def test_without_verification_a_stray_write_hangs_the_partition(broker_factory):
    """The same stray write with transaction.partition.verification.enable=false
    is appended and opens a transaction that nothing ends: the last stable
    offset stays behind it (what verification prevents)."""
    _, topic, txn_id, _, pid, epoch, leaders = raw_txn_setup(
        broker_factory, 1, 1, ["--transaction.partition.verification.enable=false"]
    )
    leader = leaders[0]
    r = tw.txn_produce(leader, txn_id, topic, 0, tw.txn_batch(pid, epoch, 0, [b"stray"]))
    assert (r.error_code, r.base_offset) == (0, 0), r
    assert tw.list_offsets_latest(leader, topic, [0], 0) == {0: (0, 1)}
    assert tw.list_offsets_latest(leader, topic, [0], 1) == {0: (0, 0)}, "the stray transaction holds the LSO"


# --------------------------------------------------------------------------
# 8. FindCoordinator, DescribeTransactions, ListTransactions


def test_coordinator_describe_and_list(broker):
    topic = uid("txdesc")
    create_topic(broker, topic, 3)

    # FindCoordinator(transaction) names a broker whose InitProducerId works.
    for i in range(6):
        tid = uid("fc%d" % i)
        err, node, host, port = tw.find_coordinator(broker.port, tid, 1)
        assert err == 0 and host == "127.0.0.1" and port in broker.ports, (err, node, host, port)
        # Same answer from the other shard.
        assert tw.find_coordinator(tw.other_port(broker, broker.port), tid, 1) == (err, node, host, port)
        err, pid, epoch = tw.init_producer_id(port, tid)
        assert (err, epoch) == (0, 0) and pid >= 0, (err, pid, epoch)
        assert tw.init_producer_id(tw.other_port(broker, port), tid)[0] == tw.NOT_COORDINATOR

    txn_id = uid("desc")
    port = tw.txn_coordinator_port(broker, txn_id)
    tp = txn_producer(broker, txn_id, **{"transaction.timeout.ms": 45000})
    tp.init_transactions(60)
    st = tw.describe_transactions(port, [txn_id])[txn_id]
    assert (st.error_code, st.transaction_state, st.producer_epoch) == (0, "Empty", 0), st
    pid = st.producer_id

    tp.begin_transaction()
    produce_all(tp, topic, [(0, "d-0"), (2, "d-1")], Deliveries())
    st = tw.describe_transactions(port, [txn_id])[txn_id]
    assert (st.error_code, st.transaction_state, st.producer_id, st.transaction_timeout_ms) == (
        0,
        "Ongoing",
        pid,
        45000,
    ), st
    assert tw.partitions_of(st) == {topic: [0, 2]}
    assert st.transaction_start_time_ms > 0

    # ListTransactions: each broker lists the transactions it coordinates.
    err, listed = tw.list_transactions(port)
    assert err == 0 and listed.get(txn_id) == (pid, "Ongoing"), listed
    assert txn_id not in tw.list_transactions(tw.other_port(broker, port))[1]
    assert tw.list_transactions(port, state_filters=["Ongoing"])[1].get(txn_id) == (pid, "Ongoing")
    assert txn_id not in tw.list_transactions(port, state_filters=["CompleteCommit"])[1]
    assert tw.list_transactions(port, producer_id_filters=[pid])[1] == {txn_id: (pid, "Ongoing")}

    tp.commit_transaction(30)
    st = wait_until(
        lambda: (lambda s: s if s.transaction_state == "CompleteCommit" else None)(
            tw.describe_transactions(port, [txn_id])[txn_id]
        ),
        15,
        "CompleteCommit",
    )
    assert (st.error_code, st.producer_id) == (0, pid)
    assert tw.partitions_of(st) == {}
    assert tw.list_transactions(port, state_filters=["CompleteCommit"])[1].get(txn_id) == (pid, "CompleteCommit")
    assert txn_id not in tw.list_transactions(port, state_filters=["Ongoing"])[1]

    # Unknown id and the wrong broker.
    nobody = uid("nobody")
    nport = tw.txn_coordinator_port(broker, nobody)
    assert tw.describe_transactions(nport, [nobody])[nobody].error_code == tw.TRANSACTIONAL_ID_NOT_FOUND
    assert tw.describe_transactions(tw.other_port(broker, port), [txn_id])[txn_id].error_code == tw.NOT_COORDINATOR
